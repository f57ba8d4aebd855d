"""`pact-vlm bench`: refusals with one-line messages, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from pact_vlm.bench.models import SyntheticSpec
from pact_vlm.cli import main

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
])
def test_nonsense_is_refused_in_one_line(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: ") and "\n" not in err
    assert match in err


def _run_tiny(monkeypatch, out, *extra):
    monkeypatch.setitem(SyntheticSpec.PRESETS, "tiny", TINY_PRESET)
    before = torch.get_num_threads()
    try:
        return main(["bench", "--threads", "1", "--synthetic", "tiny", "--image-size", "112x224",
                     "--text-tokens", "10", "--vocab", "64", "--layer", "1", "--target-ratio", "0.6",
                     "--repeats", "3", "--warmup", "0", "--max-new-tokens", "2", "--device", "cpu",
                     "--json", str(out), "--quiet", *extra])
    finally:
        torch.set_num_threads(before)          # --threads changed it for the whole process


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
