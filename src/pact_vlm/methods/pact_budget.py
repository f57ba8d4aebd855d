"""PACT with a fixed budget per image, before the language model (the form vLLM serves)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..algorithms.budget_pact import budget_pact_reduce
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_range, check_choice, check_bool, check_keep_ratio
from .base import SampleContext, per_group, register_reducer


@register_config
@dataclass
class PACTBudgetConfig(ReductionConfig):
    """PACT before the language model with exactly ``ceil(keep_ratio * N)`` tokens per image.

    Paper: Dhouib et al., "PACT: Pruning and Clustering-Based Token Reduction for Faster Visual
    Language Models", CVPR 2025 (EUTI + DBDPC + retrieval + merging). See
    :mod:`pact_vlm.algorithms.budget_pact` for the steps.

    Departures from :class:`PACTConfig`, so that a serving engine can allot the placeholders
    before the vision encoder runs: the reduction is at layer 0 (the projector's output), per
    image; the kept count is a function of the image's token count and ``keep_ratio`` only, and
    DBDPC's cut-off is searched per image to give exactly that count (completed by the next
    highest-density tokens when the count cannot be met exactly); DBDPC reads the first layer's
    keys before rotary (position-free); EUTI's context is the image's own tokens.
    Proportional attention is off by default, because vLLM's attention kernels take no per-key
    bias; ``proportional_attention=True`` is for the Hugging Face path only (to measure its worth).

    Args:
        keep_ratio: fraction of each image's visual tokens kept, in (0, 1].
        prune_ratio: λ, the fraction EUTI sets aside (the budget is never set aside).
        alpha: retrieval factor; a set-aside token rejoins its nearest center iff within alpha * d_c.
        density, dn, euti_variant: as in :class:`PACTConfig`.
        proportional_attention: add log(cluster size) to merged keys' logits (Hugging Face only).
    """

    method: ClassVar[str] = "pact_budget"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.001, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float = 0.3
    prune_ratio: float = 0.2
    alpha: float = 1.5
    density: str = "gaussian"
    dn: float = 2.0
    euti_variant: str = "full"
    proportional_attention: bool = False

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio, allow_zero=False)
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True,
                     fix="use 0 to prune nothing and e.g. 0.2 to set aside 20% of visual tokens")
        check_range("alpha", self.alpha, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use e.g. 1.5 (the paper's value)")
        check_range("dn", self.dn, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use 2.0 (the reference value)")
        check_choice("density", self.density, ("gaussian", "exponential"))
        check_choice("euti_variant", self.euti_variant, ("full", "norm", "softmax"))
        check_bool("proportional_attention", self.proportional_attention)


@register_reducer(PACTBudgetConfig)
def _reduce_pact_budget(ctx: SampleContext, cfg: PACTBudgetConfig) -> Reduction:
    def one(vi):
        mean_query = None if cfg.euti_variant == "norm" else ctx.mean_query(vi)
        return budget_pact_reduce(ctx.hidden[vi], ctx.keys[vi], mean_query, keep_ratio=cfg.keep_ratio,
                                  prune_ratio=cfg.prune_ratio, alpha=cfg.alpha, density=cfg.density,
                                  dn=cfg.dn, euti_variant=cfg.euti_variant)
    return per_group(ctx, "image", one)
