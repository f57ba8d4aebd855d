"""Gemma 3: sliding-window and full-attention layers, bidirectional attention inside each image.

Per layer type (``config.text_config.layer_types``) the model computes its own rotary table and
its own mask; the integration follows both (each layer's rotary input is indexed by the kept
rows; visibility is computed on original positions). Inside an image (a run of image tokens in
``token_type_ids``) tokens attend to each other in both directions, in full and sliding layers
alike; after a reduction the kept and merged tokens of one image still do. A sliding window
counts *original* positions: a key is visible iff its original position is within the window of
the query's (``q_pos - kv_pos < sliding_window``), so a merged token is as far from a query as
its center is. Its cache layers keep the last ``window - 1`` entries, which after a reduction
cover more than the window's positions: the superset is masked by position.

Image geometry: the image is resized to the tower's square input (no crop) and its patches are
average-pooled to a ``sqrt(mm_tokens_per_image)``-square grid, row-major.
"""

from __future__ import annotations

import math

import torch

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes


def image_blocks(inputs: dict, placeholders: torch.Tensor) -> torch.Tensor | None:
    """``[B, T]`` image index of each image token (``-1`` elsewhere), from ``token_type_ids`` as the
    model builds its bidirectional blocks; None without ``token_type_ids`` (the model then has none)."""
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is None:
        return None
    is_image = token_type_ids == 1
    start = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    ids = start.long().cumsum(dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1)).to(placeholders.device)


def gemma3_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """A ``side x side`` grid (``side = sqrt(mm_tokens_per_image)``) over the whole image."""
    n = int(config.mm_tokens_per_image)
    side = math.isqrt(n)
    if layout.num_placeholders != n:
        raise ValueError(f"image {layout.image_index}: Gemma 3 gives {n} tokens per image but the prompt holds "
                         f"{layout.num_placeholders}")
    height, width = layout.image_size
    return grid_boxes(side, side, 0.0, 0.0, float(width), float(height))


register_adapter(Adapter(
    name="Gemma 3", model_types=("gemma3",), classes=("Gemma3ForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=gemma3_geometry,
    bidirectional_kinds=("full_attention", "sliding_attention"), blocks=image_blocks))

# Gemma 4 builds on Gemma 3 but adds what the per-layer policy does not carry yet; refused, naming why
register_adapter(Adapter(
    name="Gemma 4", model_types=("gemma4",), classes=("Gemma4ForConditionalGeneration",),
    token_id_attrs=("image_token_id",),
    refused="its later layers reuse earlier layers' keys and values (KV sharing), which a reduction would have "
            "to keep consistent with the reduced cache; per-layer inputs reach every layer with one row per "
            "original token; and generate slices the prefill to its last token before the first KV-sharing "
            "layer. None of these is followed by the reduction yet, so it would run wrong; use Gemma 3 or run "
            "Gemma 4 unreduced"))
