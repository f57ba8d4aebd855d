"""FastV scores, random / VTW pruning, ToMe matching, PruMerge and HiRED on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pact_vlm.algorithms import baselines as bl


# -- shared helpers ----------------------------------------------------------------------------------

def test_num_kept_and_top_k():
    assert [bl.num_kept(10, r) for r in (0.0, 0.3, 0.31, 1.0)] == [0, 3, 4, 10]
    assert bl.num_kept(10, 0.0, at_least_one=True) == 1
    assert bl.top_k(torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]), 2).tolist() == [1, 2]
    assert bl.top_k(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 2).tolist() == [1, 2]     # ties: earlier
    red = bl.prune(torch.arange(6.0).view(3, 2), torch.tensor([0, 2]))
    assert red.labels.tolist() == [0, -1, 2] and red.sizes.tolist() == [1.0, 1.0]


def test_vtw_drops_everything_and_random_is_seeded():
    hidden = torch.randn(7, 4)
    red = bl.vtw_reduce(hidden)
    assert red.num_after == 0 and red.hidden.shape == (0, 4) and red.labels.tolist() == [-1] * 7
    a = bl.random_reduce(hidden, 0.5, seed=3)
    b = bl.random_reduce(hidden, 0.5, seed=3)
    c = bl.random_reduce(hidden, 0.5, seed=4)
    assert a.keep_index.tolist() == b.keep_index.tolist() == bl.random_keep(7, 4, 3).tolist()
    assert a.num_after == 4 and a.keep_index.tolist() != c.keep_index.tolist()
    assert torch.equal(a.hidden, hidden[a.keep_index])


# -- FastV -------------------------------------------------------------------------------------------

def _attention_by_hand(q, k, positions, real):
    """Full causal attention matrix [H, T, T] with GQA, padding rows and columns zeroed."""
    t, h, d = q.shape
    kk = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(d)
    visible = real[None, :] & (positions[None, :] <= positions[:, None])
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs * real[None, :, None]


def test_fastv_attention_received_matches_the_attention_map():
    g = torch.Generator().manual_seed(0)
    t = 9
    q, k = torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g)
    positions = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6])            # two left-padding rows
    real = torch.tensor([False, False] + [True] * 7)
    attn = _attention_by_hand(q, k, positions, real).mean(0)           # [T, T]
    last = bl.attention_received(q, k, positions, real, mode="last")
    torch.testing.assert_close(last, attn[-1])
    every = bl.attention_received(q, k, positions, real, mode="all", chunk=2)
    torch.testing.assert_close(every, attn[real].mean(0))
    assert float(last[:2].abs().sum()) == 0.0 and last.sum().item() == pytest.approx(1.0)


def test_fastv_keeps_the_most_attended_tokens():
    hidden = torch.arange(5.0)[:, None]
    red = bl.fastv_reduce(hidden, torch.tensor([0.1, 0.5, 0.2, 0.5, 0.05]), 0.4)
    assert red.keep_index.tolist() == [1, 3]
    assert bl.fastv_reduce(hidden, torch.zeros(5), 0.0).num_after == 0


# -- ToMe --------------------------------------------------------------------------------------------

def test_bipartite_soft_matching_by_hand():
    # A = rows 0, 2, 4; B = rows 1, 3. Row 0 ~ row 3 (cos 0.99), row 2 ~ row 1 (cos 0.8), row 4 ~ row 3 (0.5)
    metric = torch.tensor([[1.0, 0.14], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.5, -0.866]])
    assert bl.bipartite_soft_matching(metric, 1).tolist() == [3, 1, 2, 3, 4]
    assert bl.bipartite_soft_matching(metric, 2).tolist() == [3, 1, 1, 3, 4]
    assert bl.bipartite_soft_matching(metric, 3).tolist() == [3, 1, 1, 3, 4]      # capped at N // 2 = 2
    six = torch.cat([metric, torch.tensor([[0.0, -1.0]])])                          # B gains row 5
    assert bl.bipartite_soft_matching(six, 3).tolist() == [3, 1, 1, 3, 5, 5]
    assert bl.bipartite_soft_matching(metric, 0).tolist() == [0, 1, 2, 3, 4]


def test_tome_merges_with_size_weighted_means():
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.9, 0.1]])
    hidden = torch.tensor([[0.0], [10.0], [4.0], [8.0]])
    sizes = torch.tensor([1.0, 1.0, 3.0, 1.0])
    red = bl.tome_reduce(hidden, metric, sizes, 2)
    # A = 0, 2 -> both most similar to B row 3 (vs row 1); both merge into 3
    assert red.keep_index.tolist() == [1, 3] and red.labels.tolist() == [3, 1, 3, 3]
    assert red.sizes.tolist() == [1.0, 5.0]
    torch.testing.assert_close(red.hidden[:, 0], torch.tensor([10.0, (0 * 1 + 4 * 3 + 8 * 1) / 5]))


# -- PruMerge ----------------------------------------------------------------------------------------

def test_cls_attention_concatenated_and_per_head():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    concat = bl.cls_attention(q, k)
    want = (q[:, :1] @ k.transpose(1, 2) / math.sqrt(8)).softmax(-1)[:, 0, 1:]
    torch.testing.assert_close(concat, want)
    heads = bl.cls_attention(q, k, heads=2)
    qh, kh = q.view(2, 6, 2, 4).transpose(1, 2), k.view(2, 6, 2, 4).transpose(1, 2)
    want = (qh[:, :, :1] @ kh.transpose(-1, -2) / 2.0).softmax(-1)[:, :, 0, 1:].sum(1)
    torch.testing.assert_close(heads, want)


def test_prumerge_selects_iqr_outliers_and_merges_neighbours():
    attn = torch.tensor([0.01, 0.02, 0.015, 0.5, 0.012, 0.3, 0.011, 0.013])
    # Q1, Q3 of the 8 values (linear) -> only 0.5 and 0.3 lie above Q3 + 1.5 IQR
    assert bl.iqr_outliers(attn) == 2
    assert bl.prumerge_select(attn).tolist() == [3, 5]
    assert bl.prumerge_select(attn, keep_ratio=0.5).tolist() == [1, 2, 3, 5]
    plus = bl.prumerge_select(attn, plus=True)           # step max(1, int(int(8 / 2) / 3)) = 1
    assert plus.tolist() == list(range(7))
    features = torch.eye(8)
    keys = torch.zeros(8, 2)
    keys[:, 0] = 1.0
    keys[5] = torch.tensor([0.0, 1.0])
    keys[6] = torch.tensor([0.1, 1.0])                    # 6 is 5's nearest key
    out = bl.prumerge_merge(features, keys, attn, torch.tensor([3, 5]), neighbors=1)
    # 3's nearest other key: the first of the ties with cosine 1 (row 0); 5's: row 6
    torch.testing.assert_close(out[0], features[3] + attn[0] * features[0])
    torch.testing.assert_close(out[1], features[5] + attn[6] * features[6])


# -- HiRED -------------------------------------------------------------------------------------------

def test_allocate_is_exact_and_respects_caps():
    out = bl.allocate(10, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([5, 5, 1]))
    assert out.tolist() == [5, 4, 1] and int(out.sum()) == 10
    assert bl.allocate(5, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([9, 9, 9])).tolist() == [2, 2, 1]
    assert bl.allocate(7, torch.tensor([0.0, 0.0]), torch.tensor([3, 9])).tolist() == [2, 5]
    assert bl.allocate(99, torch.tensor([1.0, 2.0]), torch.tensor([3, 4])).tolist() == [3, 4]


def test_tile_weights_count_the_attended_full_image_cells_per_tile():
    attn = torch.zeros(4, 4)
    attn[0, 0] = attn[0, 1] = attn[3, 3] = 1.0          # top-left twice, bottom-right once
    w = bl.tile_weights(attn, alpha=1 - 3 / 16, grid_hw=(2, 2))     # the 3 most attended cells
    assert w.tolist() == [2.0, 0.0, 0.0, 1.0]
    # a 1 x 2 tile grid splits columns only; a 3-wide grid splits a cell between tiles by area
    assert bl.tile_weights(attn, 1 - 3 / 16, (1, 2)).tolist() == [2.0, 1.0]
    assert sum(bl.tile_weights(attn, 1 - 3 / 16, (3, 3)).tolist()) == pytest.approx(3.0)


def test_hired_select_shares_the_budget_and_takes_the_most_attended_per_view():
    # full view: 4 tokens; two tiles with 3 tokens each; budget ceil(0.5 * 10) = 5, alpha 0.4 -> full 2
    view = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    final = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.1, 0.2, 0.7, 0.8, 0.1])
    keep = bl.hired_select(view, final, torch.tensor([1.0, 2.0]), keep_ratio=0.5, alpha=0.4)
    # tiles get 3 * (1/3, 2/3) = 1 and 2
    assert keep.tolist() == [1, 2, 4, 7, 8]
    # one view only: the whole budget goes to it
    single = bl.hired_select(torch.zeros(4, dtype=torch.long), torch.tensor([0.4, 0.1, 0.3, 0.2]),
                             torch.zeros(1), keep_ratio=0.5, alpha=0.4)
    assert single.tolist() == [0, 2]
