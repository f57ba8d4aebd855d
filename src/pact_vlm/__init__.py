"""pact-vlm: PACT visual-token reduction (pruning and clustering) for Hugging Face VLMs.

    import pact_vlm
    handle = pact_vlm.apply(model, pact_vlm.PACTConfig(layer=4, prune_ratio=0.45, cutoff=0.21))
    out = model.generate(**inputs)
    print(handle.stats)
    handle.remove()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .algorithms import Clusters, Reduction, dbdpc, euti_scores, pact_reduce
from .budget import match_budget
from .config import ReductionConfig, load_config
from .methods import (AgglomerativeConfig, DARTConfig, DBDPCConfig, DBSCANConfig, DivPruneConfig, DPCConfig,
                      EUTIConfig, FastVConfig, HiREDConfig, KeepPriorityConfig, KMeansConfig, PACTBudgetConfig,
                      PACTConfig, PoolingConfig, PruMergeConfig, RandomConfig, ToMeConfig, VisionZipConfig, VTWConfig)
from .presets import model_config
from .tune import TuneResult, tune

if TYPE_CHECKING:  # pragma: no cover
    from .integration.handle import ReductionHandle

__version__ = "0.1.0"

__all__ = [
    "AgglomerativeConfig",
    "Clusters",
    "DARTConfig",
    "DBDPCConfig",
    "DBSCANConfig",
    "DPCConfig",
    "DivPruneConfig",
    "EUTIConfig",
    "FastVConfig",
    "HiREDConfig",
    "KMeansConfig",
    "KeepPriorityConfig",
    "PACTBudgetConfig",
    "PACTConfig",
    "PoolingConfig",
    "PruMergeConfig",
    "RandomConfig",
    "Reduction",
    "ReductionConfig",
    "ToMeConfig",
    "TuneResult",
    "VTWConfig",
    "VisionZipConfig",
    "__version__",
    "apply",
    "dbdpc",
    "euti_scores",
    "load_config",
    "match_budget",
    "model_config",
    "pact_reduce",
    "tune",
]


def apply(model, config: ReductionConfig | None = None) -> "ReductionHandle":
    """Apply a token-reduction method to a Hugging Face VLM, in place.

    Args:
        model: a supported ``transformers`` VLM (see ``pact_vlm.integration.supported_models()``).
        config: a method config, e.g. :class:`PACTConfig`; ``None``: the config that travels with
            the model (its folder's ``pact_config.json``, else its family's preset, else the
            library defaults; see :func:`model_config`), named in ``handle.config_origin``.

    Returns:
        A handle with ``.stats`` (the last prefill's reduction) and ``.remove()`` (exact undo);
        it is also a context manager that removes the reduction on exit.
    """
    from .integration.handle import apply as _apply  # transformers is imported only here

    return _apply(model, config)
