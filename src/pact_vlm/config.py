"""The base of every method config: validation helpers, JSON round-trip with a format version, registry.

Each method's config dataclass lives in its own file in :mod:`pact_vlm.methods` and is registered
here with :func:`register_config`, so :func:`load_config` can rebuild the right class from a
file (the JSON carries the method name and ``format_version``). :func:`pact_vlm.apply`
dispatches on the config's type.

Shared conventions of the method configs: ``keep_ratio`` keeps ``ceil(keep_ratio * N)`` of a
sample's N visual tokens (clustering methods: that many clusters, at least one); kept / merged
tokens keep their own position ids and their order; ``group`` is ``"sample"`` (all images of a
sample as one visual set) or ``"image"`` (each image / video on its own).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ReductionConfig",
    "CONFIG_REGISTRY",
    "register_config",
    "load_config",
    "config_from_dict",
]

FORMAT_VERSION = 1

CONFIG_REGISTRY: dict[str, type["ReductionConfig"]] = {}


def register_config(cls: type["ReductionConfig"]) -> type["ReductionConfig"]:
    """Class decorator: make ``cls`` loadable by its ``method`` name (:func:`load_config`)."""
    CONFIG_REGISTRY[cls.method] = cls
    return cls


def check_range(name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False,
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


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_layer(value: Any, name: str = "layer") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0 (the index of the decoder layer "
                         "whose input is reduced; 0 = before the first layer)")


@dataclass
class ReductionConfig:
    """Base class of all method configs (not used directly).

    Class attributes used by :func:`pact_vlm.match_budget`:
        budget_param: the numeric field that sets the amount of reduction by default.
        budget_search: for each field match_budget may search, ``(low, high, direction)``: the
            searched range (ends included; integers for integer fields; ``high=None`` = the
            model's last decoder layer) and ``+1`` if the reduction ratio grows with the value,
            ``-1`` if it shrinks.
    """

    method: ClassVar[str] = "base"
    budget_param: ClassVar[str | None] = None
    budget_search: ClassVar[dict[str, tuple[float, float | None, int]]] = {}
    # traits the integration reads; methods override them (as fields where users set them)
    layer: ClassVar[int] = 0                    # the first decoder layer whose input is reduced
    progressive: ClassVar[bool] = False         # reduces again at every layer after ``layer``
    proportional_attention: ClassVar[bool] = False   # merged keys weigh log(size) more in attention

    @property
    def budget_layer(self) -> int:
        """The layer whose single-layer reduction ratio the budget of this config is expressed at.

        For methods that reduce once, their own layer (0 for reductions before the language
        model); progressive / layer-budgeted methods (ToMe, VTW) override it with their
        ``equivalent_layer``.
        """
        return int(self.layer)

    # -- freezing ------------------------------------------------------------------------------
    def frozen(self) -> "ReductionConfig":
        """A validated copy that refuses edits (what an applied reduction runs with)."""
        copy = self.replace()
        object.__setattr__(copy, "_frozen", True)
        return copy

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"this config is in use by an applied reduction and cannot change "
                                 f"({name}={value!r}); call handle.remove(), then apply the model again with "
                                 f"config.replace({name}={value!r})")
        super().__setattr__(name, value)

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
        if not isinstance(method, str):
            raise ValueError(f"config 'method' must be a string naming one method, got {method!r}; "
                             f"known methods: {', '.join(sorted(CONFIG_REGISTRY))}")
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
        if os.path.isdir(path):
            raise ValueError(f"config file {str(path)!r} is a folder; pass the JSON file (e.g. written by "
                             "config.save(path))")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise ValueError(f"config file {str(path)!r} is not UTF-8 text; pass a JSON config file") from None
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as err:     # which file, then what is wrong in it
            raise type(err)(f"config file {str(path)!r}: {err}") from None

    def replace(self, **changes) -> "ReductionConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict[str, Any]) -> ReductionConfig:
    """Build the config of whichever method ``data["method"]`` names."""
    return ReductionConfig.from_dict(data)


def load_config(path: str | os.PathLike) -> ReductionConfig:
    """Read a JSON config file of any method."""
    return ReductionConfig.load(path)


# -- validation helpers of the method configs -------------------------------------------------------

GROUPS = ("sample", "image")


def check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer; {fix}".rstrip("; "))
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value!r} is outside {rng}; {fix}".rstrip("; "))


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def check_keep_ratio(value: Any, *, allow_zero: bool = True) -> None:
    check_range("keep_ratio", value, 0.0, 1.0, lo_open=not allow_zero,
                 fix="the fraction of visual tokens kept, e.g. 0.3 keeps 30%")




def config_from_spec(spec: str, base_for, *, where: str, example: str):
    """``"name"`` or ``"name:key=value,key=value"`` (values parsed as JSON where they are JSON) -> the
    config ``base_for(name)`` with those fields set, and the set of field names the spec gave.

    ``base_for`` raises for unknown names; ``where`` (e.g. ``"--method dart:layer=1"``) and
    ``example`` go into the error messages.
    """
    name, _, options = spec.partition(":")
    base = base_for(name)
    changes = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} in {where} is not KEY=VALUE; write e.g. {example}")
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value.strip()
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(f"{type(base).__name__} has no field(s) {', '.join(map(repr, unknown))} (in {where}); "
                         f"fields: {', '.join(sorted(fields))}")
    return base.replace(**changes), set(changes)
