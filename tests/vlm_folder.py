"""A saved VLM folder (weights + processor) for tests that load models the way users do.

The demo model's architecture (a small ``Qwen2VLForConditionalGeneration`` with the offline
``Qwen2VLImageOnlyProcessor``) with random weights, written with ``save_pretrained``; or, for
tests that want the trained model, the shipped one when it is there.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_demo_architecture(path: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """Write a random-weight model of the demo architecture and its processor to ``path``."""
    from transformers import Qwen2VLForConditionalGeneration

    from pact_vlm.demo.model import build_config, build_processor

    processor = build_processor()
    config = build_config(processor.tokenizer, num_hidden_layers=num_layers)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def shipped_or_random(tmp_dir: Path) -> tuple[Path, bool]:
    """The shipped demo model's folder if it exists, else a random-weight one; and whether it is shipped."""
    from pact_vlm.demo.model import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR, True
    return save_demo_architecture(tmp_dir), False
