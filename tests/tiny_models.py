"""Tiny random-weight models of real ``transformers`` VLM classes, and matching inputs.

A plain helper module for the tests (not a test file itself). It never imports ``pact_vlm``.

    model = build_tiny("qwen2_vl", attn_implementation="eager", num_layers=4)
    inputs = make_inputs(model, "qwen2_vl", batch=2)
    out = model(**inputs)
    gen = model.generate(**inputs, max_new_tokens=3)

Every model is float32, on CPU, in eval mode, built from a fixed seed in well under a second.
Text side: hidden 64, 4 query heads, 2 key/value heads (GQA), head_dim 16, vocab 128.
Token ids (same for every arch): pad 0, bos 1, eos 2, text 3..99, image 120, video 121,
vision_start 122, vision_end 123 (the last two only appear for the Qwen family), begin / end of
image 124 / 125 (Gemma 3).

Visual placeholder counts (per image, default sizes) are kept between 20 and 100:
  llava            25 (5x5 CLIP patches, CLS dropped: "default" strategy)
  internvl         25 per tile (10x10 patches, pixel shuffle 0.5)
  llava_next       base 16 + unpadded anyres grid + one newline per row (anyres, CLIP)
  llava_onevision  base 16 + unpadded anyres grid + one newline per row (anyres_max_9, SigLIP)
  qwen2_vl/2_5/3   grid_h * grid_w / 4 (spatial merge 2)
  gemma3           36 (12x12 SigLIP patches pooled 2x2), between begin / end-of-image tokens; layers
                   sliding (window 12), sliding, full, sliding; token_type_ids mark the image tokens
  gemma4           one per 8x8 pixels (4x4 patches pooled 2x2) of the image as given, between begin /
                   end-of-image tokens; 6 layers (NUM_LAYERS), the last two KV-shared; mm_token_type_ids
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from typing import Any

import torch
import transformers

# Gemma 4 as pact-vlm follows it (kv_sharing_modes) exists in the newer transformers of the supported range
# only; under an older one (e.g. vLLM's pin, 5.19) the adapter refuses it and its tests are not collected
GEMMA4_SUPPORTED = getattr(transformers.Gemma4TextConfig(), "kv_sharing_modes", None) is not None
GEMMA4 = ("gemma4",) if GEMMA4_SUPPORTED else ()
ARCHS = ["llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava", "gemma3",
         "mistral3", "idefics3", "smolvlm", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe", *GEMMA4]
HYBRID_ARCHS = ("qwen3_5", "qwen3_5_moe")   # linear-attention (gated delta net) + full-attention layers
TILED_ARCHS = ("idefics3", "smolvlm")
QWEN_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")   # M-RoPE, image_grid_thw
DEEPSTACK_ARCHS = ("qwen3_vl", "qwen3_vl_moe")
FRAME_TEXT_ARCHS = DEEPSTACK_ARCHS   # a timestamp (text) before each temporal patch of a video
ANYRES_ARCHS = ("llava_onevision", "llava_next")
VIDEO_ARCHS = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# Config attribute names (on ``model.config``) holding the placeholder token ids of visual tokens.
VISUAL_TOKEN_IDS: dict[str, list[str]] = {
    "llava_onevision": ["image_token_id", "video_token_id"],  # aliases of image_token_index / video_token_index
    "llava_next": ["image_token_id"],  # alias of image_token_index
    "qwen2_vl": ["image_token_id", "video_token_id"],
    "qwen2_5_vl": ["image_token_id", "video_token_id"],
    "qwen3_vl": ["image_token_id", "video_token_id"],
    "qwen3_vl_moe": ["image_token_id", "video_token_id"],
    "glm4v": ["image_token_id", "video_token_id"],
    "qwen3_5": ["image_token_id", "video_token_id"],
    "qwen3_5_moe": ["image_token_id", "video_token_id"],
    "internvl": ["image_token_id"],
    "llava": ["image_token_id"],  # alias of image_token_index
    "gemma3": ["image_token_id"],  # alias of image_token_index
    "gemma4": ["image_token_id"],
    "mistral3": ["image_token_id"],  # alias of image_token_index
    "idefics3": ["image_token_id"],
    "smolvlm": ["image_token_id"],
}

# The cache's keyword in model / layer calls: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_KWARG = ("cache" if "cache" in inspect.signature(
    transformers.models.llama.modeling_llama.LlamaDecoderLayer.forward).parameters else "past_key_values")

VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_LO, TEXT_HI = 3, 100
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 120, 121, 122, 123

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 128
VISION_HIDDEN, VISION_HEADS, VISION_INTER, VISION_LAYERS = 32, 2, 64, 2

# Anyres (LLaVA-NeXT / OneVision): 32x32 tiles of 8x8 patches -> 4x4 = 16 features per tile.
ANYRES_TILE, ANYRES_PATCH = 32, 8
ANYRES_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
# Qwen family: pixel patch size (the spatial merge is 2); image sizes are in pixels and must be multiples
# of patch * merge.
QWEN_PATCH = {"qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4, "qwen3_vl_moe": 4, "glm4v": 4, "qwen3_5": 4,
              "qwen3_5_moe": 4}
# Qwen3.5: gated delta net (linear attention) and full-attention layers; the first full layer
# (whose cache length transformers reads) comes before the reduction layer 2
QWEN3_5_LAYER_TYPES = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
QWEN_MERGE = 2
QWEN_TEMPORAL = 2

DEFAULT_IMAGE_SIZES = {
    # (height, width) of the original image, in pixels
    "llava_onevision": [(40, 60), (60, 40), (50, 50), (30, 90)],
    "llava_next": [(40, 60), (60, 40), (50, 50), (30, 90)],
    "qwen2_vl": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "qwen2_5_vl": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "qwen3_vl": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "qwen3_vl_moe": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "glm4v": [(32, 48), (40, 40), (48, 32), (32, 64)],
    # Qwen3.5: smaller images, so that prompts + generated tokens stay under the gated delta rule's
    # chunk of 64 positions: across a chunk boundary its float rounding differs at 1e-7, enough to
    # flip a near-tie of the reduction's ranking between a cached run and a no-cache recompute
    "qwen3_5": [(32, 40), (40, 32), (32, 48), (40, 40)],
    "qwen3_5_moe": [(32, 40), (40, 32), (32, 48), (40, 40)],
    "internvl": [(80, 80)],
    "llava": [(40, 40)],
    "gemma3": [(96, 96)],
    "gemma4": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "mistral3": [(32, 48), (40, 40), (48, 32), (32, 64)],
    "idefics3": [(128, 128), (64, 128), (128, 64), (64, 64)],
    "smolvlm": [(128, 128), (64, 128), (128, 64), (64, 64)],
}
# Gemma 3: 96x96 images of 8x8 patches -> 12x12 patches pooled 2x2 -> 36 soft tokens, between
# begin / end-of-image tokens; layers alternate sliding (window 12) and full attention
GEMMA3_IMAGE, GEMMA3_PATCH, GEMMA3_TOKENS, GEMMA3_WINDOW = 96, 8, 36, 12
BOI_ID, EOI_ID = 124, 125
GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# Gemma 4: images resized keeping their aspect ratio to multiples of 8 px, 4x4 patches pooled 2x2 ->
# one soft token per 8x8 pixels (row-major), between begin / end-of-image tokens; 6 layers, the last
# two KV-shared (each reuses the keys / values of the last earlier layer of its type: 2 sliding, 3 full);
# full layers: a wider head (32) with a quarter of it rotated, one key/value head, keys = values;
# per-layer inputs of width 8; images attend bidirectionally in the sliding layers only
GEMMA4_PATCH, GEMMA4_POOL, GEMMA4_WINDOW, GEMMA4_SHARED = 4, 2, 12, 2
GEMMA4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
                      "sliding_attention", "full_attention"]
# layers of each tiny model (4 unless named here)
NUM_LAYERS = {"gemma4": len(GEMMA4_LAYER_TYPES)}
# Mistral 3 (Pixtral): 4x4 patches merged 2x2 -> one token per 8x8 pixels, each row of tokens
# followed by [IMG_BREAK], the last by [IMG_END]
MISTRAL3_PATCH, IMG_BREAK_ID, IMG_END_ID = 4, 126, 127
# Idefics3 / SmolVLM: 64x64 tiles of 8x8 patches, pixel-shuffled 2x2 -> 16 tokens per tile; an image
# of (h, w) pixels is split into ceil(h/64) x ceil(w/64) tiles + a global view (one tile: the global
# view only). Markers: <fake_token_around_image> 124, <global-img> 125, <row_r_col_c> 100 + 4 (r-1) + (c-1),
# newline 116 (text ids, never placeholders)
TILE, TILE_PATCH, FAKE_ID, GLOBAL_ID, ROW_COL_ID, NEWLINE_ID = 64, 8, 124, 125, 100, 116
VIDEO_FRAMES = {"llava_onevision": 6, "qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4, "qwen3_vl_moe": 4, "glm4v": 4}
QWEN_VIDEO_SIZE = (24, 24)  # -> grid 6x6 per temporal patch -> 9 tokens per temporal patch


# --------------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------------


def _text_common(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def _clip_vision(image_size: int, patch_size: int) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTER,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=VISION_HIDDEN,
    )


def _siglip_vision(image_size: int, patch_size: int) -> dict[str, Any]:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTER,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


def _qwen_rope(mrope_section: list[int]) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}


def tiny_config(arch: str, num_layers: int | None = None) -> transformers.PretrainedConfig:
    """The config of the tiny model for ``arch`` (no weights); ``num_layers``: :data:`NUM_LAYERS` by default."""
    num_layers = NUM_LAYERS.get(arch, 4) if num_layers is None else num_layers
    if arch == "llava":
        text = dict(model_type="llama", **_text_common(num_layers), head_dim=HEAD_DIM)
        return transformers.LlavaConfig(
            vision_config=_clip_vision(image_size=40, patch_size=8),
            text_config=text,
            image_token_index=IMAGE_ID,
            image_seq_length=25,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    if arch == "llava_next":
        text = dict(model_type="llama", **_text_common(num_layers), head_dim=HEAD_DIM)
        return transformers.LlavaNextConfig(
            vision_config=_clip_vision(image_size=ANYRES_TILE, patch_size=ANYRES_PATCH),
            text_config=text,
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=ANYRES_PINPOINTS,
            image_seq_length=(ANYRES_TILE // ANYRES_PATCH) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    if arch == "llava_onevision":
        text = dict(model_type="qwen2", **_text_common(num_layers))
        return transformers.LlavaOnevisionConfig(
            vision_config=_siglip_vision(image_size=ANYRES_TILE, patch_size=ANYRES_PATCH),
            text_config=text,
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=ANYRES_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )
    if arch == "internvl":
        text = dict(model_type="qwen2", **_text_common(num_layers))
        vision = dict(
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTER,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS,
            image_size=80,
            patch_size=8,
        )
        return transformers.InternVLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE_ID,
            image_seq_length=25,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    if arch == "qwen2_vl":
        text = dict(**_text_common(num_layers), rope_parameters=_qwen_rope([2, 3, 3]))
        vision = dict(
            depth=VISION_LAYERS,
            embed_dim=VISION_HIDDEN,
            hidden_size=HIDDEN,
            mlp_ratio=2,
            num_heads=VISION_HEADS,
            patch_size=QWEN_PATCH[arch],
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
        )
        return transformers.Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    if arch == "qwen2_5_vl":
        text = dict(**_text_common(num_layers), rope_parameters=_qwen_rope([2, 3, 3]))
        vision = dict(
            depth=VISION_LAYERS,
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTER,
            out_hidden_size=HIDDEN,
            num_heads=VISION_HEADS,
            patch_size=QWEN_PATCH[arch],
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            window_size=16,  # 16 px / patch 4 / merge 2 -> windows of 2x2 merged tokens
            fullatt_block_indexes=[VISION_LAYERS - 1],
            tokens_per_second=2,
        )
        return transformers.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    if arch in HYBRID_ARCHS:
        text = dict(**_text_common(num_layers), head_dim=HEAD_DIM,
                    rope_parameters={**_qwen_rope([1, 1, 2]), "partial_rotary_factor": 0.5,
                                     "mrope_interleaved": True},
                    layer_types=[QWEN3_5_LAYER_TYPES[i % 4] for i in range(num_layers)],
                    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4)
        text.pop("tie_word_embeddings")
        if arch == "qwen3_5_moe":   # 4 routed experts (2 per token) + a shared expert
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
        vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTER,
                      out_hidden_size=HIDDEN, num_heads=VISION_HEADS, patch_size=QWEN_PATCH[arch],
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, num_position_embeddings=64)
        return (transformers.Qwen3_5Config if arch == "qwen3_5" else transformers.Qwen3_5MoeConfig)(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    if arch == "glm4v":
        # partial rotary (half of each head), interleaved, with M-RoPE sections over its 4 frequencies
        text = dict(**_text_common(num_layers),
                    rope_parameters={**_qwen_rope([1, 1, 2]), "partial_rotary_factor": 0.5})
        text.pop("tie_word_embeddings")
        vision = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTER,
                      out_hidden_size=HIDDEN, num_heads=VISION_HEADS, patch_size=QWEN_PATCH[arch],
                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, image_size=32)
        return transformers.Glm4vConfig(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
            image_start_token_id=VISION_START_ID, image_end_token_id=VISION_END_ID,
            video_start_token_id=VISION_START_ID, video_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    if arch in DEEPSTACK_ARCHS:
        text = dict(**_text_common(num_layers), head_dim=HEAD_DIM, rope_parameters=_qwen_rope([3, 3, 2]))
        text.pop("tie_word_embeddings")
        if arch == "qwen3_vl_moe":   # every layer a mixture of 4 experts, 2 per token
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
        vision = dict(
            depth=VISION_LAYERS + 1,
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTER,
            out_hidden_size=HIDDEN,
            num_heads=VISION_HEADS,
            patch_size=QWEN_PATCH[arch],
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            num_position_embeddings=64,  # 8x8 learned grid, bilinearly interpolated
            deepstack_visual_indexes=[0, 1],  # -> deepstack features added after LM layers 0 and 1
        )
        return (transformers.Qwen3VLConfig if arch == "qwen3_vl" else transformers.Qwen3VLMoeConfig)(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    if arch == "gemma3":
        text = dict(**_text_common(num_layers), head_dim=HEAD_DIM, sliding_window=GEMMA3_WINDOW,
                    layer_types=[GEMMA3_LAYER_TYPES[i % len(GEMMA3_LAYER_TYPES)] for i in range(num_layers)],
                    query_pre_attn_scalar=HEAD_DIM)
        text.pop("tie_word_embeddings")
        vision = dict(_siglip_vision(image_size=GEMMA3_IMAGE, patch_size=GEMMA3_PATCH))
        vision.pop("model_type")
        return transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=GEMMA3_TOKENS,
            image_token_index=IMAGE_ID,
            boi_token_index=BOI_ID,
            eoi_token_index=EOI_ID,
            tie_word_embeddings=False,
        )
    if arch == "gemma4":
        if num_layers < 6:
            raise ValueError("the tiny Gemma 4 needs 6 layers or more (4 of its own keys, 2 KV-shared)")
        own = num_layers - GEMMA4_SHARED
        types = [GEMMA4_LAYER_TYPES[i % 4] for i in range(own)] + GEMMA4_LAYER_TYPES[-GEMMA4_SHARED:]
        text = dict(**_text_common(num_layers), head_dim=HEAD_DIM, sliding_window=GEMMA4_WINDOW, layer_types=types,
                    global_head_dim=2 * HEAD_DIM, num_global_key_value_heads=1, attention_k_eq_v=True,
                    num_kv_shared_layers=GEMMA4_SHARED, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                    use_bidirectional_attention="vision",
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                        "rope_theta": 1_000_000.0}})
        text.pop("tie_word_embeddings")
        vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTER, num_hidden_layers=VISION_LAYERS,
                      num_attention_heads=VISION_HEADS, num_key_value_heads=VISION_HEADS,
                      head_dim=VISION_HIDDEN // VISION_HEADS, patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL,
                      position_embedding_size=64)
        return transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                         image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, boi_token_id=BOI_ID,
                                         eoi_token_id=EOI_ID, audio_token_id=VOCAB - 1, tie_word_embeddings=False)
    if arch == "mistral3":
        text = dict(model_type="mistral", **_text_common(num_layers), head_dim=HEAD_DIM, sliding_window=None)
        text.pop("tie_word_embeddings")
        vision = dict(model_type="pixtral", hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTER,
                      num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS,
                      head_dim=VISION_HIDDEN // VISION_HEADS, image_size=64, patch_size=MISTRAL3_PATCH)
        return transformers.Mistral3Config(
            text_config=text,
            vision_config=vision,
            image_token_index=IMAGE_ID,
            spatial_merge_size=2,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if arch in TILED_ARCHS:
        text = dict(model_type="llama", **_text_common(num_layers), head_dim=HEAD_DIM)
        text.pop("tie_word_embeddings")
        vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTER, num_hidden_layers=VISION_LAYERS,
                      num_attention_heads=VISION_HEADS, image_size=TILE, patch_size=TILE_PATCH)
        cls = transformers.Idefics3Config if arch == "idefics3" else transformers.SmolVLMConfig
        return cls(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, scale_factor=2,
                   tie_word_embeddings=False, pad_token_id=PAD_ID)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


_MODEL_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}


def model_class(arch: str) -> type:
    return getattr(transformers, _MODEL_CLASSES[arch])


def build_tiny(
    arch: str, attn_implementation: str = "sdpa", num_layers: int | None = None, seed: int = 0
) -> transformers.PreTrainedModel:
    """A tiny random-weight ``<Arch>ForConditionalGeneration`` in eval mode (float32, CPU)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    config = tiny_config(arch, num_layers=num_layers)
    torch.manual_seed(seed)
    model = model_class(arch)._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if arch == "gemma3":
        # the projector initialises to zero (every image would embed to the same vector)
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    if arch == "gemma4":
        # the patch position table initialises to ones (every patch of an image would embed alike)
        with torch.no_grad():
            model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 1.0)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = BOS_ID
    gc.eos_token_id = None  # random weights: never stop early, so generate always yields max_new_tokens
    gc.do_sample = False
    if arch in HYBRID_ARCHS + ("glm4v", "gemma4"):   # random weights: a generated image id would be taken for a
        # placeholder on recompute
        gc.suppress_tokens = [IMAGE_ID, VIDEO_ID]
    model.tiny_arch = arch  # handy for tests
    return model


