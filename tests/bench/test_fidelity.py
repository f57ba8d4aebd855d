"""The accuracy benchmark on the demo VLM: plumbing on a small untrained model, then the shipped one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pact_vlm.bench import fidelity
from pact_vlm.demo import model as demo_model


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    processor = demo_model.build_processor()
    config = demo_model.build_config(processor.tokenizer, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    return demo_model.Qwen2VLForConditionalGeneration(config).eval(), processor


def test_rows_are_calibrated_and_scored(small, tmp_path):
    model, processor = small
    result = fidelity.run_fidelity(model, processor, n=24, ratios=[0.5, 0.75], methods=["pact:prune_ratio=0.2", "tome"], layer=1,
                                   batch_size=12, calib_n=12, instrument_keep=[0.25], progress=False)
    base = result["unreduced"]
    assert 0.0 <= base["accuracy"] <= 1.0
    assert math.isclose(base["se"], math.sqrt(base["accuracy"] * (1 - base["accuracy"]) / 24))
    tome = [r for r in result["rows"] if r["method"] == "tome"]
    for row in tome:     # progressive: measured as it is calibrated, on the layer-averaged work
        assert abs(row["measured_ratio"] - row["target_ratio"]) < 0.1, row
    rows = {r["target_ratio"]: r for r in result["rows"] if r["method"] != "tome"}
    assert set(rows) == {0.5, 0.75}
    for target, row in rows.items():
        assert "error" not in row, row
        assert abs(row["measured_ratio"] - target) < 0.08, row      # calibrated on other questions
        assert row["param"] == "cutoff" and row["config"]["cutoff"] == row["value"]
        assert row["method"] == "pact:prune_ratio=0.2" and row["config"]["prune_ratio"] == 0.2
        assert set(row["per_type"]) <= {"color", "shape", "count", "exists", "where"}
    assert rows[0.75]["value"] > rows[0.5]["value"]
    (entry,) = result["instrument"]
    for key in ("oracle", "random", "anti_oracle"):
        assert entry[key]["measured_ratio"] == 0.75       # keep 16 of 64 tokens, exactly
    assert entry["random"]["seeds"] == 3
    gap = entry["oracle"]["accuracy"] - entry["anti_oracle"]["accuracy"]
    assert math.isclose(entry["checks"]["oracle_minus_anti_oracle"], gap)
    paths = fidelity.save_result(result, tmp_path, "test")
    saved = json.loads(paths["json"].read_text())
    assert saved["command"] == "test" and saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "pact" in paths["table"].read_text()
    assert paths["png"].stat().st_size > 1000


def test_precomputed_image_features_give_the_same_logits(small):
    """The benchmark runs the vision tower once per batch; the language model sees the same input."""
    import pact_vlm
    from pact_vlm.demo import shapes

    model, processor = small
    samples = shapes.make_dataset("heldout", 3)
    encoded = fidelity._encode(model, processor, samples, batch_size=3)
    batch = encoded.batches[0]
    assert "pixel_values" not in batch and "mm_encoder_outputs" in batch
    processor.tokenizer.padding_side = "left"
    try:
        plain = processor(images=[s.image for s in samples],
                          text=[demo_model.prompt(processor, s.question) for s in samples], return_tensors="pt",
                          padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    assert torch.equal(plain["input_ids"], batch["input_ids"])
    cfg = pact_vlm.PACTConfig(layer=1, prune_ratio=0.2, cutoff=0.3)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        want = model(**plain).logits
        want_after = handle.stats.visual_after
        got = model(**batch).logits
    assert handle.stats.visual_after == want_after < handle.stats.visual_before
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused(small):
    model, processor = small
    with pytest.raises(ValueError, match="ratio 1.0 must lie in"):
        fidelity.run_fidelity(model, processor, n=4, ratios=[1.0], progress=False)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fidelity.run_fidelity(model, processor, n=4, methods=["nope"], progress=False)
    with pytest.raises(ValueError, match="PACTConfig has no field.*'lambda'"):
        fidelity.run_fidelity(model, processor, n=4, methods=["pact:lambda=0.2"], progress=False)
    with pytest.raises(ValueError, match="option 'layer' in 'dart:layer' is not KEY=VALUE; write e.g. pact:prune"):
        fidelity.run_fidelity(model, processor, n=4, methods=["dart:layer"], progress=False)
    with pytest.raises(ValueError, match="prune_ratio=1.5 is outside"):
        fidelity.run_fidelity(model, processor, n=4, methods=["pact:prune_ratio=1.5"], progress=False)
    with pytest.raises(ValueError, match="n=0 must be an integer >= 1"):
        fidelity.run_fidelity(model, processor, n=0, progress=False)


def test_tuned_row_runs_tune_on_the_calibration_questions(small):
    model, processor = small
    result = fidelity.run_fidelity(model, processor, n=24, ratios=[0.6], methods=["pact-tuned"], layer=1,
                                   batch_size=12, calib_n=12, instrument_keep=[0.25], progress=False)
    (row,) = result["rows"]
    assert row["method"] == "pact (tuned)" and "error" not in row, row
    table = row["tune"]["table"]
    assert [r["prune_ratio"] for r in table] == [0.0, 0.1, 0.2, 0.3, 0.45]
    (chosen,) = [r for r in table if r["chosen"]]
    assert (row["config"]["prune_ratio"], row["config"]["cutoff"]) == (chosen["prune_ratio"], chosen["cutoff"])
    assert row["tune"]["samples"] == 12 and abs(row["tune"]["ratio"] - 0.6) <= 0.01
    assert abs(row["measured_ratio"] - 0.6) < 0.08


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    processor = demo_model.build_processor("llava")
    model = demo_model.build_model("llava", processor.tokenizer, num_hidden_layers=2, hidden_size=64,
                                   intermediate_size=128)
    return model.eval(), processor


def test_clip_demo_precomputed_features_give_the_same_logits(small_clip):
    """On the CLIP demo the pre-encoded batches match the processor's pixels, which are kept for vision methods."""
    from pact_vlm.demo import shapes

    model, processor = small_clip
    samples = shapes.make_dataset("heldout", 3)
    encoded = fidelity._encode(model, processor, samples, batch_size=3, keep_pixels=True)
    (batch,), (pixels,) = encoded.batches, encoded.pixel_batches
    assert "pixel_values" not in batch and "mm_encoder_outputs" in batch and "pixel_values" in pixels
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**pixels).logits, atol=1e-5, rtol=1e-5)
    from pact_vlm.methods import PACTConfig, VisionZipConfig

    assert encoded.batches_for(VisionZipConfig()) is encoded.pixel_batches
    assert encoded.batches_for(PACTConfig(layer=0)) is encoded.batches
    plain = fidelity._encode(model, processor, samples, batch_size=3)
    with pytest.raises(RuntimeError, match="without their pixels"):
        plain.batches_for(VisionZipConfig())


