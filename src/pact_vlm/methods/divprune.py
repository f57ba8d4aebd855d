"""DivPrune: keep the most diverse visual tokens, before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_choice, check_layer, check_keep_ratio, GROUPS
from .base import SampleContext, register_reducer, per_group


@register_config
@dataclass
class DivPruneConfig(ReductionConfig):
    """DivPrune: keep the visual tokens that are most diverse, by greedy max-min selection.

    Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025.

    At the input of decoder layer ``layer`` (0, the default and the paper's setting: the visual
    embeddings the projector hands to the language model), the ``ceil(keep_ratio * N)`` tokens of
    a greedy max-min diversity selection on the cosine distance of those states are kept
    (:func:`pact_vlm.algorithms.baselines.max_min_select`), in their order and at their own
    positions; the rest are dropped. No attention is read, so it works on every family and
    backend.

    Departures: the kept count is ``ceil(keep_ratio * N)`` (the reference's ``round``); distances
    in float32; a token already kept is never picked again (the reference can pick one twice when
    every distance left is 0); with several images, ``group="sample"`` selects over all of a
    sample's visual tokens at once, ``"image"`` within each image.

    Args:
        layer: the decoder layer whose input is pruned (0 = before the language model).
        keep_ratio: fraction of visual tokens kept (the paper's main setting keeps 9.8%).
        group: ``"sample"`` or ``"image"``.
    """

    method: ClassVar[str] = "divprune"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 0
    keep_ratio: float = 0.098
    group: str = "sample"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_keep_ratio(self.keep_ratio)
        check_choice("group", self.group, GROUPS)


@register_reducer(DivPruneConfig)
def _reduce_divprune(ctx: SampleContext, cfg: DivPruneConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.divprune_reduce(ctx.hidden[vi], cfg.keep_ratio))
