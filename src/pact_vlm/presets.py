"""Configs that travel with a model: the folder's ``pact_config.json``, else a preset, else the defaults."""

from __future__ import annotations

import os

from .config import ReductionConfig, load_config
from .methods.pact import PACTConfig

__all__ = ["CONFIG_FILENAME", "model_config"]

CONFIG_FILENAME = "pact_config.json"


# hub ids / folder names -> PACT preset: every substring must occur in the lower-cased name
_PRESET_NAMES = {"llava-onevision-7b": ("llava-onevision", "7b"), "qwen2-vl-7b": ("qwen2-vl-7b",)}


def _source_of(model_or_source) -> str | None:
    if model_or_source is None:
        return None
    if isinstance(model_or_source, (str, os.PathLike)):
        return str(model_or_source)
    config = getattr(model_or_source, "config", None)
    name = getattr(model_or_source, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def model_config(model_or_source) -> tuple[ReductionConfig, str]:
    """The config that travels with a model, and where it came from.

    In this order:

    1. ``pact_config.json`` in the model's folder (a local folder given as a path, or the folder a
       model was loaded from: ``model.name_or_path``); for a hub id, that file in the local hub
       cache if the repository has one (this never downloads);
    2. the paper's PACT preset for the model when its name matches one
       (``llava-onevision ... 7b`` -> ``"llava-onevision-7b"``, ``qwen2-vl-7b`` -> ``"qwen2-vl-7b"``);
    3. ``PACTConfig()``, the library defaults.

    Args:
        model_or_source: a loaded model, a folder, a hub id, or ``None`` (library defaults).

    Returns:
        ``(config, origin)``; ``origin`` names the file, the preset or ``"library defaults"``.

    Raises:
        ValueError: the folder's ``pact_config.json`` exists but is not a valid config.
    """
    source = _source_of(model_or_source)
    if source:
        path = os.path.join(os.path.expanduser(source), CONFIG_FILENAME)
        if not os.path.isfile(path):
            path = _cached_hub_file(source)
        if path:
            try:
                return load_config(path), f"model folder config {path}"
            except ValueError as err:
                raise ValueError(str(err) if path in str(err) else f"{path}: {err}") from None
        name = source.lower().replace("_", "-")
        for preset, parts in _PRESET_NAMES.items():
            if all(part in name for part in parts):
                return PACTConfig.preset(preset), f"preset {preset!r}"
    return PACTConfig(), "library defaults"


def _cached_hub_file(source: str) -> str | None:
    if os.path.isdir(os.path.expanduser(source)) or source.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return None
    try:
        found = try_to_load_from_cache(source, CONFIG_FILENAME)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not a hub model
        return None
    return found if isinstance(found, str) else None
