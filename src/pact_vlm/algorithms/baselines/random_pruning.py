"""Random pruning: a seeded random subset of the visual tokens."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import num_kept, prune

__all__ = ["random_keep", "random_reduce"]


def random_keep(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``n`` indices, ascending, drawn by a fresh CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:k].sort().values


def random_reduce(hidden: torch.Tensor, keep_ratio: float, seed: int) -> Reduction:
    """Keep ``ceil(keep_ratio * N)`` random rows of ``hidden`` ``[N, D]``."""
    n = hidden.shape[0]
    return prune(hidden, random_keep(n, num_kept(n, keep_ratio), seed).to(hidden.device))
