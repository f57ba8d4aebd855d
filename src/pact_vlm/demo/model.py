"""The demo VLM: a tiny ``Qwen2VLForConditionalGeneration`` with an offline tokenizer and processor.

Everything here is stock ``transformers`` except one thin processor subclass:

* tokenizer: a ``tokenizers`` WordLevel model (whitespace pre-tokenizer) over the shapes vocabulary
  plus Qwen2-VL's special tokens, wrapped in ``PreTrainedTokenizerFast``;
* image processor: ``Qwen2VLImageProcessorPil`` (the PIL fallback; no torchvision), 8-px patches,
  2x2 merge, 128 x 128 images -> ``image_grid_thw = [1, 16, 16]`` -> 64 visual tokens;
* processor: ``Qwen2VLImageOnlyProcessor``, a ``Qwen2VLProcessor`` whose ``__init__`` has no
  ``video_processor`` argument.  ``ProcessorMixin`` derives its sub-processor list from the
  ``__init__`` signature, so the video slot disappears: no ``VideoProcessorMixin`` class check
  (which fails without torchvision), nothing video-related saved or loaded.  Image calls, chat
  template, ``mm_token_type_ids`` and token expansion are Qwen2-VL's own code.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from . import shapes

__all__ = [
    "ARCHS",
    "CHAT_TEMPLATE",
    "CLIP_MODEL_DIR",
    "DEFAULT_MODEL_DIR",
    "Qwen2VLImageOnlyProcessor",
    "answer",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "evaluate",
    "load_demo_model",
    "prompt",
]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Where ``python -m pact_vlm.demo.train`` saves the shipped model."""
CLIP_MODEL_DIR = Path(__file__).resolve().parent / "model_clip"
"""Where ``python -m pact_vlm.demo.train --arch llava`` saves the shipped CLIP-tower model."""
ARCHS = ("qwen2-vl", "llava")
"""Demo architectures: ``"qwen2-vl"`` (the default demo VLM, a 2x2-merging Qwen2-VL tower) and
``"llava"`` (a LLaVA-1.5 layout: a CLIP tower with a CLS token, one visual token per patch), the
model that methods reading a CLIP tower's attention (VisionZip, PruMerge, HiRED) run on."""

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHAT_WORDS = ("<unk>", "system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat layout, minus the default system prompt."""

PATCH_SIZE = 8
MERGE_SIZE = 2
CLIP_PATCH_SIZE = PATCH_SIZE * MERGE_SIZE
"""The CLIP demo's patch: one visual token per 16 x 16 pixels, the same 8 x 8 grid as the Qwen2-VL demo."""
IMAGE_TOKEN = "<image>"

CLIP_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", IMAGE_TOKEN)
"""The Qwen2-VL demo's chat layout with LLaVA's ``<image>`` placeholder."""


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video slot, usable without torchvision.

    Args:
        image_processor: a Qwen2-VL image processor (``Qwen2VLImageProcessorPil`` here).
        tokenizer: a tokenizer that knows ``<|image_pad|>`` and ``<|video_pad|>``.
        chat_template: jinja chat template.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin lists sub-processors from this signature: no video_processor here
        # means no VideoProcessorMixin check (it needs torchvision) and nothing video-related
        # saved or loaded.  Qwen2VLProcessor passes video_processor=None positionally; the
        # mixin zips positional arguments with that list and so drops it.
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def build_tokenizer(arch: str = "qwen2-vl"):
    """The word-level tokenizer of the demo model (``PreTrainedTokenizerFast``); ``arch="llava"`` adds ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = (*SPECIAL_TOKENS, IMAGE_TOKEN) if _check_arch(arch) == "llava" else SPECIAL_TOKENS
    words = [*specials, *CHAT_WORDS]
    words += [w for w in shapes.vocabulary() if w not in words]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(specials),
        padding_side="right",
        model_max_length=512,
    )
    return tokenizer


def build_image_processor():
    """``Qwen2VLImageProcessorPil`` set to keep 128 x 128 images at 8-px patches, 2x2 merge."""
    pixels = shapes.IMAGE_SIZE * shapes.IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"demo arch {arch!r} is not one of {', '.join(ARCHS)}")
    return arch


def build_processor(arch: str = "qwen2-vl"):
    """The demo processor.

    ``"qwen2-vl"``: ``Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template)``;
    ``"llava"``: ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (128 x 128 in, no resize or crop,
    so the 16-px patches are the same cells as the Qwen2-VL demo's merged tokens), 64 placeholders
    per image (the CLS token is dropped by the ``"default"`` feature strategy).
    """
    if _check_arch(arch) == "qwen2-vl":
        return Qwen2VLImageOnlyProcessor(image_processor=build_image_processor(), tokenizer=build_tokenizer(),
                                         chat_template=CHAT_TEMPLATE)
    side = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                            crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer("llava"),
                          patch_size=CLIP_PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CLIP_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_llava_config(tokenizer, **overrides: Any) -> LlavaConfig:
    """A ``LlavaConfig`` for the CLIP demo: a 2-layer CLIP tower (width 192, CLS token, 16-px patches on
    128 x 128 images, learned position embeddings) and a Qwen2 text tower of the Qwen2-VL demo's size
    (width 256, 1-D rotary at base 1e4).

    Args:
        tokenizer: the tokenizer from ``build_tokenizer("llava")``.
        **overrides: text-config fields to change (e.g. ``num_hidden_layers=4``).
    """
    ids = tokenizer.convert_tokens_to_ids
    text = dict(_text_fields(tokenizer), model_type="qwen2")
    text.update(overrides)
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=shapes.IMAGE_SIZE,
        patch_size=CLIP_PATCH_SIZE,
        hidden_act="quick_gelu",
        projection_dim=256,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_model(arch: str, tokenizer, **overrides: Any):
    """A randomly initialised demo model of ``arch`` (see ``ARCHS``) for ``tokenizer``."""
    if _check_arch(arch) == "qwen2-vl":
        return Qwen2VLForConditionalGeneration(build_config(tokenizer, **overrides))
    return LlavaForConditionalGeneration(build_llava_config(tokenizer, **overrides))


def _text_fields(tokenizer) -> dict[str, Any]:
    """The text tower both demo models share: width 256, 4 layers, 4 heads (2 KV), rotary base 1e4."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def build_config(tokenizer, **overrides: Any):
    """A ``Qwen2VLConfig`` for the demo model.

    Rotary base 1e4 and an M-RoPE split that gives the time band 1 frequency pair, the height band
    the next ``head_dim // 16`` (the fastest after it) and the width band all the rest
    (``[1, 4, 27]`` for head_dim 64). Qwen2-VL's default split ([16, 24, 24] of 64 pairs at base
    1e6) gives the width band frequencies that turn by less than 1e-3 rad across an 8-token grid;
    a small base instead (e.g. 10) leaves no slow pair at all, so a question token cannot match an
    object token by content wherever it sits in the image. With this split both hold: fast pairs
    resolve rows and columns, and the width band's slowest pairs turn by under 0.1 rad across the
    image, for content matching.

    Args:
        tokenizer: the demo tokenizer (for vocabulary size and special token ids).
        **overrides: text-config fields to change (e.g. ``num_hidden_layers=4``).
    """
    ids = tokenizer.convert_tokens_to_ids
    text = _text_fields(tokenizer)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[1, 4, 27])
    text.update(overrides)
    if "rope_parameters" not in overrides:
        half = text["hidden_size"] // text["num_attention_heads"] // 2      # rotary frequency pairs
        h_pairs = max(1, half // 8)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[1, h_pairs, half - 1 - h_pairs])
    vision = dict(
        depth=2,
        embed_dim=128,
        hidden_size=text["hidden_size"],
        mlp_ratio=2,
        num_heads=4,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def prompt(processor, question: str) -> str:
    """The chat-formatted prompt for one image + ``question`` (generation prompt included)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_demo_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load the shipped demo model and its processor.

    Args:
        path: a directory written by ``python -m pact_vlm.demo.train`` (default: the copy inside
            the package, ``DEFAULT_MODEL_DIR``; ``CLIP_MODEL_DIR`` holds the CLIP-tower demo).
        dtype: parameter dtype after loading.

    Returns:
        ``(model, processor)``: a ``Qwen2VLForConditionalGeneration`` in eval mode and a
        ``Qwen2VLImageOnlyProcessor``, or for a folder of the CLIP demo a
        ``LlavaForConditionalGeneration`` and a ``LlavaProcessor``.
    """
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No demo model at {str(path)!r} (config.json missing). Train it with "
            f"`python -m pact_vlm.demo.train --out {path}` or pass the directory that holds it."
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = LlavaProcessor.from_pretrained(path)
    elif model_type == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = Qwen2VLImageOnlyProcessor.from_pretrained(path)
    else:
        raise ValueError(f"{str(path)!r} holds a {model_type!r} model, not a demo model (qwen2_vl or llava); "
                         "pass a folder written by `python -m pact_vlm.demo.train`")
    model.eval()
    return model, processor


@torch.no_grad()
def answer_batch(model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers to a batch of (image, question) pairs (left padding, ``model.generate``)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one image per question.")
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = processor(
            images=list(images), text=[prompt(processor, q) for q in questions], return_tensors="pt", padding=True
        )
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(model.device)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer(model, processor, image: Image.Image, question: str) -> str:
    """The model's greedy one-word answer to ``question`` about ``image``."""
    return answer_batch(model, processor, [image], [question])[0]


def evaluate(model, processor, n: int = 500, start: int = 0, batch_size: int = 50) -> dict[str, float]:
    """Held-out accuracy (exact match of the greedy answer) overall and per question type.

    Args:
        model, processor: as returned by ``load_demo_model``.
        n: number of held-out samples (seeds ``HELDOUT_SEEDS[start : start + n]``).
        start: offset inside the held-out seed range.
        batch_size: samples per ``generate`` call.

    Returns:
        ``{"all": acc, "color": acc, ...}`` with accuracies in [0, 1], plus ``"n"``.
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n={n!r} and batch_size={batch_size!r} must be positive.")
    samples = shapes.make_dataset("heldout", n, start=start)
    correct: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, n, batch_size):
        chunk = samples[i : i + batch_size]
        preds = answer_batch(model, processor, [s.image for s in chunk], [s.question for s in chunk])
        for sample, pred in zip(chunk, preds):
            correct[sample.qtype].append(pred == sample.answer)
            correct["all"].append(pred == sample.answer)
    result = {key: sum(v) / len(v) for key, v in correct.items()}
    result["n"] = n
    return result
