"""`pact-vlm bench`: refusals with one-line messages, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from pact_vlm.bench.models import SyntheticSpec
from pact_vlm.cli import main
from bench_run import run_tiny_bench

TINY_PRESET = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, tile=112, patch=14,
                   regions=8, prototypes=4)


@pytest.mark.parametrize("argv, match", [
    (["--repeats", "0"], "--repeats=0 must be >= 3"),
    (["--warmup", "-1"], "--warmup=-1"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--device", "tpu"], "device='tpu'"),
    (["--dtype", "float64"], "--dtype='float64'"),
    (["--target-ratio", "1.5"], "--target-ratio=1.5"),
    (["--batch", "0"], "--batch=0"),
    (["--layers", "3", "--layer", "5"], "layer=5 is beyond the model: it has 3 decoder layers"),
    (["--layers", "3"], "layer=4 is beyond the model"),          # the preset's L=4
    (["--synthetic", "llava-onevision-70b"], "unknown synthetic model"),
    (["--prune-ratio", "1.2", "--layers", "3", "--layer", "1"], "prune_ratio=1.2"),
    (["--method", "fastest"], "unknown method 'fastest' in --method fastest; known: "),
    (["--method", "dart:pivots=3"], "DARTConfig has no field(s) 'pivots' (in --method dart:pivots=3)"),
    (["--method", "dart:layer"], "option 'layer' in --method dart:layer is not KEY=VALUE"),
    (["--method", "dart", "dart"], "--method dart dart repeats a method"),
    (["--method", "divprune", "dart", "--cutoff", "0.2"], "--cutoff does not apply to method 'dart, divprune'"),
    (["--method", "dart", "--config", "c.json"], "--config and --method both choose the method"),
    (["--method", "dart:layer=9", "--layers", "3"], "layer=9 is beyond the model: it has 3 decoder layers"),
    (["--method", "pact", "visionzip"], "--method visionzip: VisionZipConfig reads the vision tower's attention, "
                                        "but the synthetic model's vision tower never runs (its image features are "
                                        "pre-encoded); pass --vision-layers N"),
])
def test_nonsense_is_refused_in_one_line(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: ") and "\n" not in err
    assert match in err


def _run_tiny(monkeypatch, out, *extra):
    return run_tiny_bench(monkeypatch, "tiny", TINY_PRESET, [
        "--image-size", "112x224", "--text-tokens", "10", "--vocab", "64", "--layer", "1", "--target-ratio", "0.6",
        "--repeats", "3", "--warmup", "0", "--max-new-tokens", "2", "--json", out, *extra])


def test_tiny_run_end_to_end(monkeypatch, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert _run_tiny(monkeypatch, out, "--no-fresh-memory") == 0
    printed = capsys.readouterr().out
    assert "analytical limit" in printed and "pact@0.6" in printed
    data = json.loads(out.read_text())
    variant = data["variants"][1]
    assert data["meta"]["calibration"][0]["param"] == "cutoff"
    assert variant["config"]["cutoff"] == data["meta"]["calibration"][0]["value"]
    assert abs(variant["reduction"]["reduction_ratio"] - 0.6) <= 0.02
    assert data["meta"]["synthetic_spec"]["hidden"] == 64
    assert "memory_fresh_process" not in variant


def test_several_methods_in_one_run_each_calibrated(monkeypatch, tmp_path, capsys):
    """--method: every method measured against the same unreduced runs; --layer moves every method
    with a layer except where the method's own options set it."""
    out = tmp_path / "speed.json"
    assert _run_tiny(monkeypatch, out, "--no-fresh-memory", "--method", "pact", "divprune:layer=0", "dart") == 0
    printed = capsys.readouterr().out
    assert "divprune:layer=0@0.6" in printed and "dart@0.6" in printed
    data = json.loads(out.read_text())
    names = [v["name"] for v in data["variants"]]
    assert names == ["unreduced", "pact@0.6", "divprune:layer=0@0.6", "dart@0.6"]
    assert [c["method"] for c in data["meta"]["calibration"]] == ["pact", "divprune:layer=0", "dart"]
    layers = [v["config"]["layer"] for v in data["variants"][1:]]
    assert layers == [1, 0, 1]
    for variant in data["variants"][1:]:
        assert abs(variant["reduction"]["reduction_ratio"] - 0.6) <= 0.02, variant["name"]


def test_fresh_process_memory(monkeypatch, tmp_path):
    """Each variant again in its own fresh process (about 15 s: one interpreter start per variant)."""
    out = tmp_path / "speed.json"
    assert _run_tiny(monkeypatch, out) == 0
    data = json.loads(out.read_text())
    variant = data["variants"][1]
    # peak memory of each variant, measured again in its own fresh process
    for v in data["variants"]:
        mem = v["memory_fresh_process"]
        assert mem["peak_rss_bytes"] >= mem["rss_before_bytes"] > 0
        assert mem["rss_increase_bytes"] == mem["peak_rss_bytes"] - mem["rss_before_bytes"]
    assert variant["ratios"]["peak_memory_ratio_fresh_process"] == pytest.approx(
        variant["memory_fresh_process"]["peak_rss_bytes"] / data["variants"][0]["memory_fresh_process"]["peak_rss_bytes"])


