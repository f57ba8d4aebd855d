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
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ReductionConfig",
    "PACTConfig",
    "CONFIG_REGISTRY",
    "load_config",
    "config_from_dict",
    "CONFIG_FILENAME",
    "model_config",
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
            searched range (ends included; integers for integer fields; ``high=None`` = the
            model's last decoder layer) and ``+1`` if the reduction ratio grows with the value,
            ``-1`` if it shrinks.
    """

    method: ClassVar[str] = "base"
    budget_param: ClassVar[str | None] = None
    budget_search: ClassVar[dict[str, tuple[float, float | None, int]]] = {}

    @property
    def budget_layer(self) -> int:
        """The layer whose single-layer reduction ratio the budget of this config is expressed at.

        For methods that reduce once, their own layer (0 for reductions before the language
        model); progressive / layer-budgeted methods (ToMe, VTW) name an ``equivalent_layer``.
        """
        return int(getattr(self, "equivalent_layer", getattr(self, "layer", 0)))

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
                raise ValueError(f"{path}: {err}") from None
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


@_register
@dataclass
class PACTConfig(ReductionConfig):
    """PACT: EUTI pruning + DBDPC clustering + retrieval + merging at decoder layer ``layer``.

    Args:
        layer: index L of the decoder layer whose input is reduced; layers 0..L-1 see every token.
        prune_ratio: λ, the fraction of visual tokens EUTI sets aside as least important (0 <= λ < 1);
            as in the reference code, ``int(N * (1 - λ))`` tokens (at least one) are kept.
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


# -- comparison methods ---------------------------------------------------------------------------
# Each docstring cites the method's paper and says where this implementation departs from it.
# Shared conventions: ``keep_ratio`` keeps ceil(keep_ratio * N) of a sample's N visual tokens
# (clustering methods: that many clusters, at least one); kept / merged tokens keep their own
# position ids and their order; ``group`` as in PACTConfig.

_GROUPS = ("sample", "image")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer; {fix}".rstrip("; "))
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value!r} is outside {rng}; {fix}".rstrip("; "))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def _check_keep_ratio(value: Any, *, allow_zero: bool = True) -> None:
    _check_range("keep_ratio", value, 0.0, 1.0, lo_open=not allow_zero,
                 fix="the fraction of visual tokens kept, e.g. 0.3 keeps 30%")


@_register
@dataclass
class FastVConfig(ReductionConfig):
    """FastV: drop the visual tokens that receive the least attention, at layer ``layer``.

    Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", ECCV 2024 (K = 2, R = 50%).

    Scores: attention probabilities (softmax over every earlier token, causal, mean over heads)
    computed from layer ``layer``'s own queries and keys after rotary, grouped-query aware, in
    float32; ``queries="last"`` scores by the last prompt token's attention (the reference code),
    ``"all"`` by the mean attention a token receives from every query of the prompt (the paper's
    wording). Keeps the ``ceil(keep_ratio * N)`` best, ties to the earlier token.

    Departures: the original ranks with the attention map of layer K-1 returned by eager
    attention; here the scores come from layer K's q / k recomputed from its input (no eager
    attention, no attention maps kept), so they are layer K's own attention. Cached tokens of an
    earlier turn are not among the keys of the softmax.

    Args:
        layer: K, the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept (1 - R).
        queries: ``"last"`` or ``"all"`` (see above).
        group: ``"sample"`` or ``"image"`` (rank within each image).
    """

    method: ClassVar[str] = "fastv"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 2
    keep_ratio: float = 0.5
    queries: str = "last"
    group: str = "sample"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_keep_ratio(self.keep_ratio)
        _check_choice("queries", self.queries, ("last", "all"))
        _check_choice("group", self.group, _GROUPS)


