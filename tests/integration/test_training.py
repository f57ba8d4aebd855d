"""Gradients through the reduction, losses with labels, right-padded batches, assisted generation."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.integration import get_adapter

LAYER = 2


def _cfg(**kw):
    return pact_vlm.PACTConfig(**{**dict(layer=LAYER, prune_ratio=0.3, cutoff=0.3), **kw})


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3", "qwen3_5"])
def test_an_identity_reduction_gives_the_unreduced_gradients(arch):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    projector = [p for n, p in model.named_parameters() if "projector" in n or "merger" in n or "connector" in n
                 or "embed_vision" in n]
    assert projector

    def grads():
        model.zero_grad()
        model(**inputs).logits.float().pow(2).mean().backward()
        return [p.grad.clone() for p in projector]

    want = grads()
    with pact_vlm.apply(model, _cfg(prune_ratio=0.0, cutoff=0.0)):
        got = grads()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3", "qwen3_5"])
def test_gradients_flow_through_the_merged_means(arch):
    """d loss / d (layer L's input) of a member = d loss / d (its merged token) / cluster size;
    a dropped token gets none; text rows pass theirs through; the vision tower gets gradients."""
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    layer = get_adapter(model).layers(model)[LAYER]
    seen = {}

    def before(module, args, kwargs):              # registered before apply: the un-reduced input
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        seen["in"] = h

    def after(module, args, kwargs):                # registered after apply: the reduced input
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        seen["reduced"] = h

    hooks = [layer.register_forward_pre_hook(before, with_kwargs=True)]
    with pact_vlm.apply(model, _cfg(prune_ratio=0.4, cutoff=0.4)) as handle:
        hooks.append(layer.register_forward_pre_hook(after, with_kwargs=True))
        model(**inputs).logits.float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    stats = handle.stats.per_sample[0]
    assert handle.stats.visual_after < handle.stats.visual_before
    g_in, g_red = seen["in"].grad[0], seen["reduced"].grad[0]
    rows = {int(p): r for r, p in enumerate(stats["kept_positions"].tolist())}
    ids = inputs["input_ids"][0]
    placeholders = get_adapter(model).placeholders(model.config, ids[None])[0]
    visual_pos = torch.nonzero(placeholders).flatten()
    if get_adapter(model).newline(model) is not None:
        kinds = tm.image_token_kinds(model, arch, inputs)[0]
        visual_pos = torch.tensor([p for p in visual_pos.tolist() if kinds[p] != "newline"])
    labels = stats["labels"]
    sizes = torch.bincount(labels[labels >= 0], minlength=labels.numel())
    for k, pos in enumerate(visual_pos.tolist()):
        rep = int(labels[k])
        if rep < 0:
            assert not g_in[pos].any()
        else:
            torch.testing.assert_close(g_in[pos], g_red[rows[int(visual_pos[rep])]] / sizes[rep], rtol=1e-4, atol=1e-8)
    text = [p for p in range(ids.numel()) if not bool(placeholders[p])]
    for pos in text:
        torch.testing.assert_close(g_in[pos], g_red[rows[pos]], rtol=1e-4, atol=1e-8)
    vision = [p.grad for n, p in model.named_parameters() if ("vision" in n or "visual" in n) and p.grad is not None]
    assert vision and any(bool(g.abs().sum() > 0) for g in vision)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3", "qwen3_5"])
def test_labels_give_the_loss_over_the_targets_that_survive(arch):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch, batch=2)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]           # the answer: the last text tokens
    with torch.no_grad():
        stock = model(**inputs, labels=labels).loss
        with pact_vlm.apply(model, _cfg(prune_ratio=0.0, cutoff=0.0)):
            identity = model(**inputs, labels=labels).loss
        with pact_vlm.apply(model, _cfg()) as handle:
            out = model(**inputs, labels=labels)
            logits = model(**inputs).logits
    torch.testing.assert_close(identity, stock, rtol=1e-5, atol=1e-6)
    # by hand: each row predicts the token after its original position
    total, count = 0.0, 0
    for i, sample in enumerate(handle.stats.per_sample):
        positions = sample["kept_positions"]
        rows = logits[i, logits.shape[1] - positions.numel():]
        for r, p in enumerate(positions.tolist()):
            if p + 1 < labels.shape[1] and labels[i, p + 1] != -100:
                total = total + torch.nn.functional.cross_entropy(rows[r].float()[None], labels[i, p + 1][None])
                count += 1
    assert count == 2 * 3
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)
    assert handle.stats.visual_after < handle.stats.visual_before


def test_a_target_predicted_by_a_removed_token_is_refused():
    torch.manual_seed(0)
    model = tm.build_tiny("llava", "sdpa")
    inputs = tm.make_inputs(model, "llava")
    labels = inputs["input_ids"].clone()                    # every token a target, visual ones too
    with torch.no_grad(), pact_vlm.apply(model, _cfg(prune_ratio=0.5, cutoff=0.5)):
        with pytest.raises(ValueError, match=r"is predicted by position \d+, a visual token the reduction removed"):
            model(**inputs, labels=labels)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_a_right_padded_batch_gets_its_logits_at_the_input_positions(arch):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    left = tm.make_inputs(model, arch, batch=2)
    pad = (left["attention_mask"] == 0).sum(1)
    right = dict(left)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in left:
            right[key] = torch.stack([torch.roll(left[key][i], -int(pad[i])) for i in range(2)])
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        packed = model(**left).logits
        at_positions = model(**right).logits
    t = left["input_ids"].shape[1]
    assert packed.shape[1] < t and at_positions.shape[1] == t
    for i in range(2):
        last = t - 1 - int(pad[i])
        torch.testing.assert_close(at_positions[i, last], packed[i, -1], rtol=1e-4, atol=1e-5)
        kept = handle.stats.per_sample[i]["kept_positions"]
        missing = torch.ones(t, dtype=torch.bool)
        missing[kept] = False
        assert bool(missing.any()) and bool(at_positions[i, missing].isnan().all())
        assert not bool(at_positions[i, kept].isnan().any())


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3"])   # Qwen3.5: transformers
# refuses assisted generation for models with a recurrent state
def test_assisted_generation_crops_the_reduced_cache_and_keeps_the_answer(arch, monkeypatch):
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    crops = []
    original = DynamicCache.crop

    def crop(self, tokens_to_remove):
        crops.append(tokens_to_remove)
        return original(self, tokens_to_remove)

    monkeypatch.setattr(DynamicCache, "crop", crop)
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad(), pact_vlm.apply(model, _cfg()):
        greedy = model.generate(**inputs, **gen)
        lookup = model.generate(**inputs, prompt_lookup_num_tokens=3, **gen)
        assisted = model.generate(**inputs, assistant_model=tm.build_tiny(arch, "sdpa", seed=1), **gen)
    assert any(n < 0 for n in crops)             # rejected candidates were cropped from the reduced cache
    assert torch.equal(lookup, greedy) and torch.equal(assisted, greedy)


_METHODS = [
    ("llava", lambda: pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.3, cutoff=0.3)),
    ("llava", lambda: pact_vlm.EUTIConfig(layer=LAYER, prune_ratio=0.4)),
    ("llava", lambda: pact_vlm.DBDPCConfig(layer=LAYER, cutoff=0.3)),
    ("llava", lambda: pact_vlm.FastVConfig(layer=LAYER, keep_ratio=0.5)),
    ("llava", lambda: pact_vlm.VTWConfig(layer=LAYER, equivalent_layer=1)),
    ("llava", lambda: pact_vlm.ToMeConfig(layer=1, r=4, equivalent_layer=1)),
    ("llava", lambda: pact_vlm.RandomConfig(layer=LAYER, keep_ratio=0.5)),
    ("llava", lambda: pact_vlm.PoolingConfig(layer=LAYER, stride=2)),
    ("llava", lambda: pact_vlm.AgglomerativeConfig(layer=LAYER, keep_ratio=0.4)),
    ("llava", lambda: pact_vlm.KMeansConfig(layer=LAYER, keep_ratio=0.4)),
    ("llava", lambda: pact_vlm.DPCConfig(layer=LAYER, keep_ratio=0.4)),
    ("llava", lambda: pact_vlm.DBSCANConfig(layer=LAYER, eps=0.3, min_samples=2)),
    ("llava_next", lambda: pact_vlm.PruMergeConfig(keep_ratio=0.4)),
    ("llava_next", lambda: pact_vlm.HiREDConfig(keep_ratio=0.4)),
    ("llava_next", lambda: pact_vlm.VisionZipConfig(keep_ratio=0.4)),
    ("llava", lambda: pact_vlm.DivPruneConfig(keep_ratio=0.4)),
    ("qwen2_vl", lambda: pact_vlm.DivPruneConfig(keep_ratio=0.4)),
    ("llava", lambda: pact_vlm.DARTConfig(layer=LAYER, keep_ratio=0.4)),
    ("qwen2_vl", lambda: pact_vlm.DARTConfig(layer=LAYER, keep_ratio=0.4)),
]


@pytest.mark.parametrize("arch, make", _METHODS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(_METHODS)])
def test_every_method_runs_with_gradients_and_gives_the_same_values(arch, make):
    """With gradients on, the merged states are recomputed from the layer's input: the values must
    be those the method returned (the integration refuses a method whose states are not the
    mean of their members)."""
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    with pact_vlm.apply(model, make()) as handle:
        with torch.no_grad():
            want = model(**inputs).logits
        got = model(**inputs).logits
        got.float().pow(2).mean().backward()
    assert handle.stats.visual_after < handle.stats.visual_before
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
