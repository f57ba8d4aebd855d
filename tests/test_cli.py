"""The ``pact-vlm`` command line: generate, methods, configs and the one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

import pact_vlm
import vlm_folder
from pact_vlm import cli
from pact_vlm.demo import make_dataset
from pact_vlm.integration.loading import build_inputs, load_vlm

OPTS = ["-o", "layer=2", "-o", "prune_ratio=0.3", "-o", "cutoff=0.3"]
QUESTION = "what color is the shape ?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return vlm_folder.save_demo_architecture(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    make_dataset("heldout", 1)[0].image.save(path)
    return path


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _expected_answer(model_dir, image_path, config, max_new_tokens=4):
    from PIL import Image

    model, processor = load_vlm(model_dir, device="cpu")
    inputs = build_inputs(processor, QUESTION, [Image.open(image_path).convert("RGB")])
    with pact_vlm.apply(model, config) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, handle.stats


def test_generate_prints_the_answer_and_a_summary(model_dir, image_path, capsys):
    rc, out, _ = _run(capsys, "generate", model_dir, "--image", image_path, "--prompt", QUESTION,
                      "--max-new-tokens", 4, "--device", "cpu", *OPTS)
    assert rc == 0
    answer, summary = out.rstrip("\n").split("\n")
    expected, stats = _expected_answer(model_dir, image_path, pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.3))
    assert answer == expected
    m = re.search(r"visual tokens (\d+) -> (\d+) \(([\d.]+)% fewer\) \| generate ([\d.]+) s", summary)
    assert m and (int(m[1]), int(m[2])) == (stats.visual_before, stats.visual_after)
    assert float(m[3]) == pytest.approx(100 * stats.reduction_ratio, abs=0.05)
    assert summary.startswith("[pact(layer=2, prune_ratio=0.3, cutoff=0.3)]")


def test_generate_json_config_file_and_no_reduction(model_dir, image_path, tmp_path, capsys):
    cfg = pact_vlm.PACTConfig(layer=1, prune_ratio=0.5, cutoff=0.2)
    cfg.save(tmp_path / "cfg.json")
    rc, out, _ = _run(capsys, "generate", model_dir, "--image", image_path, "--prompt", QUESTION, "--max-new-tokens", 3,
                      "--device", "cpu", "--config", tmp_path / "cfg.json", "--json")
    assert rc == 0
    data = json.loads(out)
    expected, stats = _expected_answer(model_dir, image_path, cfg, max_new_tokens=3)
    assert data["answer"] == expected and data["config"] == cfg.to_dict()
    assert (data["visual_before"], data["visual_after"]) == (stats.visual_before, stats.visual_after)
    assert data["reduction_ratio"] == pytest.approx(stats.reduction_ratio) and data["new_tokens"] == 3
    assert data["generate_seconds"] > 0
    # -o overrides a value of the file
    rc, out, _ = _run(capsys, "generate", model_dir, "--image", image_path, "--prompt", QUESTION, "--max-new-tokens", 1,
                      "--device", "cpu", "--config", tmp_path / "cfg.json", "-o", "prune_ratio=0", "--json")
    assert json.loads(out)["config"]["prune_ratio"] == 0
    rc, out, _ = _run(capsys, "generate", model_dir, "--image", image_path, "--prompt", QUESTION, "--max-new-tokens", 1,
                      "--device", "cpu", "--method", "none", "--json")
    data = json.loads(out)
    assert rc == 0 and data["visual_before"] == data["visual_after"] == 64 and data["reduction_ratio"] == 0.0


def test_methods_lists_the_registry(capsys):
    from pact_vlm.config import CONFIG_REGISTRY

    rc, out, _ = _run(capsys, "methods", "--json")
    assert rc == 0 and set(json.loads(out)) == set(CONFIG_REGISTRY)
    assert json.loads(out)["pact"]["cutoff"] == pact_vlm.PACTConfig().cutoff


@pytest.mark.parametrize("command", ["generate", "viz", "select-layer", "methods", "demo", "tune"])
def test_help_explains_each_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"pact-vlm {command}" in out
    for line in out.splitlines():
        if line.strip().startswith("--") and command != "demo":
            assert len(line.split(None, 2)) >= 2       # every option is described


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _bad_inputs(model_dir, image_path, text_only_dir, tmp_path):
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"method": "pact", "layer": 2, "cutof": 0.3}))
    fastv_cfg = tmp_path / "fastv.json"
    pact_vlm.FastVConfig(layer=2).save(fastv_cfg)
    base = ["generate", model_dir, "--prompt", QUESTION, "--device", "cpu"]
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image_path.read_bytes()[:200])          # a truncated PNG
    list_cfg = tmp_path / "list.json"
    list_cfg.write_text(json.dumps({"method": ["pact", "fastv"], "layer": 2}))
    return {
        "missing image": ([*base, "--image", tmp_path / "nope.png", *OPTS], "does not exist"),
        "unknown method": ([*base, "--image", image_path, "--method", "fastest"], "known methods"),
        "config with wrong keys": ([*base, "--image", image_path, "--config", bad_cfg], "valid keys"),
        "missing config": ([*base, "--image", image_path, "--config", tmp_path / "no.json"], "does not exist"),
        "model without visual tokens": (["generate", text_only_dir, "--image", image_path, "--prompt", "hi",
                                         "--device", "cpu"], "supported classes"),
        "missing model folder": (["generate", tmp_path / "no_model", "--image", image_path, "--prompt", "hi"],
                                 "does not exist"),
        "no image": ([*base, *OPTS], "pass --image"),
        "bad option": ([*base, "--image", image_path, "-o", "layer"], "KEY=VALUE"),
        "layer past the model": ([*base, "--image", image_path, "-o", "layer=9"], "choose a smaller layer"),
        "bad option value": ([*base, "--image", image_path, "-o", "prune_ratio=1.5"], "prune_ratio=1.5"),
        "video for an image-only processor": ([*base, "--video", tmp_path / "clip.gif", *OPTS], "takes no video"),
        "viz of no method": (["viz", model_dir, "--image", image_path, "--method", "none"], "needs a reduction"),
        "select-layer without image": (["select-layer", model_dir, "--device", "cpu"], "--image"),
        "corrupt video names its path": ([*base, "--video", corrupt, *OPTS], f"video {str(corrupt)!r} cannot be read"),
        "corrupt image names its path": ([*base, "--image", corrupt, *OPTS], f"image {str(corrupt)!r} is not an image"),
        "image that is a folder": ([*base, "--image", tmp_path, *OPTS], "is a folder"),
        "viz --out a folder": (["viz", model_dir, "--image", image_path, "--out", tmp_path],
                               f"--out {str(tmp_path)!r} is a folder; give a file name"),
        "viz --out without extension": (["viz", model_dir, "--image", image_path, "--out", tmp_path / "pic"],
                                        "needs one of the file extensions .png"),
        "select-layer --plot a folder": (["select-layer", model_dir, "--image", image_path, "--plot", tmp_path],
                                         "--plot"),
        "method as an option": ([*base, "--image", image_path, "-o", "method=fastv"], "choose it with --method fastv"),
        "config whose method is a list": ([*base, "--image", image_path, "--config", list_cfg],
                                          "'method' must be a string"),
        "config that is a folder": ([*base, "--image", image_path, "--config", tmp_path], "is a folder"),
        "tune without images": (["tune", model_dir, "--layer", 2], "--images DIR"),
        "tune, missing image folder": (["tune", model_dir, "--images", tmp_path / "none"], "is not a folder"),
        "tune, ratio out of range": (["tune", model_dir, "--image", image_path, "--target-ratio", 1.2],
                                     "--target-ratio 1.2"),
        "tune, bad out": (["tune", model_dir, "--image", image_path, "--out", tmp_path / "no" / "c.json"],
                          "does not exist"),
        "tune, base not PACT": (["tune", model_dir, "--image", image_path, "--layer", 2, "--config", fastv_cfg],
                                "tune searches PACT"),
    }


def test_bad_input_gives_one_line_with_the_fix(model_dir, image_path, text_only_dir, tmp_path, capsys):
    for name, (argv, hint) in _bad_inputs(model_dir, image_path, text_only_dir, tmp_path).items():
        rc, out, err = _run(capsys, *argv)
        lines = [ln for ln in err.splitlines() if ln.startswith("pact-vlm:")]
        assert rc != 0, name
        assert len(lines) == 1 and lines[0].startswith("pact-vlm: error: "), (name, err)
        assert hint in lines[0], (name, lines[0])
        assert "Traceback" not in err, name


def test_debug_shows_the_traceback(model_dir, image_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "generate", str(model_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "x"])


def test_attn_choices_are_the_supported_backends():
    from pact_vlm.cli import ATTN_BACKENDS
    from pact_vlm.integration.attention import SUPPORTED_BACKENDS

    assert ATTN_BACKENDS == SUPPORTED_BACKENDS


@pytest.mark.parametrize("argv, hint", [
    (["generate"], "the following arguments are required"),
    (["no-such-command"], "invalid choice"),
    (["generate", "m", "--prompt", "q", "--max-new-tokens", "0"], "--max-new-tokens: 0 must be >= 1"),
    (["select-layer", "m", "--image", "x.png", "--cutoff", "-1"], "--cutoff: -1 must be >= 0 (a cosine distance)"),
    (["select-layer", "m", "--image", "x.png", "--threshold", "0"], "--threshold: 0 must lie in (0, 1]"),
    (["select-layer", "m", "--image", "x.png", "--max-tokens", "1"], "--max-tokens: 1 must be >= 2"),
    (["select-layer", "m", "--image", "x.png", "--cutoff", "nan"], "--cutoff: nan must be finite"),
    (["viz", "m", "--image", "x.png", "--alpha", "1.5"], "--alpha: 1.5 must lie in [0, 1]"),
    (["demo", "--n", "0"], "--n: 0 must be >= 1"),
    (["demo", "--n", "five"], "'five' is not an integer"),
    (["fidelity", "--ratios", "0.5", "1.0"], "--ratios: 1.0 must lie in (0, 1)"),
    (["fidelity", "--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    (["bench", "--image-size", "640"], "HEIGHTxWIDTH"),
])
def test_usage_errors_are_one_line_without_the_usage_dump(argv, hint, capsys):
    """Refused while parsing, before anything is loaded: one line naming the value and the help."""
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pact-vlm: error: "), err
    assert hint in err and "usage:" not in err and "--help" in err, err


def test_select_layer_refuses_a_negative_cutoff_in_the_library():
    from pact_vlm.select_layer import key_distance_stats

    with pytest.raises(ValueError, match="cutoff=-1"):
        key_distance_stats(None, [{}], cutoff=-1)


@pytest.fixture()
def own_folder(tmp_path):
    """A model folder of its own (the tune test writes its pact_config.json into it)."""
    return vlm_folder.save_demo_architecture(tmp_path / "vlm")


def test_tune_writes_the_model_config_and_every_command_then_uses_it(own_folder, tmp_path, capsys):
    images = tmp_path / "calib"
    images.mkdir()
    for i, sample in enumerate(make_dataset("heldout", 3, start=900_000)):
        sample.image.save(images / f"{i}.png")
    png = tmp_path / "tradeoff.png"
    rc, out, err = _run(capsys, "tune", own_folder, "--images", images, "--prompt", QUESTION, "--prompt",
                        "is there a red circle ?", "--target-ratio", 0.5, "--layer", 2, "--prune-ratios", 0, 0.45,
                        "--out", own_folder, "--png", png, "--device", "cpu", "--no-progress")
    assert rc == 0, err
    written = pact_vlm.load_config(own_folder / "pact_config.json")
    assert isinstance(written, pact_vlm.PACTConfig) and written.layer == 2 and written.prune_ratio in (0, 0.45)
    assert out.startswith("6 calibration prompts (3 images x 2 prompts)")
    assert "<- chosen" in out and json.loads(out[out.index("{"):out.index("}") + 1]) == written.to_dict()
    assert f"wrote {own_folder / 'pact_config.json'}" in out and png.stat().st_size > 10_000
    table = [ln.split() for ln in out.splitlines() if re.match(r"\s+2\s+(0|0\.45)\s", ln)]
    chosen = next(row for row in table if row[-1] == "chosen")
    assert float(chosen[2]) == pytest.approx(written.cutoff, abs=5e-5) and abs(float(chosen[3]) - 0.5) <= 0.01

    # generate / viz with no method options: the folder's config, and the output says so
    origin = f"model folder config {own_folder / 'pact_config.json'}"
    rc, out, _ = _run(capsys, "generate", own_folder, "--image", images / "0.png", "--prompt", QUESTION,
                      "--max-new-tokens", 2, "--device", "cpu", "--json")
    data = json.loads(out)
    assert rc == 0 and data["config"] == written.to_dict() and data["config_origin"] == origin
    expected, stats = _expected_answer(own_folder, images / "0.png", written, max_new_tokens=2)
    assert data["answer"] == expected and data["visual_after"] == stats.visual_after
    rc, out, _ = _run(capsys, "generate", own_folder, "--image", images / "0.png", "--prompt", QUESTION,
                      "--max-new-tokens", 1, "--device", "cpu", "-o", "cutoff=0.0")
    assert rc == 0 and out.rstrip().endswith(f"| config: {origin}, -o on top")
    assert "cutoff=0.0" in out and f"layer={written.layer}" in out
    rc, out, _ = _run(capsys, "viz", own_folder, "--image", images / "0.png", "--out", tmp_path / "v.png",
                      "--device", "cpu", "--json")
    assert rc == 0 and json.loads(out)["config"] == written.to_dict() and json.loads(out)["config_origin"] == origin
    # a folder without the file: the library defaults, named
    rc, out, _ = _run(capsys, "tune", own_folder, "--image", images / "0.png", "--layer", 1, "--prune-ratios", 0,
                      "--target-ratio", 0.3, "--out", tmp_path / "other.json", "--json", "--device", "cpu",
                      "--no-progress")
    data = json.loads(out)
    assert rc == 0 and data["base_origin"] == origin and data["config"]["layer"] == 1
    assert pact_vlm.load_config(tmp_path / "other.json").to_dict() == data["config"]
