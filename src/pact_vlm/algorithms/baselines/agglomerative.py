"""Agglomerative (hierarchical) clustering, single / average / complete linkage, pure torch."""

from __future__ import annotations

import torch

from ..dbdpc import cosine_distances
from ..merge import Reduction
from .common import closest_to_mean, flat_keys, merge_by_labels, num_kept

__all__ = ["agglomerative", "agglomerative_reduce", "LINKAGES"]

LINKAGES = ("single", "average", "complete")


def agglomerative(dist: torch.Tensor, n_clusters: int, linkage: str = "single") -> torch.Tensor:
    """Merge the two closest clusters until ``n_clusters`` remain.

    Cluster distances follow the linkage (Lance-Williams updates): ``single`` = the smallest
    member distance, ``complete`` = the largest, ``average`` = the mean over member pairs. Ties
    go to the pair with the smallest lower index, then the smallest upper index.

    Args:
        dist: ``[N, N]`` symmetric distances (float; the diagonal is ignored).
        n_clusters: clusters to end with, ``1 <= n_clusters <= N``.
        linkage: ``"single"``, ``"average"`` or ``"complete"``.

    Returns:
        ``[N]`` LongTensor cluster ids in ``0..n_clusters-1``, numbered by first member.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r} is not one of {LINKAGES}")
    n = dist.shape[0]
    if not 1 <= n_clusters <= max(n, 1):
        raise ValueError(f"n_clusters={n_clusters} must be in [1, {n}]")
    device = dist.device
    d = dist.double().clone()
    d.fill_diagonal_(float("inf"))
    active = torch.ones(n, dtype=torch.bool, device=device)
    size = torch.ones(n, dtype=torch.float64, device=device)
    owner = torch.arange(n, device=device)          # the slot each point's cluster lives in
    nn_dist, nn_idx = d.min(dim=1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for _ in range(n - n_clusters):
        i = int(torch.where(active, nn_dist, inf).argmin())
        j = int(nn_idx[i])
        a, b = min(i, j), max(i, j)
        if linkage == "single":
            row = torch.minimum(d[a], d[b])
        elif linkage == "complete":
            row = torch.maximum(d[a], d[b])
        else:
            row = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
        row[a] = inf
        row[~active] = inf
        row[b] = inf
        d[a], d[:, a] = row, row
        d[b], d[:, b] = inf, inf
        active[b] = False
        size[a] += size[b]
        owner[owner == b] = a
        # rows whose nearest cluster was a or b (and a itself) recompute; others may now prefer a
        stale = active & ((nn_idx == a) | (nn_idx == b))
        stale[a] = True
        if bool(stale.any()):
            nn_dist[stale], nn_idx[stale] = d[stale].min(dim=1)
        better = active & ~stale & ((row < nn_dist) | ((row == nn_dist) & (nn_idx > a)))
        nn_dist[better] = row[better]
        nn_idx[better] = a
        nn_dist[b] = inf
    _, ids = torch.unique(owner, return_inverse=True)
    # renumber by first member
    first = torch.full((int(ids.max()) + 1,), n, dtype=torch.long, device=device)
    first.scatter_reduce_(0, ids, torch.arange(n, device=device), reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel(), device=device)
    return rank[ids]


def agglomerative_reduce(hidden: torch.Tensor, keys: torch.Tensor, keep_ratio: float, linkage: str) -> Reduction:
    """Cluster ``keys`` (cosine distances, heads concatenated) into ``ceil(keep_ratio * N)`` clusters
    (at least one) and merge ``hidden`` ``[N, D]`` by cluster mean at the member closest to the
    cluster's mean key."""
    x = flat_keys(keys)
    k = num_kept(x.shape[0], keep_ratio, at_least_one=True)
    cluster = agglomerative(cosine_distances(x), k, linkage)
    return merge_by_labels(hidden, closest_to_mean(x, cluster))
