"""FastV (Chen et al., ECCV 2024): rank visual tokens by the attention they receive."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import num_kept, prune, top_k

__all__ = ["attention_received", "fastv_reduce"]


def attention_received(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    real: torch.Tensor | None = None,
    *,
    mode: str = "last",
    chunk: int = 256,
) -> torch.Tensor:
    """Causal attention each token receives, from the last query or on average from all queries.

    Args:
        queries: ``[T, H, d_h]`` queries after rotary; keys: ``[T, H_kv, d_h]`` keys after rotary
            (query head ``h`` reads key head ``h // (H / H_kv)``).
        positions: ``[T]`` position of each row; query ``i`` sees key ``j`` iff ``positions[j] <=
            positions[i]`` (and both are real).
        real: ``[T]`` bool, rows that are tokens (False = padding); None = all.
        mode: ``"last"``: the attention of the real row with the highest position; ``"all"``:
            the mean over every real query row of its attention (0 where it cannot see the key).
        chunk: query rows per block in ``"all"`` mode (memory ``H * chunk * T`` floats).

    Returns:
        ``[T]`` float32, head-averaged softmax probabilities (0 for padding rows).
    """
    if mode not in ("last", "all"):
        raise ValueError(f"mode={mode!r} is not one of 'last', 'all'")
    t, h_kv, d_h = keys.shape
    n_heads = queries.shape[1]
    if n_heads % h_kv:
        raise ValueError(f"{n_heads} query heads is not a multiple of {h_kv} key heads")
    if real is None:
        real = torch.ones(t, dtype=torch.bool, device=keys.device)
    k = keys.float().repeat_interleave(n_heads // h_kv, dim=1)              # [T, H, d]
    rows = torch.nonzero(real).flatten()
    if mode == "last":
        rows = rows[positions[rows].argmax()].view(1)
    total = torch.zeros(t, dtype=torch.float32, device=keys.device)
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        logits = torch.einsum("qhd,khd->hqk", queries[r].float(), k) / d_h ** 0.5   # [H, q, T]
        visible = real[None, :] & (positions[None, :] <= positions[r][:, None])     # [q, T]
        logits = logits.masked_fill(~visible[None], float("-inf"))
        total += logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return total / rows.numel()


def fastv_reduce(hidden: torch.Tensor, scores: torch.Tensor, keep_ratio: float) -> Reduction:
    """Keep the ``ceil(keep_ratio * N)`` visual tokens with the highest ``scores``.

    Args:
        hidden: ``[N, D]`` the visual tokens' hidden states; scores: ``[N]``.
        keep_ratio: fraction kept, in ``[0, 1]``.
    """
    return prune(hidden, top_k(scores, num_kept(hidden.shape[0], keep_ratio)))
