"""A small VLM trained here on synthetic shapes QA: the instrument that measures accuracy offline.

``shapes`` (no transformers import) makes the seeded data; ``model`` holds the tiny
``Qwen2VLForConditionalGeneration`` (and the CLIP-tower ``LlavaForConditionalGeneration``), their
offline tokenizers / processors and the helpers below;
``train`` (``python -m pact_vlm.demo.train``) trains it.  The model-related names are imported
lazily so that ``import pact_vlm.demo`` stays cheap.
"""

from __future__ import annotations

from .shapes import HELDOUT_SEEDS, QTYPES, TRAIN_SEEDS, Sample, make_dataset, make_sample

__all__ = [
    "CLIP_MODEL_DIR",
    "DEFAULT_MODEL_DIR",
    "HELDOUT_SEEDS",
    "QTYPES",
    "Qwen2VLImageOnlyProcessor",
    "Sample",
    "TRAIN_SEEDS",
    "answer",
    "evaluate",
    "load_demo_model",
    "make_dataset",
    "make_sample",
]

_LAZY = {"CLIP_MODEL_DIR", "DEFAULT_MODEL_DIR", "Qwen2VLImageOnlyProcessor", "answer", "evaluate", "load_demo_model"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
