"""`pact-vlm bench --synthetic qwen3.5`: the hybrid limit against hand counts, the memory estimate
against the built model, and a tiny end-to-end run; the LLaVA-OneVision numbers unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pact_vlm.bench.limits import (RECURRENCE_MACS, TextDims, kv_cache_bytes, layer_flops, prefill_flops,
                                   state_bytes, work_fraction)
from pact_vlm.bench.models import SyntheticSpec, build_synthetic_model, describe, synthetic_inputs
from pact_vlm.cli import main
from bench_run import run_tiny_bench

# D=4, H=2 (gated q_proj), H_kv=1, d_h=2, F=8, V=10; linear layers: H_k=1, H_v=2, d_k=d_v=2, K=3
LIN, FULL = "linear_attention", "full_attention"
HYBRID = TextDims(hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, layers=2, vocab=10,
                  layer_types=(LIN, FULL), query_gate=True, linear_key_heads=1, linear_value_heads=2,
                  linear_key_dim=2, linear_value_dim=2, conv_kernel=3)
# full layer, multiply-adds per token: q + gate 4*(2*2*2)=32, k+v 2*4*1*2=16, o 2*2*4=16, mlp 3*4*8=96
FULL_MACS = 160
# linear layer: conv channels C = 2*1*2 + 2*2 = 8; qkv 4*8=32, z 4*2*2=16, b+a 2*4*2=16, out 2*2*4=16,
# conv taps 8*3=24, mlp 96
LINEAR_MACS = 200
RECURRENCE = RECURRENCE_MACS * 2 * 2 * 2        # per token: c * H_v * d_k * d_v

TINY_QWEN = dict(family="qwen3.5", hidden=64, heads=4, kv_heads=2, intermediate=128, layers=8, patch=16,
                 linear_key_heads=2, linear_value_heads=4, linear_key_dim=8, linear_value_dim=8, conv_kernel=4,
                 full_attention_interval=4, regions=8, prototypes=4)


def test_layer_flops_by_type_by_hand():
    lin = layer_flops(HYBRID, 3, 0)
    assert lin == {"linear": 2 * 3 * LINEAR_MACS, "attention": 0.0, "recurrence": 2 * 3 * RECURRENCE}
    full = layer_flops(HYBRID, 3, 1)
    # causal pairs 3*4/2 = 6: 2 products * 2 FLOPs * H * d_h * pairs
    assert full == {"linear": 2 * 3 * FULL_MACS, "attention": 2 * 2 * 2 * 2 * 6, "recurrence": 0.0}
    with pytest.raises(ValueError, match="counted by their type"):
        layer_flops(HYBRID, 3)


def test_hybrid_prefill_and_work_fraction_by_hand():
    f = prefill_flops(HYBRID, [10, 4])
    assert f["linear"] == 2 * 10 * LINEAR_MACS + 2 * 4 * FULL_MACS
    assert f["recurrence"] == 2 * 10 * RECURRENCE
    assert f["attention"] == 2 * 2 * 2 * 4 * 5
    assert f["total"] == f["linear"] + f["recurrence"] + f["attention"] + 2 * 4 * 10
    # reduced from layer 1 (the full-attention layer): the linear layer sees every token
    w = work_fraction(HYBRID, 10, 4, layer=1)
    lin10 = 2 * 10 * (LINEAR_MACS + RECURRENCE)
    full10, full4 = 2 * 10 * FULL_MACS + 2 * 2 * 2 * 10 * 11, 2 * 4 * FULL_MACS + 2 * 2 * 2 * 4 * 5
    assert w["flops_full"] == lin10 + full10 + 80
    assert w["flops_reduced"] == lin10 + full4 + 80
    assert w["recurrence_fraction"] == 1.0
    assert w["attention_fraction"] == pytest.approx(160 / 880)
    assert w["kv_fraction"] == pytest.approx(4 / 10)          # only the full-attention layer holds keys
    # the linear layer reduced: its work falls with its tokens, no n^2 term
    flipped = dataclasses.replace(HYBRID, layer_types=(FULL, LIN))
    w = work_fraction(flipped, 10, 4, layer=1)
    assert w["recurrence_fraction"] == pytest.approx(0.4)
    assert w["attention_fraction"] == 1.0 and w["kv_fraction"] == 1.0
    assert w["flops_reduced"] == full10 + 2 * 4 * (LINEAR_MACS + RECURRENCE) + 80


def test_linear_layers_lower_the_limit():
    """The same widths and lengths: a tower whose layers after L are linear attention can save less
    than one whose layers are all full attention (no n^2 term to cut)."""
    all_full = dataclasses.replace(HYBRID, layer_types=(FULL, FULL))
    hybrid = dataclasses.replace(HYBRID, layer_types=(FULL, LIN))
    assert (work_fraction(hybrid, 1000, 200, 1)["possible_speedup"]
            < work_fraction(all_full, 1000, 200, 1)["possible_speedup"])


def test_kv_and_state_bytes_by_hand():
    # KV of the full-attention layer only: 2 * batch 3 * H_kv 1 * d_h 2 * 2 bytes * 3 entries
    assert kv_cache_bytes(HYBRID, [5, 3], batch=3, itemsize=2) == 2 * 3 * 1 * 2 * 2 * 3
    # one linear layer: recurrent [3, 2, 2, 2] float32 + conv [3, 8, 3] in 2-byte elements
    assert state_bytes(HYBRID, batch=3, itemsize=2) == 3 * (2 * 2 * 2 * 4 + 8 * 3 * 2)


def test_llava_onevision_dims_and_numbers_unchanged():
    """No hybrid keys on a LLaVA-OneVision tower: the same dict keys, the same dims, the same FLOPs."""
    spec = SyntheticSpec.preset("llava-onevision-7b", layers=7)
    dims = spec.text_dims()
    assert dims == TextDims(hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, layers=7, vocab=4096)
    assert list(dims.to_dict()) == ["hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab"]
    assert set(spec.to_dict()) == {"hidden", "heads", "kv_heads", "intermediate", "layers", "vocab", "rope_theta",
                                   "image_size", "tile", "patch", "text_tokens", "text_before", "prototypes",
                                   "regions", "noise", "feature_std", "seed"}
    w = work_fraction(dims, 2979, 2979 - 2050, 1)
    assert set(w) == {"fraction", "possible_speedup", "linear_fraction", "attention_fraction", "kv_fraction",
                      "flops_full", "flops_reduced"}
    per_token = 3584 * 3584 + 2 * 3584 * 512 + 3584 * 3584 + 3 * 3584 * 18944     # q, k+v, o, mlp
    layer = lambda n: 2 * n * per_token + 2 * 3584 * n * (n + 1)                   # noqa: E731
    full = 7 * layer(2979) + 2 * 3584 * 4096
    assert w["flops_full"] == full
    assert w["flops_reduced"] == layer(2979) + 6 * layer(929) + 2 * 3584 * 4096


def _tiny(**over):
    return SyntheticSpec(**{**TINY_QWEN, "image_size": (128, 192), "vocab": 64, "text_tokens": 10, "text_before": 4,
                            **over})


def test_qwen_spec_inputs_and_dims_match_the_built_model():
    from pact_vlm.bench.memory import estimate_memory, text_tower_params

    spec = _tiny()
    model = build_synthetic_model(spec)
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    assert TextDims.from_config(model.config) == spec.text_dims()
    assert spec.text_dims().full_attention_layers() == [3, 7]
    line = describe(spec, model)
    assert "Qwen3_5ForConditionalGeneration" in line and "6 linear-attention" in line and "2 full-attention" in line
    inputs = synthetic_inputs(model, spec, batch=2)
    ids = inputs["input_ids"]
    rows, cols = 128 // 32, 192 // 32
    assert ids.shape == (2, 10 + 2 + rows * cols)
    assert int((ids[0] == spec.image_token_id).sum()) == rows * cols
    assert ids[0, 4] == spec.vision_start_id and ids[0, 5 + rows * cols] == spec.vision_end_id
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids[0] == spec.image_token_id)
    assert inputs["image_grid_thw"].tolist() == [[1, 2 * rows, 2 * cols]] * 2
    feats = inputs["mm_encoder_outputs"]["image"].pooler_output
    assert [f.shape for f in feats] == [(rows * cols, 64)] * 2 and not torch.equal(feats[0], feats[1])
    # the estimate's weights: the built model's, plus the q / k / v biases Qwen3.5 does not have
    text = model.model.language_model
    built = sum(p.numel() for p in text.parameters()) + sum(p.numel() for p in model.lm_head.parameters())
    dims = spec.text_dims()
    biases = 2 * (2 * 4 * 16 + 2 * 2 * 16)
    assert text_tower_params(dims) == built + biases
    # the estimate's cache: the full-attention layers' keys and values, and the states as generate() holds them
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    held = 0
    from pact_vlm.bench.speed import _cache_of

    for layer in _cache_of(out).layers:
        if getattr(layer, "keys", None) is not None:
            held += layer.keys.numel() * 4 + layer.values.numel() * 4
        for states in (getattr(layer, "conv_states", {}) or {}, getattr(layer, "recurrent_states", {}) or {}):
            held += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    est = estimate_memory(dims, seq_len=ids.shape[1], batch=2, max_new_tokens=3, dtype_bytes=4)
    assert est.kv_cache >= held
    assert est.kv_cache - held == 2 * 2 * 2 * 2 * 16 * 4      # one slot per full layer: the last token is not fed back


@pytest.mark.parametrize("over, match", [
    (dict(image_size=(100, 192)), "image_size=100x192 is not a multiple of 32 px .* use e.g. 96x192"),
    (dict(linear_value_heads=3), "linear_value_heads=3 is not a multiple of linear_key_heads=2"),
    (dict(family="qwen4"), "family='qwen4' is not one of"),
])
def test_bad_qwen_specs_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**over)


def _run_tiny_qwen(monkeypatch, out, *extra):
    return run_tiny_bench(monkeypatch, "tiny-qwen", TINY_QWEN, [
        "--image-size", "128x192", "--text-tokens", "10", "--vocab", "64", "--repeats", "3", "--warmup", "0",
        "--max-new-tokens", "2", "--json", out, *extra])


def test_tiny_qwen_run_end_to_end(monkeypatch, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert _run_tiny_qwen(monkeypatch, out, "--no-fresh-memory", "--layer", "7", "--target-ratio", "0.6") == 0
    printed = capsys.readouterr().out
    assert "analytical limit" in printed and "pact@0.6" in printed
    data = json.loads(out.read_text())
    assert "Qwen3_5ForConditionalGeneration: 8 layers (6 linear-attention" in data["meta"]["model"]
    assert data["meta"]["text_dims"]["layer_types"] == TINY_QWEN_TYPES
    assert data["meta"]["synthetic_spec"]["family"] == "qwen3.5"
    variant = data["variants"][1]
    assert abs(variant["reduction"]["reduction_ratio"] - 0.6) <= 0.02
    assert variant["kv_lengths_per_layer"][:3] == [0, 0, 0]          # linear layers: no keys
    # the limit for what was kept, recomputed here from the spec alone
    dims = SyntheticSpec(**{**TINY_QWEN, "vocab": 64}).text_dims()
    full = data["meta"]["prompt_tokens"]
    kept = variant["reduction"]["per_sample_lengths"][0]
    assert variant["limit"]["possible_speedup"] == pytest.approx(work_fraction(dims, full, kept, 7)["possible_speedup"])
    assert variant["limit"]["recurrence_fraction"] == 1.0               # layers 0..6 full length; 7 is full attention
    assert variant["ratios"]["kv_ratio"] == pytest.approx(variant["ratios"]["kv_ratio_predicted"])


TINY_QWEN_TYPES = [LIN, LIN, LIN, FULL] * 2


def test_tiny_qwen_fresh_process_memory(monkeypatch, tmp_path):
    """The fresh-process memory child rebuilds the Qwen3.5 spec from its JSON."""
    out = tmp_path / "speed.json"
    assert _run_tiny_qwen(monkeypatch, out, "--layer", "7", "--cutoff", "0.2") == 0
    data = json.loads(out.read_text())
    for v in data["variants"]:
        assert v["memory_fresh_process"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize("layer, match", [
    ("5", "layer=5 cannot reduce Qwen3.5: decoder layer 5 is a linear-attention layer .* one of \\[7\\]"),
    ("3", "layer=3 cannot reduce Qwen3.5: layers 0..2 must include the first full-attention layer \\(3\\)"),
])
def test_a_layer_qwen_refuses_is_refused_before_building(monkeypatch, capsys, layer, match):
    import re

    from pact_vlm.bench import models

    built = []
    monkeypatch.setattr(models, "build_synthetic_model", lambda *a, **k: built.append(1))
    assert _run_tiny_qwen(monkeypatch, "unused.json", "--no-fresh-memory", "--layer", layer) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: --method pact: ") and "\n" not in err
    assert re.search(match, err) and not built


def test_qwen_preset_is_the_config_defaults():
    """The preset's widths are transformers' Qwen3_5TextConfig defaults (as its docstring says)."""
    import transformers

    text = transformers.Qwen3_5Config().text_config
    dims = SyntheticSpec.preset("qwen3.5", vocab=text.vocab_size).text_dims()
    assert dims == TextDims.from_config(text)
    assert dims.layers == 32 and dims.full_attention_layers() == list(range(3, 32, 4))


def test_a_qwen_run_that_does_not_fit_is_refused_before_building(monkeypatch, capsys):
    """The 32 layers of the preset in float32 on a 24 GB machine: refused with a depth that fits,
    counted with the hybrid layers' weights and states."""
    import argparse

    import pact_vlm.bench.memory as memory
    from pact_vlm.bench import models
    from pact_vlm.bench.command import add_arguments, check_memory

    built = []
    monkeypatch.setattr(models, "build_synthetic_model", lambda *a, **k: built.append(1))
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 24 * 10**9)
    assert main(["bench", "--synthetic", "qwen3.5", "--device", "cpu", "--layers", "32", "--layer", "7",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: this run needs about") and "for 32 layers of hidden 4096" in err
    layers = int(err.split("--layers ")[1].split()[0])
    assert 8 <= layers < 32 and not built
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--synthetic", "qwen3.5", "--layers", str(layers), "--layer", "7"])
    spec = SyntheticSpec.preset("qwen3.5", layers=layers)
    assert check_memory(args, spec, torch.float32, torch.device("cpu"), free=24 * 10**9).total <= 24 * 10**9
    with pytest.raises(MemoryError, match="--layers"):
        check_memory(args, SyntheticSpec.preset("qwen3.5", layers=layers + 1), torch.float32, torch.device("cpu"),
                     free=24 * 10**9)
