"""Method configurations: one dataclass per method, validated on creation, JSON round-trip.

Every config knows its method name (``method``) and serialises to a JSON object carrying that
name and a format version, so :func:`load_config` can rebuild the right class from a file.
:func:`pact_vlm.apply` dispatches on the config's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "ReductionConfig",
    "PACTConfig",
    "CONFIG_REGISTRY",
    "load_config",
    "config_from_dict",
]

FORMAT_VERSION = 1

CONFIG_REGISTRY: dict[str, type["ReductionConfig"]] = {}


def _register(cls: type["ReductionConfig"]) -> type["ReductionConfig"]:
    CONFIG_REGISTRY[cls.method] = cls
    return cls


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False,
                 fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number; {fix}".rstrip("; "))
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}={value!r} must be finite; {fix}".rstrip("; "))
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        lb = "(" if lo_open else "["
        hb = ")" if hi_open else "]"
        raise ValueError(f"{name}={value!r} is outside {lb}{lo}, {hi}{hb}; {fix}".rstrip("; "))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_layer(value: Any, name: str = "layer") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0 (the index of the decoder layer "
                         "whose input is reduced; 0 = before the first layer)")


@dataclass
class ReductionConfig:
    """Base class of all method configs (not used directly).

    Class attributes used by :func:`pact_vlm.match_budget`:
        budget_param: the numeric field that sets the amount of reduction by default.
        budget_search: for each field match_budget may search, ``(low, high, direction)``: the
            searched range (ends included; integers for integer fields) and ``+1`` if the
            reduction ratio grows with the value, ``-1`` if it shrinks.
    """

    method: ClassVar[str] = "base"
    budget_param: ClassVar[str | None] = None
    budget_search: ClassVar[dict[str, tuple[float, float, int]]] = {}

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, "format_version": FORMAT_VERSION, **data}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReductionConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"config format_version={version!r} is not supported (this version of "
                             f"pact-vlm reads {FORMAT_VERSION}); re-save the config with this version")
        if cls is ReductionConfig:
            if method not in CONFIG_REGISTRY:
                raise ValueError(f"unknown method {method!r}; known methods: "
                                 f"{', '.join(sorted(CONFIG_REGISTRY))}")
            cls = CONFIG_REGISTRY[method]
        elif method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}; "
                             f"load it with pact_vlm.load_config(path) instead")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
                             f"valid keys: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ReductionConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReductionConfig":
        """Read a config written by :meth:`save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

    def replace(self, **changes) -> "ReductionConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict[str, Any]) -> ReductionConfig:
    """Build the config of whichever method ``data["method"]`` names."""
    return ReductionConfig.from_dict(data)


def load_config(path: str | os.PathLike) -> ReductionConfig:
    """Read a JSON config file of any method."""
    return ReductionConfig.load(path)


@_register
@dataclass
class PACTConfig(ReductionConfig):
    """PACT: EUTI pruning + DBDPC clustering + retrieval + merging at decoder layer ``layer``.

    Args:
        layer: index L of the decoder layer whose input is reduced; layers 0..L-1 see every token.
        prune_ratio: λ, the fraction of visual tokens EUTI sets aside as least important (0 <= λ < 1).
        cutoff: d_c, the DBDPC cut-off distance (cosine distance, 0 <= d_c <= 2).
        alpha: retrieval factor; a set-aside token rejoins its nearest center iff within alpha * d_c.
        density: ``"gaussian"`` (reference code, exp(-(d/dn)^2)) or ``"exponential"`` (paper eq. 6).
        dn: the density kernel's scale d_n.
        euti_context: ``"visual"`` (paper: mean query and softmax over the visual tokens) or
            ``"prefix"`` (reference code: over every token up to the last visual one).
        euti_variant: ``"full"`` (eq. 2), ``"norm"`` (hidden-state norm only) or ``"softmax"``
            (attention-like term only); the last two are ablations.
        proportional_attention: add log(cluster size) to the attention logits of merged keys.
        group: ``"sample"`` reduces all images / videos of a sample as one visual set;
            ``"image"`` reduces each image / video on its own.
    """

    method: ClassVar[str] = "pact"
    budget_param: ClassVar[str] = "cutoff"
    budget_search: ClassVar[dict[str, tuple[float, float, int]]] = {
        "cutoff": (0.0, 2.0, +1), "prune_ratio": (0.0, 0.999, +1)}

    layer: int = 4
    prune_ratio: float = 0.45
    cutoff: float = 0.21
    alpha: float = 1.5
    density: str = "gaussian"
    dn: float = 2.0
    euti_context: str = "visual"
    euti_variant: str = "full"
    proportional_attention: bool = True
    group: str = "sample"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Paper, table of hyper-parameters: LLaVA-OneVision-7B and Qwen2-VL-7B.
        "llava-onevision-7b": dict(layer=4, prune_ratio=0.45, cutoff=0.21, alpha=1.5),
        "qwen2-vl-7b": dict(layer=4, prune_ratio=0.2, cutoff=0.1, alpha=1.5),
    }

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True,
                     fix="use 0 to prune nothing and e.g. 0.45 to set aside 45% of visual tokens")
        _check_range("cutoff", self.cutoff, 0.0, 2.0,
                     fix="cosine distances lie in [0, 2]; the paper uses 0.1-0.21")
        _check_range("alpha", self.alpha, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use e.g. 1.5 (the paper's value)")
        _check_range("dn", self.dn, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use 2.0 (the reference value)")
        _check_choice("density", self.density, ("gaussian", "exponential"))
        _check_choice("euti_context", self.euti_context, ("visual", "prefix"))
        _check_choice("euti_variant", self.euti_variant, ("full", "norm", "softmax"))
        _check_choice("group", self.group, ("sample", "image"))
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"proportional_attention={self.proportional_attention!r} must be True or False")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PACTConfig":
        """The paper's setting for a model: ``"llava-onevision-7b"`` or ``"qwen2-vl-7b"``."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], **overrides})
