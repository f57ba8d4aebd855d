"""Random pruning (sanity baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_choice, check_layer, check_int, check_keep_ratio, GROUPS
from .base import SampleContext, register_reducer, per_group


@register_config
@dataclass
class RandomConfig(ReductionConfig):
    """Random pruning (sanity baseline): keep ``ceil(keep_ratio * N)`` visual tokens at random.

    Paper: the random-selection baseline that token-reduction papers (PACT's comparisons among
    them) report as a floor. The choice depends only on ``seed`` and N (a fresh generator per
    reduction), so a prompt is reduced the same way in every call, cached or not; the same seed
    picks the same indices in every sample with the same N. Departures: none to speak of (there
    is no reference implementation to follow).

    Args:
        layer: the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept.
        seed: seed of the generator.
        group: ``"sample"`` or ``"image"``.
    """

    method: ClassVar[str] = "random"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.5
    seed: int = 0
    group: str = "sample"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_keep_ratio(self.keep_ratio)
        check_int("seed", self.seed, 0, fix="any integer >= 0")
        check_choice("group", self.group, GROUPS)


@register_reducer(RandomConfig)
def _reduce_random(ctx: SampleContext, cfg: RandomConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.random_reduce(ctx.hidden[vi], cfg.keep_ratio, cfg.seed))