def test_vision_tower_methods_run_on_the_clip_demo(small_clip):
    """VisionZip, PruMerge and HiRED reduce inside the CLIP tower: calibrated and scored on their pixels."""
    model, processor = small_clip
    result = fidelity.run_fidelity(model, processor, n=12, ratios=[0.7], methods=["visionzip", "prumerge", "hired"],
                                   layer=0, batch_size=12, calib_n=12, instrument_keep=[0.25], random_seeds=1,
                                   progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"visionzip", "prumerge", "hired"}
    for name, row in rows.items():      # budgets in the tower: they reach the target on other questions
        assert "error" not in row, row
        assert row["param"] == "keep_ratio" and abs(row["measured_ratio"] - 0.7) < 0.05, row


def test_instrument_checks_survive_accuracies_without_spread():
    """An all-wrong (or all-right) model has zero standard errors: the gaps are 0 or infinite, not a crash."""
    def arm(acc):
        return {"accuracy": acc, "se": 0.0}

    flat = fidelity._instrument_checks({"oracle": arm(0.0), "random": arm(0.0), "anti_oracle": arm(0.0)})
    assert flat["oracle_minus_anti_oracle"] == 0.0 and flat["oracle_minus_random_se"] == 0.0
    assert flat["discriminates"] is False
    sharp = fidelity._instrument_checks({"oracle": arm(1.0), "random": {"accuracy": 0.5, "se": 0.1},
                                         "anti_oracle": arm(0.0)})
    assert sharp["oracle_minus_random_se"] == pytest.approx(5.0) and sharp["discriminates"] is True
    assert fidelity._instrument_checks({"oracle": arm(1.0), "random": arm(1.0), "anti_oracle": arm(0.0)}
                                       )["random_minus_anti_oracle_se"] == math.inf
