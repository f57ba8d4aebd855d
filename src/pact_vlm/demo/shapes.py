"""Seeded synthetic visual question answering: coloured shapes on a plain background.

Every image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB pixels, seen by the demo model as a
``GRID`` x ``GRID`` grid of visual tokens (one token per ``CELL`` x ``CELL`` pixels: 8-px vision
patches merged 2x2 by Qwen2-VL).  Objects sit in slots of 2 x 2 tokens aligned with that grid,
so each object covers about four visual tokens and the rest of the image is near-uniform,
redundant background: the situation token reduction is designed for.

Questions have one-word answers and need the tokens of specific objects:

==========  ==========================================  ===========================================
qtype       question                                    answers
==========  ==========================================  ===========================================
color       ``what color is the circle ?``              a colour (the shape is unique in the image)
shape       ``what shape is the red object ?``          a shape (the colour is unique in the image)
count       ``how many red objects are there ?``        ``zero`` ... ``five``
exists      ``is there a red circle ?``                 ``yes`` / ``no``
where       ``where is the red circle ?``               ``topleft`` / ``topright`` / ``bottomleft``
                                                        / ``bottomright`` (the pair is unique)
==========  ==========================================  ===========================================

Seeds: a sample is a pure function of its integer seed (``make_sample(seed)``).  The training
split uses seeds in ``TRAIN_SEEDS`` = [0, 1_000_000_000) and the held-out split seeds in
``HELDOUT_SEEDS`` = [1_000_000_000, 1_010_000_000); the two ranges are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "CELL",
    "COLORS",
    "GRID",
    "HELDOUT_SEEDS",
    "IMAGE_SIZE",
    "QTYPES",
    "QUADRANTS",
    "SHAPES",
    "SLOT",
    "Sample",
    "ShapeObject",
    "TRAIN_SEEDS",
    "make_dataset",
    "make_sample",
    "more_questions",
    "split_seeds",
    "vocabulary",
]

IMAGE_SIZE = 128
"""Image side in pixels."""
CELL = 16
"""Side in pixels of the image area behind one visual token of the demo model."""
GRID = IMAGE_SIZE // CELL
"""Visual tokens per side (8): the grid of ``Sample.object_patch_mask``."""
SLOT = 2
"""Object slot side, in visual tokens: objects occupy ``SLOT`` x ``SLOT`` tokens."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
}
"""Object colours (name -> nominal RGB; each object jitters around it)."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
QTYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "where")
QUADRANTS: tuple[str, ...] = ("topleft", "topright", "bottomleft", "bottomright")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *NUMBERS, "yes", "no", *QUADRANTS)
"""Every possible answer word."""

TRAIN_SEEDS = range(0, 1_000_000_000)
HELDOUT_SEEDS = range(1_000_000_000, 1_010_000_000)
_SPLITS = {"train": TRAIN_SEEDS, "heldout": HELDOUT_SEEDS}

_TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "count": "how many {color} objects are there ?",
    "exists": "is there a {color} {shape} ?",
    "where": "where is the {color} {shape} ?",
}
_MIN_OBJECTS, _MAX_OBJECTS = 2, 5


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object.

    Attributes:
        color: colour name, a key of ``COLORS``.
        shape: one of ``SHAPES``.
        row, col: top-left visual token of the object's ``SLOT`` x ``SLOT`` slot.
        quadrant: one of ``QUADRANTS`` (slots never straddle the image midlines).
    """

    color: str
    shape: str
    row: int
    col: int

    @property
    def quadrant(self) -> str:
        half = GRID // 2
        return QUADRANTS[2 * (self.row >= half) + (self.col >= half)]


