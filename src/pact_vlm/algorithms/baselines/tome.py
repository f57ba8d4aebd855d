"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023), on one sequence of visual tokens."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import merge_by_labels

__all__ = ["bipartite_soft_matching", "tome_reduce"]


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> torch.Tensor:
    """Which token each token merges into.

    Tokens alternate into A (even indices) and B (odd); each A token's edge goes to its most
    similar B token (cosine; ties to the earlier B); the ``r`` A tokens with the most similar
    edges (ties to the earlier A) merge into their B token. ``r`` is capped at ``N // 2``.

    Args:
        metric: ``[N, d]`` the vectors compared.
        r: number of tokens merged away.

    Returns:
        ``[N]`` LongTensor: the index each token merges into (itself if it stays).
    """
    n = metric.shape[0]
    labels = torch.arange(n, device=metric.device)
    r = min(int(r), n // 2)
    if r <= 0:
        return labels
    x = torch.nn.functional.normalize(metric.float(), dim=-1)
    a, b = labels[0::2], labels[1::2]
    sim = x[a] @ x[b].T                                    # [|A|, |B|]
    best, partner = sim.max(dim=-1)
    order = torch.sort(best, descending=True, stable=True).indices[:r]
    labels[a[order]] = b[partner[order]]
    return labels


def tome_reduce(hidden: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int) -> Reduction:
    """Merge ``r`` of the ``N`` tokens (size-weighted means); see :func:`bipartite_soft_matching`.

    Args:
        hidden: ``[N, D]``; metric: ``[N, d]`` (keys); sizes: ``[N]`` tokens each already stands for.
        r: tokens merged away.

    Returns:
        :class:`Reduction` whose sizes are the summed sizes of each merged group.
    """
    return merge_by_labels(hidden, bipartite_soft_matching(metric, r), weights=sizes)
