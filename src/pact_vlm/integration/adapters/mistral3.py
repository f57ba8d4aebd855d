"""Mistral 3 (Pixtral tower): one token per 2x2 merged patch, each image row ended by a marker.

The processor resizes an image (aspect ratio kept) to multiples of the patch size and lays its
tokens out row by row: ``[IMG] x cols`` then ``[IMG_BREAK]``, the last row ended by ``[IMG_END]``.
Only the ``[IMG]`` placeholders carry image features; the break / end tokens are text (never
reduced). So an image is several runs of placeholders, one per row: which runs belong to which
image comes from ``image_sizes`` (``rows x cols`` tokens each, in the order of the images).
"""

from __future__ import annotations

import torch

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes


def _token_grid(config, size) -> tuple[int, int]:
    """``(rows, cols)`` of the tokens of an image of (resized) ``size = (height, width)`` pixels."""
    patch = config.vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    step = int(patch) * int(config.spatial_merge_size)
    return int(size[0]) // step, int(size[1]) // step


def _counts(config, inputs: dict) -> list[int]:
    """Image tokens of each image of the call: from the encoded images ``generate`` passes
    (``mm_encoder_outputs``), else from ``image_sizes``."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    features = getattr(encoded, "pooler_output", None)
    if isinstance(features, (list, tuple)):
        return [int(f.shape[0]) for f in features]
    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise ValueError("Mistral 3: the inputs have no image_sizes, so the rows of placeholders cannot be told "
                         "apart into images; pass the processor's image_sizes with pixel_values")
    return [r * c for r, c in (_token_grid(config, s) for s in torch.as_tensor(sizes).tolist())]


def image_rows(config, input_ids: torch.Tensor, placeholders: torch.Tensor, inputs: dict) -> torch.Tensor:
    """``[B, T]`` image of each placeholder: consecutive placeholders fill the images of
    ``image_sizes`` in order (over the whole batch, as the model scatters its features)."""
    counts = _counts(config, inputs)
    total = int(placeholders.sum())
    if sum(counts) != total:
        raise ValueError(f"Mistral 3: image_sizes give {sum(counts)} image tokens but the prompt holds {total} "
                         "[IMG] placeholders; pass the image_sizes of exactly the images of this call")
    device = placeholders.device
    image_of = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    out = torch.zeros(placeholders.shape, dtype=torch.long, device=device)
    out[placeholders] = image_of
    return out


def mistral3_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """A ``rows x cols`` grid (from ``image_sizes``) over the whole image, row-major."""
    sizes = layout.inputs.get("image_sizes")
    if sizes is None:
        raise ValueError("the inputs have no image_sizes; pass the processor's output for an image prompt")
    rows, cols = _token_grid(config, torch.as_tensor(sizes)[layout.image_index].tolist())
    if rows * cols != layout.num_placeholders:
        raise ValueError(f"image {layout.image_index}: image_sizes give {rows}x{cols} tokens but the prompt holds "
                         f"{layout.num_placeholders}")
    height, width = layout.image_size
    return grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height))


register_adapter(Adapter(
    name="Mistral 3", model_types=("mistral3",), classes=("Mistral3ForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=mistral3_geometry, groups=image_rows))