def test_a_saved_model_folder_with_its_processor(tmp_path, capsys):
    """--model: a real processor and chat template (the shipped demo VLM) build the prompt."""
    from pact_vlm.demo.model import DEFAULT_MODEL_DIR

    out = tmp_path / "speed.json"
    before = torch.get_num_threads()
    try:
        rc = main(["bench", "--threads", "1", "--model", str(DEFAULT_MODEL_DIR), "--image-size", "128x128",
                   "--layer", "0", "--cutoff", "0.05", "--repeats", "3", "--warmup", "0", "--max-new-tokens", "2",
                   "--device", "cpu", "--no-fresh-memory", "--json", str(out), "--quiet"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    reduction = data["variants"][1]["reduction"]
    assert reduction["visual_before"] == 64 and 0 < reduction["visual_after"] < 64
    assert "Qwen2VLForConditionalGeneration" in data["meta"]["model"]
    # no --config / --preset: the model folder's pact_config.json, the options on top
    assert data["meta"]["config_origin"] == f"model folder config {DEFAULT_MODEL_DIR / 'pact_config.json'}, options on top"


# -- memory: estimated before anything is built, refused with the fix --------------------------

def test_memory_estimate_counts_the_weights_of_the_built_model(monkeypatch):
    """The weight count of the estimate is the parameter count of the model the bench builds."""
    from pact_vlm.bench.limits import TextDims
    from pact_vlm.bench.memory import estimate_memory, text_tower_params
    from pact_vlm.bench.models import build_synthetic_model

    spec = SyntheticSpec(**{**TINY_PRESET, "vocab": 64})
    model = build_synthetic_model(spec)
    text = model.model.language_model
    built = sum(p.numel() for p in text.parameters()) + sum(p.numel() for p in model.lm_head.parameters())
    dims = TextDims(hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                    intermediate=spec.intermediate, layers=spec.layers, vocab=spec.vocab)
    assert text_tower_params(dims) == built
    est = estimate_memory(dims, seq_len=100, batch=2, max_new_tokens=4, dtype_bytes=2)
    assert est.weights == 2 * built
    assert est.kv_cache == 2 * spec.layers * 2 * spec.kv_heads * spec.head_dim * 104 * 2


def test_a_run_that_does_not_fit_is_refused_before_anything_is_built(monkeypatch, capsys):
    import pact_vlm.bench.memory as memory
    from pact_vlm.bench import models

    built = []
    monkeypatch.setattr(models, "build_synthetic_model", lambda *a, **k: built.append(1))
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 24 * 10**9)    # a 24 GB machine
    # the 7B checkpoint's 28 layers in float32 on the CPU, asked for
    assert main(["bench", "--device", "cpu", "--layers", "28", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: this run needs about") and "\n" not in err
    assert "only 24.0 GB is free" in err and "--dtype bfloat16" in err
    layers = int(err.split("--layers ")[1].split()[0])
    assert 1 <= layers < 28 and not built
    # the suggested fix fits
    import argparse

    from pact_vlm.bench.command import add_arguments, check_memory

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--layers", str(layers)])
    spec = SyntheticSpec.preset("llava-onevision-7b", layers=layers)
    assert check_memory(args, spec, torch.float32, torch.device("cpu"), free=24 * 10**9).total <= 24 * 10**9
    with pytest.raises(MemoryError, match="--layers"):
        check_memory(args, SyntheticSpec.preset("llava-onevision-7b", layers=layers + 1), torch.float32,
                     torch.device("cpu"), free=24 * 10**9)


def test_a_run_that_fits_is_not_refused(monkeypatch, tmp_path):
    import pact_vlm.bench.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device=None: 3 * 10**9)
    assert _run_tiny(monkeypatch, tmp_path / "speed.json", "--no-fresh-memory") == 0
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 10**8)      # 0.1 GB: too little
    assert _run_tiny(monkeypatch, tmp_path / "speed.json", "--no-fresh-memory") == 2


def test_available_memory_reads_meminfo():
    from pact_vlm.bench.memory import available_memory

    with open("/proc/meminfo") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    assert abs(available_memory() - kb * 1024) < 2 * 10**9


def test_a_method_the_model_refuses_fails_before_any_calibration_or_timing(monkeypatch, capsys):
    import pact_vlm.budget
    from pact_vlm.bench import speed

    calls = []
    monkeypatch.setattr(pact_vlm.budget, "match_budget", lambda *a, **k: calls.append("calibrate"))
    monkeypatch.setattr(speed, "measure_speed", lambda *a, **k: calls.append("time"))
    # ToMe's default equivalent_layer (4) is beyond the 2-layer model: refused when applied
    assert _run_tiny(monkeypatch, "unused.json", "--no-fresh-memory", "--method", "pact", "tome") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pact-vlm: error: --method tome: equivalent_layer=4 but the model has 2 decoder layers; "
                   "choose a smaller equivalent_layer")
    assert calls == []