@dataclass(frozen=True)
class Sample:
    """One visual QA example.

    Attributes:
        image: RGB ``PIL.Image`` of ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels.
        question: lower-case words separated by spaces, ending with `` ?``.
        answer: one word of ``ANSWERS``.
        qtype: one of ``QTYPES``.
        object_patch_mask: bool array ``[GRID, GRID]``; True where a visual token's
            ``CELL`` x ``CELL`` pixel area contains object pixels.  Row-major order of this grid is
            the order of the image tokens in the demo model's input sequence.
        object_pixel_mask: bool array ``[IMAGE_SIZE, IMAGE_SIZE]``; True on object pixels.
        objects: the drawn objects.
        seed: the seed that made this sample.
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    object_patch_mask: np.ndarray
    object_pixel_mask: np.ndarray
    objects: tuple[ShapeObject, ...]
    seed: int

    def patch_mask(self, grid: int) -> np.ndarray:
        """The object mask over a ``grid`` x ``grid`` patch grid (e.g. 16 for raw 8-px patches).

        Args:
            grid: patches per side; must divide ``IMAGE_SIZE``.

        Returns:
            bool array ``[grid, grid]``: True where a patch contains object pixels.
        """
        if grid <= 0 or IMAGE_SIZE % grid:
            raise ValueError(f"grid={grid!r} must be a positive divisor of IMAGE_SIZE={IMAGE_SIZE}.")
        step = IMAGE_SIZE // grid
        return self.object_pixel_mask.reshape(grid, step, grid, step).any(axis=(1, 3))


def split_seeds(split: str) -> range:
    """The seed range of a split: ``"train"`` or ``"heldout"``."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {sorted(_SPLITS)}.")
    return _SPLITS[split]


def vocabulary() -> list[str]:
    """Every word that can appear in a question or an answer, in a fixed order."""
    words: list[str] = []
    for text in (*_TEMPLATES.values(), " ".join(ANSWERS)):
        for word in text.replace("{shape}", " ").replace("{color}", " ").split():
            if word not in words:
                words.append(word)
    for word in (*COLORS, *SHAPES):
        if word not in words:
            words.append(word)
    return words


