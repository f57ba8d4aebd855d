"""match_budget: the parameter value giving a target reduction ratio."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.budget import measure_ratio


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    model = tm.build_tiny("llava", "sdpa")
    inputs = [tm.make_inputs(model, "llava", seed=s) for s in range(2)]
    return model, inputs


def _ratio_by_hand(model, cfg, inputs):
    before = after = 0
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        for x in inputs:
            model(**x)
            before += handle.stats.visual_before
            after += handle.stats.visual_after
    return 1 - after / before


def test_measure_ratio_is_token_weighted_over_inputs(llava):
    model, inputs = llava
    two = [inputs[0], tm.make_inputs(model, "llava", n_images=2, seed=3)]
    cfg = pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.3)
    assert measure_ratio(model, cfg, two) == pytest.approx(_ratio_by_hand(model, cfg, two), abs=1e-9)
    single = [measure_ratio(model, cfg, x) for x in two]
    assert single[0] != pytest.approx(single[1])        # the weighting matters on these inputs
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_pact_cutoff_is_matched(llava, target):
    model, inputs = llava
    base = pact_vlm.PACTConfig(layer=2, prune_ratio=0.2, cutoff=0.1)
    cfg = pact_vlm.match_budget(model, base, inputs, target, tol=0.02)
    assert isinstance(cfg, pact_vlm.PACTConfig)
    assert (cfg.layer, cfg.prune_ratio) == (base.layer, base.prune_ratio) and cfg.cutoff != base.cutoff
    got = _ratio_by_hand(model, cfg, inputs)
    # 50 visual tokens in all: one token is 0.02 of the ratio
    assert abs(got - target) <= 0.02 + 1e-9


def test_other_param_and_integer_steps(llava):
    model, inputs = llava
    cfg = pact_vlm.match_budget(model, pact_vlm.PACTConfig(layer=2, cutoff=0.0), inputs, 0.4,
                                param="prune_ratio", tol=0.0, max_iter=12)
    # cutoff 0: every kept token is its own cluster and retrieval radius is 0, so the ratio is
    # 1 - int(25 * (1 - prune_ratio)) / 25 per image; 0.4 is reachable exactly
    assert _ratio_by_hand(model, cfg, inputs) == pytest.approx(0.4)
    assert cfg.cutoff == 0.0


def test_unreachable_target_names_target_and_range(llava):
    model, inputs = llava
    with pytest.raises(ValueError, match=r"target_ratio=1.0 cannot be reached .*reachable reduction ratios "
                                         r"are \[0\.\d+, 0\.9\d+\]"):
        pact_vlm.match_budget(model, pact_vlm.PACTConfig(layer=2), inputs, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_ratio=1.5), "target_ratio=1.5"),
    (dict(target_ratio=0.5, param="alpha"), "param='alpha' cannot be searched.*cutoff, prune_ratio"),
    (dict(target_ratio=0.5, tol=-1), "tol=-1"),
    (dict(target_ratio=0.5, max_iter=0), "max_iter=0"),
])
def test_bad_arguments(llava, kwargs, match):
    model, inputs = llava
    with pytest.raises(ValueError, match=match):
        pact_vlm.match_budget(model, pact_vlm.PACTConfig(layer=2), inputs, **kwargs)


def test_inputs_without_visual_tokens_are_refused(llava):
    model, _ = llava
    text = tm.make_inputs(model, "llava", with_image=False)
    with pytest.raises(ValueError, match="no visual tokens"):
        pact_vlm.match_budget(model, pact_vlm.PACTConfig(layer=2), [text], 0.5)
    with pytest.raises(ValueError, match="non-empty list"):
        pact_vlm.match_budget(model, pact_vlm.PACTConfig(layer=2), [], 0.5)


def test_keep_ratio_methods_are_matched(llava):
    model, inputs = llava
    cfg = pact_vlm.match_budget(model, pact_vlm.FastVConfig(layer=2), inputs, 0.6, tol=0.0)
    assert _ratio_by_hand(model, cfg, inputs) == pytest.approx(0.6)      # 10 of 25 kept per image
    cfg = pact_vlm.match_budget(model, pact_vlm.KMeansConfig(layer=2), inputs, 0.69, tol=0.0)
    assert _ratio_by_hand(model, cfg, inputs) == pytest.approx(0.68)     # 8 clusters of 25: closest


def test_vtw_layer_is_matched_at_the_equivalent_layer(llava):
    model, inputs = llava
    # withdrawing at layer K of 4 removes the work of a ratio (4 - K) / (4 - 1) reduction at layer 1
    cfg = pact_vlm.match_budget(model, pact_vlm.VTWConfig(equivalent_layer=1), inputs, 0.65)
    assert cfg.layer == 2 and cfg.equivalent_layer == 1
    assert measure_ratio(model, cfg, inputs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"reachable reduction ratios are \[0.3333, 1.3333\]"):
        pact_vlm.match_budget(model, pact_vlm.VTWConfig(equivalent_layer=1), inputs, 0.1, tol=0.0)


def test_tome_r_is_matched_on_the_layer_average(llava):
    model, inputs = llava
    # from layer 1, r per layer: layers 1..3 see 25 - r, 25 - 2r, 25 - 3r -> ratio 6r / 75 at layer 1
    cfg = pact_vlm.match_budget(model, pact_vlm.ToMeConfig(layer=1, equivalent_layer=1), inputs, 0.3)
    assert isinstance(cfg.r, int) and cfg.r == 4
    assert measure_ratio(model, cfg, inputs) == pytest.approx(6 * 4 / 75)
    # the same r compared at layer 2 (the work of layers 2..3 against two layers of a single reduction)
    cfg2 = cfg.replace(equivalent_layer=2)
    assert measure_ratio(model, cfg2, inputs) == pytest.approx((1 - (25 + 21 + 17 + 13) / 100) * 4 / 2)