@_register
@dataclass
class VTWConfig(ReductionConfig):
    """VTW: withdraw every visual token at layer ``layer``.

    Paper: Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal
    for Rapid Inference", AAAI 2025.

    Budget (as the PACT reference code's ``VTW_equivalant_layer_for_reduction``): withdrawing at
    layer K of n removes the same visual-token work, averaged over the layers, as a single
    reduction by ratio ``(n - K) / (n - equivalent_layer)`` at ``equivalent_layer``;
    :func:`pact_vlm.match_budget` searches K. Departures: the paper picks K with a KL-divergence
    criterion on a few samples; here K is given.

    Args:
        layer: K, the first decoder layer that sees no visual token.
        equivalent_layer: the layer at which this config's budget is compared with single-layer
            methods (see :attr:`ReductionConfig.budget_layer`).
    """

    method: ClassVar[str] = "vtw"
    budget_param: ClassVar[str] = "layer"
    budget_search: ClassVar[dict] = {"layer": (0, None, -1)}

    layer: int = 16
    equivalent_layer: int = 4

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_layer(self.equivalent_layer, "equivalent_layer")


@_register
@dataclass
class ToMeConfig(ReductionConfig):
    """ToMe: bipartite soft matching merges ``r`` visual tokens at every layer from ``layer`` on.

    Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

    At the input of each layer >= ``layer``: the visual tokens alternate into sets A and B (even /
    odd in sequence order), each A token finds its most similar B token (cosine similarity of the
    layer's keys after rotary, heads concatenated, like DBDPC), the ``r`` most similar pairs
    merge into their B token as size-weighted means, and sizes add up for proportional attention.
    ``r`` is capped at ``N // 2`` per layer.

    Departures: ToMe merges inside ViT blocks between attention and MLP with the block's
    head-averaged keys; here it merges at the input of language-model layers (as the PACT paper
    applies it), with keys recomputed from that input; a merged token keeps the B token's position.
    Budget as in the PACT reference code: the visual-token count averaged over the layers equals
    that of a single reduction at ``equivalent_layer``.

    Args:
        layer: the first merging layer (0 in the PACT reference code).
        r: tokens merged per layer.
        equivalent_layer: the layer at which the budget is compared with single-layer methods.
        proportional_attention: add log(size) to the attention logits of merged keys.
    """

    method: ClassVar[str] = "tome"
    budget_param: ClassVar[str] = "r"
    budget_search: ClassVar[dict] = {"r": (0, 4096, +1)}
    progressive: ClassVar[bool] = True

    layer: int = 0
    r: int = 8
    equivalent_layer: int = 4
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_int("r", self.r, 0, fix="the number of tokens merged per layer, e.g. 8")
        _check_layer(self.equivalent_layer, "equivalent_layer")
        _check_bool("proportional_attention", self.proportional_attention)


@_register
@dataclass
class PruMergeConfig(ReductionConfig):
    """LLaVA-PruMerge: keep the visual tokens the CLIP CLS token attends to most, merge the rest in.

    Paper: Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", 2024 (PruMerge and PruMerge+).

    Before the language model, per CLIP view (an image, or an anyres tile): the CLS attention of
    the vision layer whose input is the selected feature layer (q / k projections, heads
    concatenated, as the reference code) selects the tokens above Q3 + 1.5 IQR (``keep_ratio=None``,
    adaptive) or the ``ceil(keep_ratio * P)`` highest; each kept token's CLIP feature becomes
    ``x_i + sum_j a_j x_j`` over its ``neighbors`` nearest tokens by key cosine similarity
    (``a`` = CLS attention), before the projector. ``plus=True`` (PruMerge+) adds spatially
    uniform samples.

    Only for CLIP towers with a CLS token and the ``"default"`` feature strategy: LLaVA-1.5 and
    LLaVA-NeXT; anything else is refused when applied.

    Departures: kept tokens keep their spatial order and their own position ids (the original
    feeds them in attention order at consecutive positions); the reference code's extra token
    (attention-weighted sum of the pruned tokens) is not added; LLaVA-NeXT ``image_newline``
    tokens are never dropped; on LLaVA-NeXT each tile is one view.

    Args:
        keep_ratio: ``None`` (IQR outliers, the paper) or the fraction of tokens kept per view.
        plus: PruMerge+ (adds uniformly spaced tokens).
        neighbors: k of the k-nearest-neighbour merge (32 in the reference code).
    """

    method: ClassVar[str] = "prumerge"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.001, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float | None = None
    plus: bool = False
    neighbors: int = 32

    def __post_init__(self) -> None:
        if self.keep_ratio is not None:
            _check_keep_ratio(self.keep_ratio, allow_zero=False)
        _check_bool("plus", self.plus)
        _check_int("neighbors", self.neighbors, 0, fix="the reference code uses 32")


