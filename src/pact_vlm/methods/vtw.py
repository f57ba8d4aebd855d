"""VTW: withdraw every visual token at one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_layer
from .base import SampleContext, register_reducer


@register_config
@dataclass
class VTWConfig(ReductionConfig):
    """VTW: withdraw every visual token at layer ``layer``.

    Paper: Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal
    for Rapid Inference", AAAI 2025.

    Budget (as the PACT reference code's ``VTW_equivalant_layer_for_reduction``): withdrawing at
    layer K of n removes the same visual-token work, averaged over the layers, as a single
    reduction by ratio ``(n - K) / (n - equivalent_layer)`` at ``equivalent_layer``;
    :func:`pact_vlm.match_budget` searches K. Departures: the paper picks K with a KL-divergence
    criterion on a few samples; here K is given.

    Args:
        layer: K, the first decoder layer that sees no visual token.
        equivalent_layer: the layer at which this config's budget is compared with single-layer
            methods (see :attr:`ReductionConfig.budget_layer`).
    """

    method: ClassVar[str] = "vtw"
    budget_param: ClassVar[str] = "layer"
    budget_search: ClassVar[dict] = {"layer": (0, None, -1)}

    layer: int = 16
    equivalent_layer: int = 4

    @property
    def budget_layer(self) -> int:
        return self.equivalent_layer

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_layer(self.equivalent_layer, "equivalent_layer")


@register_reducer(VTWConfig)
def _reduce_vtw(ctx: SampleContext, cfg: VTWConfig) -> Reduction:
    return bl.vtw_reduce(ctx.hidden[ctx.visual_index])