# --------------------------------------------------------------------------------------------------------------------
# visual token layouts
# --------------------------------------------------------------------------------------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder layers (``model.model.language_model.layers``; Idefics3 / SmolVLM: ``model.model.text_model``)."""
    inner = model.model
    return (inner.text_model if hasattr(inner, "text_model") else inner.language_model).layers


_MODEL_TYPE_TO_ARCH = {
    "llava_onevision": "llava_onevision",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl_moe",
    "glm4v": "glm4v",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "internvl": "internvl",
    "llava": "llava",
    "gemma3": "gemma3",
    "gemma4": "gemma4",
    "mistral3": "mistral3",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
}


def arch_of(model) -> str:
    """The ``ARCHS`` name of a model of one of the seven classes (from ``config.model_type``)."""
    return _MODEL_TYPE_TO_ARCH[model.config.model_type]


def visual_token_ids(model, arch: str | None = None) -> list[int]:
    ids = []
    for name in VISUAL_TOKEN_IDS[arch or arch_of(model)]:
        value = getattr(model.config, name, None)
        if value is not None:
            ids.append(int(value))
    return ids


def visual_token_mask(model, input_ids: torch.Tensor, arch: str | None = None) -> torch.Tensor:
    """Bool mask, True at image / video placeholder positions (LLaVA-NeXT/OV newline placeholders included)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for tid in visual_token_ids(model, arch):
        mask |= input_ids == tid
    return mask


def image_index(arch: str, input_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` long: the image each position of one prompt belongs to, from the markers ``make_inputs``
    lays out (Mistral 3: an image ends at ``[IMG_END]``; others: each run of placeholders is one image)."""
    if arch == "mistral3":
        return torch.nn.functional.pad((input_ids == IMG_END_ID).long().cumsum(0), (1, 0))[:-1]
    if arch in TILED_ARCHS:     # an image ends with its global view (the run after <global-img>)
        out, image, in_global = [], 0, False
        for tok in input_ids.tolist():
            if in_global and tok != IMAGE_ID:
                image, in_global = image + 1, False
            in_global = in_global or tok == GLOBAL_ID
            out.append(image)
        return torch.tensor(out)
    placeholders = torch.isin(input_ids, torch.tensor([IMAGE_ID, VIDEO_ID]))
    return (placeholders & ~torch.nn.functional.pad(placeholders, (1, 0))[:-1]).long().cumsum(0) - 1


