"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens (greedy max-min selection)."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import num_kept, prune

__all__ = ["max_min_select", "divprune_reduce"]


def max_min_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity: ``k`` rows of ``features``, each as far as possible from those before.

    Distance ``d(i, j) = 1 - cos(x_i, x_j)`` in float32. The first row is the one whose nearest
    other row is farthest (``argmax_j min_{i != j} d(i, j)``); each next row maximises its
    distance to the nearest row already chosen. Ties go to the earlier row; a chosen row is never
    chosen again (the reference code can repeat one when every distance left is 0). No host sync
    per step.

    Args:
        features: ``[N, D]``; k: rows to choose (``0 <= k <= N``).

    Returns:
        ``[k]`` LongTensor, ascending.
    """
    n = features.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, {n}]")
    device = features.device
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if k == n:
        return torch.arange(n, device=device)
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T                                                   # [N, N]
    # nearest other row of each row (the reference's second-smallest entry of each column)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=device), float("inf")).amin(dim=0)
    chosen = torch.zeros(k, dtype=torch.long, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    score = nearest
    for step in range(k):
        pick = score.masked_fill(taken, float("-inf")).argmax()           # first maximum: earlier row
        chosen[step] = pick
        taken[pick] = True
        to_pick = dist.index_select(0, pick.view(1))[0]
        score = to_pick if step == 0 else torch.minimum(score, to_pick)
    return chosen.sort().values


def divprune_reduce(hidden: torch.Tensor, keep_ratio: float) -> Reduction:
    """Keep the ``ceil(keep_ratio * N)`` most diverse rows of ``hidden`` ``[N, D]`` (:func:`max_min_select`)."""
    return prune(hidden, max_min_select(hidden, num_kept(hidden.shape[0], keep_ratio)))
