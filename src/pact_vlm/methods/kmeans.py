"""k-means on the keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import register_config, check_int, check_keep_ratio
from .base import SampleContext, register_reducer, per_group, ClusterConfig


@register_config
@dataclass
class KMeansConfig(ClusterConfig):
    """k-means on the visual tokens' keys, ``k = ceil(keep_ratio * N)``.

    Paper: Lloyd, "Least squares quantization in PCM", 1982; k-means++ seeding (Arthur &
    Vassilvitskii 2007). Euclidean Lloyd iterations on layer ``layer``'s keys after rotary
    (heads concatenated), seeded k-means++ initialisation, until assignments stop changing or
    ``max_iter``; an emptied cluster is re-seeded with the point farthest from its centroid. Each
    cluster becomes the mean of its members at the position of the member closest to its centroid.

    Departures: the PACT reference code runs FAISS k-means (random initialisation) on the same
    keys; here pure torch with k-means++.

    Args:
        layer, keep_ratio, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        max_iter: at most this many Lloyd iterations.
        seed: seed of the k-means++ initialisation.
    """

    method: ClassVar[str] = "kmeans"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    max_iter: int = 100
    seed: int = 0
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        check_keep_ratio(self.keep_ratio)
        check_int("max_iter", self.max_iter, 1, fix="e.g. 100")
        check_int("seed", self.seed, 0, fix="any integer >= 0")


@register_reducer(KMeansConfig)
def _reduce_kmeans(ctx: SampleContext, cfg: KMeansConfig) -> Reduction:
    return per_group(ctx, cfg.group, lambda vi: bl.kmeans_reduce(
        ctx.hidden[vi], ctx.rotated_keys[vi], cfg.keep_ratio, max_iter=cfg.max_iter, seed=cfg.seed))
