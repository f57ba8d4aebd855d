"""LLaVA-1.5: one square grid of CLIP patches per image (CLS dropped by the "default" strategy)."""

from __future__ import annotations

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes, no_region, processor_setting, size_value


def _covered_region(image_processor, height: int, width: int) -> tuple[float, float, float, float]:
    """The rectangle of the original image that the square model input shows.

    ``do_pad`` pads the image to a centered square; ``do_center_crop`` (CLIP's default) resizes the
    shortest edge and crops the center; otherwise the image is stretched to the square.
    """
    if processor_setting(image_processor, "do_pad", False):
        side = max(height, width)
        x0, y0 = (width - side) / 2, (height - side) / 2
        return x0, y0, x0 + side, y0 + side
    if processor_setting(image_processor, "do_center_crop", False):
        size = processor_setting(image_processor, "size")
        crop = processor_setting(image_processor, "crop_size")
        shortest = size_value(size, "shortest_edge")
        crop_h, crop_w = size_value(crop, "height"), size_value(crop, "width")
        if shortest and crop_h and crop_w:
            scale = shortest / min(height, width)
            ch, cw = crop_h / scale, crop_w / scale
            x0, y0 = (width - cw) / 2, (height - ch) / 2
            return x0, y0, x0 + cw, y0 + ch
    return 0.0, 0.0, float(width), float(height)


def llava_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """A ``side x side`` grid (``side = image_size / patch_size``) over the region the processor keeps."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    has_cls = getattr(config, "vision_feature_select_strategy", "default") == "full"
    expected = side * side + int(has_cls)
    if layout.num_placeholders != expected:
        raise ValueError(f"image {layout.image_index}: {side}x{side} patches{' + CLS' if has_cls else ''} "
                         f"give {expected} tokens but the prompt holds {layout.num_placeholders}")
    height, width = layout.image_size
    grid = grid_boxes(side, side, *_covered_region(layout.image_processor, height, width))
    return TokenBoxes.cat([no_region(1), grid], ("image",)) if has_cls else grid


register_adapter(Adapter(
    name="LLaVA-1.5", model_types=("llava",), classes=("LlavaForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=llava_geometry))
