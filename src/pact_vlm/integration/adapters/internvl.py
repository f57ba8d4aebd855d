"""InternVL: the image cut into tiles (+ a thumbnail), each tile pixel-shuffled to a small token grid."""

from __future__ import annotations

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes, processor_setting


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def tile_arrangement(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int
                     ) -> tuple[int, int]:
    """``(cols, rows)`` of the tile canvas the processor picks (closest aspect ratio)."""
    try:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:  # pragma: no cover - the PIL module carries it when torchvision is absent
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    return get_optimal_tiled_canvas((height, width), tile, min_tiles, max_tiles)


def internvl_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """Tiles in row-major order (each a row-major grid of 2x2 pixel-shuffled patches), then the thumbnail.

    One tile: the whole image stretched to the tile size. Several: the image stretched to a
    ``cols x rows`` canvas of tiles, followed by a thumbnail of the whole image.
    """
    vc = config.vision_config
    (th, tw), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
    ratio = float(config.downsample_ratio)
    tok_rows, tok_cols = int(th // ph * ratio), int(tw // pw * ratio)
    per_tile = tok_rows * tok_cols
    if layout.num_placeholders % per_tile:
        raise ValueError(f"image {layout.image_index}: {layout.num_placeholders} placeholders is not a multiple of "
                         f"the {per_tile} tokens of one tile")
    n_tiles = layout.num_placeholders // per_tile
    height, width = layout.image_size
    if n_tiles == 1:
        return grid_boxes(tok_rows, tok_cols, 0.0, 0.0, float(width), float(height), view=0)
    ip = layout.image_processor
    cols, rows = tile_arrangement(height, width, (th, tw), int(processor_setting(ip, "min_patches", 1)),
                                  int(processor_setting(ip, "max_patches", 12)))
    if cols * rows + 1 != n_tiles:
        raise ValueError(f"image {layout.image_index} of size {height}x{width}: the prompt holds {n_tiles} tiles "
                         f"but the processor's tiling gives {cols}x{rows} + thumbnail; pass the image processor used")
    parts = []
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        x0, y0 = c * width / cols, r * height / rows
        parts.append(grid_boxes(tok_rows, tok_cols, x0, y0, x0 + width / cols, y0 + height / rows, view=1))
    parts.append(grid_boxes(tok_rows, tok_cols, 0.0, 0.0, float(width), float(height), view=0))
    return TokenBoxes.cat(parts, ("thumbnail", "tiles"))


register_adapter(Adapter(
    name="InternVL", model_types=("internvl",), classes=("InternVLForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=internvl_geometry))
