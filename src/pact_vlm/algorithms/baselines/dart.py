"""DART (Wen et al., 2025): keep pivot tokens and the visual tokens least duplicated with them."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import prune, top_k

__all__ = ["dart_select", "dart_reduce"]


def dart_select(features: torch.Tensor, pivot_scores: torch.Tensor, k: int, num_pivots: int,
                extra_pivots: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending) of the ``k`` visual tokens DART keeps.

    1. Visual pivots: the ``min(num_pivots, k)`` tokens with the highest ``pivot_scores`` (ties to
       the earlier token); they are kept.
    2. Every pivot in turn (visual pivots in sequence order, then the rows of ``extra_pivots``,
       e.g. text pivots, in their order) takes the not yet kept visual tokens least cosine-similar
       to it (ties to the earlier token): the ``k - visual pivots`` tokens left are shared between
       the pivots, ``floor`` each and one more for the first ``remainder`` pivots, so exactly
       ``min(k, N)`` tokens are kept.

    Args:
        features: ``[N, D]`` the visual tokens' vectors the duplication is measured on.
        pivot_scores: ``[N]`` how strongly each visual token qualifies as a pivot (key norm).
        k: tokens kept (``0 <= k <= N``).
        num_pivots: visual pivots wanted.
        extra_pivots: ``[M, D]`` further pivot vectors that are not visual tokens (never kept), or None.

    Returns:
        ``[k]`` LongTensor.
    """
    n = features.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, {n}]")
    device = features.device
    pivots = top_k(pivot_scores, min(int(num_pivots), k))
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[pivots] = True
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    vectors = x[pivots]
    if extra_pivots is not None and extra_pivots.shape[0]:
        vectors = torch.cat([vectors, torch.nn.functional.normalize(extra_pivots.float().to(device), dim=-1)])
    left = k - pivots.numel()
    p = vectors.shape[0]
    if left > 0 and p == 0:
        raise ValueError(f"DART needs at least one pivot to keep {left} more tokens; give num_pivots >= 1")
    shares = [left // p + (1 if j < left % p else 0) for j in range(p)] if p else []
    for j, share in enumerate(shares):
        if share == 0:
            continue
        sim = (x @ vectors[j]).masked_fill(taken, float("inf"))
        pick = torch.sort(sim, stable=True).indices[:share]              # least similar first, ties: earlier
        taken[pick] = True
    return torch.nonzero(taken).flatten()


def dart_reduce(hidden: torch.Tensor, features: torch.Tensor, pivot_scores: torch.Tensor, k: int,
                num_pivots: int, extra_pivots: torch.Tensor | None = None) -> Reduction:
    """Keep the rows :func:`dart_select` picks of ``hidden`` ``[N, D]``, unchanged."""
    return prune(hidden, dart_select(features, pivot_scores, k, num_pivots, extra_pivots))
