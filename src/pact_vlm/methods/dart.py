"""DART: pivot tokens and the visual tokens least duplicated with them, at a layer of the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import (ReductionConfig, register_config, check_choice, check_int, check_layer, check_keep_ratio,
                      GROUPS)
from .base import SampleContext, register_reducer, per_group


@register_config
@dataclass
class DARTConfig(ReductionConfig):
    """DART: keep a few pivot tokens and the visual tokens least duplicated with them, at layer ``layer``.

    Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", 2025 (DART; K = 2, 8 pivots).

    At the input of decoder layer ``layer``: the ``image_pivots`` visual tokens and the
    ``text_pivots`` text tokens after the last visual token (the question) with the largest L1
    norm of their keys (heads concatenated, after rotary) are the pivots; the visual pivots are
    kept, and each pivot in turn takes the not yet kept visual tokens least cosine-similar to it
    (``similarity="hidden"``: the layer's input hidden states; ``"keys"``: the same keys as the
    pivot scores) until ``ceil(keep_ratio * N)`` visual tokens are kept
    (:func:`pact_vlm.algorithms.baselines.dart_select`). Kept tokens keep their positions. No
    attention maps are read, so every attention backend works.

    Departures: the pivot scores are layer K's own keys, recomputed from its input (the reference
    reads layer K-1's cached keys); the similarity is on the hidden states without the final
    norm's per-channel weight the reference applies; the budget is exact (the reference keeps
    ``image_pivots + pivots * floor(budget / pivots)``, a few more or fewer), shared between the
    pivots in a fixed order (visual pivots by position, then text pivots by position; the
    reference iterates a Python set); ties go to the earlier token. With no text after the
    visual tokens only visual pivots are used.

    Args:
        layer: K, the decoder layer whose input is pruned (the paper: 2).
        keep_ratio: fraction of visual tokens kept (the reference's 128 of 576 = 0.222).
        image_pivots: visual pivot tokens (reference: 4).
        text_pivots: text pivot tokens (reference: 4).
        similarity: ``"hidden"`` or ``"keys"``.
        group: ``"sample"`` or ``"image"`` (pivots and budget per image; text pivots shared).
    """

    method: ClassVar[str] = "dart"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 2
    keep_ratio: float = 0.222
    image_pivots: int = 4
    text_pivots: int = 4
    similarity: str = "hidden"
    group: str = "sample"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_keep_ratio(self.keep_ratio)
        check_int("image_pivots", self.image_pivots, 1, fix="the reference uses 4")
        check_int("text_pivots", self.text_pivots, 0, fix="the reference uses 4")
        check_choice("similarity", self.similarity, ("hidden", "keys"))
        check_choice("group", self.group, GROUPS)


@register_reducer(DARTConfig)
def _reduce_dart(ctx: SampleContext, cfg: DARTConfig) -> Reduction:
    keys = bl.flat_keys(ctx.rotated_keys)
    norms = keys.abs().sum(dim=-1)
    features = ctx.hidden if cfg.similarity == "hidden" else keys
    real = ctx.real if ctx.real is not None else torch.ones_like(norms, dtype=torch.bool)
    positions = ctx.positions if ctx.positions is not None else torch.arange(norms.numel(), device=norms.device)
    text = real.clone()
    text[ctx.visual_index] = False
    text &= positions > positions[ctx.visual_index].max()
    rows = torch.nonzero(text).flatten()
    pivots = rows[bl.top_k(norms[rows], min(cfg.text_pivots, rows.numel()))]
    extra = features[pivots]

    def one(vi):
        k = bl.num_kept(vi.numel(), cfg.keep_ratio)
        return bl.dart_reduce(ctx.hidden[vi], features[vi], norms[vi], k, cfg.image_pivots, extra)
    return per_group(ctx, cfg.group, one)