@_register
@dataclass
class HiREDConfig(ReductionConfig):
    """HiRED: a fixed token budget, shared between the views by CLS attention, before the LLM.

    Paper: Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models", AAAI 2025.

    Per image: budget ``B = ceil(keep_ratio * N)``; the full-image view gets ``min(alpha * B, its
    tokens)`` (all of B for an image with one view), the sub-image tiles share the rest in
    proportion to how many of the full image's ``(1 - alpha)`` most CLS-attended tokens (first
    vision layer) fall in each tile's region; each view keeps its tokens with the highest CLS
    attention of the selected feature layer (heads summed).

    Only for CLIP towers with a CLS token: LLaVA-1.5 and LLaVA-NeXT (others are refused).

    Departures: budgets count the tokens that reach the language model (after unpadding), the
    per-tile shares are rounded by largest remainder so the total is exact, and the full-image
    attention is summed over each tile's spatial region (the reference code reshapes it into
    contiguous chunks); ``image_newline`` tokens are kept (the reference drops them); kept tokens
    keep their own position ids.

    Args:
        keep_ratio: the token budget as a fraction of the visual tokens (paper: 0.2).
        alpha: share of the budget for the full-image view.
    """

    method: ClassVar[str] = "hired"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float = 0.2
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_keep_ratio(self.keep_ratio)
        _check_range("alpha", self.alpha, 0.0, 1.0, fix="the full-image share of the budget, e.g. 0.5")


@_register
@dataclass
class EUTIConfig(ReductionConfig):
    """EUTI alone: PACT's pruning step without clustering (the paper's ablation).

    Paper: Dhouib et al., "PACT: Pruning and Clustering-Based Token Reduction for Faster Visual
    Language Models", CVPR 2025 (EUTI, eq. 1-4). Keeps the ``int(N * (1 - prune_ratio))`` tokens with
    the highest EUTI score (at least one; the reference's rule) and drops the rest. No departure beyond PACTConfig's.

    Args:
        layer, prune_ratio, euti_context, euti_variant, group: as in :class:`PACTConfig`.
    """

    method: ClassVar[str] = "euti"
    budget_param: ClassVar[str] = "prune_ratio"
    budget_search: ClassVar[dict] = {"prune_ratio": (0.0, 0.999, +1)}

    layer: int = 4
    prune_ratio: float = 0.45
    euti_context: str = "visual"
    euti_variant: str = "full"
    group: str = "sample"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True,
                     fix="use 0 to prune nothing and e.g. 0.45 to drop 45% of visual tokens")
        _check_choice("euti_context", self.euti_context, ("visual", "prefix"))
        _check_choice("euti_variant", self.euti_variant, ("full", "norm", "softmax"))
        _check_choice("group", self.group, _GROUPS)


@_register
@dataclass
class DBDPCConfig(ReductionConfig):
    """DBDPC alone: PACT's clustering and merging without the pruning step (the paper's ablation).

    Paper: Dhouib et al., CVPR 2025 (algorithm 2). Every visual token is clustered; each cluster
    becomes its mean at the center's position. No departure beyond PACTConfig's.

    Args:
        layer, cutoff, density, dn, proportional_attention, group: as in :class:`PACTConfig`.
    """

    method: ClassVar[str] = "dbdpc"
    budget_param: ClassVar[str] = "cutoff"
    budget_search: ClassVar[dict] = {"cutoff": (0.0, 2.0, +1)}

    layer: int = 4
    cutoff: float = 0.21
    density: str = "gaussian"
    dn: float = 2.0
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_range("cutoff", self.cutoff, 0.0, 2.0, fix="cosine distances lie in [0, 2]; the paper uses 0.1-0.21")
        _check_range("dn", self.dn, 0.0, math.inf, lo_open=True, hi_open=True, fix="use 2.0 (the reference value)")
        _check_choice("density", self.density, ("gaussian", "exponential"))
        _check_bool("proportional_attention", self.proportional_attention)
        _check_choice("group", self.group, _GROUPS)


