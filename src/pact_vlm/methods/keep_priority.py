"""Keep the tokens of highest user-given priority (an oracle / anti-oracle instrument)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_choice, check_layer, check_keep_ratio, GROUPS
from .base import SampleContext, register_reducer, split_by


@register_config
@dataclass
class KeepPriorityConfig(ReductionConfig):
    """Keep the ``ceil(keep_ratio * N)`` visual tokens of highest user-given priority (an instrument).

    Not a method of the paper: with a priority that marks the tokens an answer needs, it is an
    oracle (they are kept first) or, negated, an anti-oracle. The priority is set per call on the
    handle, ``handle.set_priority(...)``: per sample, one value per reducible visual token in
    sequence order; ties go to the earlier token.

    Args:
        layer: the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept.
        group: ``"sample"`` or ``"image"``.
    """

    method: ClassVar[str] = "keep_priority"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.5
    group: str = "sample"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_keep_ratio(self.keep_ratio)
        check_choice("group", self.group, GROUPS)


@register_reducer(KeepPriorityConfig, needs=("priority",))
def _reduce_priority(ctx: SampleContext, cfg: KeepPriorityConfig) -> Reduction:
    priority = ctx.extras["priority"]
    return split_by(ctx.groups if cfg.group == "image" else torch.zeros_like(ctx.groups), lambda sel: bl.prune(
        ctx.hidden[ctx.visual_index[sel]], bl.top_k(priority[sel], bl.num_kept(sel.numel(), cfg.keep_ratio))))
