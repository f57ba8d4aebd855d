"""FastV: drop the visual tokens that receive the least attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_choice, check_layer, check_keep_ratio, GROUPS
from .base import SampleContext, register_reducer, per_group


@register_config
@dataclass
class FastVConfig(ReductionConfig):
    """FastV: drop the visual tokens that receive the least attention, at layer ``layer``.

    Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", ECCV 2024 (K = 2, R = 50%).

    Scores: attention probabilities (softmax over every earlier token, causal, mean over heads)
    computed from layer ``layer``'s own queries and keys after rotary, grouped-query aware, in
    float32; ``queries="last"`` scores by the last prompt token's attention (the reference code),
    ``"all"`` by the mean attention a token receives from every query of the prompt (the paper's
    wording). Keeps the ``ceil(keep_ratio * N)`` best, ties to the earlier token.

    Departures: the original ranks with the attention map of layer K-1 returned by eager
    attention; here the scores come from layer K's q / k recomputed from its input (no eager
    attention, no attention maps kept), so they are layer K's own attention. Cached tokens of an
    earlier turn are not among the keys of the softmax.

    Args:
        layer: K, the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept (1 - R).
        queries: ``"last"`` or ``"all"`` (see above).
        group: ``"sample"`` or ``"image"`` (rank within each image).
    """

    method: ClassVar[str] = "fastv"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 2
    keep_ratio: float = 0.5
    queries: str = "last"
    group: str = "sample"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_keep_ratio(self.keep_ratio)
        check_choice("queries", self.queries, ("last", "all"))
        check_choice("group", self.group, GROUPS)


@register_reducer(FastVConfig, needs=("rotated_queries",))
def _reduce_fastv(ctx: SampleContext, cfg: FastVConfig) -> Reduction:
    scores = bl.attention_received(ctx.rotated_queries, ctx.rotated_keys, ctx.positions, ctx.real,
                                   mode=cfg.queries)
    return per_group(ctx, cfg.group, lambda vi: bl.fastv_reduce(ctx.hidden[vi], scores[vi], cfg.keep_ratio))
