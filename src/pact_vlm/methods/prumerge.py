"""LLaVA-PruMerge(+): CLS attention of the CLIP tower, before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_int, check_bool, check_keep_ratio
from .base import SampleContext, register_reducer


@register_config
@dataclass
class PruMergeConfig(ReductionConfig):
    """LLaVA-PruMerge: keep the visual tokens the CLIP CLS token attends to most, merge the rest in.

    Paper: Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", 2024 (PruMerge and PruMerge+).

    Before the language model, per CLIP view (an image, or an anyres tile): the CLS attention of
    the vision layer whose input is the selected feature layer (the reference code's layer 23 of
    24 for LLaVA-1.5's feature layer -2; the last layer when the features are the tower's output;
    q / k projections, heads concatenated, as the reference code) selects the tokens above Q3 + 1.5 IQR (``keep_ratio=None``,
    adaptive) or the ``ceil(keep_ratio * P)`` highest; each kept token's CLIP feature becomes
    ``x_i + sum_j a_j x_j`` over its ``neighbors`` nearest tokens by key cosine similarity
    (``a`` = CLS attention), before the projector. ``plus=True`` (PruMerge+) adds spatially
    uniform samples.

    Only for CLIP towers with a CLS token and the ``"default"`` feature strategy: LLaVA-1.5 and
    LLaVA-NeXT; anything else is refused when applied.

    Departures: kept tokens keep their spatial order and their own position ids (the original
    feeds them in attention order at consecutive positions); the reference code's extra token
    (attention-weighted sum of the pruned tokens) is not added; LLaVA-NeXT ``image_newline``
    tokens are never dropped; on LLaVA-NeXT each tile is one view.

    Args:
        keep_ratio: ``None`` (IQR outliers, the paper) or the fraction of tokens kept per view.
        plus: PruMerge+ (adds uniformly spaced tokens).
        neighbors: k of the k-nearest-neighbour merge (32 in the reference code).
    """

    method: ClassVar[str] = "prumerge"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.001, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float | None = None
    plus: bool = False
    neighbors: int = 32

    def __post_init__(self) -> None:
        if self.keep_ratio is not None:
            check_keep_ratio(self.keep_ratio, allow_zero=False)
        check_bool("plus", self.plus)
        check_int("neighbors", self.neighbors, 0, fix="the reference code uses 32")


@register_reducer(PruMergeConfig, needs=("vision",))
def _reduce_prumerge(ctx: SampleContext, cfg: PruMergeConfig) -> Reduction:
    # the features of the kept tokens were merged before the projector (see .vision)
    keep = torch.nonzero(ctx.extras["keep"]).flatten()
    return bl.prune(ctx.hidden[ctx.visual_index], keep)
