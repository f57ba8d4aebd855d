"""Pictures of a reduction: which image regions were merged together, kept alone or dropped.

    result = pact_vlm.viz.visualize(model, processor, image, config, "What is shown?")
    result.image.save("pact.png")

Each visual token's region of the input image (from the model family's adapter geometry) is
tinted with its cluster's colour; the regions of dropped tokens are greyed out; a dot marks each
cluster's center (the token whose position the merged token keeps); a small legend gives the
counts. The picture has the input image's size.
"""

from __future__ import annotations

import colorsys
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["DROPPED_RGB", "CENTER_RGB", "VizResult", "palette", "render", "visualize"]

DROPPED_RGB = (128, 128, 128)
"""Colour dropped tokens are blended with (exactly this colour at ``alpha=1``)."""
CENTER_RGB = (0, 0, 0)
"""Fill of the center markers (outlined in white)."""


@dataclass
class VizResult:
    """A rendered picture and the counts it shows.

    Attributes:
        image: the picture (RGB, the input image's size).
        visual_before / visual_after: reducible visual tokens of the image before / after.
        dropped: tokens that no kept token represents.
        merged_clusters / merged_tokens: kept tokens standing for more than one token, and how many
            tokens they stand for in total.
        singletons: kept tokens standing only for themselves.
        view: the name of the view drawn (e.g. ``"tiles"``); ``views`` all views of the image.
        tokens_drawn / centers_drawn: tokens whose region is painted, center dots drawn.
        colors: ``{kept token index: (r, g, b)}``, indices into the image's visual tokens.
        legend_box: ``(x0, y0, x1, y1)`` of the legend, or None.
    """

    image: Image.Image
    visual_before: int
    visual_after: int
    dropped: int
    merged_clusters: int
    merged_tokens: int
    singletons: int
    view: str
    views: tuple[str, ...]
    tokens_drawn: int
    centers_drawn: int
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    legend_box: tuple[int, int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict."""
        return dict(visual_before=self.visual_before, visual_after=self.visual_after, dropped=self.dropped,
                    merged_clusters=self.merged_clusters, merged_tokens=self.merged_tokens,
                    singletons=self.singletons, view=self.view, views=list(self.views),
                    tokens_drawn=self.tokens_drawn, centers_drawn=self.centers_drawn,
                    width=self.image.width, height=self.image.height,
                    legend_box=list(self.legend_box) if self.legend_box else None, **self.extra)


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated colours (golden-ratio hues), none grey, black or white."""
    colors: list[tuple[int, int, int]] = []
    seen = {DROPPED_RGB, CENTER_RGB, (255, 255, 255)}
    k = 0
    while len(colors) < n:
        hue = (k * 0.618033988749895) % 1.0
        sat = 0.6 + 0.4 * ((k * 7) % 5) / 4
        val = 0.7 + 0.3 * ((k * 3) % 4) / 3
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        k += 1
        if rgb not in seen:
            seen.add(rgb)
            colors.append(rgb)
    return colors


def _pixel_box(box: torch.Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(round(x0), 0), width), min(max(round(y0), 0), height),
            min(max(round(x1), 0), width), min(max(round(y1), 0), height))


