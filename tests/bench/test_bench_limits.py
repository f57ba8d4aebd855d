"""The analytical limit against hand computations."""

from __future__ import annotations

import pytest

from pact_vlm.bench.limits import TextDims, kv_cache_bytes, layer_flops, prefill_flops, work_fraction

# D=4, H=2 query heads, H_kv=1, d_h=2, F=8, N=2 layers, V=10
DIMS = TextDims(hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, layers=2, vocab=10)
# per token, linear multiply-adds: q 4*2*2=16, k+v 2*4*1*2=16, o 2*2*4=16, mlp 3*4*8=96 -> 144
PER_TOKEN_MACS = 144


def test_layer_flops_by_hand():
    f = layer_flops(DIMS, 3)
    assert f["linear"] == 2 * 3 * PER_TOKEN_MACS                  # 864
    # causal pairs 3*4/2 = 6; QK^T and PV: 2 products * 2 FLOPs * H * d_h * pairs = 2*2*2*2*6
    assert f["attention"] == 96


def test_prefill_flops_by_hand():
    f = prefill_flops(DIMS, [3, 2], logits_tokens=1)
    # layer 0 on 3 tokens: 864 + 96; layer 1 on 2 tokens: 2*2*144=576 + 2*2*2*2*3=48; lm_head 2*4*10=80
    assert f["linear"] == 864 + 576
    assert f["attention"] == 96 + 48
    assert f["lm_head"] == 80
    assert f["total"] == 864 + 96 + 576 + 48 + 80


def test_work_fraction_by_hand():
    w = work_fraction(DIMS, full_length=10, reduced_length=4, layer=1)
    full_layer = 2 * 10 * PER_TOKEN_MACS + 2 * 2 * 2 * 10 * 11      # 2880 + 880
    reduced_layer = 2 * 4 * PER_TOKEN_MACS + 2 * 2 * 2 * 4 * 5      # 1152 + 160
    lm_head = 80
    full = 2 * full_layer + lm_head
    reduced = full_layer + reduced_layer + lm_head
    assert w["flops_full"] == full
    assert w["flops_reduced"] == reduced
    assert w["fraction"] == pytest.approx(reduced / full)
    assert w["possible_speedup"] == pytest.approx(full / reduced)
    assert w["linear_fraction"] == pytest.approx((2880 + 1152) / (2 * 2880))
    assert w["attention_fraction"] == pytest.approx((880 + 160) / (2 * 880))
    assert w["kv_fraction"] == pytest.approx((10 + 4) / 20)


def test_work_fraction_sums_samples_and_is_one_without_reduction():
    assert work_fraction(DIMS, 10, 10, 0)["fraction"] == 1.0
    both = work_fraction(DIMS, [10, 6], [4, 6], 1)
    one = work_fraction(DIMS, 10, 4, 1)
    other = work_fraction(DIMS, 6, 6, 1)
    assert both["flops_full"] == one["flops_full"] + other["flops_full"]
    assert both["flops_reduced"] == one["flops_reduced"] + other["flops_reduced"]


def test_kv_cache_bytes_by_hand():
    # keys + values (2) * batch 3 * H_kv 1 * d_h 2 * 2 bytes * (5 + 3) entries
    assert kv_cache_bytes(DIMS, [5, 3], batch=3, itemsize=2) == 2 * 3 * 1 * 2 * 2 * 8


@pytest.mark.parametrize("call, match", [
    (lambda: work_fraction(DIMS, 10, 4, 2), "layer=2"),
    (lambda: work_fraction(DIMS, 10, 11, 1), "reduced_length=11"),
    (lambda: work_fraction(DIMS, [10, 9], [4], 1), "same number"),
    (lambda: prefill_flops(DIMS, [3]), "one length per decoder layer"),
    (lambda: layer_flops(DIMS, -1), "n=-1"),
    (lambda: TextDims(4, 2, 1, 2, 8, 0, 10), "layers=0"),
])
def test_bad_arguments_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_text_dims_from_config():
    import transformers

    cfg = transformers.LlavaOnevisionConfig(text_config=dict(
        model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, num_hidden_layers=7, vocab_size=1000))
    assert TextDims.from_config(cfg) == TextDims(3584, 28, 4, 128, 18944, 7, 1000)


def test_layer_work_fraction_by_hand():
    from pact_vlm.bench.limits import layer_work_fraction

    w = layer_work_fraction(DIMS, 10, [6, 4])
    full_layer = 2 * 10 * PER_TOKEN_MACS + 2 * 2 * 2 * 10 * 11
    six = 2 * 6 * PER_TOKEN_MACS + 2 * 2 * 2 * 6 * 7
    four = 2 * 4 * PER_TOKEN_MACS + 2 * 2 * 2 * 4 * 5
    assert w["fraction"] == pytest.approx((six + four + 80) / (2 * full_layer + 80))
    assert w["kv_fraction"] == pytest.approx(10 / 20)
    # one reduction layer: the same as work_fraction
    assert layer_work_fraction(DIMS, 10, [10, 4]) == work_fraction(DIMS, 10, 4, 1)
    with pytest.raises(ValueError, match="lengths"):
        layer_work_fraction(DIMS, 10, [11, 4])
