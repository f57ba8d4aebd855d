"""Helpers shared by the comparison methods: how many tokens to keep, and Reductions from a
keep set (pruning) or from cluster labels (merging)."""

from __future__ import annotations

import math

import torch

from ..merge import Reduction, merge_clusters

__all__ = ["num_kept", "top_k", "prune", "drop_all", "merge_by_labels", "closest_to_mean", "best_per_cluster", "flat_keys"]


def num_kept(n: int, keep_ratio: float, *, at_least_one: bool = False) -> int:
    """``ceil(keep_ratio * n)`` (the epsilon keeps e.g. 0.3 * 10 from rounding up to 4)."""
    k = min(n, max(0, math.ceil(keep_ratio * n - 1e-9)))
    return max(k, 1) if at_least_one and n > 0 else k


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` highest ``scores`` ``[N]``; ties go to the earlier index."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def prune(hidden: torch.Tensor, keep: torch.Tensor) -> Reduction:
    """The Reduction that keeps the rows ``keep`` (ascending ``[K]``) of ``hidden`` ``[N, D]`` unchanged."""
    n = hidden.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
    keep = keep.to(hidden.device)
    labels[keep] = keep
    return Reduction(keep, hidden[keep], torch.ones(keep.numel(), device=hidden.device), labels)


def drop_all(hidden: torch.Tensor) -> Reduction:
    """The Reduction that removes every one of the ``N`` rows of ``hidden`` ``[N, D]``."""
    return prune(hidden, torch.zeros(0, dtype=torch.long, device=hidden.device))


def merge_by_labels(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> Reduction:
    """Each cluster becomes one token at its representative.

    Args:
        hidden: ``[N, D]`` hidden states.
        labels: ``[N]`` the representative (an index into the rows) of each row's cluster, ``-1``
            for a dropped row; a representative carries its own index.
        weights: ``[N]`` sizes of the rows (tokens they already stand for), or None (all 1): the
            merged state is the ``weights``-weighted mean and the size the sum of the weights.

    Returns:
        :class:`Reduction` with the representatives (ascending), the (weighted) means and sizes.
    """
    centers = torch.unique(labels[labels >= 0])       # sorted
    if weights is None:
        merged, sizes = merge_clusters(hidden, labels, centers)
        return Reduction(centers, merged, sizes, labels)
    w = weights.float().to(hidden.device)
    sums, counts = merge_clusters(hidden.float() * w[:, None], labels, centers)
    wsum, _ = merge_clusters(w[:, None], labels, centers)
    merged = (sums.float() / wsum.float()).to(hidden.dtype)
    return Reduction(centers, merged, (wsum[:, 0].float() * counts), labels)


def closest_to_mean(points: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the member of its cluster closest (cosine) to the cluster's mean.

    Args:
        points: ``[N, d]`` float; cluster: ``[N]`` cluster ids in ``0..C-1`` (``-1`` = no cluster).

    Returns:
        ``[N]`` labels for :func:`merge_by_labels` (``-1`` kept for rows without a cluster); ties
        go to the earlier member.
    """
    x = torch.nn.functional.normalize(points.float(), dim=-1)
    member = cluster >= 0
    c = int(cluster.max()) + 1 if bool(member.any()) else 0
    sums = torch.zeros(c, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, cluster[member], x[member])
    mean = torch.nn.functional.normalize(sums, dim=-1)
    sim = torch.full((x.shape[0],), -math.inf, device=x.device)
    sim[member] = (x[member] * mean[cluster[member]]).sum(-1)
    return best_per_cluster(sim, cluster, c)


def best_per_cluster(score: torch.Tensor, cluster: torch.Tensor, c: int) -> torch.Tensor:
    """``[N]`` labels: for each row in a cluster, the earliest row of its cluster with the highest score."""
    member = cluster >= 0
    if c == 0:
        return torch.full_like(cluster, -1)
    idx = cluster.clamp(min=0)
    best = torch.full((c,), -math.inf, device=score.device).scatter_reduce(
        0, idx[member], score[member].float(), reduce="amax")
    rows = torch.arange(score.shape[0], device=score.device)
    hit = member & (score.float() == best[idx])
    rep = torch.full((c,), score.shape[0], dtype=torch.long, device=score.device).scatter_reduce(
        0, idx[hit], rows[hit], reduce="amin")
    return torch.where(member, rep[cluster.clamp(min=0)], torch.full_like(cluster, -1))


def flat_keys(rotated_keys: torch.Tensor) -> torch.Tensor:
    """``[N, H_kv, d_h]`` (or ``[N, d]``) keys as ``[N, H_kv * d_h]`` float32, heads concatenated."""
    return rotated_keys.reshape(rotated_keys.shape[0], -1).float()