def render(image: Image.Image, boxes, labels: torch.Tensor, *, view: str | None = None, alpha: float = 0.55,
           legend: bool = True, centers: bool = True) -> VizResult:
    """Paint one image's token regions by cluster.

    Args:
        image: the input image (any mode; drawn as RGB).
        boxes: the :class:`~pact_vlm.integration.adapters.geometry.TokenBoxes` of the image's ``N``
            reducible visual tokens.
        labels: ``[N]`` long, for every token the index of the kept token representing it, ``-1``
            if dropped (``handle.stats.per_sample[i]["labels"]``).
        view: which view to draw for images seen twice (e.g. ``"base"`` or ``"tiles"``);
            default the finest (last) view.
        alpha: opacity of the cluster colours over the image (1 = solid colours).
        legend: draw the legend with the counts.
        centers: mark each cluster center with a dot.

    Returns:
        A :class:`VizResult`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1] (0 = image only, 1 = solid colours)")
    labels = labels.detach().cpu().long()
    n = len(boxes)
    if labels.shape != (n,):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the geometry describes {n} tokens; "
                         "pass the labels of the same image")
    views = tuple(boxes.views)
    view = views[-1] if view is None else view
    if view not in views:
        raise ValueError(f"view {view!r} is not one of this image's views: {', '.join(views)}")
    view_id = views.index(view)

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = rgb.shape[:2]
    grey = np.asarray(ImageOps.grayscale(image.convert("RGB")).convert("RGB"), dtype=np.float64)
    out = rgb.copy()

    kept = torch.unique(labels[labels >= 0]).tolist()
    colors = dict(zip(kept, palette(len(kept))))
    sizes = torch.bincount(labels[labels >= 0], minlength=n)
    drawn = (boxes.view == view_id) & ~torch.isnan(boxes.boxes).any(dim=1)
    for i in torch.nonzero(drawn).flatten().tolist():
        x0, y0, x1, y1 = _pixel_box(boxes.boxes[i], width, height)
        if x1 <= x0 or y1 <= y0:
            continue
        if int(labels[i]) < 0:
            out[y0:y1, x0:x1] = (1 - alpha) * grey[y0:y1, x0:x1] + alpha * np.array(DROPPED_RGB, dtype=np.float64)
        else:
            color = np.array(colors[int(labels[i])], dtype=np.float64)
            out[y0:y1, x0:x1] = (1 - alpha) * rgb[y0:y1, x0:x1] + alpha * color
    picture = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(picture)

    centers_drawn = 0
    if centers:
        for c in kept:
            if not bool(drawn[c]):
                continue
            x0, y0, x1, y1 = (float(v) for v in boxes.boxes[c])
            radius = max(1.0, 0.22 * min(x1 - x0, y1 - y0))
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if not (0 <= cx < width and 0 <= cy < height):
                continue
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=CENTER_RGB,
                         outline=(255, 255, 255), width=1 if radius >= 3 else 0)
            centers_drawn += 1

    merged = [c for c in kept if int(sizes[c]) > 1]
    result = VizResult(
        image=picture, visual_before=n, visual_after=len(kept), dropped=int((labels < 0).sum()),
        merged_clusters=len(merged), merged_tokens=int(sum(int(sizes[c]) for c in merged)),
        singletons=len(kept) - len(merged), view=view, views=views, tokens_drawn=int(drawn.sum()),
        centers_drawn=centers_drawn, colors=colors)
    if legend:
        result.legend_box = _draw_legend(picture, result, [colors[c] for c in merged[:3]], boxes, view_id)
    return result


def _draw_legend(picture: Image.Image, r: VizResult, swatch_colors, boxes, view_id: int
                 ) -> tuple[int, int, int, int]:
    """A translucent box in the bottom-left corner with the counts; returns its pixel box."""
    width, height = picture.size
    size = max(8, round(min(width, height) / 32))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    fewer = 1 - r.visual_after / r.visual_before if r.visual_before else 0.0
    lines: list[tuple[Any, str]] = [
        (None, f"visual tokens {r.visual_before} -> {r.visual_after} ({fewer:.0%} fewer)"),
        (swatch_colors or [(200, 200, 200)], f"{r.merged_clusters} merged ({r.merged_tokens} tokens)"),
        ("outline", f"{r.singletons} kept alone"),
        ([DROPPED_RGB], f"{r.dropped} dropped"),
        ("dot", "cluster center"),
    ]
    hidden = int((boxes.view != view_id).sum())
    if hidden:
        lines.append((None, f"{hidden} tokens of other views not drawn"))
    pad, line_h = max(2, size // 3), size + max(2, size // 4)
    sw = size
    text_w = max(ImageDraw.Draw(picture).textlength(text, font=font) for _, text in lines)
    box_w = int(min(width, pad * 3 + sw + text_w))
    box_h = int(min(height, pad * 2 + line_h * len(lines)))
    x0, y0 = 0, height - box_h
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    odraw.rectangle([x0, y0, x0 + box_w - 1, height - 1], fill=(0, 0, 0, 170))
    picture.paste(Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(picture)
    y = y0 + pad
    for kind, text in lines:
        sx0, sy0, sx1, sy1 = x0 + pad, y + 1, x0 + pad + sw, y + size - 1
        if isinstance(kind, list):
            step = (sx1 - sx0) / len(kind)
            for j, color in enumerate(kind):
                draw.rectangle([sx0 + j * step, sy0, sx0 + (j + 1) * step, sy1], fill=tuple(color))
        elif kind == "outline":
            draw.rectangle([sx0, sy0, sx1, sy1], outline=(230, 230, 230))
        elif kind == "dot":
            rad = max(1, size // 4)
            cx, cy = (sx0 + sx1) / 2, (sy0 + sy1) / 2
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=CENTER_RGB, outline=(255, 255, 255))
        tx = x0 + pad * 2 + sw if kind is not None else x0 + pad
        draw.text((tx, y), text, fill=(255, 255, 255), font=font)
        y += line_h
    return (x0, y0, x0 + box_w, height)


def image_layout(model, processor, inputs, image, image_index: int = 0):
    """The :class:`ImageLayout` of image ``image_index`` of a one-sample prompt built by the processor."""
    from .integration.adapters import ImageLayout, get_adapter

    adapter = get_adapter(model)
    counts = adapter.placeholders_per_image(model.config, inputs["input_ids"][0], dict(inputs))
    if image_index >= len(counts):
        raise ValueError(f"the prompt holds {len(counts)} image(s); image_index={image_index} is out of range")
    return ImageLayout(image_size=(image.height, image.width), num_placeholders=counts[image_index],
                       inputs=dict(inputs), image_index=image_index,
                       image_processor=getattr(processor, "image_processor", None), multi_image=len(counts) > 1)


def visualize(model, processor, image: Image.Image | str | os.PathLike, config, prompt: str = "Describe the image.",
              *, view: str | None = None, alpha: float = 0.55, legend: bool = True) -> VizResult:
    """Apply ``config`` to ``model``, run the prompt with ``image`` once, and paint the reduction.

    Args:
        model, processor: a supported VLM and its processor (see ``pact_vlm.integration.loading.load_vlm``).
        image: a PIL image or a path.
        config: a method config such as :class:`pact_vlm.PACTConfig`.
        prompt: the text that goes with the image (EUTI's context can depend on it).
        view, alpha, legend: see :func:`render`.

    Returns:
        A :class:`VizResult` whose ``image`` has the input image's size.
    """
    from .integration.adapters import get_adapter
    from .integration.handle import apply
    from .integration.loading import build_inputs

    if not isinstance(image, Image.Image):
        image = _open_image(image)
    adapter = get_adapter(model)
    if adapter.geometry is None:
        raise ValueError(f"{adapter.name} has no patch geometry; pictures are not available for it")
    device = next(model.parameters()).device
    inputs = build_inputs(processor, prompt, [image], device=device)
    layout = image_layout(model, processor, inputs, image)
    boxes = adapter.geometry(model.config, layout)
    with apply(model, config) as handle, torch.no_grad():
        model(**inputs)
    labels = handle.stats.per_sample[0].get("labels") if handle.stats.per_sample else None
    if labels is None:
        raise ValueError(f"method {config.method!r} reported no per-token labels for this prompt; "
                         "pictures need a method that assigns every visual token (e.g. pact)")
    result = render(image, boxes, labels, view=view, alpha=alpha, legend=legend)
    result.extra.update(reduction_seconds=handle.stats.seconds, method=config.method)
    return result


@contextlib.contextmanager
def strict_loading():
    """Refuse truncated image files while reading the user's inputs, whatever another library set
    globally (lmms-eval sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` when it is imported)."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _open_image(path) -> Image.Image:
    if os.path.isdir(path):
        raise ValueError(f"image {str(path)!r} is a folder; pass an image file (a folder of frames goes to --video)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {str(path)!r} does not exist; pass an existing PNG / JPEG file")
    try:
        with strict_loading(), Image.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()
    except (OSError, ValueError, SyntaxError) as err:    # PIL: unreadable, truncated, corrupt
        raise ValueError(f"image {str(path)!r} is not an image PIL can read ({' '.join(str(err).split())}); "
                         "pass a PNG or JPEG file") from None
