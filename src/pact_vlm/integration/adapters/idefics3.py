"""Idefics3 and SmolVLM: an image split into tiles (row-major) plus a global view, each a grid of
pixel-shuffled patches, every tile introduced by text marker tokens.

The processor writes ``<fake_token_around_image><row_r_col_c>`` + the tile's placeholders for
each tile (a newline after each row of tiles), then ``<fake_token_around_image><global-img>`` +
the global view's placeholders; an image too small to split has the global view only. Markers
are text (never reduced), so one image is several runs of placeholders; the run after
``<global-img>`` ends its image. The config does not hold the marker ids: ``<global-img>`` is the
token before the last run of a prompt (every image, the last one included, ends with its global
view). The decoder is at ``model.text_model``.
"""

from __future__ import annotations

import math

import torch

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes


def image_tiles(config, input_ids: torch.Tensor, placeholders: torch.Tensor, inputs: dict) -> torch.Tensor:
    """``[B, T]`` image of each placeholder: an image is every run up to and including the run that
    follows the global-view marker (the token before the last run of the sample)."""
    out = torch.zeros(placeholders.shape, dtype=torch.long, device=placeholders.device)
    for b in range(placeholders.shape[0]):
        row = placeholders[b]
        is_start = row & ~torch.nn.functional.pad(row, (1, 0))[:-1]
        starts = torch.nonzero(is_start).flatten()
        if starts.numel() == 0 or int(starts[-1]) == 0:
            continue
        marker = input_ids[b, starts - 1]           # the token introducing each run
        closes = marker == marker[-1]               # runs of a global view
        image_of_run = torch.nn.functional.pad(closes.long().cumsum(0), (1, 0))[:-1]
        run_of = (is_start.long().cumsum(0) - 1).clamp(min=0)
        out[b] = torch.where(row, image_of_run[run_of], out[b])
    return out


def _tile_arrangement(n_tiles: int, height: int, width: int, image_processor) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles of an image of ``height x width`` pixels: the processor's own
    count when it is given, else the factorisation of ``n_tiles`` closest to the image's aspect ratio."""
    counter = getattr(image_processor, "get_number_of_image_patches", None)
    if counter is not None:
        _, rows, cols = counter(height, width)
        if rows * cols != n_tiles:
            raise ValueError(f"the processor splits a {height}x{width} image into {rows}x{cols} tiles but the prompt "
                             f"holds {n_tiles}; pass the image processor used")
        return int(rows), int(cols)
    target = math.log(height / width)
    pairs = [(r, n_tiles // r) for r in range(1, n_tiles + 1) if n_tiles % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - target))


def idefics3_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """Tiles row-major (each a ``side x side`` grid, ``side = image_size / patch / scale_factor``),
    then the global view (the whole image stretched to one tile)."""
    vc = config.vision_config
    side = int(vc.image_size) // int(vc.patch_size) // int(config.scale_factor)
    per_tile = side * side
    if layout.num_placeholders % per_tile:
        raise ValueError(f"image {layout.image_index}: {layout.num_placeholders} placeholders is not a multiple of "
                         f"the {per_tile} tokens of one tile")
    n = layout.num_placeholders // per_tile
    height, width = layout.image_size
    full = grid_boxes(side, side, 0.0, 0.0, float(width), float(height), view=0)
    if n == 1:
        return TokenBoxes(full.boxes, full.view, ("global",))
    rows, cols = _tile_arrangement(n - 1, height, width, layout.image_processor)
    parts = []
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        x0, y0 = c * width / cols, r * height / rows
        parts.append(grid_boxes(side, side, x0, y0, x0 + width / cols, y0 + height / rows, view=1))
    parts.append(full)
    return TokenBoxes.cat(parts, ("global", "tiles"))


for _name, _type, _cls in (("Idefics3", "idefics3", "Idefics3ForConditionalGeneration"),
                           ("SmolVLM", "smolvlm", "SmolVLMForConditionalGeneration")):
    register_adapter(Adapter(
        name=_name, model_types=(_type,), classes=(_cls,), token_id_attrs=("image_token_id",),
        language_model="model.text_model", geometry=idefics3_geometry, groups=image_tiles))
