"""Merging clusters into tokens, and the common result type of every reduction method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Reduction", "merge_clusters", "gather_positions", "identity_reduction"]


@dataclass
class Reduction:
    """What a reduction method did to one sequence's ``N`` visual tokens.

    Attributes:
        keep_index: ``[K]`` LongTensor, ascending indices (into the ``N`` visual tokens) of the
            tokens that stay; each keeps its own position id.
        hidden: ``[K, D]`` their new hidden states (cluster means for merged tokens).
        sizes: ``[K]`` float32, how many original tokens each kept token stands for (1 = not merged);
            proportional attention adds ``log(size)`` to the attention logits of that key.
        labels: ``[N]`` LongTensor, for every visual token the index (into the ``N`` visual tokens)
            of the kept token that represents it, ``-1`` if it was dropped.
    """

    keep_index: torch.Tensor
    hidden: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor

    @property
    def num_before(self) -> int:
        return int(self.labels.numel())

    @property
    def num_after(self) -> int:
        return int(self.keep_index.numel())


def identity_reduction(hidden: torch.Tensor) -> Reduction:
    """The reduction that keeps every token as it is. ``hidden``: ``[N, D]``."""
    n = hidden.shape[0]
    index = torch.arange(n, device=hidden.device)
    return Reduction(index, hidden, torch.ones(n, device=hidden.device), index.clone())


def merge_clusters(hidden: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state and size of each cluster.

    Args:
        hidden: ``[R, D]`` hidden states of every row that ``labels`` describes.
        labels: ``[R]`` LongTensor, the center (an index into ``hidden``'s rows) each row joined,
            ``-1`` for rows that joined none.
        centers: ``[C]`` LongTensor, the center indices.

    Returns:
        ``(merged [C, D] in hidden's dtype, sizes [C] float32)``: the unweighted mean over each
        cluster's members (computed in float32) and the member count, in ``centers``' order.
    """
    slot = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
    slot[centers] = torch.arange(centers.numel(), device=hidden.device)
    member = labels >= 0
    target = slot[labels[member]]
    sums = torch.zeros(centers.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, target, hidden[member].float())
    sizes = torch.bincount(target, minlength=centers.numel()).float()
    return (sums / sizes.unsqueeze(1)).to(hidden.dtype), sizes


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions of the kept tokens: ``position_ids[..., index]``.

    Works for 1-D RoPE (``[T]`` or ``[B, T]``) and M-RoPE (``[3, T]`` or ``[3, B, T]``): every kept
    token keeps its own position (the center's, for a merged cluster).
    """
    return position_ids.index_select(-1, index)
