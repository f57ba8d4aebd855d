"""pact_reduce and merging on one sequence."""

from __future__ import annotations

import torch

import pact_vlm
from pact_vlm.algorithms import gather_positions, merge_clusters
from pact_vlm.algorithms.dbdpc import cosine_distances


def _inputs(t=40, visual=slice(5, 35), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, 16, generator=g)
    queries = torch.randn(t, 4, 8, generator=g)
    keys = torch.randn(t, 2, 8, generator=g)
    # clustered rotated keys: 6 groups
    base = torch.randn(6, 16, generator=g)
    rotated = (base[torch.randint(0, 6, (t,), generator=g)] + 0.1 * torch.randn(t, 16, generator=g)).view(t, 2, 8)
    visual_index = torch.arange(t)[visual]
    return hidden, queries, keys, rotated, visual_index


def test_reduce_combines_euti_dbdpc_retrieval_and_merge():
    hidden, queries, keys, rotated, vidx = _inputs()
    red = pact_vlm.pact_reduce(hidden, queries, keys, rotated, visual_index=vidx,
                               prune_ratio=0.3, cutoff=0.2, alpha=1.5)
    n = vidx.numel()
    assert red.labels.shape == (n,)
    assert torch.equal(red.keep_index, red.keep_index.sort().values)
    # every kept token represents itself; every label points at a kept token or is -1
    assert torch.equal(red.labels[red.keep_index], red.keep_index)
    assert bool(torch.isin(red.labels[red.labels >= 0], red.keep_index).all())
    # sizes count members; hidden is their mean
    members = [(red.labels == k).sum().item() for k in red.keep_index.tolist()]
    assert red.sizes.tolist() == members
    vh = hidden[vidx]
    for row, k in enumerate(red.keep_index.tolist()):
        torch.testing.assert_close(red.hidden[row], vh[red.labels == k].mean(0))
    # the pruned set is the lowest EUTI scores; the kept tokens' clusters are DBDPC's
    scores = pact_vlm.euti_scores(hidden[: vidx[-1] + 1], keys[: vidx[-1] + 1], queries[: vidx[-1] + 1],
                                  visual_mask=torch.isin(torch.arange(vidx[-1] + 1), vidx))
    n_pruned = int(0.3 * n)
    pruned = scores.argsort()[:n_pruned]
    assert not bool(torch.isin(red.keep_index, pruned).any())
    flat = rotated[vidx].reshape(n, -1)
    dropped = red.labels == -1
    assert bool(torch.isin(torch.nonzero(dropped).flatten(), pruned).all())
    if dropped.any():
        d = cosine_distances(flat[dropped], flat[red.keep_index]).min(dim=1).values
        assert bool((d > 1.5 * 0.2).all())


def test_zero_reduction_is_identity():
    hidden, queries, keys, rotated, vidx = _inputs()
    red = pact_vlm.pact_reduce(hidden, queries, keys, torch.randn_like(rotated), visual_index=vidx,
                               prune_ratio=0.0, cutoff=0.0)
    assert torch.equal(red.keep_index, torch.arange(vidx.numel()))
    assert torch.equal(red.hidden, hidden[vidx])
    assert torch.equal(red.sizes, torch.ones(vidx.numel()))


def test_merge_clusters_means_and_sizes():
    hidden = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 7.0]])
    labels = torch.tensor([0, 0, 2, -1])
    merged, sizes = merge_clusters(hidden, labels, torch.tensor([0, 2]))
    assert merged.tolist() == [[2.0, 1.0], [5.0, 4.0]] and sizes.tolist() == [2.0, 1.0]


def test_gather_positions_1d_and_mrope():
    pos = torch.arange(10)
    idx = torch.tensor([0, 3, 7])
    assert gather_positions(pos, idx).tolist() == [0, 3, 7]
    mrope = torch.stack([torch.zeros(10, dtype=torch.long), torch.arange(10) // 3, torch.arange(10) % 3])
    assert gather_positions(mrope, idx).tolist() == [[0, 0, 0], [0, 1, 2], [0, 0, 1]]
