"""Pictures of a reduction (pact_vlm.viz) and the per-family token geometry behind them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pact_vlm
import tiny_models as tm
import vlm_folder
from pact_vlm import cli, viz
from pact_vlm.integration.adapters import ADAPTERS, ImageLayout
from pact_vlm.integration.adapters.geometry import grid_boxes


# -- geometry: one box per reducible visual token, laid over the image ------------------------------

def _layouts(arch, **make_kw):
    """(layout, kinds) of every image of sample 0 of tiny inputs, with the placeholder kinds of each image."""
    config = tm.tiny_config(arch)
    inputs = tm.make_inputs(SimpleNamespace(config=config), arch, **make_kw)
    kinds = tm.image_token_kinds(SimpleNamespace(config=config), arch, inputs)[0]
    counts = ADAPTERS[config.model_type].placeholders_per_image(config, inputs["input_ids"][0], inputs)
    placeholder_at = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
    runs, start = [], 0      # each image's placeholders (an image may be several runs, split by markers)
    for n in counts:
        runs.append(placeholder_at[start:start + n])
        start += n
    sizes = make_kw.get("image_sizes") or [tm.DEFAULT_IMAGE_SIZES[arch][:make_kw.get("n_images", 1)]]
    out = []
    for k, positions in enumerate(runs):
        h, w = sizes[0][k] if isinstance(sizes[0], list) else sizes[0]
        layout = ImageLayout(image_size=(h, w), num_placeholders=len(positions), inputs=inputs, image_index=k,
                             multi_image=len(runs) > 1)
        out.append((config, layout, [kinds[p] for p in positions]))
    return out


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_geometry_has_one_box_per_reducible_token_and_tiles_the_image(arch):
    for config, layout, kinds in _layouts(arch):
        boxes = ADAPTERS[config.model_type].geometry(config, layout)
        reducible = sum(k != "newline" for k in kinds)
        assert len(boxes) == reducible
        h, w = layout.image_size
        for v in range(len(boxes.views)):
            sel = boxes.boxes[boxes.view == v]
            assert sel.shape[0] > 0
            area = ((sel[:, 2] - sel[:, 0]) * (sel[:, 3] - sel[:, 1])).sum()
            assert float(area) == pytest.approx(h * w)          # each view covers the image once
            assert float(sel[:, 0].min()) == pytest.approx(0) and float(sel[:, 2].max()) == pytest.approx(w)
            assert float(sel[:, 1].min()) == pytest.approx(0) and float(sel[:, 3].max()) == pytest.approx(h)


@pytest.mark.parametrize("arch", tm.ANYRES_ARCHS)
def test_anyres_views_base_then_tiles(arch):
    for config, layout, kinds in _layouts(arch):
        boxes = ADAPTERS[config.model_type].geometry(config, layout)
        reducible = [k for k in kinds if k != "newline"]
        assert boxes.views == ("base", "tiles")
        assert boxes.view.tolist() == [0 if k == "base" else 1 for k in reducible]


def test_onevision_multi_image_keeps_only_the_base_view():
    (cfg, layout, kinds), _ = _layouts("llava_onevision", n_images=2,
                                       image_sizes=[[(40, 60), (60, 40)]])
    boxes = ADAPTERS["llava_onevision"].geometry(cfg, layout)
    assert boxes.views == ("base",) and len(boxes) == kinds.count("base")


def test_geometry_refuses_a_wrong_placeholder_count():
    (cfg, layout, _), = _layouts("qwen2_vl")
    layout.num_placeholders += 1
    with pytest.raises(ValueError, match="prompt holds"):
        ADAPTERS["qwen2_vl"].geometry(cfg, layout)


def test_internvl_tiles_then_thumbnail():
    cfg = tm.tiny_config("internvl")
    processor = SimpleNamespace(min_patches=1, max_patches=6)
    from pact_vlm.integration.adapters.internvl import tile_arrangement

    cols, rows = tile_arrangement(80, 200, (80, 80), 1, 6)
    assert cols * rows > 1
    layout = ImageLayout(image_size=(80, 200), num_placeholders=25 * (cols * rows + 1), image_processor=processor)
    boxes = ADAPTERS["internvl"].geometry(cfg, layout)
    assert boxes.views == ("thumbnail", "tiles")
    assert boxes.view.tolist() == [1] * (25 * cols * rows) + [0] * 25
    tiles = boxes.boxes[boxes.view == 1]
    area = ((tiles[:, 2] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 1])).sum()
    assert float(area) == pytest.approx(80 * 200)
    # first tile's first token sits in the top-left corner, 2x2 pixel-shuffled patches -> 5x5 grid per tile
    assert tiles[0].tolist() == pytest.approx([0, 0, 200 / cols / 5, 80 / rows / 5])
    layout.num_placeholders = 25 * (cols * rows + 2)
    with pytest.raises(ValueError, match="tiles"):
        ADAPTERS["internvl"].geometry(cfg, layout)


def test_llava_center_crop_covers_the_middle_square():
    cfg = tm.tiny_config("llava")
    crop = SimpleNamespace(do_pad=False, do_center_crop=True, size={"shortest_edge": 40},
                           crop_size={"height": 40, "width": 40})
    boxes = ADAPTERS["llava"].geometry(cfg, ImageLayout((40, 80), 25, image_processor=crop))
    assert float(boxes.boxes[:, 0].min()) == pytest.approx(20) and float(boxes.boxes[:, 2].max()) == pytest.approx(60)
    pad = SimpleNamespace(do_pad=True)
    boxes = ADAPTERS["llava"].geometry(cfg, ImageLayout((40, 80), 25, image_processor=pad))
    assert float(boxes.boxes[:, 1].min()) == pytest.approx(-20) and float(boxes.boxes[:, 3].max()) == pytest.approx(60)


# -- render: pixel classes follow the labels ----------------------------------------------------------

def _classes(png: np.ndarray, colors):
    flat = png.reshape(-1, 3)
    counts = {tuple(c): int((flat == np.array(c)).all(axis=1).sum()) for c in colors}
    return counts


def test_render_paints_clusters_dropped_and_centers():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    boxes = grid_boxes(4, 4, 0, 0, 64, 64)
    labels = torch.tensor([0, 0, 2, 2, 0, 5, 2, -1, -1, 5, 10, 10, -1, 13, 10, 15])
    result = viz.render(image, boxes, labels, alpha=1.0, legend=False)
    png = np.asarray(result.image)
    assert png.shape == (64, 64, 3)
    kept = sorted(set(labels[labels >= 0].tolist()))
    assert result.visual_after == len(kept) and result.dropped == 3
    sizes = {c: int((labels == c).sum()) for c in kept}
    assert result.merged_clusters == sum(n > 1 for n in sizes.values()) == 4
    assert result.singletons == 2 and result.merged_tokens == sum(n for n in sizes.values() if n > 1)
    counts = _classes(png, [viz.DROPPED_RGB, *result.colors.values()])
    assert counts[viz.DROPPED_RGB] == 3 * 16 * 16
    for c in kept:
        members = int((labels == c).sum())
        got = counts[result.colors[c]]
        assert members * 256 - 60 <= got < members * 256          # minus the center dot
    assert result.centers_drawn == len(kept)
    assert (png == 0).all(axis=-1).sum() > 0                       # the dots


def test_render_alpha_zero_keeps_the_image_and_legend_stays_in_the_corner():
    image = Image.new("RGB", (120, 90), (10, 200, 30))
    boxes = grid_boxes(3, 4, 0, 0, 120, 90)
    labels = torch.tensor([0, 0, 0, 3, 3, 3, -1, -1, 8, 8, 8, 8])
    plain = viz.render(image, boxes, labels, alpha=0.0, legend=False, centers=False)
    kept_region = np.asarray(plain.image)[0:30, 0:90]
    assert (kept_region == np.array([10, 200, 30])).all()
    with_legend = viz.render(image, boxes, labels)
    x0, y0, x1, y1 = with_legend.legend_box
    assert with_legend.image.size == image.size and x0 == 0 and y1 == 90 and 0 < y0 < 90


def test_render_rejects_mismatched_labels_and_bad_alpha():
    boxes = grid_boxes(2, 2, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="geometry describes 4 tokens"):
        viz.render(Image.new("RGB", (8, 8)), boxes, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="alpha"):
        viz.render(Image.new("RGB", (8, 8)), boxes, torch.tensor([0, 0, 0, 0]), alpha=1.5)
    with pytest.raises(ValueError, match="view"):
        viz.render(Image.new("RGB", (8, 8)), boxes, torch.tensor([0, 0, 0, 0]), view="tiles")


# -- the command: PNG of the image's size whose pixel classes count what stats reports ---------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return vlm_folder.save_demo_architecture(tmp_path_factory.mktemp("vlm"))


def _shapes_image(path, size=(128, 128)):
    from pact_vlm.demo import make_dataset

    image = make_dataset("heldout", 1)[0].image.resize(size)
    image.save(path)
    return image


def test_viz_command_png_counts_match_stats(model_dir, tmp_path, capsys):
    image = _shapes_image(tmp_path / "in.png")
    out = tmp_path / "out.png"
    opts = ["-o", "layer=2", "-o", "prune_ratio=0.3", "-o", "cutoff=0.3"]
    rc = cli.main(["viz", str(model_dir), "--image", str(tmp_path / "in.png"), "--out", str(out),
                   "--alpha", "1", "--no-legend", "--device", "cpu", "--json", *opts])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)

    # the reduction itself, computed here without the command
    from pact_vlm.integration.loading import build_inputs, load_vlm

    model, processor = load_vlm(model_dir, device="cpu")
    inputs = build_inputs(processor, "Describe the image.", [image])
    with pact_vlm.apply(model, pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.3)) as handle, torch.no_grad():
        model(**inputs)
    labels = handle.stats.per_sample[0]["labels"]
    assert report["visual_before"] == handle.stats.visual_before == 64
    assert report["visual_after"] == handle.stats.visual_after
    assert report["dropped"] == int((labels < 0).sum())

    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[:2] == (image.height, image.width)
    flat = png.reshape(-1, 3)
    grey = int((flat == np.array(viz.DROPPED_RGB)).all(axis=1).sum())
    assert grey == int((labels < 0).sum()) * 16 * 16                 # 128 px / 8 tokens per side
    palette = viz.palette(handle.stats.visual_after)
    present = [c for c in palette if (flat == np.array(c)).all(axis=1).any()]
    assert len(present) == handle.stats.visual_after                  # one colour per kept token
    painted = grey + sum(int((flat == np.array(c)).all(axis=1).sum()) for c in present)
    assert flat.shape[0] - painted <= handle.stats.visual_after * 60   # the rest: the center dots


def test_viz_command_default_picture_has_the_image_size_and_a_legend(model_dir, tmp_path, capsys):
    _shapes_image(tmp_path / "in.png", size=(100, 80))
    out = tmp_path / "out.png"
    rc = cli.main(["viz", str(model_dir), "--image", str(tmp_path / "in.png"), "--out", str(out), "--device", "cpu",
                   "-o", "layer=2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (100x80" in text and "visual tokens" in text
    assert Image.open(out).size == (100, 80)


def test_idefics3_tiles_follow_the_processor_then_the_global_view():
    """2 x 3 tiles (row-major, each a 4x4 grid) then the global view; the processor's tile count rules
    (a 3 x 2 split of the same count is not guessed from the aspect ratio)."""
    cfg = tm.tiny_config("idefics3")
    processor = SimpleNamespace(get_number_of_image_patches=lambda h, w: (7, 2, 3))
    layout = ImageLayout(image_size=(100, 300), num_placeholders=16 * 7, image_processor=processor)
    boxes = ADAPTERS["idefics3"].geometry(cfg, layout)
    assert boxes.views == ("global", "tiles")
    assert boxes.view.tolist() == [1] * (16 * 6) + [0] * 16
    assert boxes.boxes[0].tolist() == pytest.approx([0, 0, 100 / 4, 50 / 4])        # tile (0, 0), first token
    assert boxes.boxes[16 * 3].tolist() == pytest.approx([0, 50, 25, 50 + 50 / 4])   # tile (1, 0)
    tall = SimpleNamespace(get_number_of_image_patches=lambda h, w: (7, 3, 2))
    with pytest.raises(ValueError, match="splits a 100x300 image into 3x2 tiles"):
        ADAPTERS["idefics3"].geometry(cfg, ImageLayout(image_size=(100, 300), num_placeholders=16 * 5,
                                                       image_processor=tall))


def test_gemma4_grid_follows_the_image_processor_with_or_without_its_patch_positions():
    """The grid of soft tokens from the real (PIL) image processor's patch positions, and the same
    grid from its resize rule alone; every token covers an equal share of the whole image."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    cfg = tm.tiny_config("gemma4")
    processor = Gemma4ImageProcessorPil(patch_size=tm.GEMMA4_PATCH, pooling_kernel_size=tm.GEMMA4_POOL,
                                        max_soft_tokens=70)
    image = Image.new("RGB", (100, 45))       # width 100, height 45: resized to whole 8 px cells
    out = processor(image, return_tensors="pt")
    n = int(out["num_soft_tokens_per_image"][0])
    positions = out["image_position_ids"][0]
    real = positions[(positions >= 0).all(-1)]
    rows, cols = (int(real[:, 1].max()) + 1) // 2, (int(real[:, 0].max()) + 1) // 2
    assert rows * cols == n and cols > rows
    with_positions = ADAPTERS["gemma4"].geometry(cfg, ImageLayout(image_size=(45, 100), num_placeholders=n,
                                                                  inputs=dict(out)))
    from_resize = ADAPTERS["gemma4"].geometry(cfg, ImageLayout(image_size=(45, 100), num_placeholders=n,
                                                               image_processor=processor))
    torch.testing.assert_close(with_positions.boxes, from_resize.boxes)
    assert with_positions.boxes[1].tolist() == pytest.approx([100 / cols, 0, 200 / cols, 45 / rows])   # row-major
    with pytest.raises(ValueError, match="gives .* Gemma 4 tokens but the prompt holds"):
        ADAPTERS["gemma4"].geometry(cfg, ImageLayout(image_size=(45, 100), num_placeholders=n + 1,
                                                     image_processor=processor))
