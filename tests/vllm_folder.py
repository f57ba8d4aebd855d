"""Tiny random-weight Qwen2-VL / Qwen2.5-VL folders that vLLM can serve (for tests/test_vllm.py and
benchmarks/vllm_throughput.py).

The demo model's tokenizer and text sizes (head dim 64: vLLM's CPU attention takes head sizes
32, 64, 80, ...), with the stock ``Qwen2VLProcessor`` (image and video processors: vLLM's Qwen
processors need both), 8-px patches, 2x2 merge, images resized to at most 128 x 128 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ARCHS = ("qwen2_vl", "qwen2_5_vl")
PLUGIN_ARCH = {"qwen2_vl": "PactQwen2VLForConditionalGeneration",
               "qwen2_5_vl": "PactQwen2_5_VLForConditionalGeneration"}
PATCH, MERGE = 8, 2


def save_tiny(path: Path, arch: str, num_layers: int = 2, seed: int = 0, *, hidden_size: int = 256,
              num_heads: int = 4, patch: int = PATCH, max_pixels: int = 128 * 128, vision_depth: int = 2) -> Path:
    """Write a random-weight ``arch`` model with its processor to ``path``; returns ``path``.

    ``hidden_size / num_heads`` is the head dim (vLLM's CPU attention: 32, 64, 80, ...); ``patch`` and
    ``max_pixels`` set how many visual tokens an image gets (``(H / patch / 2) * (W / patch / 2)``).
    """
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from pact_vlm.demo.model import CHAT_TEMPLATE, build_config, build_tokenizer

    tokenizer = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=MERGE, temporal_patch_size=2,
                                            min_pixels=32 * 32, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=MERGE, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    config = build_config(tokenizer, num_hidden_layers=num_layers, hidden_size=hidden_size,
                          intermediate_size=3 * hidden_size, num_attention_heads=num_heads,
                          num_key_value_heads=max(1, num_heads // 2))
    config.vision_config.patch_size = patch
    config.vision_config.depth = vision_depth
    if arch == "qwen2_5_vl":
        ids = tokenizer.convert_tokens_to_ids
        text = config.text_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
            text.pop(key, None)
        vision = dict(depth=vision_depth, hidden_size=128, intermediate_size=256, out_hidden_size=text["hidden_size"],
                      num_heads=4, patch_size=patch, spatial_merge_size=MERGE, temporal_patch_size=2,
                      window_size=2 * patch * MERGE, fullatt_block_indexes=[1], tokens_per_second=2)
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"), bos_token_id=ids("<|im_start|>"),
            eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif arch == "qwen2_vl":
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"arch={arch!r}; one of {ARCHS}")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():                 # larger random weights: less uniform logits, more telling comparisons
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def image(height: int, width: int, seed: int) -> Image.Image:
    """A random RGB image (noise over a few coloured blocks)."""
    rng = np.random.RandomState(seed)
    pixels = rng.rand(height, width, 3) * 80
    for _ in range(4):
        y, x = rng.randint(0, height - 16), rng.randint(0, width - 16)
        pixels[y:y + 16, x:x + 16] += rng.rand(3) * 175
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


def prompt(num_images: int, question: str = "what shape") -> str:
    """A chat prompt with ``num_images`` images followed by ``question``."""
    images = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    return f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"
