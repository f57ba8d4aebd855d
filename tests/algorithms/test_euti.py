"""EUTI against a direct per-head loop of eq. 2, both contexts, GQA."""

from __future__ import annotations

import math

import pytest
import torch

import pact_vlm
from pact_vlm.algorithms.euti import split_by_importance


def loop_euti(hidden, keys, queries, visual, context):
    """Eq. 1-2 written out: one head at a time, one token at a time."""
    t, n_kv, d_h = keys.shape
    n_heads = queries.shape[1]
    rows = [i for i in range(t) if visual[i]] if context == "visual" else list(range(t))
    scores = []
    for i in (i for i in range(t) if visual[i]):
        per_head = []
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            q_global = sum(queries[j, h].double() for j in rows) / len(rows)
            logits = {j: float(keys[j, kv].double() @ q_global) / math.sqrt(d_h) for j in rows}
            z = sum(math.exp(v) for v in logits.values())
            per_head.append(math.exp(logits[i]) / z)
        scores.append(sum(per_head) / n_heads * float(hidden[i].double().norm()))
    return torch.tensor(scores)


@pytest.mark.parametrize("context", ["visual", "prefix"])
@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2), (6, 1)])
def test_matches_per_head_loop(context, n_heads, n_kv):
    g = torch.Generator().manual_seed(n_heads * 10 + n_kv)
    t, d_h = 14, 8
    hidden = torch.randn(t, 16, generator=g)
    keys = torch.randn(t, n_kv, d_h, generator=g)
    queries = torch.randn(t, n_heads, d_h, generator=g)
    visual = torch.zeros(t, dtype=torch.bool)
    visual[3:11] = True
    got = pact_vlm.euti_scores(hidden, keys, queries, visual_mask=visual, context=context)
    want = loop_euti(hidden, keys, queries, visual, context)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-7)


def test_contexts_differ_and_variants_factorise():
    g = torch.Generator().manual_seed(1)
    hidden, keys, queries = torch.randn(10, 8, generator=g), torch.randn(10, 2, 4, generator=g), torch.randn(10, 2, 4, generator=g)
    visual = torch.tensor([False, False] + [True] * 6 + [False, False])
    full = {c: pact_vlm.euti_scores(hidden, keys, queries, visual_mask=visual, context=c) for c in ("visual", "prefix")}
    assert not torch.allclose(full["visual"], full["prefix"])
    norm = pact_vlm.euti_scores(hidden, keys, queries, visual_mask=visual, variant="norm")
    soft = pact_vlm.euti_scores(hidden, keys, queries, visual_mask=visual, variant="softmax")
    torch.testing.assert_close(norm, hidden[visual].norm(dim=-1))
    torch.testing.assert_close(norm * soft, full["visual"])
    torch.testing.assert_close(soft.sum(), torch.tensor(1.0))


def test_low_precision_is_scored_in_float32():
    g = torch.Generator().manual_seed(2)
    hidden, keys, queries = torch.randn(12, 8, generator=g), torch.randn(12, 2, 4, generator=g), torch.randn(12, 4, 4, generator=g)
    got = pact_vlm.euti_scores(hidden.bfloat16(), keys.bfloat16(), queries.bfloat16())
    assert got.dtype == torch.float32
    want = pact_vlm.euti_scores(hidden.bfloat16().float(), keys.bfloat16().float(), queries.bfloat16().float())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="attention"), "variant='attention'"),
    (dict(context="all"), "context='all'"),
    (dict(visual_mask=torch.ones(3, dtype=torch.bool)), "visual_mask has shape"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pact_vlm.euti_scores(torch.randn(5, 4), torch.randn(5, 1, 2), torch.randn(5, 2, 2), **kwargs)


def test_gqa_head_mismatch():
    with pytest.raises(ValueError, match="not a multiple"):
        pact_vlm.euti_scores(torch.randn(5, 4), torch.randn(5, 2, 2), torch.randn(5, 3, 2))


@pytest.mark.parametrize("n, ratio, n_kept", [(10, 0.0, 10), (10, 0.45, 5), (100, 0.29, 71), (1, 0.9, 1), (3, 0.99, 1),
                                            (729, 0.45, 400), (10, 0.3, 7), (2889, 0.2, 2311)])
def test_split_sizes(n, ratio, n_kept):
    kept, pruned = split_by_importance(torch.randn(n), ratio)
    assert kept.numel() == n_kept and pruned.numel() == n - n_kept
    assert sorted(torch.cat([kept, pruned]).tolist()) == list(range(n))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.5, 0.7, 0.9])
def test_kept_count_is_the_reference_rule(ratio):
    """The reference keeps int(N * (1 - ratio)) tokens; N - floor(ratio * N) differs on most N."""
    for n in range(1, 800):
        kept, _ = split_by_importance(torch.zeros(n), ratio)
        assert kept.numel() == max(1, int(n * (1 - ratio))), n


def test_split_keeps_the_highest_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3, 0.5])
    kept, pruned = split_by_importance(scores, 0.5)
    assert kept.tolist() == [0, 2, 3] and pruned.tolist() == [1, 4, 5]


@pytest.mark.parametrize("context", ["visual", "prefix"])
def test_mean_query_replaces_queries(context):
    g = torch.Generator().manual_seed(3)
    hidden, keys, queries = torch.randn(12, 8, generator=g), torch.randn(12, 2, 4, generator=g), torch.randn(12, 6, 4, generator=g)
    visual = torch.zeros(12, dtype=torch.bool)
    visual[2:9] = True
    rows = visual if context == "visual" else torch.ones(12, dtype=torch.bool)
    want = pact_vlm.euti_scores(hidden, keys, queries, visual_mask=visual, context=context)
    got = pact_vlm.euti_scores(hidden, keys, None, visual_mask=visual, context=context,
                               mean_query=queries[rows].mean(dim=0))
    torch.testing.assert_close(got, want)
    # norm-only needs no query at all
    torch.testing.assert_close(pact_vlm.euti_scores(hidden, keys, None, visual_mask=visual, variant="norm"),
                               hidden[visual].norm(dim=-1))


@pytest.mark.parametrize("queries, mean_query, match", [
    (None, None, "exactly one of queries"),
    (torch.randn(5, 2, 2), torch.randn(2, 2), "exactly one of queries"),
    (None, torch.randn(5, 2, 2), r"mean_query \[H, d_h\]"),
    (None, torch.randn(3, 2), "not a multiple"),
    (torch.randn(4, 2, 2), None, r"queries \[T=5"),
])
def test_bad_query_arguments(queries, mean_query, match):
    with pytest.raises(ValueError, match=match):
        pact_vlm.euti_scores(torch.randn(5, 4), torch.randn(5, 2, 2), queries, mean_query=mean_query)
