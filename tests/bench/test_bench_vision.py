"""The synthetic LLaVA-OneVision with a running SigLIP tower (``vision_layers`` / ``--vision-layers``):
pixels in, the stock tower, projector and packing, VisionZip measured, the tower timed and counted."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import pact_vlm
from pact_vlm.bench import SyntheticSpec, build_synthetic_model, measure_speed, synthetic_inputs, work_fraction
from pact_vlm.bench.limits import TextDims
from pact_vlm.bench.memory import estimate_memory, text_tower_params
from pact_vlm.bench.models import visual_token_count
from pact_vlm.bench.speed import _EncoderTimer, _Timeline
from pact_vlm.cli import main
from bench_run import run_tiny_bench

# 112 px tiles of 14 px patches (8x8 per view); a 2-layer SigLIP of hidden 48
TINY_VISION = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, tile=112, patch=14, regions=8,
                   prototypes=4, vision_hidden=48, vision_heads=4, vision_intermediate=80)
SPEC = SyntheticSpec(**TINY_VISION, vocab=64, image_size=(112, 224), text_tokens=12, text_before=4, vision_layers=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(one_thread):
    model = build_synthetic_model(SPEC)
    return model, synthetic_inputs(model, SPEC, batch=2)


def test_pixels_in_and_the_stock_tower_runs(tiny):
    model, inputs = tiny
    tower = model.model.vision_tower
    assert type(tower).__name__ == "SiglipVisionModel" and len(tower.encoder.layers) == 2
    assert tower.config.hidden_size == 48 and tower.config.num_attention_heads == 4
    assert tower.config.intermediate_size == 80
    assert "mm_encoder_outputs" not in inputs
    n, newlines = visual_token_count(model, SPEC)
    assert SPEC.vision_views() == 3                       # the base tile + 1x2 anyres tiles
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 3, 112, 112)
    assert inputs["image_sizes"].tolist() == [[112, 224]] * 2
    assert float(inputs["pixel_values"].abs().max()) <= 1.0      # SigLIP's normalised range
    assert not torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][1])
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                             vision_feature_layer=-1, vision_feature_select_strategy="full")
    feats = out.pooler_output
    assert [f.shape[0] for f in feats] == [n, n]
    assert int((inputs["input_ids"][0] == SPEC.image_token_id).sum()) == n
    assert int((feats[0] == model.model.image_newline).all(dim=-1).sum()) == newlines


def _nearest_similarity(model, pixels, sizes):
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes, vision_feature_layer=-1,
                                               vision_feature_select_strategy="full").pooler_output[0]
    unit = torch.nn.functional.normalize(feats, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-1.0)
    return float(sim.max(dim=1).values.mean())


def test_flat_regions_give_redundant_features_through_the_random_tower(tiny):
    """Each token's most similar other token is closer for the Voronoi scene than for pixel noise of
    the same range: the redundancy the reductions find comes from the scene, not the tower."""
    model, inputs = tiny
    pixels, sizes = inputs["pixel_values"][:1], inputs["image_sizes"][:1]
    noise = (torch.rand(pixels.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert _nearest_similarity(model, pixels, sizes) > _nearest_similarity(model, noise, sizes) + 0.05


def test_memory_estimate_counts_the_tower_and_projector_of_the_built_model():
    for spec in (SPEC, SyntheticSpec(**{**TINY_VISION, "vocab": 64})):         # running tower, and none
        model = build_synthetic_model(spec)
        built = sum(p.numel() for p in model.parameters())
        dims = spec.text_dims()
        assert text_tower_params(dims) + spec.extra_params() == built
        est = estimate_memory(dims, seq_len=100, batch=1, max_new_tokens=2, dtype_bytes=4,
                              extra_params=spec.extra_params())
        assert est.weights == 4 * built
    # the tower's activations count where they exceed a decoder layer's
    big = SyntheticSpec.preset("llava-onevision-7b", layers=1, vision_layers=2, image_size=(384, 384))
    assert big.vision_activation_bytes(1, 4) > 0 == SyntheticSpec.preset("llava-onevision-7b").vision_activation_bytes(1, 4)
    dims = TextDims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=1, vocab=64)
    small = estimate_memory(dims, seq_len=10, batch=1, max_new_tokens=1, dtype_bytes=4)
    assert estimate_memory(dims, seq_len=10, batch=1, max_new_tokens=1, dtype_bytes=4,
                           extra_activations=10**9).activations == 10**9 > small.activations


def test_the_real_tower_is_counted_at_its_widths():
    """SigLIP-so400m at 384 px: about 15.2M parameters per layer (hidden 1152, MLP 4304)."""
    one = SyntheticSpec.preset("llava-onevision-7b", vision_layers=1).extra_params()
    two = SyntheticSpec.preset("llava-onevision-7b", vision_layers=2).extra_params()
    h, f = 1152, 4304
    assert two - one == 4 * (h * h + h) + h * f + f + f * h + h + 4 * h


def test_spec_round_trip_and_refusals():
    data = SPEC.to_dict()
    assert data["vision_layers"] == 2 and data["vision_hidden"] == 48
    data["image_size"], data["noise"] = tuple(data["image_size"]), tuple(data["noise"])
    assert SyntheticSpec(**data) == SPEC
    # without a running tower the spec reads as before the vision fields existed
    assert not any(k.startswith("vision_") for k in SyntheticSpec().to_dict())
    for over, match in [({"vision_layers": -1}, "vision_layers=-1 must be an integer >= 0"),
                        ({"vision_layers": True}, "vision_layers=True"),
                        ({"vision_layers": 2, "vision_heads": 5}, "vision_hidden=1152 is not a multiple of vision_heads=5"),
                        ({"vision_layers": 2, "vision_intermediate": 0}, "vision_intermediate=0 must be a positive")]:
        with pytest.raises(ValueError, match=match):
            SyntheticSpec(**over)
    with pytest.raises(ValueError, match="LLaVA-OneVision synthetic model only"):
        SyntheticSpec.preset("qwen3.5", vision_layers=1)


def test_prefill_time_never_includes_an_image_encoding():
    timeline = _Timeline(torch.device("cpu"))
    timeline.lm_calls = [[10.0, 20.0]]
    timeline.vision_calls = [[2.0, 4.0]]                 # before the prefill (generate()'s encoding)
    assert timeline.prefill_seconds() == 10.0 and timeline.vision_seconds() == 2.0
    timeline.vision_calls = [[12.0, 15.0]]               # inside the text model's call: subtracted
    assert timeline.prefill_seconds() == 7.0
    timeline.vision_calls = []
    assert timeline.vision_seconds() is None


def test_the_encoder_timer_keeps_the_signature_and_restores_exactly(tiny):
    model, _ = tiny
    inner = model.model
    before = inspect.signature(inner.get_image_features)
    timer = _EncoderTimer(inner, _Timeline(torch.device("cpu")))
    assert "get_image_features" in vars(inner)
    assert inspect.signature(inner.get_image_features) == before      # generate() picks arguments by it
    timer.remove()
    assert "get_image_features" not in vars(inner)


def test_visionzip_and_the_tower_time_in_measure_speed(tiny):
    model, inputs = tiny
    cfgs = [pact_vlm.PACTConfig(layer=1, cutoff=0.3), pact_vlm.VisionZipConfig(keep_ratio=0.3)]
    res = measure_speed(model, cfgs, inputs, repeats=3, warmup=0, max_new_tokens=2, names=["pact", "visionzip"])
    assert "get_image_features" not in vars(model.model)
    for v in res.variants:
        assert len(v["samples"]["vision_s"]) == 3 and all(x > 0 for x in v["samples"]["vision_s"]), v["name"]
    zip_ = res.variant("visionzip")
    red = zip_["reduction"]
    assert red["layer"] == 0 and red["visual_after"] < red["visual_before"] == 2 * 192
    prompt = inputs["input_ids"].shape[1]
    removed = [before - after for before, after in red["per_sample_visual"]]
    expected = work_fraction(TextDims.from_config(model.config), [prompt] * 2, [prompt - k for k in removed], 0)
    assert zip_["limit"]["fraction"] == pytest.approx(expected["fraction"])      # a reduction before layer 0
    r = zip_["ratios"]
    base = res.variant("unreduced")["samples"]["vision_s"]
    diffs = sorted(a - b for a, b in zip(zip_["samples"]["vision_s"], base))
    assert r["vision_extra_s"]["median"] == pytest.approx(diffs[1])
    assert "vision_s = the image encoder" in res.meta["timed"]
    assert "vision encoder (not in the LM prefill nor the limit" in res.table()


def test_fresh_process_child_runs_the_tower(one_thread):
    from pact_vlm.bench.memory import _child

    request = {"spec": SPEC.to_dict(), "config": pact_vlm.VisionZipConfig(keep_ratio=0.3).to_dict(),
               "dtype": "float32", "batch": 1, "max_new_tokens": 2, "threads": 1}
    mem = _child(request)
    assert mem["peak_rss_bytes"] >= mem["rss_before_bytes"] > 0


# -- the command line ---------------------------------------------------------------------------

def _run_tiny(monkeypatch, out, *extra):
    return run_tiny_bench(monkeypatch, "tiny-vision", TINY_VISION, [
        "--image-size", "112x224", "--text-tokens", "10", "--vocab", "64", "--layer", "1", "--target-ratio", "0.6",
        "--repeats", "3", "--warmup", "0", "--max-new-tokens", "2", "--no-fresh-memory", "--json", out, *extra])


def test_visionzip_runs_through_the_bench_with_a_running_tower(monkeypatch, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert _run_tiny(monkeypatch, out, "--vision-layers", "2", "--method", "pact", "divprune:layer=0", "dart",
                     "visionzip") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "visionzip@0.6" in printed and "vision_s" in printed and "SiglipVisionModel tower of 2 layers" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["synthetic_spec"]["vision_layers"] == 2
    assert [v["name"] for v in data["variants"]] == ["unreduced", "pact@0.6", "divprune:layer=0@0.6", "dart@0.6",
                                                     "visionzip@0.6"]
    assert data["meta"]["calibration"][-1]["param"] == "keep_ratio"
    for v in data["variants"]:
        assert v["summary"]["vision_s"]["median"] > 0, v["name"]
    zip_ = data["variants"][-1]
    assert zip_["reduction"]["visual_after"] < zip_["reduction"]["visual_before"] == 192
    assert abs(zip_["reduction"]["reduction_ratio"] - 0.6) <= 0.02
    assert zip_["ratios"]["vision_extra_s"] is not None and zip_["limit"]["possible_speedup"] > 1


def test_without_a_running_tower_visionzip_is_refused_with_the_fix(monkeypatch, capsys):
    built = []
    monkeypatch.setattr("pact_vlm.bench.command._synthetic_model", lambda *a, **k: built.append(1))
    assert _run_tiny(monkeypatch, "unused.json", "--method", "pact", "visionzip") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: --method visionzip: VisionZipConfig reads the vision tower's attention")
    assert "pass --vision-layers N" in err and "\n" not in err and not built


@pytest.mark.parametrize("argv, match", [
    (["--vision-layers", "-1"], "--vision-layers=-1 must be >= 0"),
    (["--vision-layers", "2", "--model", "some/model"], "--vision-layers builds the synthetic model's vision tower"),
    (["--vision-layers", "2", "--synthetic", "qwen3.5"], "--vision-layers 2: a running vision tower is built for"),
])
def test_bad_vision_layers_are_refused(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pact-vlm: error: ") and "\n" not in err and match in err


def test_a_vision_layers_value_that_is_no_integer_is_refused(capsys):
    assert main(["bench", "--vision-layers", "two"]) == 2
    assert "argument --vision-layers: invalid int value: 'two'" in capsys.readouterr().err


def test_the_memory_refusal_names_the_tower(monkeypatch, capsys):
    import pact_vlm.bench.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device=None: 10**8)
    assert main(["bench", "--device", "cpu", "--layers", "4", "--layer", "1", "--vision-layers", "2",
                 "--quiet"]) == 2
    assert "for 4 layers of hidden 3584 and a 2-layer vision tower" in capsys.readouterr().err
