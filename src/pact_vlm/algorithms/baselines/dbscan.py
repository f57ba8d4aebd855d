"""DBSCAN (Ester et al., KDD 1996), pure torch."""

from __future__ import annotations

import torch

from ..dbdpc import cosine_distances
from ..merge import Reduction
from .common import best_per_cluster, flat_keys, merge_by_labels

__all__ = ["dbscan", "dbscan_reduce"]


def dbscan(dist: torch.Tensor, eps: float, min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-based clusters.

    A core token has at least ``min_samples`` tokens (itself included) within ``eps``; clusters
    are the connected components of core tokens linked by distances ``<= eps``; a non-core token
    within ``eps`` of a core token is a border token and joins the cluster of its nearest core
    neighbour (ties: lower index); the rest is noise.

    Args:
        dist: ``[N, N]`` distances; eps >= 0; min_samples >= 1.

    Returns:
        ``(cluster [N] ids in 0..C-1 numbered by first core member, -1 = noise; is_core [N] bool)``.
    """
    n = dist.shape[0]
    near = dist <= eps
    near.fill_diagonal_(True)
    core = near.sum(dim=1) >= min_samples
    comp = torch.arange(n, device=dist.device)
    link = near & core[:, None] & core[None, :]
    big = torch.full_like(comp, n)
    while True:
        # min-label propagation over the core graph, with pointer jumping (comp[v] is always a
        # core token of v's component with an index <= v, so comp[comp[v]] is one too)
        new = torch.where(link, comp[None, :], big[None, :]).min(dim=1).values
        new = torch.where(core, new, comp)
        for _ in range(4):
            new = new[new]
        if torch.equal(new, comp):
            break
        comp = new
    cluster = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    if bool(core.any()):
        _, ids = torch.unique(comp[core], return_inverse=True)   # numbered by smallest member = first core
        cluster[core] = ids
        to_core = torch.where(core[None, :] & near, dist.float(), torch.full_like(dist.float(), float("inf")))
        nearest_d, nearest = to_core.min(dim=1)
        border = ~core & torch.isfinite(nearest_d)
        cluster[border] = cluster[nearest[border]]
    return cluster, core


def dbscan_reduce(hidden: torch.Tensor, keys: torch.Tensor, eps: float, min_samples: int,
                  noise: str = "keep") -> Reduction:
    """DBSCAN on the cosine distances of ``keys``; each cluster becomes the mean of ``hidden``
    ``[N, D]`` at its member with the most neighbours within ``eps`` (ties: earlier); noise tokens
    stay as they are (``noise="keep"``) or are dropped (``"drop"``)."""
    if noise not in ("keep", "drop"):
        raise ValueError(f"noise={noise!r} is not one of 'keep', 'drop'")
    x = flat_keys(keys)
    dist = cosine_distances(x)
    cluster, _ = dbscan(dist, eps, min_samples)
    c = int(cluster.max()) + 1 if bool((cluster >= 0).any()) else 0
    degree = (dist <= eps).sum(dim=1).float()
    labels = best_per_cluster(degree, cluster, c)
    if noise == "keep":
        idx = torch.arange(x.shape[0], device=labels.device)
        labels = torch.where(cluster < 0, idx, labels)
    return merge_by_labels(hidden, labels)
