"""Spatial average pooling (sanity baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_layer, check_int, check_bool
from .base import SampleContext, register_reducer


@register_config
@dataclass
class PoolingConfig(ReductionConfig):
    """Spatial average pooling (sanity baseline): each ``stride x stride`` window of a visual grid
    becomes one token, the mean of its members, at the position of its first (top-left) member.

    Paper: the spatial-pooling sanity baseline (2x2 average pooling of the visual feature map, as
    LLaVA-OneVision applies to video frames). The grid of each image / tile / frame comes from the
    model's inputs (see :mod:`pact_vlm.integration.vision`); windows never span two views, and
    edge windows are smaller. Departures: pooling happens on the hidden states at the input of
    decoder layer ``layer``, not on the vision features before the projector, and pooled tokens
    keep the position of their first member.

    Args:
        layer: the decoder layer whose input is pooled.
        stride: window side in tokens.
        proportional_attention: add log(window size) to the attention logits of pooled keys.
    """

    method: ClassVar[str] = "pooling"
    budget_param: ClassVar[str] = "stride"
    budget_search: ClassVar[dict] = {"stride": (1, 64, +1)}

    layer: int = 4
    stride: int = 2
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_int("stride", self.stride, 1, fix="the side of the pooling window, e.g. 2")
        check_bool("proportional_attention", self.proportional_attention)


@register_reducer(PoolingConfig, needs=("grid",))
def _reduce_pooling(ctx: SampleContext, cfg: PoolingConfig) -> Reduction:
    return bl.pool_reduce(ctx.hidden[ctx.visual_index], ctx.extras["grid"], cfg.stride)
