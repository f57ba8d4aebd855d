"""Gemma 3 and Gemma 4: sliding-window and full-attention layers, bidirectional attention inside each image.

Per layer type (``config.text_config.layer_types``) the model computes its own rotary table and
its own mask; the integration follows both (each layer's rotary input is indexed by the kept
rows; visibility is computed on original positions). Inside an image (a run of image tokens in
``token_type_ids``) tokens attend to each other in both directions, in full and sliding layers
alike; after a reduction the kept and merged tokens of one image still do. A sliding window
counts *original* positions: a key is visible iff its original position is within the window of
the query's (``q_pos - kv_pos < sliding_window``), so a merged token is as far from a query as
its center is. Its cache layers keep the last ``window - 1`` entries, which after a reduction
cover more than the window's positions: the superset is masked by position.

Image geometry: the image is resized to the tower's square input (no crop) and its patches are
average-pooled to a ``sqrt(mm_tokens_per_image)``-square grid, row-major.

Gemma 4 builds on this policy, with these differences (each followed here or in the integration):

* the image blocks (from ``mm_token_type_ids``, only with ``use_bidirectional_attention="vision"``)
  apply in sliding layers only; full layers are causal;
* full layers have a wider head and rotate a part of it (their own rotary table, indexed by the
  kept rows like every other), and ``apply_rotary_pos_emb`` rotates one tensor;
* per-layer inputs (``per_layer_input``, one row per original token) reach every layer: gathered
  to the kept rows like the rotary tables;
* the last ``num_kv_shared_layers`` layers compute no keys: each reuses the keys and values its
  *producer* (the last earlier layer of its type) computed in the same call, cache included. The
  producers must hold the reduced sequence, so the reduction layer is at or before the first
  producer; the shared layers then attend over exactly the keys the producers' caches hold, in
  prefill and decode, with proportional attention as in any reduced layer. A progressive
  reduction (which would also reduce at the shared layers) is refused;
* in prefill ``generate`` slices the hidden states, rotary tables and per-layer inputs to the
  last ``logits_to_keep`` rows before the first KV-shared layer: the integration follows it, and
  keeps the text model from slicing when those rows would not be the call's last positions (a
  reducible visual token among them).

Gemma 4 image geometry: each image is resized keeping its aspect ratio (no crop) to whole
``patch_size x pooling_kernel_size`` cells, one soft token per cell, row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import Adapter, register_adapter
from .geometry import ImageLayout, TokenBoxes, grid_boxes, processor_setting


def image_blocks(config, inputs: dict, placeholders: torch.Tensor, past: int = 0) -> torch.Tensor | None:
    """``[B, T]`` image index of each image token (``-1`` elsewhere), from ``token_type_ids`` as the
    model builds its bidirectional blocks; None without ``token_type_ids`` (the model then has none)."""
    return _runs(inputs.get("token_type_ids"), (1,), placeholders)


def gemma4_blocks(config, inputs: dict, placeholders: torch.Tensor, past: int = 0) -> torch.Tensor | None:
    """As :func:`image_blocks`, from ``mm_token_type_ids`` (1 image, 2 video), which the model reads
    only with ``use_bidirectional_attention="vision"``, by absolute position: entry ``j`` is position
    ``j`` of the sequence (after a cache generate passes them from its start), positions past
    their end have none."""
    if getattr(config.get_text_config(), "use_bidirectional_attention", None) != "vision":
        return None
    blocks = _runs(inputs.get("mm_token_type_ids"), (1, 2), placeholders)
    if blocks is None:
        return None
    end = past + placeholders.shape[1]
    blocks = torch.nn.functional.pad(blocks, (0, max(0, end - blocks.shape[1])), value=-1)
    return blocks[:, past:end]


def _runs(token_type_ids: torch.Tensor | None, kinds: tuple[int, ...], placeholders: torch.Tensor):
    if token_type_ids is None:
        return None
    is_image = torch.isin(token_type_ids, torch.tensor(kinds, device=token_type_ids.device))
    start = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    ids = start.long().cumsum(dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1)).to(placeholders.device)


def gemma3_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """A ``side x side`` grid (``side = sqrt(mm_tokens_per_image)``) over the whole image."""
    n = int(config.mm_tokens_per_image)
    side = math.isqrt(n)
    if layout.num_placeholders != n:
        raise ValueError(f"image {layout.image_index}: Gemma 3 gives {n} tokens per image but the prompt holds "
                         f"{layout.num_placeholders}")
    height, width = layout.image_size
    return grid_boxes(side, side, 0.0, 0.0, float(width), float(height))


register_adapter(Adapter(
    name="Gemma 3", model_types=("gemma3",), classes=("Gemma3ForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=gemma3_geometry,
    bidirectional_kinds=("full_attention", "sliding_attention"), blocks=image_blocks))



# -- Gemma 4 ----------------------------------------------------------------------------------------

def kv_producers(config) -> dict[int, list[int]]:
    """``{producer layer: [KV-shared layers reusing its keys and values]}`` (empty: no KV sharing)."""
    text = config.get_text_config()
    modes = getattr(text, "kv_sharing_modes", None)
    if modes is None:
        import transformers

        raise ValueError(f"Gemma 4 under transformers {transformers.__version__}: its config has no kv_sharing_modes "
                         "(an older Gemma 4 layout, which pact-vlm does not follow); upgrade transformers (5.24 is "
                         "tested) or run Gemma 4 unreduced")
    modes = list(modes)
    kinds = list(text.layer_types)
    out: dict[int, list[int]] = {}
    for i, mode in enumerate(modes):
        if mode == "reuse":
            producer = max(j for j in range(i) if modes[j] != "reuse" and kinds[j] == kinds[i])
            out.setdefault(producer, []).append(i)
    return out


@dataclass(frozen=True)
class Gemma4Adapter(Adapter):
    """Gemma 4: the per-layer policy of Gemma 3 plus the KV-sharing rules (see the module docstring)."""

    def check_layers(self, model, first: int, progressive: bool = False) -> None:
        text = model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise ValueError("Gemma 4 with use_bidirectional_attention='all' attends in both directions over every "
                             "token (no causal order), which the reduced layers' visibility does not model; run it "
                             "unreduced")
        producers = kv_producers(model.config)
        if producers and progressive:
            shared = sorted(i for users in producers.values() for i in users)
            raise ValueError(f"Gemma 4: decoder layers {shared[0]}..{shared[-1]} reuse earlier layers' keys and "
                             "values (KV sharing) and compute none of their own, so a progressive reduction cannot "
                             "reduce there; use progressive=False")
        super().check_layers(model, first, progressive)
        # the rows the shared layers see are the last stage's (a reduction at layer 0 leaves its
        # dropped rows in layer 0, as ghosts, until layer 1)
        start = 1 if first == 0 else first
        early = sorted(p for p in producers if p < start)
        if early:
            allowed = min(producers)
            users = sorted(i for p in early for i in producers[p])
            fix = (f"use layer <= {allowed}" + (" (and not 0)" if allowed >= 1 and first == 0 else "")
                   if allowed >= 1 else "no layer can reduce this configuration")
            raise ValueError(f"Gemma 4: decoder layers {users} reuse the keys and values of layer(s) {early} (KV "
                             f"sharing), which must hold the reduced sequence, but the reduction starts at layer "
                             f"{start}; {fix}")


def gemma4_geometry(config, layout: ImageLayout) -> TokenBoxes:
    """A ``rows x cols`` grid over the whole image: from the processor's patch positions
    (``image_position_ids``) when given, else from its aspect-preserving resize."""
    vc = config.vision_config
    k = int(vc.pooling_kernel_size)
    height, width = layout.image_size
    positions = layout.inputs.get("image_position_ids")
    if positions is not None:
        pos = positions[layout.image_index]
        pos = pos[(pos >= 0).all(dim=-1)]
        cols, rows = ((int(pos[:, 0].max()) + 1) // k, (int(pos[:, 1].max()) + 1) // k)
    else:
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        patch = int(processor_setting(layout.image_processor, "patch_size", vc.patch_size))
        pool = int(processor_setting(layout.image_processor, "pooling_kernel_size", k))
        soft = int(processor_setting(layout.image_processor, "max_soft_tokens", 280))
        h, w = get_aspect_ratio_preserving_size(height, width, patch, soft * pool * pool, pool)
        rows, cols = h // (patch * pool), w // (patch * pool)
    if rows * cols != layout.num_placeholders:
        raise ValueError(f"image {layout.image_index}: a {height}x{width} image gives {rows}x{cols} Gemma 4 tokens "
                         f"but the prompt holds {layout.num_placeholders}")
    return grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height))


register_adapter(Gemma4Adapter(
    name="Gemma 4", model_types=("gemma4",), classes=("Gemma4ForConditionalGeneration",),
    token_id_attrs=("image_token_id",), geometry=gemma4_geometry,
    bidirectional_kinds=("sliding_attention",), blocks=gemma4_blocks,
    row_kwargs=("position_ids", "per_layer_input")))
