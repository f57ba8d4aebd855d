"""LLaVA-NeXT and LLaVA-OneVision: anyres (a base view of the whole image + high-resolution tiles).

Placeholders of one image: the base view (``side x side``, row-major), then the unpadded tile grid
row by row, each row followed by one ``image_newline`` (never reduced). LLaVA-OneVision shrinks a
tile grid larger than ``anyres_max_N`` allows, and keeps only the base view (+ one newline) for each
image of a multi-image sample.
"""

from __future__ import annotations

import math

import torch

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes


def tile_grid_shape(config, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of the unpadded (and, for OneVision, shrunk) tile feature grid of an image."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    nph, npw = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, vc.image_size)
    rows, cols = unpad_image(torch.zeros(1, nph * side, npw * side), (height, width)).shape[1:]
    aspect = getattr(config, "vision_aspect_ratio", None)
    if config.model_type == "llava_onevision" and aspect is not None:
        max_tiles = int(aspect.strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return int(rows), int(cols)


def anyres_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """Base view: the image stretched to one tile; tiles: the unpadded grid, which spans the image."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    height, width = layout.image_size
    base = grid_boxes(side, side, 0.0, 0.0, float(width), float(height), view=0)
    if layout.multi_image and config.model_type == "llava_onevision":
        expected, result = side * side + 1, TokenBoxes(base.boxes, base.view, ("base",))
    else:
        rows, cols = tile_grid_shape(config, height, width)
        tiles = grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height), view=1)
        expected, result = side * side + rows * (cols + 1), TokenBoxes.cat([base, tiles], ("base", "tiles"))
    if layout.num_placeholders != expected:
        raise ValueError(f"image {layout.image_index} of size {height}x{width}: the anyres layout gives "
                         f"{expected} placeholders but the prompt holds {layout.num_placeholders}")
    return result


register_adapter(Adapter(
    name="LLaVA-OneVision", model_types=("llava_onevision",),
    classes=("LlavaOnevisionForConditionalGeneration",),
    token_id_attrs=("image_token_id", "video_token_id"), newline_param="model.image_newline",
    geometry=anyres_geometry))
register_adapter(Adapter(
    name="LLaVA-NeXT", model_types=("llava_next",), classes=("LlavaNextForConditionalGeneration",),
    token_id_attrs=("image_token_id",), newline_param="model.image_newline", geometry=anyres_geometry))
