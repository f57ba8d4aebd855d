"""Gemma 4's own rules: KV-shared layers, generate's prefill slice before them, image blocks only in
sliding layers (the family battery over ``tm.ARCHS`` covers the rest)."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not tm.GEMMA4_SUPPORTED, reason="this transformers' Gemma 4 has no kv_sharing_modes: "
                                 "the adapter refuses it (test_gemma4_refusal.py)")]

LAYER = 2
FIRST_SHARED = tm.NUM_LAYERS["gemma4"] - tm.GEMMA4_SHARED      # layers 4 (sliding) and 5 (full) reuse 2 and 3


def _cfg(**kw):
    return pact_vlm.PACTConfig(**{**dict(layer=LAYER, prune_ratio=0.3, cutoff=0.3), **kw})


def _generate(model, inputs, n=5):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


def _no_cache_logits(model, inputs, generated):
    steps = []
    for s in range(generated.shape[1]):
        ext = dict(inputs)
        ext["input_ids"] = torch.cat([inputs["input_ids"], generated[:, :s]], dim=1)
        ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, :s])], dim=1)
        ext["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated[:, :s])], dim=1)
        steps.append(model(**ext, use_cache=False).logits[:, -1])
    return steps


def _rows_per_layer(model):
    """Hooks recording the rows (hidden states, per-layer input) each decoder layer receives."""
    seen = {}

    def grab(i):
        def hook(module, args, kwargs):
            pli = args[1] if len(args) > 1 else kwargs.get("per_layer_input")
            seen.setdefault(i, []).append((args[0].shape[1], pli.shape[1]))
        return hook
    return seen, [layer.register_forward_pre_hook(grab(i), with_kwargs=True)
                  for i, layer in enumerate(tm.decoder_layers(model))]


def test_the_kv_sharing_rules_are_refused_where_they_would_run_wrong():
    model = tm.build_tiny("gemma4")
    with pytest.raises(ValueError, match=r"layers \[4\] reuse the keys and values of layer\(s\) \[2\].*use layer <= 2"):
        pact_vlm.apply(model, _cfg(layer=3))
    with pytest.raises(ValueError, match="decoder layer 4 computes no keys of its own"):
        pact_vlm.apply(model, _cfg(layer=4))
    with pytest.raises(ValueError, match=r"layers 4..5 reuse earlier layers' keys.*progressive=False"):
        pact_vlm.apply(model, pact_vlm.ToMeConfig(layer=2, equivalent_layer=2))
    for layer in (0, 1, 2):
        pact_vlm.apply(model, _cfg(layer=layer)).remove()
    model.config.text_config.use_bidirectional_attention = "all"
    with pytest.raises(ValueError, match="use_bidirectional_attention='all'"):
        pact_vlm.apply(model, _cfg())
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_keeps_its_prefill_slice_and_the_shared_layers_see_the_reduced_keys(impl):
    """In prefill the KV-shared layers get only the last row (as without the reduction); they
    attend over the keys their producers hold, which the reduction shortened."""
    torch.manual_seed(0)
    model = tm.build_tiny("gemma4", impl)
    inputs = tm.make_inputs(model, "gemma4", batch=2)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        seen, hooks = _rows_per_layer(model)       # after apply: what the layers receive
        out = _generate(model, inputs)
        stats = handle.stats
        for h in hooks:
            h.remove()
        recomputed = _no_cache_logits(model, inputs, out.sequences[:, prompt:])
    reduced = stats.seq_lengths[LAYER]
    assert reduced < prompt
    prefill = {i: rows[0] for i, rows in seen.items()}
    assert prefill == {0: (prompt, prompt), 1: (prompt, prompt), 2: (reduced, reduced), 3: (reduced, reduced),
                       4: (1, 1), 5: (1, 1)}
    cache = out.past_key_values
    assert [cache.layers[i].keys.shape[-2] for i in (2, 3)] == [tm.GEMMA4_WINDOW - 1, reduced + 4]
    assert all(getattr(cache.layers[i], "keys", None) is None for i in (4, 5))
    for step, (cached, full) in enumerate(zip(out.logits, recomputed)):
        assert (cached - full).abs().max() < 1e-4, f"step {step}"


def test_a_prompt_ending_in_visual_tokens_keeps_every_row():
    """generate's slice keeps the last positions' per-layer inputs; when a reducible token is among
    them the text model is kept from slicing, and the answer is still the no-cache recompute's."""
    torch.manual_seed(0)
    model = tm.build_tiny("gemma4")
    full = tm.make_inputs(model, "gemma4")
    end = int(torch.nonzero(full["input_ids"][0] == tm.IMAGE_ID).max()) + 1     # cut after the last image token
    inputs = {k: (v[:, :end] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
              for k, v in full.items()}
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        seen, hooks = _rows_per_layer(model)       # after apply: what the layers receive
        out = _generate(model, inputs)
        reduced = handle.stats.seq_lengths[LAYER]
        for h in hooks:
            h.remove()
        recomputed = _no_cache_logits(model, inputs, out.sequences[:, end:])
        every = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert reduced < end
    assert [seen[i][0] for i in range(FIRST_SHARED, FIRST_SHARED + 2)] == [(reduced, reduced)] * 2
    for cached, want in zip(out.logits, recomputed):
        assert (cached - want).abs().max() < 1e-4
    assert last.shape == (1, 1, tm.VOCAB)
    torch.testing.assert_close(last, every[:, -1:], rtol=1e-5, atol=1e-6)


def test_without_the_vision_mode_images_attend_causally():
    """use_bidirectional_attention=None (the smaller checkpoints): no image blocks anywhere; a zero
    reduction gives the model's own logits, which it would not if blocks were applied."""
    torch.manual_seed(0)
    model = tm.build_tiny("gemma4", "eager")
    inputs = tm.make_inputs(model, "gemma4", batch=2)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        vision_mode = model(**inputs).logits
        model.config.text_config.use_bidirectional_attention = None
        want = model(**inputs).logits
        assert (vision_mode[valid] - want[valid]).abs().max() > 1e-3        # the blocks matter in this model
        with pact_vlm.apply(model, _cfg(prune_ratio=0.0, cutoff=0.0)):
            got = model(**inputs).logits
        with pact_vlm.apply(model, _cfg()) as handle:
            out = _generate(model, inputs)
            recomputed = _no_cache_logits(model, inputs, out.sequences[:, inputs["input_ids"].shape[1]:])
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert handle.stats.visual_after < handle.stats.visual_before
    for cached, full in zip(out.logits, recomputed):
        assert (cached - full).abs().max() < 1e-4


def test_a_second_turn_with_a_new_image_keeps_each_image_its_own_block():
    """Turn 1 holds one image, turn 2 adds another (generate passes mm_token_type_ids from the start
    of the sequence): per-image reduction in two turns equals one no-cache pass over both."""
    torch.manual_seed(0)
    model = tm.build_tiny("gemma4")
    full = tm.make_inputs(model, "gemma4", n_images=2)
    ids = full["input_ids"]
    second = int(torch.nonzero((ids[0] == tm.IMAGE_ID).long().diff() == 1).flatten()[-1]) + 1
    first_patches = int((full["image_position_ids"][0] >= 0).all(-1).sum())
    second_patches = int((full["image_position_ids"][1] >= 0).all(-1).sum())
    turn1 = dict(input_ids=ids[:, :second], attention_mask=full["attention_mask"][:, :second],
                 mm_token_type_ids=full["mm_token_type_ids"][:, :second],
                 pixel_values=full["pixel_values"][:1, :first_patches],
                 image_position_ids=full["image_position_ids"][:1, :first_patches])
    turn2 = dict(input_ids=ids, attention_mask=full["attention_mask"], mm_token_type_ids=full["mm_token_type_ids"],
                 pixel_values=full["pixel_values"][1:, :second_patches],
                 image_position_ids=full["image_position_ids"][1:, :second_patches])
    with torch.no_grad(), pact_vlm.apply(model, _cfg(group="image")) as handle:
        cache = model(**turn1, use_cache=True).past_key_values
        first_stats = handle.stats
        out = model.generate(**turn2, cache=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        second_stats = handle.stats
        recomputed = _no_cache_logits(model, full, out.sequences[:, ids.shape[1]:])
    assert 0 < first_stats.visual_after < first_stats.visual_before
    assert 0 < second_stats.visual_after < second_stats.visual_before
    for step, (cached, want) in enumerate(zip(out.logits, recomputed)):
        assert (cached - want).abs().max() < 1e-4, f"step {step}"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_reduction_scored_at_a_full_layer_with_its_wide_partial_rotary_keys(impl):
    """8 layers (sliding producer 5, full producer 3): the reduction at full layer 3 scores with its
    wide head (a quarter rotated); cached decode equals the no-cache recompute."""
    from pact_vlm.integration.adapters import get_adapter

    torch.manual_seed(0)
    model = tm.build_tiny("gemma4", impl, num_layers=8)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[3]
    assert adapter.layer_kind(model, 3) == "full_attention" and layer.self_attn.head_dim == 2 * tm.HEAD_DIM
    hidden = torch.randn(1, 9, tm.HIDDEN)
    cos, sin = model.model.language_model.rotary_emb(hidden, torch.arange(9)[None], "full_attention")
    with torch.no_grad():
        q, k, rk = adapter.queries_keys(layer, hidden, cos, sin)
        mean = adapter.mean_query(layer, layer.input_layernorm(hidden[0]))
    assert k.shape == rk.shape == (1, 9, 1, 2 * tm.HEAD_DIM)
    unrotated = (cos[0, :, None, :] == 1) & (sin[0, :, None, :] == 0)
    assert bool(unrotated.all(0).any()) and not bool(unrotated.all())       # partial rotary
    torch.testing.assert_close(rk[0][unrotated.expand_as(rk[0])], k[0][unrotated.expand_as(k[0])])
    torch.testing.assert_close(mean, q[0].float().mean(0), rtol=1e-5, atol=1e-6)
    inputs = tm.make_inputs(model, "gemma4", batch=2)
    with torch.no_grad(), pact_vlm.apply(model, _cfg(layer=3)) as handle:
        out = _generate(model, inputs)
        recomputed = _no_cache_logits(model, inputs, out.sequences[:, inputs["input_ids"].shape[1]:])
    assert handle.stats.visual_after < handle.stats.visual_before
    for step, (cached, want) in enumerate(zip(out.logits, recomputed)):
        assert (cached - want).abs().max() < 1e-4, f"step {step}"
