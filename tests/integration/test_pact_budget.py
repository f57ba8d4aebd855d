"""PACT's budget form through ``pact_vlm.apply`` at layer 0: exact counts per image, the same
reduction as the algorithm on the first layer's keys, identity at full budget, cached decoding."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.algorithms.budget_pact import budget_keep_count, budget_pact_reduce
from pact_vlm.integration import get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tm.build_tiny(arch, "sdpa", seed=0)
        return cache[arch]
    return get


def _image_counts(inputs) -> list[int]:
    return [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]


@pytest.mark.parametrize("arch", QWEN)
def test_each_image_keeps_exactly_its_budget(models, arch):
    model = models(arch)
    inputs = tm.make_inputs(model, arch, batch=2, image_sizes=[[(32, 48), (48, 48)], [(40, 56)]])
    counts = _image_counts(inputs)
    cfg = pact_vlm.PACTBudgetConfig(keep_ratio=0.3)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs)
    stats = handle.stats
    per_sample = [counts[:2], counts[2:]]
    for sample, images in zip(stats.per_sample, per_sample):
        assert sample["visual_before"] == sum(images)
        assert sample["visual_after"] == sum(budget_keep_count(n, 0.3) for n in images)
        labels = sample["labels"]
        assert sample["visual_after"] == int((labels == torch.arange(labels.numel())).sum())
        # no token joins a center of another image
        start = 0
        for n in images:
            own = labels[start:start + n]
            assert bool(((own == -1) | ((own >= start) & (own < start + n))).all())
            start += n


def test_the_same_reduction_as_the_algorithm_on_the_first_layer(models):
    arch = "qwen2_vl"
    model = models(arch)
    inputs = tm.make_inputs(model, arch, image_sizes=[[(48, 48)]])
    hidden, _, _, k, _, _ = tm.layer_input_by_hand(model, inputs, 0)
    visual = tm.visual_token_mask(model, inputs["input_ids"], arch)[0]
    layer = get_adapter(model).layers(model)[0]
    with torch.no_grad():
        normed = layer.input_layernorm(hidden[visual])
        mean_query = get_adapter(model).mean_query(layer, normed)
    want = budget_pact_reduce(hidden[visual], k[visual], mean_query, keep_ratio=0.25, prune_ratio=0.3)
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PACTBudgetConfig(keep_ratio=0.25, prune_ratio=0.3)) as h:
        model(**inputs)
    assert h.stats.per_sample[0]["labels"].tolist() == want.labels.tolist()
    assert 0 < want.num_after < want.num_before


@pytest.mark.parametrize("arch", QWEN)
def test_full_budget_without_pruning_is_the_unreduced_model(models, arch):
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad():
        base = model(**inputs).logits
        with pact_vlm.apply(model, pact_vlm.PACTBudgetConfig(keep_ratio=1.0, prune_ratio=0.0)) as handle:
            out = model(**inputs).logits
    assert handle.stats.visual_after == handle.stats.visual_before
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5)


def test_cached_generate_equals_recompute(models):
    arch = "qwen2_vl"
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    cfg = pact_vlm.PACTBudgetConfig(keep_ratio=0.3)
    with torch.no_grad(), pact_vlm.apply(model, cfg):
        cached = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        fresh = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.tolist() == fresh.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_ratio=0.0), r"keep_ratio=0.0 is outside \(0.0, 1.0\]"),
    (dict(keep_ratio=1.2), r"keep_ratio=1.2 is outside"),
    (dict(prune_ratio=1.0), "prune_ratio=1.0"),
    (dict(alpha=0), "alpha=0"),
    (dict(density="cosine"), "density='cosine'"),
    (dict(proportional_attention=1), "proportional_attention=1 must be True or False"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pact_vlm.PACTBudgetConfig(**kwargs)