def _draw_scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, tuple[ShapeObject, ...]]:
    """Draw 2-5 objects in distinct slots; returns (image, pixel mask, objects)."""
    n_objects = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    slots_per_side = GRID // SLOT
    slot_ids = rng.choice(slots_per_side * slots_per_side, size=n_objects, replace=False)
    color_names = list(COLORS)
    # Draw colours from a random sub-palette now and then, so that counts above one are common.
    palette = color_names if rng.random() < 0.5 else list(rng.choice(color_names, size=3, replace=False))

    base = rng.integers(190, 246)
    tint = rng.integers(-8, 9, size=3)
    background = np.clip(base + tint, 0, 255)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels[:] = background
    pixels += rng.normal(0.0, 2.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    pixel_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)

    objects = []
    slot_px = SLOT * CELL
    for slot in slot_ids:
        row, col = SLOT * (int(slot) // slots_per_side), SLOT * (int(slot) % slots_per_side)
        color = str(palette[int(rng.integers(len(palette)))])
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(rng.integers(20, 29))
        x0 = col * CELL + int(rng.integers(1, slot_px - size))
        y0 = row * CELL + int(rng.integers(1, slot_px - size))
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
        layer = Image.new("1", image.size, 0)
        _draw_shape(ImageDraw.Draw(layer), shape, x0, y0, size, 1)
        _draw_shape(draw, shape, x0, y0, size, fill)
        pixel_mask |= np.asarray(layer, dtype=bool)
        objects.append(ShapeObject(color=color, shape=shape, row=row, col=col))
    return image, pixel_mask, tuple(objects)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, size: int, fill) -> None:
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = size // 8
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + (size - 1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        arm = size // 3
        lo, hi = (size - arm) // 2, (size - arm) // 2 + arm - 1
        draw.rectangle((x0 + lo, y0, x0 + hi, y1), fill=fill)
        draw.rectangle((x0, y0 + lo, x1, y0 + hi), fill=fill)
    else:
        raise ValueError(f"shape={shape!r} is unknown; use one of {SHAPES}.")


def _question(
    qtype: str, objects: tuple[ShapeObject, ...], rng: np.random.Generator
) -> tuple[str, str] | None:
    """A (question, answer) of ``qtype`` about ``objects``, or None if the scene cannot ask it."""
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    pairs = [(o.color, o.shape) for o in objects]
    if qtype == "color":
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return _TEMPLATES["color"].format(shape=target.shape), target.color
    if qtype == "shape":
        unique = [o for o in objects if colors.count(o.color) == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return _TEMPLATES["shape"].format(color=target.color), target.shape
    if qtype == "count":
        if rng.random() < 0.8:
            color = colors[int(rng.integers(len(colors)))]
        else:
            absent = [c for c in COLORS if c not in colors]
            color = absent[int(rng.integers(len(absent)))]
        return _TEMPLATES["count"].format(color=color), NUMBERS[colors.count(color)]
    if qtype == "exists":
        if rng.random() < 0.5:
            color, shape = pairs[int(rng.integers(len(pairs)))]
            return _TEMPLATES["exists"].format(color=color, shape=shape), "yes"
        if rng.random() < 0.6:  # hard negative: colour and shape both present, never together
            candidates = [(c, s) for c in set(colors) for s in set(shapes) if (c, s) not in pairs]
        else:
            candidates = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
        if not candidates:
            return None
        candidates.sort()
        color, shape = candidates[int(rng.integers(len(candidates)))]
        return _TEMPLATES["exists"].format(color=color, shape=shape), "no"
    if qtype == "where":
        unique = [o for o in objects if pairs.count((o.color, o.shape)) == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return _TEMPLATES["where"].format(color=target.color, shape=target.shape), target.quadrant
    raise ValueError(f"qtype={qtype!r} is unknown; use one of {QTYPES}.")


def make_sample(seed: int, qtype: str | None = None) -> Sample:
    """The sample of ``seed``: the same seed always gives the same image, question and answer.

    Args:
        seed: non-negative integer; see ``TRAIN_SEEDS`` / ``HELDOUT_SEEDS`` for the split ranges.
        qtype: force a question type (one of ``QTYPES``); by default it is drawn from the seed.

    Returns:
        a ``Sample``.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    if qtype is not None and qtype not in QTYPES:
        raise ValueError(f"qtype={qtype!r} is unknown; use one of {QTYPES} or None.")
    rng = np.random.default_rng([int(seed), 0x5EED])
    if qtype is None:
        qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    while True:  # redraw the scene until it can ask this question type (a few tries at most)
        image, pixel_mask, objects = _draw_scene(rng)
        qa = _question(qtype, objects, rng)
        if qa is not None:
            break
    question, answer = qa
    patch_mask = pixel_mask.reshape(GRID, CELL, GRID, CELL).any(axis=(1, 3))
    return Sample(
        image=image,
        question=question,
        answer=answer,
        qtype=qtype,
        object_patch_mask=patch_mask,
        object_pixel_mask=pixel_mask,
        objects=objects,
        seed=int(seed),
    )


def more_questions(sample: Sample, n: int) -> list[tuple[str, str, str]]:
    """``n`` further questions about ``sample``'s image, a pure function of its seed.

    Question types cycle through ``QTYPES`` from a seeded offset; a type the scene cannot ask
    (e.g. ``color`` when every shape appears twice) is skipped.

    Returns:
        ``[(question, answer, qtype), ...]`` of length ``n``.
    """
    if n < 0:
        raise ValueError(f"n={n!r} must be >= 0.")
    rng = np.random.default_rng([sample.seed, 0xA5C])
    out: list[tuple[str, str, str]] = []
    start = int(rng.integers(len(QTYPES)))
    k = 0
    while len(out) < n:
        qtype = QTYPES[(start + k) % len(QTYPES)]
        k += 1
        qa = _question(qtype, sample.objects, rng)
        if qa is not None:
            out.append((qa[0], qa[1], qtype))
    return out


def make_dataset(split: str, n: int, start: int = 0) -> list[Sample]:
    """``n`` consecutive samples of a split, from the ``start``-th seed of its range.

    Args:
        split: ``"train"`` or ``"heldout"``.
        n: number of samples (>= 0).
        start: offset inside the split's seed range.

    Returns:
        list of ``Sample``, seeds ``split_seeds(split)[start : start + n]``.
    """
    seeds = split_seeds(split)
    if n < 0 or start < 0 or start + n > len(seeds):
        raise ValueError(
            f"n={n!r}, start={start!r} fall outside the {split!r} split of {len(seeds)} seeds; "
            "use 0 <= start and start + n <= that size."
        )
    return [make_sample(seed) for seed in seeds[start : start + n]]
