"""The reduction methods: one file each, holding the method's config dataclass and its reducer.

A reducer is pure torch: it reads one sample's :class:`~pact_vlm.methods.base.SampleContext` at a
reduction layer and returns a :class:`~pact_vlm.Reduction`; the integration (the only package that
imports transformers) does everything around it. Adding a method is adding a file here (plus its
algorithm in :mod:`pact_vlm.algorithms` when it is new) and importing it below.

PACT and its ablations: :mod:`.pact`; its fixed-budget form before the language model (the one vLLM serves):
:mod:`.pact_budget`. The comparison methods of the PACT paper: :mod:`.fastv`,
:mod:`.vtw`, :mod:`.tome`, :mod:`.prumerge`, :mod:`.hired`, :mod:`.random`, :mod:`.pooling`,
:mod:`.agglomerative`, :mod:`.kmeans`, :mod:`.dpc`, :mod:`.dbscan`; the 2025 baselines that other
toolkits ship: :mod:`.visionzip`, :mod:`.divprune`, :mod:`.dart`; an instrument: :mod:`.keep_priority`.
"""

from .agglomerative import AgglomerativeConfig
from .base import NEEDS, REDUCERS, SampleContext, register_reducer
from .dart import DARTConfig
from .dbscan import DBSCANConfig
from .divprune import DivPruneConfig
from .dpc import DPCConfig
from .fastv import FastVConfig
from .hired import HiREDConfig
from .keep_priority import KeepPriorityConfig
from .kmeans import KMeansConfig
from .pact import DBDPCConfig, EUTIConfig, PACTConfig
from .pact_budget import PACTBudgetConfig
from .pooling import PoolingConfig
from .prumerge import PruMergeConfig
from .random import RandomConfig
from .tome import ToMeConfig
from .visionzip import VisionZipConfig
from .vtw import VTWConfig

__all__ = ["AgglomerativeConfig", "DARTConfig", "DBDPCConfig", "DBSCANConfig", "DPCConfig", "DivPruneConfig",
           "EUTIConfig", "FastVConfig", "HiREDConfig", "KMeansConfig", "KeepPriorityConfig", "NEEDS", "PACTBudgetConfig",
           "PACTConfig", "PoolingConfig", "PruMergeConfig", "REDUCERS", "RandomConfig", "SampleContext", "ToMeConfig",
           "VTWConfig", "VisionZipConfig", "register_reducer"]
