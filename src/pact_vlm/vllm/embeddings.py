"""What the vLLM model classes do to an image's embeddings, as plain torch (no vLLM import).

* :func:`reduce_image`: the budget form of PACT (:func:`pact_vlm.algorithms.budget_pact.budget_pact_reduce`)
  on one image's ``N`` embeddings, with the keys and EUTI's mean query from the language model's
  first layer, exactly as the Hugging Face path computes them at layer 0.
* :func:`append_positions` / :func:`split_positions`: each kept token's M-RoPE offset within its
  image (``t, h, w`` of its center) travels with the embeddings through vLLM's encoder cache as
  extra channels, as vLLM's EVS does for video; each offset is written as two channels
  (``offset // 256`` and ``offset % 256``), integers that bfloat16 holds exactly.
* :func:`mrope_positions`: the prompt's M-RoPE positions with every kept image token at its image's
  start; the offsets are added in the model's forward once the content has chosen the tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..algorithms.budget_pact import budget_keep_count, budget_pact_reduce
from ..methods.pact_budget import PACTBudgetConfig

__all__ = ["POSITION_CHANNELS", "reduce_image", "grid_offsets", "append_positions", "split_positions",
           "mrope_positions"]

POSITION_CHANNELS = 6
"""Extra channels on a reduced image's embeddings: (t, h, w) offsets, two channels each."""

_BASE = 256


def grid_offsets(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """``[t*h*w, 3]`` long: the M-RoPE offset ``(t, h, w)`` of each token of a ``t x h x w`` token grid,
    row-major, as vLLM's ``get_mrope_input_positions`` lays them out (time scaled by ``t_factor``)."""
    grid = torch.from_numpy(np.indices((t, h, w)).reshape(3, -1).copy())
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).long()
    return grid.T.contiguous()


def reduce_image(embeds: torch.Tensor, layer_keys: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
                 cfg: PACTBudgetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce one image's embeddings to :func:`budget_keep_count` ``(N, cfg.keep_ratio)`` tokens.

    Args:
        embeds: ``[N, D]`` the projector's output for one image.
        layer_keys: ``embeds -> (keys [N, H_kv, d_h], mean_query [H, d_h] or None)``: the first decoder
            layer's keys before rotary (``k_proj`` of ``input_layernorm``) and EUTI's mean query
            (``q_proj`` of the mean normalised row; None is allowed for ``euti_variant="norm"``).
        cfg: the config.

    Returns:
        ``(merged [K, D], keep_index [K])``: the kept tokens (each the mean of its cluster, in
        ascending order of their centers) and their centers' rows in ``embeds``.
    """
    keys, mean_query = layer_keys(embeds)
    red = budget_pact_reduce(embeds, keys, mean_query if cfg.euti_variant != "norm" else None,
                             keep_ratio=cfg.keep_ratio, prune_ratio=cfg.prune_ratio, alpha=cfg.alpha,
                             density=cfg.density, dn=cfg.dn, euti_variant=cfg.euti_variant)
    expected = budget_keep_count(embeds.shape[0], cfg.keep_ratio)
    if red.keep_index.numel() != expected:      # the placeholders were allotted for exactly this many
        raise RuntimeError(f"the budget reduction kept {red.keep_index.numel()} tokens of {embeds.shape[0]}, "
                           f"not the {expected} placeholders of the prompt")
    return red.hidden.to(embeds.dtype), red.keep_index


def append_positions(embeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[K, D + POSITION_CHANNELS]``: ``embeds [K, D]`` followed by ``offsets [K, 3]`` (each < 65536)."""
    offsets = offsets.to(embeds.device).long()
    if offsets.numel() and int(offsets.max()) >= _BASE * _BASE:
        raise ValueError(f"an M-RoPE offset of {int(offsets.max())} does not fit the position channels "
                         f"(< {_BASE * _BASE}); the image grid is too large")
    coded = torch.stack([offsets // _BASE, offsets % _BASE], dim=-1).reshape(offsets.shape[0], 6)
    return torch.cat([embeds, coded.to(embeds.dtype)], dim=1)


def split_positions(embeds: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(embeds [K, width], offsets [K, 3] long or None)``: undo :func:`append_positions` (None: the
    embeddings carry no offsets, e.g. a video left unreduced)."""
    if embeds.shape[-1] == width:
        return embeds, None
    if embeds.shape[-1] != width + POSITION_CHANNELS:
        raise ValueError(f"multimodal embeddings of width {embeds.shape[-1]}; expected {width} or "
                         f"{width + POSITION_CHANNELS} (with PACT's position channels)")
    coded = embeds[:, width:].float().round().long().reshape(-1, 3, 2)
    return embeds[:, :width], coded[..., 0] * _BASE + coded[..., 1]


def mrope_positions(num_tokens: int, items: Sequence[tuple[int, int, int, int, int, float, bool]]
                    ) -> tuple[torch.Tensor, int]:
    """The prompt's M-RoPE positions ``[3, num_tokens]`` and the decode delta.

    ``items``: per image / video, in prompt order, ``(offset, length, t, h, w, t_factor, reduced)``:
    where its placeholders start, how many there are, its token grid, and whether PACT reduced it.
    An unreduced item gets its grid's positions (vLLM's own rule); a reduced one gets its start
    position on every placeholder (the kept tokens' offsets are added in the forward). Text after
    an item continues after the item's whole grid, so every text token, and every decoded token
    (the returned delta: largest position + 1 - num_tokens), has the position it has without the
    reduction, as on the Hugging Face path.
    """
    parts: list[np.ndarray] = []
    start, next_pos, top = 0, 0, -1
    for offset, length, t, h, w, t_factor, reduced in items:
        text = offset - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        base = next_pos + text
        grid = grid_offsets(t, h, w, t_factor).T.numpy()
        if reduced:
            parts.append(np.full((3, length), base, dtype=np.int64))
        else:
            if grid.shape[1] != length:
                raise ValueError(f"a media item at {offset} has {length} placeholders but its grid {t}x{h}x{w} "
                                 f"gives {grid.shape[1]}")
            parts.append(grid + base)
        next_pos = base + int(grid.max()) + 1
        top = max(top, next_pos - 1)
        start = offset + length
    if start < num_tokens:
        parts.append(np.broadcast_to(np.arange(num_tokens - start), (3, num_tokens - start)) + next_pos)
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    top = max(top, int(positions.max()) if positions.size else -1)
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), top + 1 - num_tokens
