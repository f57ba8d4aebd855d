"""Where each visual token comes from in the input image: boxes in original image pixels.

Every adapter that supports pictures (``pact-vlm viz``) has a geometry function
``geometry(config, layout) -> TokenBoxes``. It describes one image's *reducible* visual tokens
(``image_newline`` placeholders left out), in sequence order, which is the order of
``handle.stats.per_sample[i]["labels"]`` for a prompt with one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ImageLayout", "TokenBoxes", "grid_boxes"]


@dataclass
class ImageLayout:
    """What the processor did to one image: the inputs a geometry function reads.

    Attributes:
        image_size: ``(height, width)`` of the original image, in pixels.
        num_placeholders: placeholder tokens of this image in the prompt (newlines included).
        inputs: the processor's output for the whole prompt (``image_grid_thw``, ``image_sizes``, ...).
        image_index: index of this image among all images of ``inputs``.
        image_processor: the processor's image processor (resize / crop / tiling settings), or None
            (then the defaults of the model family are assumed).
        multi_image: the image is one of several in its sample (LLaVA-OneVision then keeps only
            the base view).
    """

    image_size: tuple[int, int]
    num_placeholders: int
    inputs: dict[str, Any] = field(default_factory=dict)
    image_index: int = 0
    image_processor: Any = None
    multi_image: bool = False


@dataclass
class TokenBoxes:
    """The image region each reducible visual token of one image stands for.

    Attributes:
        boxes: ``[N, 4]`` float64 ``(x0, y0, x1, y1)`` in original image pixels (may reach past
            the image border where the processor padded it); a row of NaN is a token with no
            region (e.g. a CLS token).
        view: ``[N]`` long, index into ``views`` (e.g. LLaVA-OneVision's base image and its tiles
            cover the same pixels twice).
        views: names of the views, coarsest first.
    """

    boxes: torch.Tensor
    view: torch.Tensor
    views: tuple[str, ...] = ("image",)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def cat(parts: list["TokenBoxes"], views: tuple[str, ...]) -> "TokenBoxes":
        return TokenBoxes(torch.cat([p.boxes for p in parts]), torch.cat([p.view for p in parts]), views)


def grid_boxes(rows: int, cols: int, x0: float, y0: float, x1: float, y1: float, view: int = 0) -> TokenBoxes:
    """Row-major boxes of a ``rows x cols`` grid laid over the rectangle ``(x0, y0)-(x1, y1)``."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid of {rows} x {cols} tokens is empty")
    ys = torch.linspace(y0, y1, rows + 1, dtype=torch.float64)
    xs = torch.linspace(x0, x1, cols + 1, dtype=torch.float64)
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    boxes = torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=1)
    return TokenBoxes(boxes, torch.full((rows * cols,), view, dtype=torch.long))


def no_region(n: int, view: int = 0) -> TokenBoxes:
    """``n`` tokens with no image region (NaN boxes)."""
    return TokenBoxes(torch.full((n, 4), math.nan, dtype=torch.float64), torch.full((n,), view, dtype=torch.long))


def processor_setting(image_processor, name: str, default=None):
    """An image-processor attribute, or ``default`` when there is no processor or no such attribute."""
    if image_processor is None:
        return default
    value = getattr(image_processor, name, None)
    return default if value is None else value


def size_value(size, key: str):
    """``size["key"]`` for dicts and transformers' ``SizeDict``; None when absent."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)
