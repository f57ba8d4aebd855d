"""`pact-vlm demo` and a reduced fidelity run on the shipped demo VLM (offline)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

import pact_vlm
from pact_vlm import cli
from pact_vlm.demo.model import DEFAULT_MODEL_DIR
from pact_vlm.demo.run import DEMO_CONFIG_FILE

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE).is_file(),
                                reason="demo model or its pact_config.json not shipped")


def test_demo_answers_with_and_without_pact(capsys, tmp_path):
    picture = tmp_path / "demo.png"
    rc = cli.main(["demo", "--n", "5", "--repeats", "1", "--picture", str(picture)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("Q: ") == 5 and out.count("unreduced: ") == 5
    counts = [(int(a), int(b)) for a, b in re.findall(r"visual tokens (\d+) -> (\d+)\n", out)]
    assert len(counts) == 5 and all(b < a == 64 for a, b in counts)
    summary = re.search(r"unreduced (\d+)% right, pact (\d+)% right", out)
    assert summary and int(summary.group(2)) >= 60          # the shipped setting keeps the answers
    with Image.open(picture) as img:
        assert img.size == (512, 512)


def test_demo_json_and_options(capsys):
    rc = cli.main(["demo", "--n", "2", "--repeats", "1", "--no-picture", "--json", "-o", "cutoff=0.0"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["config"]["cutoff"] == 0.0 and result["picture"] is None
    # no --method / --config: the model folder's pact_config.json, -o on top
    shipped = json.loads((DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE).read_text())
    assert result["config"] == dict(shipped, cutoff=0.0)
    assert result["config_origin"] == f"model folder config {DEFAULT_MODEL_DIR / DEMO_CONFIG_FILE}, -o on top"
    # cutoff 0 keeps every kept token its own cluster: only EUTI's pruned tokens can disappear
    for q in result["questions"]:
        assert q["reduced"]["visual_after"] >= 64 * (1 - result["config"]["prune_ratio"]) - 1


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
