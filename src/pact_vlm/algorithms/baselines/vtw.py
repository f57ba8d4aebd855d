"""VTW (Lin et al., AAAI 2025): every visual token is withdrawn at one layer."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import drop_all

__all__ = ["vtw_reduce"]


def vtw_reduce(hidden: torch.Tensor) -> Reduction:
    """Drop all ``N`` rows of ``hidden`` ``[N, D]``: an empty keep set, every label ``-1``."""
    return drop_all(hidden)
