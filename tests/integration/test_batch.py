"""Batches: per-sample reduction, re-packing, and the same answers as running each sample alone."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm

LAYER = 2
SIZES = {   # per arch: four samples, different image sizes, one without image
    "qwen": [(32, 48), None, (48, 32), (40, 40)],
    "anyres": [(32, 64), None, (64, 64), (64, 32)],
    "fixed": [(0, 0), None, (0, 0), (0, 0)],
    "tiles": [(128, 128), None, (64, 128), (64, 64)],
}


def _sizes(arch):
    kind = ("qwen" if arch in tm.QWEN_ARCHS + ("mistral3", "gemma4") else "anyres" if arch in tm.ANYRES_ARCHS
            else "tiles" if arch in tm.TILED_ARCHS else "fixed")
    return SIZES[kind]


def _left_pad(x, length, value):
    pad = torch.full((x.shape[0], length - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([pad, x], dim=1)


def collate(samples):
    """Batch single-sample inputs: left padding for sequences, images concatenated."""
    length = max(s["input_ids"].shape[1] for s in samples)
    batch = {}
    for key, value in (("input_ids", tm.PAD_ID), ("attention_mask", 0), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
        if key in samples[0]:
            batch[key] = torch.cat([_left_pad(s[key], length, value) for s in samples])
    with_pixels = [s for s in samples if "pixel_values" in s]
    if with_pixels:
        pv = [s["pixel_values"] for s in with_pixels]
        if pv[0].dim() == 5:    # anyres: [images, tiles, C, H, W], tiles padded to the max
            tiles = max(p.shape[1] for p in pv)
            pv = [torch.cat([p, p.new_zeros(p.shape[0], tiles - p.shape[1], *p.shape[2:])], dim=1) for p in pv]
        elif pv[0].dim() == 4:  # images of different sizes (Mistral 3): zero-padded to the largest
            h, w = max(p.shape[2] for p in pv), max(p.shape[3] for p in pv)
            pv = [torch.nn.functional.pad(p, (0, w - p.shape[3], 0, h - p.shape[2])) for p in pv]
        elif "image_position_ids" in with_pixels[0]:    # Gemma 4: patches padded to the longest, positions -1
            n = max(p.shape[1] for p in pv)
            pv = [torch.nn.functional.pad(p, (0, 0, 0, n - p.shape[1])) for p in pv]
            batch["image_position_ids"] = torch.cat([torch.nn.functional.pad(
                s["image_position_ids"], (0, 0, 0, n - s["image_position_ids"].shape[1]), value=-1) for s in with_pixels])
        batch["pixel_values"] = torch.cat(pv)
        for key in ("image_sizes", "image_grid_thw"):
            if key in with_pixels[0]:
                batch[key] = torch.cat([s[key] for s in with_pixels])
    return batch


def _samples(model, arch):
    out = []
    for b, size in enumerate(_sizes(arch)):
        if size is None:
            out.append(tm.make_inputs(model, arch, with_image=False, seed=b, text_len=6 + b))
        elif size == (0, 0):
            out.append(tm.make_inputs(model, arch, seed=b, text_len=6 + b))
        else:
            out.append(tm.make_inputs(model, arch, image_sizes=[size], seed=b, text_len=6 + b))
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_batch_equals_each_sample_alone(arch, impl):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, impl)
    samples = _samples(model, arch)
    batch = collate(samples)
    cfg = pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.3, cutoff=0.3)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        batched = model.generate(**batch, **gen)
        batch_stats = handle.stats
        alone = []
        for s in samples:
            alone.append((model.generate(**s, **gen), handle.stats))
    prompt = batch["input_ids"].shape[1]
    assert len(batch_stats.per_sample) == 4
    assert batch_stats.visual_before == sum(st.visual_before for _, st in alone)
    for b, (out, st) in enumerate(alone):
        assert batch_stats.per_sample[b]["visual_before"] == st.visual_before
        assert batch_stats.per_sample[b]["visual_after"] == st.visual_after
        assert torch.equal(batched.sequences[b, prompt:], out.sequences[0, s_len(samples[b]):])
        for step, (lb, la) in enumerate(zip(batched.logits, out.logits)):
            assert (lb[b] - la[0]).abs().max() < 1e-4, f"sample {b} step {step}"
    assert batch_stats.per_sample[1]["visual_before"] == 0


def s_len(sample):
    return sample["input_ids"].shape[1]


@pytest.mark.parametrize("method", ["pact", "euti"])
def test_prefix_context_leaves_padding_rows_out(method):
    """EUTI over every token up to the last visual one: rows of left padding are no tokens, so the
    reducer gives on a padded sample what it gives on the sample alone."""
    from pact_vlm.methods import REDUCERS, SampleContext

    cfg = (pact_vlm.PACTConfig(layer=0, prune_ratio=0.5, cutoff=0.3, euti_context="prefix") if method == "pact"
           else pact_vlm.EUTIConfig(layer=0, prune_ratio=0.5, euti_context="prefix"))
    g = torch.Generator().manual_seed(0)
    t, d, heads, kv, dh = 14, 16, 4, 2, 8
    hidden, queries = torch.randn(t, d, generator=g), torch.randn(t, heads, dh, generator=g)
    keys, rotated = torch.randn(t, kv, dh, generator=g), torch.randn(t, kv, dh, generator=g)
    vis = torch.arange(3, 13)

    def reduce(pad):
        def padded(x):          # padding rows with large values that would dominate any mean
            return torch.cat([100 * torch.randn(pad, *x.shape[1:], generator=g), x])
        q = padded(queries)
        ctx = SampleContext(padded(hidden), None, padded(keys), padded(rotated), vis + pad,
                            torch.zeros(vis.numel(), dtype=torch.long),
                            real=torch.arange(t + pad) >= pad, mean_query=lambda rows: q[rows].mean(dim=0))
        return REDUCERS[type(cfg)](ctx, cfg)

    alone, with_padding = reduce(0), reduce(6)
    assert torch.equal(alone.keep_index, with_padding.keep_index)
    assert torch.equal(alone.labels, with_padding.labels)
    torch.testing.assert_close(alone.hidden, with_padding.hidden)


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "internvl"])
def test_layers_after_l_run_on_fewer_tokens(arch):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    batch = tm.make_inputs(model, arch, batch=3)
    layers = model.model.language_model.layers
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).shape[1]))
             for i, layer in enumerate(layers)]
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.4, cutoff=0.4)) as h:
        model(**batch)
    for hk in hooks:
        hk.remove()
    t = batch["input_ids"].shape[1]
    assert [seen[i] for i in range(LAYER)] == [t] * LAYER
    assert all(seen[i] < t for i in range(LAYER, len(layers)))
    assert [seen[i] for i in range(len(layers))] == h.stats.seq_lengths
    assert all(s["visual_after"] < s["visual_before"] for s in h.stats.per_sample)