@_register
@dataclass
class RandomConfig(ReductionConfig):
    """Random pruning (sanity baseline): keep ``ceil(keep_ratio * N)`` visual tokens at random.

    Paper: the random-selection baseline that token-reduction papers (PACT's comparisons among
    them) report as a floor. The choice depends only on ``seed`` and N (a fresh generator per
    reduction), so a prompt is reduced the same way in every call, cached or not; the same seed
    picks the same indices in every sample with the same N. Departures: none to speak of (there
    is no reference implementation to follow).

    Args:
        layer: the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept.
        seed: seed of the generator.
        group: ``"sample"`` or ``"image"``.
    """

    method: ClassVar[str] = "random"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.5
    seed: int = 0
    group: str = "sample"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_keep_ratio(self.keep_ratio)
        _check_int("seed", self.seed, 0, fix="any integer >= 0")
        _check_choice("group", self.group, _GROUPS)


@_register
@dataclass
class PoolingConfig(ReductionConfig):
    """Spatial average pooling (sanity baseline): each ``stride x stride`` window of a visual grid
    becomes one token, the mean of its members, at the position of its first (top-left) member.

    Paper: the spatial-pooling sanity baseline (2x2 average pooling of the visual feature map, as
    LLaVA-OneVision applies to video frames). The grid of each image / tile / frame comes from the
    model's inputs (see :mod:`pact_vlm.integration.vision`); windows never span two views, and
    edge windows are smaller. Departures: pooling happens on the hidden states at the input of
    decoder layer ``layer``, not on the vision features before the projector, and pooled tokens
    keep the position of their first member.

    Args:
        layer: the decoder layer whose input is pooled.
        stride: window side in tokens.
        proportional_attention: add log(window size) to the attention logits of pooled keys.
    """

    method: ClassVar[str] = "pooling"
    budget_param: ClassVar[str] = "stride"
    budget_search: ClassVar[dict] = {"stride": (1, 64, +1)}

    layer: int = 4
    stride: int = 2
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_int("stride", self.stride, 1, fix="the side of the pooling window, e.g. 2")
        _check_bool("proportional_attention", self.proportional_attention)


class _ClusterConfig(ReductionConfig):
    """Shared validation of the clustering alternatives (not a method)."""

    def _check_common(self) -> None:
        _check_layer(self.layer)
        _check_bool("proportional_attention", self.proportional_attention)
        _check_choice("group", self.group, _GROUPS)


@_register
@dataclass
class AgglomerativeConfig(_ClusterConfig):
    """Agglomerative clustering of the visual tokens' keys into ``ceil(keep_ratio * N)`` clusters.

    Paper: the linkage methods of hierarchical clustering (single: Florek et al. 1951 / Sneath
    1957; complete: Sørensen 1948; average / UPGMA: Sokal & Michener 1958), compared with DBDPC
    in the PACT paper. Pure torch: repeatedly merges the two closest clusters (Lance-Williams
    updates; ties to the lowest index pair) on the cosine distances of layer ``layer``'s keys
    after rotary (heads concatenated, as DBDPC); each cluster becomes the mean of its members at
    the position of the member closest (cosine) to the cluster's mean key.

    Departures: the PACT reference code calls scikit-learn on the same distances (same
    clusters up to ties).

    Args:
        layer: the decoder layer whose input is reduced.
        keep_ratio: fraction of clusters (tokens) kept.
        linkage: ``"single"`` (reference default), ``"average"`` or ``"complete"``.
        proportional_attention, group: as in :class:`PACTConfig`.
    """

    method: ClassVar[str] = "agglomerative"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    linkage: str = "single"
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        _check_keep_ratio(self.keep_ratio)
        _check_choice("linkage", self.linkage, ("single", "average", "complete"))


@_register
@dataclass
class KMeansConfig(_ClusterConfig):
    """k-means on the visual tokens' keys, ``k = ceil(keep_ratio * N)``.

    Paper: Lloyd, "Least squares quantization in PCM", 1982; k-means++ seeding (Arthur &
    Vassilvitskii 2007). Euclidean Lloyd iterations on layer ``layer``'s keys after rotary
    (heads concatenated), seeded k-means++ initialisation, until assignments stop changing or
    ``max_iter``; an emptied cluster is re-seeded with the point farthest from its centroid. Each
    cluster becomes the mean of its members at the position of the member closest to its centroid.

    Departures: the PACT reference code runs FAISS k-means (random initialisation) on the same
    keys; here pure torch with k-means++.

    Args:
        layer, keep_ratio, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        max_iter: at most this many Lloyd iterations.
        seed: seed of the k-means++ initialisation.
    """

    method: ClassVar[str] = "kmeans"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    max_iter: int = 100
    seed: int = 0
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        _check_keep_ratio(self.keep_ratio)
        _check_int("max_iter", self.max_iter, 1, fix="e.g. 100")
        _check_int("seed", self.seed, 0, fix="any integer >= 0")