def anyres_token_kinds(config, image_size, multi_image: bool = False) -> list[str]:
    """Kinds of the placeholder tokens of one LLaVA-NeXT / LLaVA-OneVision image, in sequence order.

    'base' (the resized whole image, row-major), 'tile' (the unpadded anyres grid, row-major) and 'newline'
    (``image_newline``, one after every row of the unpadded grid; for an image without tiles - a multi-image
    sample in OneVision - one after the base features). Mirrors ``pack_image_features`` of both classes.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    n_base = side * side  # CLS (if any) already dropped by the "default" strategy, or SigLIP has none
    if multi_image:
        return ["base"] * n_base + ["newline"]
    h, w = int(image_size[0]), int(image_size[1])
    nph, npw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, vc.image_size)
    dummy = torch.zeros(1, nph * side, npw * side)
    cur_h, cur_w = unpad_image(dummy, (h, w)).shape[1:]
    aspect = getattr(config, "vision_aspect_ratio", None)
    if config.model_type == "llava_onevision" and aspect is not None:
        max_num_patches = int(aspect.strip("anyres_max_"))
        ratio = math.sqrt(cur_h * cur_w / (max_num_patches * side**2))
        if ratio > 1.1:
            # same as F.interpolate(size=[int(cur_h // ratio), int(cur_w // ratio)])
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    kinds = ["base"] * n_base
    for _ in range(cur_h):
        kinds += ["tile"] * cur_w + ["newline"]
    return kinds


def onevision_video_token_kinds(config, num_frames: int) -> list[str]:
    """LLaVA-OneVision video: per frame ceil(side/2)^2 pooled features, then ONE newline for the whole video."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    pooled = math.ceil(side / 2)
    return ["frame"] * (num_frames * pooled * pooled) + ["newline"]


