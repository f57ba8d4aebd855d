"""Spatial average pooling of visual tokens laid out on grids."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import merge_by_labels

__all__ = ["pool_labels", "pool_reduce"]


def pool_labels(grid: torch.Tensor, stride: int) -> torch.Tensor:
    """The window representative of each token.

    Args:
        grid: ``[N, 3]`` long ``(view, row, col)`` of each token (a view is one image / tile / frame).
        stride: window side; window ``(view, row // stride, col // stride)``.

    Returns:
        ``[N]`` labels: the first token (in sequence order) of each token's window.
    """
    if stride < 1:
        raise ValueError(f"stride={stride!r} must be >= 1")
    key = torch.stack([grid[:, 0], grid[:, 1] // stride, grid[:, 2] // stride], dim=1)
    _, window = torch.unique(key, dim=0, return_inverse=True)
    n = grid.shape[0]
    first = torch.full((int(window.max()) + 1 if n else 0,), n, dtype=torch.long, device=grid.device)
    first.scatter_reduce_(0, window, torch.arange(n, device=grid.device), reduce="amin")
    return first[window]


def pool_reduce(hidden: torch.Tensor, grid: torch.Tensor, stride: int) -> Reduction:
    """Mean of each ``stride x stride`` window of ``hidden`` ``[N, D]`` (see :func:`pool_labels`)."""
    return merge_by_labels(hidden, pool_labels(grid, stride))