@_register
@dataclass
class DPCConfig(_ClusterConfig):
    """Density-peak clustering with ``ceil(keep_ratio * N)`` centers.

    Paper: Rodriguez & Laio, "Clustering by fast search and find of density peaks", Science 2014.
    Cosine distances of the keys after rotary; density ``rho_i = sum_j exp(-(d_ij / dc)^2)``;
    ``delta_i`` = distance to the nearest denser token (density ties broken by index; infinite
    for the densest); the tokens with the largest ``rho * delta`` are centers; every other token,
    in decreasing density, joins the cluster of its nearest denser token. Each cluster becomes
    its mean at the center's position.

    Departures: the number of centers is fixed by ``keep_ratio`` instead of read off the decision
    graph (as in the PACT reference code, which also uses the Gaussian kernel with dc = 2).

    Args:
        layer, keep_ratio, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        dc: the density kernel's scale.
    """

    method: ClassVar[str] = "dpc"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.3
    dc: float = 2.0
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        _check_keep_ratio(self.keep_ratio)
        _check_range("dc", self.dc, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="the reference code uses 2.0")


@_register
@dataclass
class DBSCANConfig(_ClusterConfig):
    """DBSCAN on the visual tokens' keys.

    Paper: Ester et al., "A Density-Based Algorithm for Discovering Clusters in Large Spatial
    Databases with Noise", KDD 1996. Cosine distances of the keys after rotary; a core token has
    at least ``min_samples`` tokens (itself included) within ``eps``; clusters are the connected
    components of core tokens (edges: distance <= eps); a border token joins the cluster of its
    nearest core neighbour; noise tokens are kept as single tokens (``noise="keep"``) or dropped
    (``"drop"``). A cluster becomes its mean at the position of its member with the most
    neighbours within ``eps`` (as the reference code).

    Departures: the PACT reference code runs cuML DBSCAN with Euclidean distance on normalised
    keys (``eps_euclid = sqrt(2 * eps_cosine)``) and drops noise by default; ``"keep"`` is the
    default here so the reduction ratio grows with ``eps``.

    Args:
        layer, proportional_attention, group: as in :class:`AgglomerativeConfig`.
        eps: neighbourhood radius (cosine distance).
        min_samples: neighbours (self included) that make a core token.
        noise: ``"keep"`` or ``"drop"``.
    """

    method: ClassVar[str] = "dbscan"
    budget_param: ClassVar[str] = "eps"
    budget_search: ClassVar[dict] = {"eps": (0.0, 2.0, +1)}

    layer: int = 4
    eps: float = 0.1
    min_samples: int = 5
    noise: str = "keep"
    proportional_attention: bool = True
    group: str = "sample"

    def __post_init__(self) -> None:
        self._check_common()
        _check_range("eps", self.eps, 0.0, 2.0, fix="a cosine distance, e.g. 0.1")
        _check_int("min_samples", self.min_samples, 1, fix="the reference code uses 5")
        _check_choice("noise", self.noise, ("keep", "drop"))


@_register
@dataclass
class KeepPriorityConfig(ReductionConfig):
    """Keep the ``ceil(keep_ratio * N)`` visual tokens of highest user-given priority (an instrument).

    Not a method of the paper: with a priority that marks the tokens an answer needs, it is an
    oracle (they are kept first) or, negated, an anti-oracle. The priority is set per call on the
    handle, ``handle.set_priority(...)``: per sample, one value per reducible visual token in
    sequence order; ties go to the earlier token.

    Args:
        layer: the decoder layer whose input is pruned.
        keep_ratio: fraction of visual tokens kept.
        group: ``"sample"`` or ``"image"``.
    """

    method: ClassVar[str] = "keep_priority"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}

    layer: int = 4
    keep_ratio: float = 0.5
    group: str = "sample"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        _check_keep_ratio(self.keep_ratio)
        _check_choice("group", self.group, _GROUPS)
