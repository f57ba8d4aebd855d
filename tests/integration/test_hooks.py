"""apply() on tiny random-weight models of every supported class, sdpa and eager."""

from __future__ import annotations


import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.integration import get_adapter

BACKENDS = ["sdpa", "eager"]
LAYER = 2


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch, impl):
        if (arch, impl) not in cache:
            torch.manual_seed(0)
            cache[arch, impl] = tm.build_tiny(arch, impl)
        return cache[arch, impl]
    return get


def _cfg(**kw):
    base = dict(layer=LAYER, prune_ratio=0.3, cutoff=0.3, alpha=1.5)
    base.update(kw)
    return pact_vlm.PACTConfig(**base)


def _generate(model, inputs, n=8, **kw):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out


def _extend(inputs, new_ids):
    """inputs for the prompt followed by new_ids [B, k] (text tokens)."""
    ext = dict(inputs)
    b, k = new_ids.shape
    ext["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
    ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(b, k, dtype=torch.long)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            ext[key] = torch.cat([inputs[key], torch.zeros(b, k, dtype=torch.long)], dim=1)
    return ext


def _no_cache_logits(model, inputs, generated):
    """Logits of each generation step, recomputing the whole sequence without a cache."""
    steps = []
    for s in range(generated.shape[1]):
        ext = _extend(inputs, generated[:, :s])
        steps.append(model(**ext, use_cache=False).logits[:, -1].float())
    return steps


# -- identity and undo ------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_zero_reduction_is_identity_and_remove_is_exact(models, arch, impl):
    model = models(arch, impl)
    inputs = tm.make_inputs(model, arch)
    forwards = [m.forward for m in model.modules()]
    with torch.no_grad():
        ref = model(**inputs).logits
        with pact_vlm.apply(model, _cfg(prune_ratio=0.0, cutoff=0.0)) as handle:
            out = model(**inputs).logits
        stats = handle.stats
        after = model(**inputs).logits
    assert stats.visual_before > 0 and stats.visual_after == stats.visual_before
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(after, ref)
    assert [m.forward for m in model.modules()] == forwards
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_apply_twice_and_unsupported_input_are_refused(models):
    model = models("qwen2_vl", "sdpa")
    with pact_vlm.apply(model, _cfg()):
        with pytest.raises(ValueError, match="already applied"):
            pact_vlm.apply(model, _cfg())
    with pytest.raises(ValueError, match="layer=9 but the model has 4 decoder layers"):
        pact_vlm.apply(model, _cfg(layer=9))
    with pytest.raises(ValueError, match="not supported; supported classes: .*Qwen2VLForConditionalGeneration"):
        pact_vlm.apply(torch.nn.Linear(2, 2), _cfg())
    with pytest.raises(TypeError, match="PACTConfig"):
        pact_vlm.apply(model, {"layer": 2})


@pytest.mark.parametrize("arch", tm.DEEPSTACK_ARCHS)
def test_a_layer_receiving_deepstack_features_is_refused(models, arch):
    model = models(arch, "sdpa")
    with pytest.raises(ValueError, match=r"layers 0..1 receive deepstack visual features; use layer >= 2"):
        pact_vlm.apply(model, _cfg(layer=1))
    pact_vlm.apply(model, _cfg(layer=2)).remove()


def test_qwen3_5_reduces_only_where_it_is_valid(models):
    """Qwen3.5 (linear layers 0 and 3, full layers 1 and 2): the first full layer keeps every token
    (transformers reads the decode positions from its cache), a reduction is scored at a full
    layer, and a progressive method would reduce at a linear layer: each refused with its reason."""
    model = models("qwen3_5", "sdpa")
    with pytest.raises(ValueError, match=r"layers 0..1 include the first full-attention layer, whose cache length "
                                         r"sets every decode position .* use layer >= 2"):
        pact_vlm.apply(model, _cfg(layer=1))
    with pytest.raises(ValueError, match=r"decoder layer 3 is a 'linear_attention' layer \(a recurrent state, no "
                                         r"softmax attention\).*one of \[2\]"):
        pact_vlm.apply(model, _cfg(layer=3))
    with pytest.raises(ValueError, match=r"decoder layer 3 is a 'linear_attention' layer.*use progressive=False"):
        pact_vlm.apply(model, pact_vlm.ToMeConfig(layer=2, equivalent_layer=2))
    pact_vlm.apply(model, _cfg(layer=2)).remove()


def test_static_cache_and_flash_attention_are_refused(models):
    model = models("llava", "sdpa")
    inputs = tm.make_inputs(model, "llava")
    with pact_vlm.apply(model, _cfg()):
        with pytest.raises(ValueError, match="StaticCache is not supported"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    torch.manual_seed(0)
    flash = tm.build_tiny("llava", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    flash.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' needs the 'flash_attn' package, which is not installed"):
        pact_vlm.apply(flash, _cfg())


def test_newline_tokens_are_never_reduced(models):
    for arch in ("llava_onevision", "llava_next"):
        model = models(arch, "sdpa")
        inputs = tm.make_inputs(model, arch)
        kinds = tm.image_token_kinds(model, arch, inputs)[0]
        newline = [i for i, k in enumerate(kinds) if k == "newline"]
        image = [i for i, k in enumerate(kinds) if k in ("base", "tile")]
        assert newline
        with torch.no_grad(), pact_vlm.apply(model, _cfg(prune_ratio=0.5, cutoff=0.5)) as handle:
            model(**inputs)
        kept = set(handle.stats.per_sample[0]["kept_positions"].tolist())
        assert handle.stats.visual_before == len(image)
        assert set(newline) <= kept
        assert handle.stats.visual_after < len(image)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_mean_query_equals_mean_of_every_query(models, arch):
    """EUTI's mean query from one row through q_proj (Qwen3: every row, its q_norm is not affine)."""
    model = models(arch, "sdpa")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[LAYER]
    hidden = torch.randn(1, 9, model.config.get_text_config().hidden_size)
    head_dim = layer.self_attn.head_dim
    cos, sin = torch.ones(1, 9, head_dim), torch.zeros(1, 9, head_dim)
    with torch.no_grad():
        q, _, _ = adapter.queries_keys(layer, hidden, cos, sin)
        rows = torch.tensor([1, 2, 5, 8])
        got = adapter.mean_query(layer, layer.input_layernorm(hidden[0][rows]))
        assert adapter.queries_keys(layer, hidden, cos, sin, queries=False)[0] is None
    torch.testing.assert_close(got, q[0][rows].float().mean(dim=0), rtol=1e-5, atol=1e-6)


# -- layer-L equivalence ----------------------------------------------------------------------------

@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "internvl"])
def test_layer_l_output_equals_unpatched_layer_on_hand_reduced_sequence(models, arch, impl, proportional):
    model = models(arch, impl)
    inputs = tm.make_inputs(model, arch)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[LAYER]
    cfg = _cfg(proportional_attention=proportional, prune_ratio=0.4, cutoff=0.4)

    # the layer's input and its queries / keys by hand, from the layer's own modules
    hidden, kw, q, k, _, rk = tm.layer_input_by_hand(model, inputs, LAYER)
    cos, sin = (x.expand(1, -1, -1)[0] for x in kw["position_embeddings"])
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(adapter.visual_token_ids(model.config)))
    if adapter.newline(model) is not None:
        kinds = tm.image_token_kinds(model, arch, inputs)[0]
        visual &= torch.tensor([kd != "newline" for kd in kinds])
    vidx = torch.nonzero(visual).flatten()
    with torch.no_grad():
        red = pact_vlm.pact_reduce(hidden, q, k, rk, visual_index=vidx, prune_ratio=0.4, cutoff=0.4)
    keep = torch.cat([torch.nonzero(~visual).flatten(), vidx[red.keep_index]]).sort()
    new_hidden = torch.cat([hidden[~visual], red.hidden])[keep.indices]
    sizes = torch.cat([torch.ones(int((~visual).sum())), red.sizes])[keep.indices]
    pos = keep.values
    mask = torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(torch.float32).min)
    if proportional:
        mask = torch.where(pos[None, :] <= pos[:, None], sizes.log()[None, :], mask)
    want_kw = dict(kw, attention_mask=mask[None, None], cache=None, use_cache=False,
                   position_embeddings=(cos[pos][None], sin[pos][None]))
    want_kw.pop("past_key_values", None)
    if kw.get("position_ids") is not None:
        want_kw["position_ids"] = kw["position_ids"][..., pos]
    with torch.no_grad():
        want = layer(new_hidden[None], **want_kw)
    want = want[0] if isinstance(want, tuple) else want

    got = {}
    post = layer.register_forward_hook(lambda m, a, o: got.update(out=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs)
    post.remove()
    assert handle.stats.visual_after == red.num_after < red.num_before
    torch.testing.assert_close(got["out"], want, atol=1e-5, rtol=1e-5)


# -- cached generate == no-cache recompute ----------------------------------------------------------

@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_cached_generate_equals_no_cache_recompute(models, arch, impl, proportional):
    model = models(arch, impl)
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad(), pact_vlm.apply(model, _cfg(proportional_attention=proportional)) as handle:
        out = _generate(model, inputs)
        stats = handle.stats
        generated = out.sequences[:, inputs["input_ids"].shape[1]:]
        recomputed = _no_cache_logits(model, inputs, generated)
    assert 0 < stats.visual_after < stats.visual_before
    assert generated.shape[1] == 8
    for step, (cached, full) in enumerate(zip(out.logits, recomputed)):
        assert (cached.float() - full).abs().max() < 1e-4, f"step {step}"
        assert torch.equal(cached.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_kv_cache_lengths_follow_the_reduction(models, arch):
    model = models(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        out = _generate(model, inputs, n=4)
    stats = handle.stats
    cache = out.past_key_values
    # Qwen3.5: linear layers hold states; Gemma 4: KV-shared layers hold nothing (they reuse earlier layers' keys)
    kv = [i for i, cl in enumerate(cache.layers) if getattr(cl, "keys", None) is not None]
    assert len(kv) == (2 if arch in tm.HYBRID_ARCHS else len(cache.layers) - (tm.GEMMA4_SHARED if arch == "gemma4"
                                                                               else 0))
    lengths = [cache.layers[i].keys.shape[-2] if i in kv else None for i in range(len(cache.layers))]
    reduced = prompt - (stats.visual_before - stats.visual_after)
    # sliding-window layers keep only the last window - 1 entries
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    kinds = [get_adapter(model).layer_kind(model, i) for i in range(len(lengths))]

    def held(n, i):
        return min(n, window - 1) if kinds[i] == "sliding_attention" else n
    # the cache holds the prompt and the 3 tokens fed back while generating 4
    assert lengths[:LAYER] == [held(prompt + 3, i) if i in kv else None for i in range(LAYER)]
    assert lengths[LAYER:] == [held(reduced + 3, i) if i in kv else None for i in range(LAYER, len(lengths))]
    assert stats.seq_lengths == [prompt] * LAYER + [reduced] * (len(lengths) - LAYER)
    assert cache.get_seq_length() == prompt + 3


# -- several images, video, several turns -----------------------------------------------------------

@pytest.mark.parametrize("group", ["sample", "image"])
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_multi_image(models, arch, group):
    model = models(arch, "sdpa")
    inputs = tm.make_inputs(model, arch, n_images=2)
    with torch.no_grad(), pact_vlm.apply(model, _cfg(group=group)) as handle:
        out = _generate(model, inputs, n=6)
        generated = out.sequences[:, inputs["input_ids"].shape[1]:]
        recomputed = _no_cache_logits(model, inputs, generated)
    labels = handle.stats.per_sample[0]["labels"]
    assert handle.stats.visual_after < handle.stats.visual_before
    for cached, full in zip(out.logits, recomputed):
        assert (cached.float() - full).abs().max() < 1e-4
    if group == "image":
        # no cluster spans two images
        # no cluster spans two images, and newline rows do not split an image into groups
        ids = inputs["input_ids"][0]
        adapter = get_adapter(model)
        placeholders = torch.isin(ids, torch.tensor(adapter.visual_token_ids(model.config)))
        visual = placeholders.clone()
        if adapter.newline(model) is not None:
            kinds = tm.image_token_kinds(model, arch, inputs)[0]
            visual &= torch.tensor([kd != "newline" for kd in kinds])
        groups = tm.image_index(arch, ids)[visual]
        assert groups.unique().tolist() == [0, 1]
        joined = labels >= 0
        assert torch.equal(groups[joined], groups[labels[joined]])
        if arch == "llava_next":     # its tile grids have a newline per row: clusters cross rows
            rows = (~visual & placeholders).long().cumsum(0)[visual]
            assert bool((rows[joined] != rows[labels[joined]]).any())


@pytest.mark.parametrize("arch", tm.VIDEO_ARCHS)
def test_video(models, arch):
    model = models(arch, "sdpa")
    inputs = tm.make_inputs(model, arch, video=True)
    video_id = getattr(model.config, "video_token_id", None)
    n_video = int((inputs["input_ids"] == video_id).sum())
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        out = _generate(model, inputs, n=6)
        generated = out.sequences[:, inputs["input_ids"].shape[1]:]
        recomputed = _no_cache_logits(model, inputs, generated)
    assert handle.stats.visual_before >= n_video - 16 > 0    # video tokens (minus newlines) are counted
    assert handle.stats.visual_after < handle.stats.visual_before
    for cached, full in zip(out.logits, recomputed):
        assert (cached.float() - full).abs().max() < 1e-4


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_multi_turn_text_follow_up(models, arch):
    """A second generate() continuing from the returned cache equals recomputing everything."""
    model = models(arch, "sdpa")
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad(), pact_vlm.apply(model, _cfg()):
        first = _generate(model, inputs, n=4)
        follow = torch.randint(tm.TEXT_LO, tm.TEXT_HI, (1, 3), generator=torch.Generator().manual_seed(5))
        turn2 = _extend(inputs, torch.cat([first.sequences[:, inputs["input_ids"].shape[1]:], follow], dim=1))
        # the image is in the cache already: the follow-up carries no pixels
        text_only = {k: v for k, v in turn2.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        second = _generate(model, text_only, n=4, **{tm.CACHE_KWARG: first.past_key_values})
        generated = second.sequences[:, turn2["input_ids"].shape[1]:]
        recomputed = _no_cache_logits(model, turn2, generated)
    for cached, full in zip(second.logits, recomputed):
        assert (cached.float() - full).abs().max() < 1e-4


def test_cache_filled_without_the_reduction_is_refused(models):
    model = models("llava", "sdpa")
    inputs = tm.make_inputs(model, "llava")
    with torch.no_grad():
        first = _generate(model, inputs, n=2)
        with pact_vlm.apply(model, _cfg()):
            turn2 = _extend(inputs, first.sequences[:, inputs["input_ids"].shape[1]:])
            with pytest.raises(ValueError, match="filled without the reduction"):
                model.generate(input_ids=turn2["input_ids"], attention_mask=turn2["attention_mask"],
                               max_new_tokens=2, **{tm.CACHE_KWARG: first.past_key_values})


@pytest.mark.parametrize("arch", ["llava", "internvl"])
def test_multi_turn_with_a_new_image(models, arch):
    """Turn 1 holds one image, turn 2 adds another, reduced in its own turn; with per-image
    grouping this equals reducing both images in one no-cache pass."""
    model = models(arch, "sdpa")
    full = tm.make_inputs(model, arch, n_images=2)
    ids = full["input_ids"]
    image_id = get_adapter(model).visual_token_ids(model.config)[0]
    is_image = (ids[0] == image_id).long()
    second_start = int(torch.nonzero(is_image.diff() == 1).flatten()[-1]) + 1   # first token of image 2
    with torch.no_grad(), pact_vlm.apply(model, _cfg(group="image")) as handle:
        cache = model(input_ids=ids[:, :second_start], attention_mask=full["attention_mask"][:, :second_start],
                      pixel_values=full["pixel_values"][:1], use_cache=True).past_key_values
        first_stats = handle.stats
        out = _generate(model, dict(input_ids=ids, attention_mask=full["attention_mask"],
                                    pixel_values=full["pixel_values"][1:]), n=5, **{tm.CACHE_KWARG: cache})
        second_stats = handle.stats
        generated = out.sequences[:, ids.shape[1]:]
        recomputed = _no_cache_logits(model, full, generated)
    assert first_stats.visual_before == second_stats.visual_before == int(is_image.sum()) // 2
    assert second_stats.visual_after < second_stats.visual_before
    for cached, fullpass in zip(out.logits, recomputed):
        assert (cached.float() - fullpass).abs().max() < 1e-4


def _tiny_refused(kind):
    import transformers

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    assert kind == "llama4"
    text.update(num_local_experts=2, intermediate_size_mlp=128)
    vision.update(image_size=32, patch_size=8, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=64, rope_theta=10000)
    config, cls = transformers.Llama4Config(text_config=text, vision_config=vision), \
        transformers.Llama4ForConditionalGeneration
    torch.manual_seed(0)
    return cls._from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("kind, reason", [("llama4", r"Llama 4 \(Llama4ForConditionalGeneration\) is not supported: "
                                                     r"its chunked-attention layers")])
def test_unsupported_families_are_refused_with_their_reason(kind, reason):
    model = _tiny_refused(kind)
    with pytest.raises(ValueError, match=reason):
        pact_vlm.apply(model, _cfg())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert type(model).__name__ not in pact_vlm.integration.adapters.supported_models()
