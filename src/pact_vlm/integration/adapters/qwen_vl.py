"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE: M-RoPE positions, 2x2-merged patches in row-major order.

Qwen3-VL(-MoE) add deepstack visual features to the hidden states after their first layers: a
reduction starts past them. The MoE class differs from Qwen3-VL only in the MLP (experts routed
per token), which a reduction leaves as it is: the kept rows are routed as before, merged rows
by their merged state.
"""

from __future__ import annotations

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes


def _deepstack_layers(config) -> int:
    vision = getattr(config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or [])


def qwen_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """One token per ``merge x merge`` block of patches, row-major over the resized image.

    The processor resizes the image (keeping its aspect ratio up to rounding) to
    ``grid_h x grid_w`` patches (``image_grid_thw``); every merged token covers
    ``merge x merge`` patches, so the token grid ``(grid_h / merge) x (grid_w / merge)`` spans the
    whole original image.
    """
    grid = layout.inputs.get("image_grid_thw")
    if grid is None:
        raise ValueError("the inputs have no image_grid_thw; pass the processor's output for an image prompt")
    t, gh, gw = (int(v) for v in grid[layout.image_index])
    merge = int(config.vision_config.spatial_merge_size)
    rows, cols = gh // merge, gw // merge
    if t * rows * cols != layout.num_placeholders:
        raise ValueError(f"image {layout.image_index}: image_grid_thw {[t, gh, gw]} gives {t * rows * cols} tokens "
                         f"but the prompt holds {layout.num_placeholders}")
    height, width = layout.image_size
    frame = grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height))
    return TokenBoxes.cat([frame] * t, ("image",))


for _name, _type, _cls, _min_layer in (
    ("Qwen2-VL", "qwen2_vl", "Qwen2VLForConditionalGeneration", lambda config: 0),
    ("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", lambda config: 0),
    ("Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration", _deepstack_layers),
    ("Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", _deepstack_layers),
):
    register_adapter(Adapter(
        name=_name, model_types=(_type,), classes=(_cls,),
        token_id_attrs=("image_token_id", "video_token_id"), min_layer=_min_layer, geometry=qwen_geometry))
