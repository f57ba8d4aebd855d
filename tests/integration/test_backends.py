"""Every attention backend gives the same answers over a reduced sequence, on every family; a backend
switched after apply() is followed; proportional attention never needs a dense float mask."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.integration import get_adapter

LAYER = 2


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers compiles flex_attention for the layers before the reduction; on these CPU
    machines torch 2.13's inductor fails on some shapes even without pact-vlm (a C++ compile
    error at batch 2), so the model's own flex runs uncompiled here (our route never compiles on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    import transformers.integrations.flex_attention as hf_flex

    def uncompiled(query, key, value, training=False, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


def _backends(arch):
    cls = tm.model_class(arch)
    return ["sdpa", "eager"] + (["flex_attention"] if cls._supports_flex_attn else [])


def _run(model, inputs, n=3):
    """Logits of a padded batch's prefill + decode, then of a second turn continuing the cache."""
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)
    first = model.generate(**inputs, **gen)
    b = inputs["input_ids"].shape[0]
    follow = torch.randint(tm.TEXT_LO, tm.TEXT_HI, (b, 3), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([first.sequences, follow], dim=1)
    turn2 = {"input_ids": ids, "attention_mask": torch.cat([inputs["attention_mask"],
                                                           torch.ones(b, ids.shape[1] - inputs["input_ids"].shape[1],
                                                                      dtype=torch.long)], dim=1)}
    if "mm_token_type_ids" in inputs:
        turn2["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                torch.zeros(b, ids.shape[1] - inputs["input_ids"].shape[1],
                                                            dtype=torch.long)], dim=1)
    second = model.generate(**turn2, **{tm.CACHE_KWARG: first.past_key_values}, **gen)
    return torch.stack(first.logits + second.logits)


@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_backends_agree_in_prefill_decode_and_a_second_turn(arch, proportional, eager_flex):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    inputs = tm.make_inputs(model, arch, batch=2)
    cfg = pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.3, cutoff=0.3, proportional_attention=proportional)
    results = {}
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        for backend in _backends(arch):
            model.set_attn_implementation(backend)
            results[backend] = _run(model, inputs)
            assert handle.stats.visual_after < handle.stats.visual_before
    model.set_attn_implementation("sdpa")
    for backend, logits in results.items():
        assert (logits - results["sdpa"]).abs().max() < 1e-5, backend


def test_a_backend_switched_after_apply_is_followed_or_refused(eager_flex):
    from transformers import AttentionInterface

    torch.manual_seed(0)
    model = tm.build_tiny("llava", "sdpa")
    inputs = tm.make_inputs(model, "llava", batch=2)
    cfg = pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.3, cutoff=0.3)
    with torch.no_grad(), pact_vlm.apply(model, cfg):
        want = model(**inputs).logits
        model.set_attn_implementation("flex_attention")
        got = model(**inputs).logits
        AttentionInterface.register("my_kernel", lambda *a, **k: None)
        model.set_attn_implementation("my_kernel")
        with pytest.raises(ValueError, match="'my_kernel' is not supported with a reduction"):
            model(**inputs)
    model.set_attn_implementation("sdpa")
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "gemma3"])
def test_no_dense_float_mask_enters_sdpa(arch, monkeypatch):
    """An unpadded prefill and its decode steps run causal by is_causal (SDPA may pick its flash
    kernel); a padded batch gets a boolean mask at most. Never a float [B, 1, q, kv] bias."""
    seen = []          # (called from pact-vlm's route, the mask)
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        ours = sys._getframe(1).f_globals.get("__name__") == "pact_vlm.integration.attention"
        seen.append((ours, kwargs.get("attn_mask", args[3] if len(args) > 3 else None)))
        return original(*args, **kwargs)

    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    cfg = pact_vlm.PACTConfig(layer=LAYER, prune_ratio=0.3, cutoff=0.3)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model.generate(**tm.make_inputs(model, arch), max_new_tokens=3, do_sample=False)
        assert handle.stats.visual_after < handle.stats.visual_before
        unpadded = list(seen)
        seen.clear()
        model.generate(**tm.make_inputs(model, arch, batch=2), max_new_tokens=3, do_sample=False)
    ours = [m for from_route, m in unpadded if from_route]
    n_layers = len(tm.decoder_layers(model))
    assert len(ours) == 3 * (n_layers - LAYER)           # prefill + 2 decode steps, layers >= L
    if arch == "gemma3":
        # its image blocks need a (boolean) mask in the prefill, and a sliding window that cuts
        # (12 positions here) in every step; full-attention layers decode without one
        kinds = [get_adapter(model).layer_kind(model, i) for i in range(LAYER, n_layers)] * 3
        assert all(m.dtype == torch.bool for m in ours[:n_layers - LAYER])
        decode = list(zip(kinds, ours))[n_layers - LAYER:]
        assert all(m is None for kind, m in decode if kind == "full_attention")
        assert all(m is None or m.dtype == torch.bool for m in ours)
    else:
        assert all(m is None for m in ours)
    padded = [m for from_route, m in seen if from_route]
    assert padded and all(m is None or m.dtype == torch.bool for m in padded)
    assert all(m is None or m.dtype == torch.bool for _, m in unpadded + seen)
