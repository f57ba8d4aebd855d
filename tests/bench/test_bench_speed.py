"""measure_speed on a tiny synthetic LLaVA-OneVision: fields, ratios, limits, refusals."""

from __future__ import annotations

import statistics

import pytest
import torch

import pact_vlm
from pact_vlm.bench import SyntheticSpec, build_synthetic_model, measure_speed, synthetic_inputs, work_fraction
from pact_vlm.bench.limits import TextDims
from pact_vlm.bench.models import visual_token_count
from pact_vlm.bench.speed import METRICS, paired_ratio, quartiles, resolve_device

# 112 px tiles of 14 px patches: 8x8 features per tile; a 112x224 image -> 1x2 tiles
TINY = SyntheticSpec(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=3, vocab=64, image_size=(112, 224),
                     tile=112, patch=14, text_tokens=12, text_before=4, regions=8, prototypes=4)
NEW_TOKENS = 3
REPEATS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    model = build_synthetic_model(TINY)
    return model, synthetic_inputs(model, TINY, batch=2)


@pytest.fixture(scope="module")
def result(tiny):
    model, inputs = tiny
    cfgs = [pact_vlm.PACTConfig(layer=1, cutoff=0.3), pact_vlm.PACTConfig(layer=2, cutoff=0.5)]
    return measure_speed(model, cfgs, inputs, repeats=REPEATS, warmup=0, max_new_tokens=NEW_TOKENS,
                         names=["a", "b"])


def test_synthetic_inputs_follow_the_model_layout(tiny):
    model, inputs = tiny
    n, newlines = visual_token_count(model, TINY)
    # 64 base features + an 8x16 grid (1x2 tiles), a newline after each of its 8 rows
    assert (n, newlines) == (64 + 8 * 17, 8)
    ids = inputs["input_ids"]
    assert ids.shape == (2, TINY.text_tokens + n)
    assert int((ids == TINY.image_token_id).sum(dim=1)[0]) == n
    images = inputs["mm_encoder_outputs"]["image"].pooler_output
    assert [tuple(x.shape) for x in images] == [(n, TINY.hidden)] * 2
    assert not torch.equal(images[0], images[1])          # every sample its own scene
    # the newline rows carry the model's image_newline, so the integration leaves them out
    is_newline = (images[0] == model.model.image_newline).all(dim=-1)
    assert int(is_newline.sum()) == newlines


def test_every_field_is_measured(result):
    assert [v["name"] for v in result.variants] == ["unreduced", "a", "b"]
    for v in result.variants:
        for metric in METRICS:
            values = v["samples"][metric]
            if metric == "reduction_s" and v["name"] == "unreduced":
                assert values == [None] * REPEATS and v["summary"][metric] is None
                continue
            if metric == "vision_s":             # pre-encoded image features: the vision tower never ran
                assert values == [None] * REPEATS and v["summary"][metric] is None
                continue
            assert len(values) == REPEATS and all(x > 0 for x in values), metric
            s = v["summary"][metric]
            assert s["q1"] <= s["median"] <= s["q3"]
    for key in ("device", "machine", "dtype", "batch", "prompt_tokens", "date", "torch", "transformers"):
        assert result.meta[key] not in (None, "")
    assert result.meta["batch"] == 2


def test_ratios_are_computed_from_the_samples(result):
    base = result.variant("unreduced")["samples"]
    for v in result.reduced:
        s, r = v["samples"], v["ratios"]
        per_round = [u / x for u, x in zip(base["lm_prefill_s"], s["lm_prefill_s"])]
        assert r["lm_prefill_speedup"]["median"] == pytest.approx(statistics.median(per_round))
        decode = [x / u for u, x in zip(base["decode_per_token_s"], s["decode_per_token_s"])]
        assert r["decode_ratio"]["median"] == pytest.approx(statistics.median(decode))
        assert r["of_possible"] == pytest.approx(statistics.median(per_round) / v["limit"]["possible_speedup"])
        assert r["reduction_share"] == pytest.approx(statistics.median(s["reduction_s"])
                                                     / statistics.median(base["lm_prefill_s"]))


