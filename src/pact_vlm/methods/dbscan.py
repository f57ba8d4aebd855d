"""DBSCAN on the keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import register_config, check_range, check_choice, check_int
from .base import SampleContext, register_reducer, per_group, ClusterConfig


@register_config
@dataclass
class DBSCANConfig(ClusterConfig):
    """DBSCAN on the visual tokens' keys.

    Paper: Ester et al., "A Density-Based Algorithm for Discovering Clusters in Large Spatial
    Databases with Noise", KDD 1996. Cosine distances of the keys after rotary; a core token has
    at least ``min_samples`` tokens (itself included) within ``eps``; clusters are the connected
    components of core tokens (edges: distance <= eps); a border token joins the cluster of its
    nearest core neighbour; noise tokens are kept as single tokens (``noise="keep"``) or dropped
    (``"drop"``). A cluster becomes its mean at the position of its member with the most
    neighbours within ``eps`` (as the reference code).

    Departures: the PACT reference code runs cuML DBSCAN with Euclidean distance on normalised
    keys (``eps_euclid = sqrt(2 * eps_cosine)``) and drops noise by default; ``"keep"`` is the
    default here so the reduction ratio grows with ``eps``.

    Args:
        layer, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        eps: neighbourhood radius (cosine distance).
        min_samples: neighbours (self included) that make a core token.
        noise: ``"keep"`` or ``"drop"``.
    """

    method: ClassVar[str] = "dbscan"
    budget_param: ClassVar[str] = "eps"
    budget_search: ClassVar[dict] = {"eps": (0.0, 2.0, +1)}

    layer: int = 4
    eps: float = 0.1
    min_samples: int = 5
    noise: str = "keep"
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        check_range("eps", self.eps, 0.0, 2.0, fix="a cosine distance, e.g. 0.1")
        check_int("min_samples", self.min_samples, 1, fix="the reference code uses 5")
        check_choice("noise", self.noise, ("keep", "drop"))


@register_reducer(DBSCANConfig)
def _reduce_dbscan(ctx: SampleContext, cfg: DBSCANConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.dbscan_reduce(
        ctx.hidden[vi], ctx.rotated_keys[vi], cfg.eps, cfg.min_samples, cfg.noise))
