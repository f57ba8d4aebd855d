"""`pact-vlm demo` and a reduced fidelity run on the shipped demo VLM (offline)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image

import pact_vlm
from pact_vlm import cli
from pact_vlm.demo.model import DEFAULT_MODEL_DIR
from pact_vlm.demo.run import DEMO_CONFIG_FILE

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE).is_file(),
                                reason="demo model or its pact_config.json not shipped")


def test_demo_answers_fifty_held_out_questions_in_batches(capsys, tmp_path):
    from pact_vlm.bench.fidelity import CALIB_START, EVAL_START
    from pact_vlm.demo import shapes

    picture = tmp_path / "demo.png"
    rc = cli.main(["demo", "--n", "50", "--batch-size", "25", "--picture", str(picture), "--json", "--no-speed"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    assert len(result["questions"]) == 50
    seeds = [q["seed"] for q in result["questions"]]
    first_eval = shapes.HELDOUT_SEEDS[EVAL_START]
    assert all(first_eval <= s < shapes.HELDOUT_SEEDS[CALIB_START] for s in seeds)   # evaluation split only
    assert not any(s in shapes.TRAIN_SEEDS for s in seeds)
    assert {q["qtype"] for q in result["questions"]} == set(shapes.QTYPES)
    # the accuracies are the answers' own: recount them
    acc = lambda key: sum(q[key] == q["truth"] for q in result["questions"]) / 50  # noqa: E731
    assert result["accuracy_unreduced"] == pytest.approx(acc("unreduced")) and acc("unreduced") >= 0.8
    assert result["accuracy_reduced"] == pytest.approx(acc("reduced")) and acc("reduced") >= 0.7
    assert result["visual_before"] == 50 * 64 and result["visual_after"] < 0.5 * result["visual_before"]
    assert result["speed"] is None
    with Image.open(picture) as img:
        assert img.size == (512, 512)


def test_demo_text_reports_both_accuracies(capsys):
    rc = cli.main(["demo", "--n", "10", "--no-picture", "--no-speed"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("Q: ") == 5 and out.count("unreduced: ") == 5
    summary = re.search(r"10 held-out questions .*unreduced ([\d.]+)% .* pact ([\d.]+)% .*visual tokens 640 -> (\d+)", out)
    assert summary and int(summary.group(3)) < 640


def test_demo_json_and_options(capsys):
    rc = cli.main(["demo", "--n", "2", "--no-picture", "--json", "--no-speed", "-o", "cutoff=0.0"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["config"]["cutoff"] == 0.0 and result["picture"] is None
    # no --method / --config: the model folder's pact_config.json, -o on top
    shipped = json.loads((DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE).read_text())
    assert result["config"] == dict(shipped, cutoff=0.0)
    assert result["config_origin"] == f"model folder config {DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE}, -o on top"
    # cutoff 0 keeps every kept token its own cluster: only EUTI's pruned tokens can disappear
    assert result["visual_after"] >= 2 * (64 * (1 - result["config"]["prune_ratio"]) - 1)


def test_speed_line_measures_against_the_unreduced_model_with_the_limit():
    from pact_vlm.bench.models import SyntheticSpec
    from pact_vlm.demo.run import speed_line

    spec = SyntheticSpec(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, tile=112, patch=14,
                         regions=8, prototypes=4, vocab=64, image_size=(112, 224), text_tokens=10, text_before=5)
    line = speed_line(spec, layer=1, repeats=3)
    assert 0 < line["reduction_ratio"] < 1
    assert 1 < line["limit"] < 1 / (1 - line["reduction_ratio"]) + 1e-9
    assert line["prefill_speedup"]["q1"] <= line["prefill_speedup"]["median"] <= line["prefill_speedup"]["q3"]


def test_demo_measures_the_speed_line_by_default(capsys, monkeypatch):
    """Without --no-speed the demo prints the speed line beside its limit (a narrow spec stands in for the
    7B width here; the width is tested by SPEED_SPEC below)."""
    from pact_vlm.bench.models import SyntheticSpec
    from pact_vlm.demo import run

    tiny = SyntheticSpec(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, tile=112, patch=14,
                         regions=8, prototypes=4, vocab=64, image_size=(112, 224), text_tokens=10, text_before=5)
    original = run.speed_line
    calls = []
    monkeypatch.setattr(run, "speed_line", lambda repeats: calls.append(repeats) or original(tiny, repeats=repeats))
    assert cli.main(["demo", "--n", "4", "--no-picture"]) == 0
    out = capsys.readouterr().out
    assert calls == [3]
    line = re.search(r"speed at a real width .* (\d+)% fewer visual tokens, prefill ([\d.]+)x faster "
                     r"\(q1-q3 ([\d.]+)-([\d.]+)\); analytical limit ([\d.]+)x", out)
    assert line, out
    assert float(line.group(3)) <= float(line.group(2)) <= float(line.group(4)) and float(line.group(5)) > 1


def test_speed_spec_is_the_7b_width_and_is_refused_when_memory_is_short():
    from pact_vlm.bench.models import SyntheticSpec
    from pact_vlm.demo.run import SPEED_SPEC, _check_speed_memory

    spec = SyntheticSpec.preset("llava-onevision-7b", **SPEED_SPEC)
    assert (spec.hidden, spec.heads, spec.kv_heads, spec.intermediate) == (3584, 28, 4, 18944)
    _check_speed_memory(spec, torch.float32, free=8 * 10**9)          # about 3 GB: fits
    with pytest.raises(MemoryError, match=r"needs about 3\.\d GB .* 1\.0 GB is free; run `pact-vlm demo --no-speed`"):
        _check_speed_memory(spec, torch.float32, free=10**9)


def test_demo_refuses_no_reduction(capsys):
    assert cli.main(["demo", "--method", "none"]) == 2
    assert "pick a method" in capsys.readouterr().err


def test_reduced_fidelity_run_on_the_shipped_model(capsys, tmp_path):
    rc = cli.main(["fidelity", "--n", "100", "--ratios", "0.7", "--methods", "pact:prune_ratio=0.2", "random",
                   "--calib-n", "50", "--random-seeds", "1", "--no-progress", "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "fidelity.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert result["settings"]["layer"] == json.loads(
        (DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE).read_text())["layer"]     # default: the shipped setting's L
    assert result["unreduced"]["accuracy"] >= 0.85
    pact, random = rows["pact:prune_ratio=0.2"], rows["random"]
    assert abs(pact["measured_ratio"] - 0.7) < 0.05
    assert pact["accuracy"] >= 0.9 * result["unreduced"]["accuracy"]
    assert pact["accuracy"] > random["accuracy"]
    (entry,) = [e for e in result["instrument"] if e["keep"] == 0.25]
    assert entry["oracle"]["accuracy"] - entry["anti_oracle"]["accuracy"] >= 0.2
    assert (tmp_path / "fidelity.png").stat().st_size > 1000


def test_fidelity_without_layer_takes_the_model_folder_config(capsys, tmp_path):
    import vlm_folder

    folder = vlm_folder.save_demo_architecture(tmp_path / "m")     # no pact_config.json: the library defaults
    capsys.readouterr()
    assert cli.main(["fidelity", "--model-dir", str(folder), "--n", "10"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pact-vlm")]
    assert len(err) == 1 and "reduction layer 4 (library defaults)" in err[0] and "--layer" in err[0]
    folder = tmp_path / "copy"              # the trained model with a config of another layer
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    pact_vlm.PACTConfig(layer=2).save(folder / DEMO_CONFIG_FILE)
    rc = cli.main(["fidelity", "--model-dir", str(folder), "--n", "20", "--ratios", "0.5", "--methods", "fastv",
                   "--calib-n", "8", "--batch-size", "20", "--random-seeds", "1", "--no-progress", "--instrument-keep",
                   "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert result["settings"]["layer"] == 2 and DEMO_CONFIG_FILE in result["settings"]["layer_origin"]
    assert result["rows"][0]["config"]["layer"] == 2 and result["instrument"] == []     # --instrument-keep: none
    assert f"reduction layer 2: model folder config {folder / DEMO_CONFIG_FILE}" in capsys.readouterr().err


def test_demo_on_the_clip_demo_takes_its_config_and_runs_visionzip_on_pixels(capsys):
    from pact_vlm.demo.model import CLIP_MODEL_DIR

    rc = cli.main(["demo", "--model-dir", str(CLIP_MODEL_DIR), "--n", "10", "--no-picture", "--json", "--no-speed"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    assert result["config"] == json.loads((CLIP_MODEL_DIR / DEMO_CONFIG_FILE).read_text())
    assert result["visual_before"] == 640 and result["visual_after"] < 0.5 * 640
    # VisionZip reduces inside the tower: the demo must hand it the pixels (it refused before)
    rc = cli.main(["demo", "--model-dir", str(CLIP_MODEL_DIR), "--n", "10", "--no-picture", "--json", "--no-speed",
                   "--method", "visionzip", "-o", "keep_ratio=0.25"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out)
    assert result["visual_before"] == 640 and result["visual_after"] == 10 * 16