def test_limit_and_kv_cache_follow_the_kept_tokens(result, tiny):
    model, inputs = tiny
    dims = TextDims.from_config(model.config)
    prompt = inputs["input_ids"].shape[1]
    for v in result.reduced:
        red = v["reduction"]
        removed = [before - after for before, after in red["per_sample_visual"]]
        assert red["visual_after"] < red["visual_before"]
        expected = work_fraction(dims, [prompt] * 2, [prompt - k for k in removed], red["layer"])
        assert v["limit"]["fraction"] == pytest.approx(expected["fraction"])
        # the cache holds exactly what the lengths per layer predict, generated tokens included
        itemsize = next(model.parameters()).element_size()
        per_entry = 2 * 2 * dims.kv_heads * dims.head_dim * itemsize        # k + v, batch 2
        lengths = v["kv_lengths_per_layer"]
        assert lengths == [n + NEW_TOKENS - 1 for n in red["seq_lengths"]]
        assert v["samples"]["kv_cache_bytes"] == [per_entry * sum(lengths)] * REPEATS
        assert v["ratios"]["kv_bytes_predicted"] == per_entry * sum(lengths)
        assert v["ratios"]["kv_ratio"] == pytest.approx(v["ratios"]["kv_ratio_predicted"])
    assert result.variant("unreduced")["kv_lengths_per_layer"] == [prompt + NEW_TOKENS - 1] * dims.layers
    # a later reduction layer keeps more of the cache
    assert result.variant("b")["reduction"]["layer"] == 2


def test_table_json_and_plot(result, tmp_path):
    text = result.table()
    assert "analytical limit" in text and "measured / possible" in text and "reduction step" in text
    result.save(tmp_path / "r.json")
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["variants"][1]["ratios"]["of_possible"] == result.variants[1]["ratios"]["of_possible"]
    result.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quartiles_and_paired_ratio():
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0}
    assert paired_ratio([2.0, 6.0, 9.0], [1.0, 2.0, 3.0]) == {"median": 3.0, "q1": 2.5, "q3": 3.0}
    with pytest.raises(ValueError, match="same number"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeats=0), "repeats=0"),
    (dict(repeats=2), "repeats=2"),
    (dict(warmup=-1), "warmup=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(configs=pact_vlm.PACTConfig(layer=3)), "layer=3 is beyond the model"),
    (dict(configs=[]), "configs is empty"),
    (dict(inputs={"pixel_values": None}), "input_ids"),
    (dict(names=["unreduced"]), "names="),
])
def test_bad_arguments_refused(tiny, kwargs, match):
    model, inputs = tiny
    args = dict(configs=pact_vlm.PACTConfig(layer=1), inputs=inputs, repeats=3, warmup=0, max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        measure_speed(model, args.pop("configs"), args.pop("inputs"), **args)


def test_devices(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    for bad in ("tpu", "mps", "gpu0"):
        with pytest.raises(ValueError, match=repr(bad)):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_spec_refuses_nonsense():
    with pytest.raises(ValueError, match="heads=5"):
        SyntheticSpec(hidden=64, heads=5)
    with pytest.raises(ValueError, match="unknown synthetic model"):
        SyntheticSpec.preset("llava-onevision-70b")
    with pytest.raises(ValueError, match="layers=0"):
        SyntheticSpec(layers=0)


def test_fresh_process_child_measures_one_variant(one_thread):
    from pact_vlm.bench.memory import _child

    request = {"spec": TINY.to_dict(), "config": pact_vlm.PACTConfig(layer=1, cutoff=0.3).to_dict(),
               "dtype": "float32", "batch": 1, "max_new_tokens": 2, "threads": 1}
    mem = _child(request)
    assert mem["peak_rss_bytes"] >= mem["rss_before_bytes"] > 0
    assert mem["rss_increase_bytes"] == mem["peak_rss_bytes"] - mem["rss_before_bytes"]


def test_other_methods_and_progressive_limits(tiny):
    """Any layer method can be measured; a progressive one (ToMe: every layer from 0) gets the
    per-layer limit of the mean sample."""
    from pact_vlm.bench.limits import layer_work_fraction

    model, inputs = tiny
    cfgs = [pact_vlm.FastVConfig(layer=1, keep_ratio=0.5), pact_vlm.ToMeConfig(layer=0, r=40, equivalent_layer=1)]
    res = measure_speed(model, cfgs, inputs, repeats=3, warmup=0, max_new_tokens=2, names=["fastv", "tome"])
    dims = TextDims.from_config(model.config)
    prompt = inputs["input_ids"].shape[1]          # both samples have this length (no padding)
    fastv, tome = res.variant("fastv"), res.variant("tome")
    assert fastv["limit"]["method"].startswith("per sample")
    assert fastv["reduction"]["reduction_ratio"] == pytest.approx(0.5, abs=0.01)
    red = tome["reduction"]
    assert tome["limit"]["method"].startswith("mean sample") and len(red["reduction_layers"]) > 1
    removed = [red["visual_before"] - v for v in red["visual_per_layer"]]
    lengths = [round((2 * prompt - k) / 2) for k in removed]
    assert lengths[-1] < lengths[0] <= prompt
    assert tome["limit"]["fraction"] == pytest.approx(layer_work_fraction(dims, prompt, lengths)["fraction"])
