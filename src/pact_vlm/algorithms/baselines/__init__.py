"""The comparison methods of the PACT paper, pure torch on plain tensors (no transformers).

One module per method: :mod:`.fastv`, :mod:`.vtw`, :mod:`.tome`, :mod:`.random_pruning`,
:mod:`.pooling`, :mod:`.agglomerative`, :mod:`.kmeans`, :mod:`.dpc`, :mod:`.dbscan`,
:mod:`.prumerge`, :mod:`.hired`; beyond the paper's set: :mod:`.divprune`, :mod:`.dart`,
:mod:`.visionzip`;
:mod:`.common` holds the shared keep / merge helpers. Each ``*_reduce`` function returns a :class:`pact_vlm.Reduction` over one sequence's visual tokens.
"""

from .agglomerative import agglomerative, agglomerative_reduce
from .common import drop_all, flat_keys, merge_by_labels, num_kept, prune, top_k
from .dart import dart_reduce, dart_select
from .dbscan import dbscan, dbscan_reduce
from .divprune import divprune_reduce, max_min_select
from .dpc import dpc, dpc_reduce
from .fastv import attention_received, fastv_reduce
from .hired import allocate, hired_select, tile_weights
from .kmeans import kmeans, kmeans_reduce
from .pooling import pool_labels, pool_reduce
from .prumerge import cls_attention, iqr_outliers, prumerge_merge, prumerge_select
from .random_pruning import random_keep, random_reduce
from .tome import bipartite_soft_matching, tome_reduce
from .visionzip import mean_attention_received, visionzip_counts, visionzip_labels, visionzip_reduce
from .vtw import vtw_reduce

__all__ = [
    "agglomerative", "agglomerative_reduce", "allocate", "attention_received", "bipartite_soft_matching",
    "cls_attention", "dart_reduce", "dart_select", "dbscan", "dbscan_reduce", "divprune_reduce", "dpc",
    "dpc_reduce", "drop_all", "fastv_reduce", "flat_keys",
    "hired_select", "iqr_outliers", "kmeans", "kmeans_reduce", "max_min_select", "mean_attention_received",
    "merge_by_labels", "num_kept",
    "pool_labels", "pool_reduce", "prumerge_merge", "prumerge_select", "prune", "random_keep",
    "random_reduce", "tile_weights", "tome_reduce", "top_k", "visionzip_counts",
    "visionzip_labels", "visionzip_reduce", "vtw_reduce",
]
