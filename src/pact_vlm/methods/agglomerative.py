"""Agglomerative clustering of the keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import register_config, check_choice, check_keep_ratio
from .base import SampleContext, register_reducer, per_group, ClusterConfig


@register_config
@dataclass
class AgglomerativeConfig(ClusterConfig):
    """Agglomerative clustering of the visual tokens' keys into ``ceil(keep_ratio * N)`` clusters.

    Paper: the linkage methods of hierarchical clustering (single: Florek et al. 1951 / Sneath
    1957; complete: Sørensen 1948; average / UPGMA: Sokal & Michener 1958), compared with DBDPC
    in the PACT paper. Pure torch: repeatedly merges the two closest clusters (Lance-Williams
    updates; ties to the lowest index pair) on the cosine distances of layer ``layer``'s keys
    after rotary (heads concatenated, as DBDPC); each cluster becomes the mean of its members at
    the position of the member closest (cosine) to the cluster's mean key.

    Departures: the PACT reference code calls scikit-learn on the same distances (same
    clusters up to ties).

    Args:
        layer: the decoder layer whose input is reduced.
        keep_ratio: fraction of clusters (tokens) kept.
        linkage: ``"single"`` (reference default), ``"average"`` or ``"complete"``.
        proportional_attention, group: as in :class:`PACTConfig`.
    """

    method: ClassVar[str] = "agglomerative"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    linkage: str = "single"
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        check_keep_ratio(self.keep_ratio)
        check_choice("linkage", self.linkage, ("single", "average", "complete"))


@register_reducer(AgglomerativeConfig)
def _reduce_agglomerative(ctx: SampleContext, cfg: AgglomerativeConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.agglomerative_reduce(
        ctx.hidden[vi], ctx.rotated_keys[vi], cfg.keep_ratio, cfg.linkage))
