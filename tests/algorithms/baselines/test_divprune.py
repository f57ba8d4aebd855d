"""DivPrune's greedy max-min selection on points whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from pact_vlm.algorithms import baselines as bl


def _angles(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def test_first_pick_is_the_most_isolated_point_then_the_farthest_from_those_chosen():
    # 0 and 1 are near-duplicates; 3 is the most isolated (its nearest point, 2, is 90 degrees away)
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    assert bl.max_min_select(x, 1).tolist() == [3]
    assert bl.max_min_select(x, 2).tolist() == [0, 3]          # opposite of 3: distance 2
    assert bl.max_min_select(x, 3).tolist() == [0, 2, 3]       # 2 is 1 from both, 4 only 0.29 from 0
    assert bl.max_min_select(x, 5).tolist() == [0, 1, 2, 3, 4]


def test_a_cluster_of_duplicates_gives_one_token_and_the_outliers_the_rest():
    x = torch.cat([_angles([10.0] * 6), _angles([100.0, 190.0, 280.0])])
    keep = bl.max_min_select(x, 4).tolist()
    assert keep[-3:] == [6, 7, 8] and len([i for i in keep if i < 6]) == 1


def test_ties_go_to_the_earlier_token_and_nothing_is_picked_twice():
    x = torch.ones(5, 3)                                       # every distance is 0
    assert bl.max_min_select(x, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_pick_maximises_the_distance_to_the_chosen_set(seed):
    """The greedy invariant, checked by brute force on the picks in order."""
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(seed))
    xn = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - xn @ xn.T
    chosen = []
    for _ in range(8):
        rest = [j for j in range(30) if j not in chosen]
        if not chosen:
            score = {j: min(float(dist[i, j]) for i in range(30) if i != j) for j in rest}
        else:
            score = {j: min(float(dist[i, j]) for i in chosen) for j in rest}
        chosen.append(max(rest, key=lambda j: (score[j], -j)))
    assert bl.max_min_select(x, 8).tolist() == sorted(chosen)


def test_divprune_reduce_keeps_the_ceil_of_the_ratio_unchanged():
    h = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    red = bl.divprune_reduce(h, 0.25)
    assert red.num_after == 3 and torch.equal(red.hidden, h[red.keep_index])
    assert torch.equal(red.labels[red.keep_index], red.keep_index) and int((red.labels == -1).sum()) == 7
    assert bl.divprune_reduce(h, 0.0).num_after == 0
    with pytest.raises(ValueError, match="k=11 must lie in"):
        bl.max_min_select(h, 11)
