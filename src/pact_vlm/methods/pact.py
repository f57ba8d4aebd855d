"""PACT and its two ablations: EUTI alone (pruning) and DBDPC alone (clustering)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..algorithms import baselines as bl
from ..algorithms.dbdpc import dbdpc
from ..algorithms.euti import euti_scores, split_by_importance
from ..algorithms.merge import Reduction
from ..algorithms.pact import pact_reduce
from ..config import ReductionConfig, register_config, check_range, check_choice, check_layer, check_bool, GROUPS
from .base import SampleContext, per_group, register_reducer, sub_keys


@register_config
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
        check_layer(self.layer)
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True,
                     fix="use 0 to prune nothing and e.g. 0.45 to set aside 45% of visual tokens")
        check_range("cutoff", self.cutoff, 0.0, 2.0,
                     fix="cosine distances lie in [0, 2]; the paper uses 0.1-0.21")
        check_range("alpha", self.alpha, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use e.g. 1.5 (the paper's value)")
        check_range("dn", self.dn, 0.0, math.inf, lo_open=True, hi_open=True,
                     fix="use 2.0 (the reference value)")
        check_choice("density", self.density, ("gaussian", "exponential"))
        check_choice("euti_context", self.euti_context, ("visual", "prefix"))
        check_choice("euti_variant", self.euti_variant, ("full", "norm", "softmax"))
        check_choice("group", self.group, ("sample", "image"))
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"proportional_attention={self.proportional_attention!r} must be True or False")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PACTConfig":
        """The paper's setting for a model: ``"llava-onevision-7b"`` or ``"qwen2-vl-7b"``."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], **overrides})


@register_config
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
        check_layer(self.layer)
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True,
                     fix="use 0 to prune nothing and e.g. 0.45 to drop 45% of visual tokens")
        check_choice("euti_context", self.euti_context, ("visual", "prefix"))
        check_choice("euti_variant", self.euti_variant, ("full", "norm", "softmax"))
        check_choice("group", self.group, GROUPS)


@register_config
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
        check_layer(self.layer)
        check_range("cutoff", self.cutoff, 0.0, 2.0, fix="cosine distances lie in [0, 2]; the paper uses 0.1-0.21")
        check_range("dn", self.dn, 0.0, math.inf, lo_open=True, hi_open=True, fix="use 2.0 (the reference value)")
        check_choice("density", self.density, ("gaussian", "exponential"))
        check_bool("proportional_attention", self.proportional_attention)
        check_choice("group", self.group, GROUPS)


def _euti_view(ctx: SampleContext, vi: torch.Tensor, context: str, variant: str):
    """What EUTI reads for the visual rows ``vi``: ``(hidden, keys, rotated_keys, local_vi, mean_query)``.

    With ``context="prefix"`` the context is every row of the sample up to its last visual row, so
    padding and packing slots (``ctx.real`` False) are cut out of the tensors, as the sample alone
    would have none; ``local_vi`` are the positions of ``vi`` in the rows kept (``vi`` itself when
    nothing is cut). ``mean_query`` is None for the norm-only variant."""
    hidden, keys, rotated, local_vi = ctx.hidden, ctx.keys, ctx.rotated_keys, vi
    rows = None
    if context == "prefix" and ctx.real is not None and not bool(ctx.real[: int(vi[-1]) + 1].all()):
        rows = torch.nonzero(ctx.real).flatten()
        hidden, keys, rotated, local_vi = hidden[rows], keys[rows], rotated[rows], torch.searchsorted(rows, vi)
    if variant == "norm":
        mean_query = None
    elif context == "visual":
        mean_query = ctx.mean_query(vi)
    else:
        prefix = torch.arange(int(vi[-1]) + 1, device=vi.device) if rows is None else rows[: int(local_vi[-1]) + 1]
        mean_query = ctx.mean_query(prefix)
    return hidden, keys, rotated, local_vi, mean_query


@register_reducer(PACTConfig)
def _reduce_pact(ctx: SampleContext, cfg: PACTConfig) -> Reduction:
    kwargs = dict(prune_ratio=cfg.prune_ratio, cutoff=cfg.cutoff, alpha=cfg.alpha, density=cfg.density,
                  dn=cfg.dn, euti_context=cfg.euti_context, euti_variant=cfg.euti_variant)

    def one(vi):
        hidden, keys, rotated, local_vi, mean_query = _euti_view(ctx, vi, cfg.euti_context, cfg.euti_variant)
        return pact_reduce(hidden, None, keys, rotated, visual_index=local_vi, mean_query=mean_query, **kwargs)
    return per_group(ctx, cfg.group, one)


@register_reducer(EUTIConfig)
def _reduce_euti(ctx: SampleContext, cfg: EUTIConfig) -> Reduction:
    def one(vi):
        hidden, keys, _, local_vi, mean_query = _euti_view(ctx, vi, cfg.euti_context, cfg.euti_variant)
        last = int(local_vi[-1]) + 1
        mask = torch.zeros(last, dtype=torch.bool, device=vi.device)
        mask[local_vi] = True
        scores = euti_scores(hidden[:last], keys[:last], None, visual_mask=mask, context=cfg.euti_context,
                             variant=cfg.euti_variant, mean_query=mean_query)
        kept, _ = split_by_importance(scores, cfg.prune_ratio)
        return bl.prune(ctx.hidden[vi], kept)
    return per_group(ctx, cfg.group, one)


@register_reducer(DBDPCConfig)
def _reduce_dbdpc(ctx: SampleContext, cfg: DBDPCConfig) -> Reduction:
    def one(vi):
        hidden, keys = sub_keys(ctx, vi)
        clusters = dbdpc(keys, cfg.cutoff, density=cfg.density, dn=cfg.dn)
        return bl.merge_by_labels(hidden, clusters.labels)
    return per_group(ctx, cfg.group, one)
