"""HiRED (Arif et al., AAAI 2025): a token budget shared between an image's views by CLS attention."""

from __future__ import annotations

import math

import torch

from .common import num_kept, top_k

__all__ = ["allocate", "tile_weights", "hired_select"]


def allocate(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` into integers roughly proportional to ``weights``, each ``<= caps``.

    Largest remainder: each entry with room gets the floor of its share of what is left (capped),
    the units still left go one each to the entries with the largest fractional parts (ties to
    the earlier entry); what caps turned away is shared again. The result sums to
    ``min(total, caps.sum())`` exactly. Zero weights on every entry with room: shares
    proportional to the room left.

    Args:
        total: units to split; weights: ``[V]`` >= 0; caps: ``[V]`` integers.

    Returns:
        ``[V]`` long.
    """
    caps = caps.long().cpu()
    w = weights.double().cpu().clamp(min=0)
    out = torch.zeros_like(caps)
    left = min(int(total), int(caps.sum()))
    while left > 0:
        room = caps - out
        ww = torch.where(room > 0, w, torch.zeros_like(w))
        if float(ww.sum()) <= 0:
            ww = room.double()
        share = ww / ww.sum() * left
        give = torch.minimum(share.floor().long(), room)
        rest = left - int(give.sum())
        frac = torch.where(give < room, share - share.floor(), torch.full_like(share, -1.0))
        for i in torch.sort(frac, descending=True, stable=True).indices[:rest].tolist():
            if frac[i] >= 0:
                give[i] += 1
        out += give
        left -= int(give.sum())
    return out


def tile_weights(initial_attn: torch.Tensor, alpha: float, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Visual content of each sub-image tile, read on the full image.

    Args:
        initial_attn: ``[S, S]`` the full-image view's CLS attention in the first vision layer.
        alpha: the full-image share of the budget; the ``int(S * S * (1 - alpha))`` most attended
            full-image tokens are counted.
        grid_hw: ``(rows, cols)`` of the tile grid.

    Returns:
        ``[rows * cols]`` float: how many of those tokens fall in each tile's region of the full
        image (row-major tiles; a token counts for every tile its cell overlaps, by area).
    """
    s = initial_attn.shape[0]
    rows, cols = grid_hw
    marked = torch.zeros(s * s, dtype=torch.float64)
    marked[top_k(initial_attn.flatten().cpu(), int(s * s * (1 - alpha)))] = 1.0
    marked = marked.view(s, s)
    # overlap of cell [i, i+1) with tile band [t * s / rows, (t + 1) * s / rows)
    def overlap(n_tiles: int) -> torch.Tensor:
        edges = torch.arange(n_tiles + 1, dtype=torch.float64) * s / n_tiles
        cells = torch.arange(s, dtype=torch.float64)
        lo = torch.maximum(cells[None, :], edges[:-1, None])
        hi = torch.minimum(cells[None, :] + 1, edges[1:, None])
        return (hi - lo).clamp(min=0)                                     # [tiles, S]
    oy, ox = overlap(rows), overlap(cols)
    return torch.einsum("ri,ij,cj->rc", oy, marked, ox).flatten().float()


def hired_select(view: torch.Tensor, final_attn: torch.Tensor, weights: torch.Tensor, keep_ratio: float,
                 alpha: float) -> torch.Tensor:
    """Indices (ascending) of the tokens HiRED keeps in one image.

    Args:
        view: ``[N]`` long, 0 for the full-image view, ``1 + t`` for sub-image tile ``t``.
        final_attn: ``[N]`` CLS attention of the selected feature layer.
        weights: ``[T]`` the tiles' content weights (:func:`tile_weights`), ``T >= max(view)``.
        keep_ratio: the budget ``ceil(keep_ratio * N)``.
        alpha: the full-image view gets ``min(floor(alpha * budget), its tokens)``; all of the
            budget when the image has no tiles.
    """
    n = view.shape[0]
    budget = num_kept(n, keep_ratio)
    tiles = int(view.max()) if n else 0
    counts = torch.bincount(view.cpu(), minlength=tiles + 1)
    full = min(budget if tiles == 0 else math.floor(alpha * budget), int(counts[0]))
    per_view = torch.cat([torch.tensor([full]),
                          allocate(budget - full, weights[:tiles].cpu(), counts[1:])]) if tiles else torch.tensor([full])
    keep = []
    for v in range(tiles + 1):
        rows = torch.nonzero(view == v).flatten()
        keep.append(rows[top_k(final_attn[rows], int(per_view[v]))])
    return torch.cat(keep).sort().values
