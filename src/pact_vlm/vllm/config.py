"""The PACT config of a model served by vLLM, found and checked when the model loads.

In this order:

1. ``hf_overrides={"pact": {...}}`` (``--hf-overrides '{"pact": {...}}'`` for ``vllm serve``): the
   fields of :class:`pact_vlm.PACTBudgetConfig` (``"method"`` may be left out);
2. ``pact_config.json`` in the model's folder (a local folder, or the hub repository's file);
3. ``PACTBudgetConfig()``, the library defaults (``keep_ratio=0.3``).

Only method ``"pact_budget"`` can run inside vLLM (the number of an image's placeholder tokens
must be known before its encoder runs), and only with ``proportional_attention=False`` (vLLM's
attention kernels take no per-key bias); anything else is refused with the fix.
No vLLM import: this reads ``model_config.hf_config`` and ``model_config.model`` only.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import ReductionConfig, load_config
from ..methods.pact_budget import PACTBudgetConfig
from ..presets import CONFIG_FILENAME

__all__ = ["resolve_config", "config_from_override"]

_RUNS_HERE = "the vLLM plugin runs method 'pact_budget' only (PACT with a fixed budget per image, before the " \
             "language model)"


def config_from_override(raw: Any) -> PACTBudgetConfig:
    """The config given as ``hf_overrides={"pact": raw}``; a ValueError names what is wrong."""
    if isinstance(raw, str):            # a JSON string also works (e.g. written by config.to_json())
        try:
            cfg = ReductionConfig.from_json(raw)
        except ValueError as err:
            raise ValueError(f"hf_overrides 'pact': {err}") from None
        return _check(cfg, "hf_overrides 'pact'")
    if not isinstance(raw, dict):
        raise ValueError(f"hf_overrides 'pact' must be a dict of PACTBudgetConfig fields, e.g. "
                         f"{{\"keep_ratio\": 0.3}}, got {type(raw).__name__} {raw!r}")
    data = dict(raw)
    data.setdefault("method", PACTBudgetConfig.method)
    try:
        cfg = ReductionConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"hf_overrides 'pact': {err}") from None
    return _check(cfg, "hf_overrides 'pact'")


def _check(cfg: ReductionConfig, origin: str) -> PACTBudgetConfig:
    if not isinstance(cfg, PACTBudgetConfig):
        raise ValueError(f"{origin} holds method {cfg.method!r}, but {_RUNS_HERE}; pass "
                         "hf_overrides={\"pact\": {\"keep_ratio\": 0.3}} or write a pact_budget config "
                         "(pact_vlm.PACTBudgetConfig(...).save('pact_config.json'))")
    if cfg.proportional_attention:
        raise ValueError(f"{origin}: proportional_attention=True cannot run in vLLM (its attention kernels "
                         "take no per-key bias); set \"proportional_attention\": false")
    return cfg


def _folder_file(model: str, revision: str | None) -> str | None:
    local = os.path.join(os.path.expanduser(model), CONFIG_FILENAME)
    if os.path.isfile(local):
        return local
    if os.path.isdir(os.path.expanduser(model)) or model.count("/") != 1:
        return None
    try:                                 # a hub repository: its file if it has one (vLLM downloads the rest)
        from huggingface_hub import hf_hub_download
        return hf_hub_download(model, CONFIG_FILENAME, revision=revision)
    except Exception:                    # no such file, offline, gated: no folder config
        return None


def resolve_config(model_config) -> tuple[PACTBudgetConfig, str]:
    """``(config, origin)`` for a vLLM ``ModelConfig`` (see the module docstring for the order).

    Raises:
        ValueError: the config given is not a valid ``pact_budget`` config that vLLM can run.
    """
    raw = getattr(model_config.hf_config, "pact", None)
    if raw is not None:
        return config_from_override(raw), "hf_overrides 'pact'"
    path = _folder_file(str(model_config.model), getattr(model_config, "revision", None))
    if path is not None:
        try:
            cfg = load_config(path)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err) if path in str(err) else f"{path}: {err}") from None
        return _check(cfg, f"model folder config {path}"), f"model folder config {path}"
    return PACTBudgetConfig(), "library defaults"
