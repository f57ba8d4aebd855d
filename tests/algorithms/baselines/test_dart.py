"""DART's pivots and duplicate removal on vectors whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from pact_vlm.algorithms import baselines as bl


def _angles(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def test_the_pivot_is_the_largest_score_and_takes_the_least_similar_tokens():
    #          0    1    2     3     4     5
    x = _angles([0, 10, 20, 90, 180, 170])
    scores = torch.tensor([1.0, 5.0, 2.0, 0.0, 0.0, 0.0])
    # pivot 1 (10 degrees); the least similar to it: 4 (170 deg away), then 5 (160), then 3 (80)
    assert bl.dart_select(x, scores, 1, 1).tolist() == [1]
    assert bl.dart_select(x, scores, 2, 1).tolist() == [1, 4]
    assert bl.dart_select(x, scores, 3, 1).tolist() == [1, 4, 5]
    assert bl.dart_select(x, scores, 4, 1).tolist() == [1, 3, 4, 5]


def test_duplicates_of_a_kept_token_are_never_the_next_choice():
    # tokens 0-3 duplicate the pivot; 4 and 5 are each other's near-duplicates, opposite the pivot
    x = torch.cat([_angles([0, 0, 1, 2]), _angles([179, 180])])
    scores = torch.tensor([9.0, 0, 0, 0, 0, 0])
    assert bl.dart_select(x, scores, 2, 1).tolist() == [0, 5]      # 180 deg is less similar than 179


def test_the_budget_is_shared_between_pivots_in_order_and_is_exact():
    #            0   1   2   3    4    5    6    7
    x = _angles([0, 5, 90, 95, 180, 185, 270, 275])
    scores = torch.tensor([3.0, 0, 2.0, 0, 0, 0, 0, 0])
    # pivots 0 and 2 (scores 3, 2) kept; 4 left: pivot 0 (in order first) takes the 2 least similar
    # to 0 deg (180, 185 -> 4, 5), then pivot 2 (90 deg) takes 6 and 7 (270 / 275, least similar to 90)
    assert bl.dart_select(x, scores, 6, 2).tolist() == [0, 2, 4, 5, 6, 7]
    # 5 left: 3 for pivot 0 (180, 185, then 95 deg), 2 for pivot 2 (270, 275)
    assert bl.dart_select(x, scores, 7, 2).tolist() == [0, 2, 3, 4, 5, 6, 7]
    for k in range(9):
        assert bl.dart_select(x, scores, k, 3).numel() == k


def test_text_pivots_take_their_share_and_are_not_kept():
    x = _angles([0, 60, 180, 250])
    scores = torch.tensor([1.0, 0, 0, 0])
    # alone, pivot 0 takes 180 then 250 deg (cos -0.34 < cos 60 = 0.5)
    assert bl.dart_select(x, scores, 3, 1).tolist() == [0, 2, 3]
    # with a text pivot at 200 deg: pivot 0 takes 180, the text pivot the token farthest from 200 (60)
    assert bl.dart_select(x, scores, 3, 1, _angles([200])).tolist() == [0, 1, 2]


def test_dart_reduce_keeps_the_rows_unchanged_and_checks_k():
    h = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    red = bl.dart_reduce(h, h, h.norm(dim=-1), 3, 2)
    assert red.num_after == 3 and torch.equal(red.hidden, h[red.keep_index])
    with pytest.raises(ValueError, match="k=7 must lie in"):
        bl.dart_select(h, h.norm(dim=-1), 7, 2)
