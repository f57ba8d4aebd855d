"""Token-reduction algorithms: pure torch on plain tensors (this package never imports transformers)."""

from .dbdpc import Clusters, cosine_distances, dbdpc
from .euti import euti_scores, split_by_importance
from .merge import Reduction, gather_positions, identity_reduction, merge_clusters
from .pact import pact_reduce

__all__ = [
    "Clusters",
    "Reduction",
    "cosine_distances",
    "dbdpc",
    "euti_scores",
    "gather_positions",
    "identity_reduction",
    "merge_clusters",
    "pact_reduce",
    "split_by_importance",
]
