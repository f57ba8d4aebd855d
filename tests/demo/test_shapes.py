"""Tests of the synthetic shapes QA generator (fast) and of the shipped demo model (if present)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pact_vlm.demo import shapes
from pact_vlm.demo.shapes import (
    CELL,
    COLORS,
    GRID,
    HELDOUT_SEEDS,
    QTYPES,
    SHAPES,
    TRAIN_SEEDS,
    make_dataset,
    make_sample,
)

SEEDS = list(range(40)) + [HELDOUT_SEEDS[0] + i for i in range(10)]


def _object_pixels(sample: shapes.Sample, obj: shapes.ShapeObject) -> np.ndarray:
    """Pixels of ``sample.image`` whose colour is close to ``obj``'s nominal colour, inside its slot."""
    pixels = np.asarray(sample.image).astype(int)
    near = np.abs(pixels - np.array(COLORS[obj.color])).max(-1) <= 20
    slot = np.zeros_like(near)
    size = shapes.SLOT * CELL
    slot[obj.row * CELL : obj.row * CELL + size, obj.col * CELL : obj.col * CELL + size] = True
    return near & slot


def test_same_seed_same_sample():
    a, b = make_sample(123), make_sample(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.question, a.answer, a.qtype, a.objects) == (b.question, b.answer, b.qtype, b.objects)
    assert np.array_equal(a.object_patch_mask, b.object_patch_mask)


def test_different_seeds_differ():
    images = {np.asarray(make_sample(seed).image).tobytes() for seed in range(20)}
    assert len(images) == 20


def test_splits_are_disjoint_ranges():
    assert TRAIN_SEEDS.stop <= HELDOUT_SEEDS.start
    assert set(s.seed for s in make_dataset("heldout", 5)) == set(HELDOUT_SEEDS[:5])
    assert [s.seed for s in make_dataset("train", 3, start=7)] == [7, 8, 9]
    with pytest.raises(ValueError, match="split"):
        make_dataset("test", 3)
    with pytest.raises(ValueError, match="start"):
        make_dataset("heldout", 2, start=len(HELDOUT_SEEDS) - 1)


def test_image_geometry_and_masks():
    for seed in SEEDS:
        sample = make_sample(seed)
        assert sample.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and sample.image.mode == "RGB"
        assert sample.object_patch_mask.shape == (GRID, GRID)
        assert 2 <= len(sample.objects) <= 5
        # The patch mask is the pooled pixel mask, and every object's pixels are inside it.
        assert np.array_equal(sample.patch_mask(GRID), sample.object_patch_mask)
        covered = np.kron(sample.object_patch_mask, np.ones((CELL, CELL), dtype=bool))
        for obj in sample.objects:
            drawn = _object_pixels(sample, obj)
            assert drawn.sum() > 100, (seed, obj)
            assert not (drawn & ~covered).any(), (seed, obj)
            assert not (drawn & ~sample.object_pixel_mask).any(), (seed, obj)
            # each object covers its 2 x 2 token slot
            slot = sample.object_patch_mask[obj.row : obj.row + 2, obj.col : obj.col + 2]
            assert slot.sum() >= 3, (seed, obj)
        # background tokens hold no object pixels and are the majority
        assert (~sample.object_patch_mask).sum() >= GRID * GRID - 4 * len(sample.objects)
        assert not (sample.object_pixel_mask & ~covered).any()


def _check_answer(s, question, answer, qtype):
    colors = [o.color for o in s.objects]
    pairs = [(o.color, o.shape) for o in s.objects]
    words = question.split()
    if qtype == "count":
        color = words[2]
        # count the objects of that colour in the pixels, not in the metadata
        n_drawn = sum(_object_pixels(s, o).sum() > 100 for o in s.objects if o.color == color)
        assert answer == shapes.NUMBERS[n_drawn] == shapes.NUMBERS[colors.count(color)]
    elif qtype == "color":
        (target,) = [o for o in s.objects if o.shape == words[-2]]
        assert answer == target.color
    elif qtype == "shape":
        (target,) = [o for o in s.objects if o.color == words[-3]]
        assert answer == target.shape
    elif qtype == "exists":
        assert answer == ("yes" if (words[-3], words[-2]) in pairs else "no")
    elif qtype == "where":
        (target,) = [o for o in s.objects if (o.color, o.shape) == (words[-3], words[-2])]
        ys, xs = np.nonzero(_object_pixels(s, target))
        half = shapes.IMAGE_SIZE / 2
        expected = ("bottom" if ys.mean() > half else "top") + ("right" if xs.mean() > half else "left")
        assert answer == expected
    else:  # pragma: no cover
        pytest.fail(f"unknown qtype {qtype}")
    assert answer in shapes.ANSWERS


def test_answers_match_drawn_objects():
    for seed in range(300):
        s = make_sample(seed)
        _check_answer(s, s.question, s.answer, s.qtype)


def test_more_questions_about_the_same_image():
    types = []
    for seed in range(100):
        s = make_sample(seed)
        more = shapes.more_questions(s, 4)
        assert more == shapes.more_questions(make_sample(seed), 4)       # a pure function of the seed
        assert len(more) == 4
        for question, answer, qtype in more:
            _check_answer(s, question, answer, qtype)
            types.append(qtype)
    assert set(types) == set(shapes.QTYPES)
    with pytest.raises(ValueError, match="n=-1"):
        shapes.more_questions(make_sample(0), -1)


def test_question_types_and_answers_are_balanced():
    samples = make_dataset("train", 500)
    qtypes = Counter(s.qtype for s in samples)
    assert set(qtypes) == set(QTYPES) and min(qtypes.values()) > 60
    answers = Counter(s.answer for s in samples if s.qtype == "exists")
    assert min(answers.values()) > 0.3 * sum(answers.values())
    assert set(s.answer for s in samples if s.qtype == "shape") == set(SHAPES)


def test_forced_qtype_and_bad_arguments():
    assert make_sample(5, qtype="where").qtype == "where"
    with pytest.raises(ValueError, match="qtype"):
        make_sample(5, qtype="size")
    with pytest.raises(ValueError, match="seed"):
        make_sample(-1)
    with pytest.raises(ValueError, match="grid"):
        make_sample(5).patch_mask(5)
