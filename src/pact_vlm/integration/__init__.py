"""Applying reductions to Hugging Face ``transformers`` VLMs (the only package importing transformers)."""

from .adapters import ADAPTERS, Adapter, get_adapter, supported_models
from .handle import ReductionHandle, apply
from .stats import ReductionStats

__all__ = ["ADAPTERS", "Adapter", "ReductionHandle", "ReductionStats", "apply", "get_adapter", "supported_models"]