def num_image_tokens(model, arch: str, image_size=None, multi_image: bool = False) -> int:
    cfg = model.config
    if arch in ANYRES_ARCHS:
        return len(anyres_token_kinds(cfg, image_size, multi_image=multi_image))
    if arch in QWEN_ARCHS:
        gh, gw = _qwen_grid(cfg, image_size)
        return gh * gw // (QWEN_MERGE**2)
    if arch == "internvl":
        vc = cfg.vision_config
        patches = (vc.image_size[0] // vc.patch_size[0]) * (vc.image_size[1] // vc.patch_size[1])
        return int(patches * cfg.downsample_ratio**2)
    if arch == "llava":
        vc = cfg.vision_config
        return (vc.image_size // vc.patch_size) ** 2  # CLS dropped by the "default" strategy
    if arch == "gemma3":
        return cfg.mm_tokens_per_image
    if arch == "gemma4":
        rows, cols = gemma4_grid(image_size)
        return rows * cols
    if arch == "mistral3":
        rows, cols = mistral3_grid(cfg, image_size)
        return rows * cols
    if arch in TILED_ARCHS:
        rows, cols = tile_grid(image_size)
        return (rows * cols + (1 if rows * cols > 1 else 0)) * TILE_TOKENS
    raise ValueError(arch)


TILE_TOKENS = (TILE // TILE_PATCH // 2) ** 2


def tile_grid(image_size) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles of an Idefics3 / SmolVLM image (``(1, 1)``: global view only)."""
    return math.ceil(int(image_size[0]) / TILE), math.ceil(int(image_size[1]) / TILE)


def gemma4_grid(image_size) -> tuple[int, int]:
    """``(rows, cols)`` of the soft tokens of a tiny Gemma 4 image (sizes are taken as resized already)."""
    step = GEMMA4_PATCH * GEMMA4_POOL
    h, w = int(image_size[0]), int(image_size[1])
    if h % step or w % step:
        raise ValueError(f"tiny Gemma 4 image sizes must be multiples of {step} px, got {h}x{w}")
    return h // step, w // step


def mistral3_grid(cfg, image_size) -> tuple[int, int]:
    step = cfg.vision_config.patch_size * cfg.spatial_merge_size
    return int(image_size[0]) // step, int(image_size[1]) // step


def _qwen_grid(cfg, image_size) -> tuple[int, int]:
    p = cfg.vision_config.patch_size
    m = cfg.vision_config.spatial_merge_size
    h, w = int(image_size[0]), int(image_size[1])
    gh = max(m, round(h / (p * m)) * m)
    gw = max(m, round(w / (p * m)) * m)
    return gh, gw


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def _normalize_image_sizes(arch: str, batch: int, image_sizes, n_images: int, with_image: bool):
    """-> list (per sample) of lists of (h, w)."""
    if not with_image:
        return [[] for _ in range(batch)]
    defaults = DEFAULT_IMAGE_SIZES[arch]
    if image_sizes is None:
        out = []
        for b in range(batch):
            out.append([tuple(defaults[(b + k) % len(defaults)]) for k in range(n_images)])
        return out
    if len(image_sizes) != batch:
        raise ValueError(f"image_sizes must have one entry per sample ({batch}), got {len(image_sizes)}")
    out = []
    for entry in image_sizes:
        if entry is None:
            out.append([])
        elif len(entry) == 2 and all(isinstance(v, (int, float)) for v in entry):
            out.append([tuple(int(v) for v in entry)])
        else:
            out.append([tuple(int(v) for v in e) for e in entry])
    return out


def make_inputs(
    model,
    arch: str,
    *,
    batch: int = 1,
    image_sizes=None,
    text_len: int = 8,
    n_images: int = 1,
    seed: int = 0,
    video: bool = False,
    with_image: bool = True,
) -> dict:
    """Keyword arguments for ``model(**inputs)`` / ``model.generate(**inputs)``.

    ``image_sizes``: one entry per sample: ``(h, w)``, a list of ``(h, w)`` (several images) or ``None`` (a sample
    without image). Default: ``n_images`` images per sample, sizes differing between samples. Sizes are original
    image sizes in pixels (LLaVA-NeXT / OneVision: drive the anyres layout; Qwen: rounded to multiples of
    patch*merge = 8 px, grid = size / 4); ignored for InternVL and Llava (fixed size).
    Each sample is: ``bos``, text, the image(s) (Qwen: wrapped in vision_start / vision_end), the video (if any),
    text. Sample ``b`` has ``text_len + b`` text tokens; shorter samples are left-padded with ``pad`` (0) and
    ``attention_mask`` 0. ``video=True`` adds one video per sample (archs in ``VIDEO_ARCHS``).
    """
    if arch not in ARCHS:
        raise ValueError(arch)
    if video and arch not in VIDEO_ARCHS:
        raise ValueError(f"{arch} takes no video")
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    sizes = _normalize_image_sizes(arch, batch, image_sizes, n_images, with_image)
    n_frames = VIDEO_FRAMES.get(arch, 0)

    def text(n):
        return torch.randint(TEXT_LO, TEXT_HI, (n,), generator=gen).tolist()

    seqs, types = [], []  # token ids and mm_token_type_ids (0 text, 1 image, 2 video)
    qwen_image_grids, qwen_video_grids = [], []
    pixel_sizes = []  # Mistral 3: (h, w) of each image
    tiles = [0] * batch  # Idefics3 / SmolVLM: tiles (global views included) of each sample
    anyres_sizes, batch_num_images = [], []
    for b in range(batch):
        n_text = text_len + b
        n_pre = max(1, n_text // 2)
        n_post = max(1, n_text - n_pre)
        ids = [BOS_ID] + text(n_pre)
        tt = [0] * len(ids)
        multi = len(sizes[b]) > 1
        batch_num_images.append(len(sizes[b]))
        for k, size in enumerate(sizes[b]):
            if k > 0:
                ids += text(1)
                tt += [0]
            if arch in QWEN_ARCHS:
                gh, gw = _qwen_grid(cfg, size)
                qwen_image_grids.append([1, gh, gw])
                n = gh * gw // QWEN_MERGE**2
                ids += [VISION_START_ID] + [IMAGE_ID] * n + [VISION_END_ID]
                tt += [0] + [1] * n + [0]
            elif arch in ("gemma3", "gemma4"):
                n = num_image_tokens(model, arch, size)
                ids += [BOI_ID] + [IMAGE_ID] * n + [EOI_ID]
                tt += [0] + [1] * n + [0]
                pixel_sizes.append(size)
            elif arch == "mistral3":
                rows, cols = mistral3_grid(cfg, size)
                for r in range(rows):
                    ids += [IMAGE_ID] * cols + [IMG_END_ID if r == rows - 1 else IMG_BREAK_ID]
                    tt += [1] * cols + [0]
                pixel_sizes.append(size)
            elif arch in TILED_ARCHS:
                rows, cols = tile_grid(size)
                if rows * cols > 1:
                    for r in range(rows):
                        for c in range(cols):
                            ids += [FAKE_ID, ROW_COL_ID + 4 * r + c] + [IMAGE_ID] * TILE_TOKENS
                            tt += [0, 0] + [1] * TILE_TOKENS
                        ids += [NEWLINE_ID]
                        tt += [0]
                    ids += [NEWLINE_ID]
                    tt += [0]
                ids += [FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TILE_TOKENS + [FAKE_ID]
                tt += [0, 0] + [1] * TILE_TOKENS + [0]
                tiles[b] += rows * cols + (1 if rows * cols > 1 else 0)
            else:
                if arch in ANYRES_ARCHS:
                    anyres_sizes.append(size)
                n = num_image_tokens(model, arch, size, multi_image=(multi and arch == "llava_onevision"))
                ids += [IMAGE_ID] * n
                tt += [1] * n
        if video:
            ids += text(1)
            tt += [0]
            if arch == "llava_onevision":
                n = len(onevision_video_token_kinds(cfg, n_frames))
                ids += [VIDEO_ID] * n
                tt += [2] * n
            else:
                gh, gw = _qwen_grid(cfg, QWEN_VIDEO_SIZE)
                t = n_frames // QWEN_TEMPORAL
                qwen_video_grids.append([t, gh, gw])
                per_t = gh * gw // QWEN_MERGE**2
                if arch in FRAME_TEXT_ARCHS:
                    # Qwen3-VL separates temporal patches by timestamp text: <t> <vs> frame <ve> <t> <vs> frame <ve>
                    for _ in range(t):
                        ids += text(1) + [VISION_START_ID] + [VIDEO_ID] * per_t + [VISION_END_ID]
                        tt += [0, 0] + [2] * per_t + [0]
                else:
                    ids += [VISION_START_ID] + [VIDEO_ID] * (t * per_t) + [VISION_END_ID]
                    tt += [0] + [2] * (t * per_t) + [0]
        ids += text(n_post)
        tt += [0] * n_post
        seqs.append(ids)
        types.append(tt)

    max_len = max(len(s) for s in seqs)
    input_ids = torch.full((batch, max_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
    mm_types = torch.zeros((batch, max_len), dtype=torch.long)
    for b, (s, t) in enumerate(zip(seqs, types)):
        input_ids[b, max_len - len(s) :] = torch.tensor(s)
        attention_mask[b, max_len - len(s) :] = 1
        mm_types[b, max_len - len(t) :] = torch.tensor(t)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}

    n_imgs = sum(len(s) for s in sizes)
    if arch in QWEN_ARCHS:
        vc = cfg.vision_config
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        inputs["mm_token_type_ids"] = mm_types
        if n_imgs:
            grid = torch.tensor(qwen_image_grids, dtype=torch.long)
            inputs["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
            inputs["image_grid_thw"] = grid
        if video:
            grid = torch.tensor(qwen_video_grids, dtype=torch.long)
            inputs["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
            inputs["video_grid_thw"] = grid
            if arch == "qwen2_5_vl":
                inputs["second_per_grid_ts"] = torch.ones(len(qwen_video_grids))
    elif arch in ANYRES_ARCHS:
        vc = cfg.vision_config
        if n_imgs:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            n_patches = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vc.image_size) for s in anyres_sizes]
            pv = torch.zeros(n_imgs, max(n_patches), 3, vc.image_size, vc.image_size)
            for i, n in enumerate(n_patches):
                pv[i, :n] = torch.randn(n, 3, vc.image_size, vc.image_size, generator=gen)
            inputs["pixel_values"] = pv
            inputs["image_sizes"] = torch.tensor(anyres_sizes, dtype=torch.long)
            if arch == "llava_onevision" and max(batch_num_images) > 1:
                inputs["batch_num_images"] = torch.tensor(batch_num_images, dtype=torch.long)
        if video:
            inputs["pixel_values_videos"] = torch.randn(
                batch, n_frames, 3, vc.image_size, vc.image_size, generator=gen
            )
    elif arch in TILED_ARCHS:
        if n_imgs:
            pv = torch.zeros(batch, max(tiles), 3, TILE, TILE)   # all-zero tiles are padding
            for b, n in enumerate(tiles):
                pv[b, :n] = torch.randn(n, 3, TILE, TILE, generator=gen)
            inputs["pixel_values"] = pv
    elif arch == "gemma4":
        inputs["mm_token_type_ids"] = mm_types
        if n_imgs:
            # the processor's layout: each image's patches (row-major), padded to the longest, positions (x, y),
            # (-1, -1) at padding
            p = GEMMA4_PATCH
            grids = [(h // p, w // p) for h, w in pixel_sizes]
            longest = max(gh * gw for gh, gw in grids)
            pv = torch.zeros(n_imgs, longest, 3 * p * p)
            pos = torch.full((n_imgs, longest, 2), -1, dtype=torch.long)
            for i, (gh, gw) in enumerate(grids):
                pv[i, :gh * gw] = torch.rand(gh * gw, 3 * p * p, generator=gen)
                ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
                pos[i, :gh * gw] = torch.stack([xs.flatten(), ys.flatten()], dim=1)
            inputs["pixel_values"] = pv
            inputs["image_position_ids"] = pos
    elif arch == "mistral3":
        if n_imgs:
            hmax, wmax = max(h for h, _ in pixel_sizes), max(w for _, w in pixel_sizes)
            pv = torch.zeros(n_imgs, 3, hmax, wmax)
            for i, (h, w) in enumerate(pixel_sizes):
                pv[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
            inputs["pixel_values"] = pv
            inputs["image_sizes"] = torch.tensor(pixel_sizes, dtype=torch.long)
    else:
        vc = cfg.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        if n_imgs:
            inputs["pixel_values"] = torch.randn(n_imgs, 3, size, size, generator=gen)
        if arch == "gemma3":
            inputs["token_type_ids"] = (mm_types == 1).long()
    return inputs


def image_token_kinds(model, arch: str, inputs: dict) -> list[list[str]]:
    """Per sample, the kind of every sequence position: 'text'/'pad', or for placeholders 'base'/'tile'/'newline'
    (anyres archs), 'frame'/'newline' (OneVision video), 'image'/'video' (other archs). Follows ``make_inputs``'s
    layout (images first, then the video)."""
    input_ids = inputs["input_ids"]
    cfg = model.config
    out = []
    img_iter = iter(inputs["image_sizes"].tolist()) if "image_sizes" in inputs else None
    bni = inputs.get("batch_num_images")
    for b in range(input_ids.shape[0]):
        row = input_ids[b].tolist()
        kinds = ["pad" if inputs["attention_mask"][b, i] == 0 else "text" for i in range(len(row))]
        i = 0
        while i < len(row):
            tid = row[i]
            if tid == IMAGE_ID and arch in ANYRES_ARCHS:
                multi = bni is not None and int(bni[b]) > 1
                ks = anyres_token_kinds(cfg, next(img_iter), multi_image=multi and arch == "llava_onevision")
                kinds[i : i + len(ks)] = ks
                i += len(ks)
                continue
            if tid == VIDEO_ID and arch == "llava_onevision":
                ks = onevision_video_token_kinds(cfg, inputs["pixel_values_videos"].shape[1])
                kinds[i : i + len(ks)] = ks
                i += len(ks)
                continue
            if tid == IMAGE_ID:
                kinds[i] = "image"
            elif tid == VIDEO_ID:
                kinds[i] = "video"
            i += 1
        out.append(kinds)
    return out


def timed_build(arch: str, attn_implementation: str = "sdpa", num_layers: int | None = None):
    t0 = time.perf_counter()
    model = build_tiny(arch, attn_implementation, num_layers)
    return model, time.perf_counter() - t0


def layer_input_by_hand(model, inputs: dict[str, Any], layer_index: int):
    """Unpatched run of ``model`` on ``inputs`` (batch 1): decoder layer ``layer_index``'s input
    ``hidden [T, D]`` and call kwargs, and its queries / keys computed by hand from the layer's own
    modules: ``(hidden, kwargs, q, k, rotated_q, rotated_k)``, q / k ``[T, heads, d_h]``."""
    from pact_vlm.integration import get_adapter

    layer = get_adapter(model).layers(model)[layer_index]
    captured = {}
    pre = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0] if a else k["hidden_states"], kw=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    pre.remove()
    hidden, kw = captured["hidden"][0], captured["kw"]
    cos, sin = (x.expand(1, -1, -1)[0] for x in kw["position_embeddings"])
    attn = layer.self_attn
    t = hidden.shape[0]
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)
        q = attn.q_proj(normed).view(t, -1, attn.head_dim)
        k = attn.k_proj(normed).view(t, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        rq, rk = rotate(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    return hidden, kw, q, k, rq[0].transpose(0, 1), rk[0].transpose(0, 1)
