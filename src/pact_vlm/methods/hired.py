"""HiRED: a token budget shared between anyres views by CLS attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_range, check_keep_ratio
from .base import SampleContext, register_reducer, split_by


@register_config
@dataclass
class HiREDConfig(ReductionConfig):
    """HiRED: a fixed token budget, shared between the views by CLS attention, before the LLM.

    Paper: Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models", AAAI 2025.

    Per image: budget ``B = ceil(keep_ratio * N)``; the full-image view gets ``min(alpha * B, its
    tokens)`` (all of B for an image with one view), the sub-image tiles share the rest in
    proportion to how many of the full image's ``(1 - alpha)`` most CLS-attended tokens (first
    vision layer) fall in each tile's region; each view keeps its tokens with the highest CLS
    attention of the selected feature layer (heads summed).

    Only for CLIP towers with a CLS token: LLaVA-1.5 and LLaVA-NeXT (others are refused).

    Departures: budgets count the tokens that reach the language model (after unpadding), the
    per-tile shares are rounded by largest remainder so the total is exact, and the full-image
    attention is summed over each tile's spatial region (the reference code reshapes it into
    contiguous chunks); ``image_newline`` tokens are kept (the reference drops them); kept tokens
    keep their own position ids.

    Args:
        keep_ratio: the token budget as a fraction of the visual tokens (paper: 0.2).
        alpha: share of the budget for the full-image view.
    """

    method: ClassVar[str] = "hired"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float = 0.2
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        check_range("alpha", self.alpha, 0.0, 1.0, fix="the full-image share of the budget, e.g. 0.5")


@register_reducer(HiREDConfig, needs=("vision",))
def _reduce_hired(ctx: SampleContext, cfg: HiREDConfig) -> Reduction:
    ex = ctx.extras
    return split_by(ex["image"], lambda sel: bl.prune(ctx.hidden[ctx.visual_index[sel]], bl.hired_select(
        ex["view"][sel], ex["final_attention"][sel], ex["tile_weights"][sel][0], cfg.keep_ratio, cfg.alpha)))
