"""Density-peak clustering (Rodriguez & Laio, Science 2014), pure torch."""

from __future__ import annotations

import torch

from ..dbdpc import cosine_distances
from ..merge import Reduction
from .common import flat_keys, merge_by_labels, num_kept

__all__ = ["dpc", "dpc_reduce"]


def dpc(dist: torch.Tensor, n_centers: int, dc: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Density peaks.

    ``rho_i = sum_j exp(-(d_ij / dc)^2)``; tokens are ranked by decreasing density (ties: lower
    index first); ``delta_i`` = distance to the nearest token ranked before ``i`` (infinite for
    the first); the ``n_centers`` tokens with the largest ``rho * delta`` (ties: lower index) are
    centers; in rank order, every other token joins the cluster of its nearest earlier-ranked
    token (ties: lower index).

    Args:
        dist: ``[N, N]`` distances; n_centers: ``1 <= n_centers <= N``; dc: kernel scale.

    Returns:
        ``(centers [C] ascending, labels [N])``: labels are center indices.
    """
    n = dist.shape[0]
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers={n_centers} must be in [1, {n}]")
    d = dist.float()
    rho = torch.exp(-(d / dc) ** 2).sum(dim=1)
    order = torch.sort(rho, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=d.device)
    earlier = rank[None, :] < rank[:, None]                          # [i, j]: j ranked before i
    masked = torch.where(earlier, d, torch.full_like(d, float("inf")))
    delta, parent = masked.min(dim=1)                                 # first index among ties
    gamma = rho * delta
    centers = torch.sort(gamma, descending=True, stable=True).indices[:n_centers].sort().values
    labels = torch.full((n,), -1, dtype=torch.long, device=d.device)
    labels[centers] = centers
    is_center = (labels >= 0).tolist()
    parent_list, labels_list = parent.tolist(), labels.tolist()
    for i in order.tolist():           # the densest token is always a center (gamma = inf)
        if not is_center[i]:
            labels_list[i] = labels_list[parent_list[i]]
    return centers, torch.tensor(labels_list, dtype=torch.long, device=d.device)


def dpc_reduce(hidden: torch.Tensor, keys: torch.Tensor, keep_ratio: float, dc: float = 2.0) -> Reduction:
    """DPC on the cosine distances of ``keys`` with ``ceil(keep_ratio * N)`` centers (at least one);
    each cluster becomes the mean of ``hidden`` ``[N, D]`` at its center."""
    x = flat_keys(keys)
    _, labels = dpc(cosine_distances(x), num_kept(x.shape[0], keep_ratio, at_least_one=True), dc)
    return merge_by_labels(hidden, labels)
