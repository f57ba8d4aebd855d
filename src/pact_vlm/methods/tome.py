"""ToMe: bipartite soft matching at every layer from one on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_layer, check_int, check_bool
from .base import SampleContext, register_reducer, sub_keys


@register_config
@dataclass
class ToMeConfig(ReductionConfig):
    """ToMe: bipartite soft matching merges ``r`` visual tokens at every layer from ``layer`` on.

    Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

    At the input of each layer >= ``layer``: the visual tokens alternate into sets A and B (even /
    odd in sequence order), each A token finds its most similar B token (cosine similarity of the
    layer's keys after rotary, heads concatenated, like DBDPC), the ``r`` most similar pairs
    merge into their B token as size-weighted means, and sizes add up for proportional attention.
    ``r`` is capped at ``N // 2`` per layer.

    Departures: ToMe merges inside ViT blocks between attention and MLP with the block's
    head-averaged keys; here it merges at the input of language-model layers (as the PACT paper
    applies it), with keys recomputed from that input; a merged token keeps the B token's position.
    Budget as in the PACT reference code: the visual-token count averaged over the layers equals
    that of a single reduction at ``equivalent_layer``.

    Args:
        layer: the first merging layer (0 in the PACT reference code).
        r: tokens merged per layer.
        equivalent_layer: the layer at which the budget is compared with single-layer methods.
        proportional_attention: add log(size) to the attention logits of merged keys.
    """

    method: ClassVar[str] = "tome"
    budget_param: ClassVar[str] = "r"
    budget_search: ClassVar[dict] = {"r": (0, 4096, +1)}
    progressive: ClassVar[bool] = True

    layer: int = 0
    r: int = 8
    equivalent_layer: int = 4
    proportional_attention: bool = True

    @property
    def budget_layer(self) -> int:
        return self.equivalent_layer

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_int("r", self.r, 0, fix="the number of tokens merged per layer, e.g. 8")
        check_layer(self.equivalent_layer, "equivalent_layer")
        check_bool("proportional_attention", self.proportional_attention)


@register_reducer(ToMeConfig)
def _reduce_tome(ctx: SampleContext, cfg: ToMeConfig) -> Reduction:
    hidden, keys = sub_keys(ctx, ctx.visual_index)
    return bl.tome_reduce(hidden, keys, ctx.sizes, cfg.r)
