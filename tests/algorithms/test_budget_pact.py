"""The budget form of PACT: exact counts, the cut-off search, completion, retrieval and merging by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pact_vlm.algorithms.budget_pact import budget_keep_count, budget_pact_reduce


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_keep_count_is_ceil_of_the_ratio_at_least_one():
    assert budget_keep_count(10, 0.3) == 3          # not 4 (0.3 * 10 = 3.0000000000000004)
    assert budget_keep_count(16, 0.25) == 4
    assert budget_keep_count(7, 0.5) == 4
    assert budget_keep_count(5, 0.01) == 1
    assert budget_keep_count(9, 1.0) == 9
    assert budget_keep_count(0, 0.5) == 0
    with pytest.raises(ValueError, match=r"keep_ratio=0 is outside \(0, 1\]"):
        budget_keep_count(4, 0)
    with pytest.raises(ValueError, match="n=-1"):
        budget_keep_count(-1, 0.5)


def test_two_groups_of_duplicates_become_their_two_means():
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    keys = torch.tensor([a, a, a, b, b, b]).view(6, 1, 3)
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)
    red = budget_pact_reduce(hidden, keys, None, keep_ratio=2 / 6, prune_ratio=0.0, euti_variant="norm")
    assert red.keep_index.tolist() == [0, 3]
    assert red.labels.tolist() == [0, 0, 0, 3, 3, 3]
    assert red.sizes.tolist() == [3.0, 3.0]
    torch.testing.assert_close(red.hidden, torch.stack([hidden[:3].mean(0), hidden[3:].mean(0)]))
    assert red.cutoff == 0.0 and red.dbdpc_centers == 2


def test_completion_by_density_when_dbdpc_cannot_reach_the_budget():
    # four identical keys: DBDPC finds one center at any cut-off; the budget of 2 is completed by the
    # densest non-center (all equal: the lowest index), and the duplicates join the first center
    keys = torch.ones(4, 1, 3)
    hidden = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    red = budget_pact_reduce(hidden, keys, None, keep_ratio=0.5, prune_ratio=0.0, euti_variant="norm")
    assert red.keep_index.tolist() == [0, 1]
    assert red.dbdpc_centers == 1
    assert red.labels.tolist() == [0, 1, 0, 0]
    assert red.sizes.tolist() == [3.0, 1.0]
    assert red.hidden.flatten().tolist() == pytest.approx([(1 + 3 + 4) / 3, 2.0])


def test_cutoff_search_retrieval_and_merge_by_hand():
    # kept (largest norms): two pairs of keys 0.3 rad apart, the pairs 90 degrees apart;
    # set aside: token 4 (0.05 rad from token 1) and token 5 (at 45 degrees, far from every center)
    angles = [0.0, 0.3, math.pi / 2 + 0.3, math.pi / 2, 0.35, math.pi / 4]
    keys = torch.tensor([_unit(t) for t in angles]).view(6, 1, 2)
    norms = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    hidden = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    hidden = hidden / hidden.norm(dim=1, keepdim=True) * norms[:, None]
    red = budget_pact_reduce(hidden, keys, None, keep_ratio=2 / 6, prune_ratio=1 / 3, euti_variant="norm")
    d_pair = 1 - math.cos(0.3)
    assert red.cutoff == pytest.approx(d_pair, abs=1e-5)
    # within each pair the token nearer the other pair is densest: 1 and 3 are the centers
    assert red.keep_index.tolist() == [1, 3]
    assert red.labels.tolist() == [1, 1, 3, 3, 1, -1]
    assert red.sizes.tolist() == [3.0, 2.0]
    torch.testing.assert_close(red.hidden[0], hidden[[0, 1, 4]].mean(0))
    torch.testing.assert_close(red.hidden[1], hidden[[2, 3]].mean(0))


@pytest.mark.parametrize("n", [1, 2, 7, 30, 64])
@pytest.mark.parametrize("keep_ratio", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_exactly_the_budget_on_random_tokens(n, keep_ratio):
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 8, generator=gen)
    keys = torch.randn(n, 2, 4, generator=gen)
    mean_query = torch.randn(4, 4, generator=gen)
    red = budget_pact_reduce(hidden, keys, mean_query, keep_ratio=keep_ratio, prune_ratio=0.2)
    k = budget_keep_count(n, keep_ratio)
    assert red.num_after == k and red.num_before == n
    keep = red.keep_index
    assert bool((keep[1:] > keep[:-1]).all())
    assert red.labels[keep].tolist() == keep.tolist()          # every center stands for itself
    joined = red.labels[red.labels >= 0]
    assert bool(torch.isin(joined, keep).all())
    assert float(red.sizes.sum()) == joined.numel()
    for j, c in enumerate(keep.tolist()):
        torch.testing.assert_close(red.hidden[j], hidden[red.labels == c].mean(0))


def test_everything_kept_is_the_identity():
    gen = torch.Generator().manual_seed(3)
    hidden, keys = torch.randn(12, 8, generator=gen), torch.randn(12, 2, 4, generator=gen)
    red = budget_pact_reduce(hidden, keys, torch.randn(4, 4, generator=gen), keep_ratio=1.0, prune_ratio=0.0)
    assert red.keep_index.tolist() == list(range(12)) and red.labels.tolist() == list(range(12))
    torch.testing.assert_close(red.hidden, hidden)


def test_budget_larger_than_euti_keeps_the_budget():
    gen = torch.Generator().manual_seed(4)
    hidden, keys = torch.randn(10, 8, generator=gen), torch.randn(10, 1, 4, generator=gen)
    # EUTI alone would keep int(10 * 0.1) = 1; the budget is 8
    red = budget_pact_reduce(hidden, keys, torch.randn(2, 4, generator=gen), keep_ratio=0.8, prune_ratio=0.9)
    assert red.num_after == 8


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no visual tokens"):
        budget_pact_reduce(torch.zeros(0, 4), torch.zeros(0, 1, 4), None, keep_ratio=0.5, euti_variant="norm")
    with pytest.raises(ValueError, match="disagree on tokens"):
        budget_pact_reduce(torch.zeros(3, 4), torch.zeros(2, 1, 4), None, keep_ratio=0.5, euti_variant="norm")
    with pytest.raises(ValueError, match="keep_ratio=1.5"):
        budget_pact_reduce(torch.ones(3, 4), torch.ones(3, 1, 4), None, keep_ratio=1.5, euti_variant="norm")
