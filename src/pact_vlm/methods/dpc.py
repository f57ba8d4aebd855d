"""Density-peak clustering with a fixed number of centers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import register_config, check_range, check_keep_ratio
from .base import SampleContext, register_reducer, per_group, ClusterConfig


@register_config
@dataclass
class DPCConfig(ClusterConfig):
    """Density-peak clustering with ``ceil(keep_ratio * N)`` centers.

    Paper: Rodriguez & Laio, "Clustering by fast search and find of density peaks", Science 2014.
    Cosine distances of the keys after rotary; density ``rho_i = sum_j exp(-(d_ij / dc)^2)``;
    ``delta_i`` = distance to the nearest denser token (density ties broken by index; infinite
    for the densest); the tokens with the largest ``rho * delta`` are centers; every other token,
    in decreasing density, joins the cluster of its nearest denser token. Each cluster becomes
    its mean at the center's position.

    Departures: the number of centers is fixed by ``keep_ratio`` instead of read off the decision
    graph (as in the PACT reference code, which also uses the Gaussian kernel with dc = 2).

    Args:
        layer, keep_ratio, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        dc: the density kernel's scale.
    """

    method: ClassVar[str] = "dpc"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    dc: float = 2.0
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        check_keep_ratio(self.keep_ratio)
        check_range("dc", self.dc, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="the reference code uses 2.0")


@register_reducer(DPCConfig)
def _reduce_dpc(ctx: SampleContext, cfg: DPCConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.dpc_reduce(ctx.hidden[vi], ctx.rotated_keys[vi],
                                                               cfg.keep_ratio, cfg.dc))
