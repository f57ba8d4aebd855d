"""What every method file builds on: the per-sample input of a reducer and the reducer registry.

A method is one file in this package: its config dataclass (registered with
:func:`pact_vlm.config.register_config`) and its reducer, registered right under it with
:func:`register_reducer`. A reducer reads one sample's :class:`SampleContext` at a reduction layer
and returns a :class:`~pact_vlm.Reduction`; it never sees transformers objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import GROUPS, ReductionConfig, check_bool, check_choice, check_layer

__all__ = ["SampleContext", "Reducer", "REDUCERS", "NEEDS", "reads_vision_tower", "register_reducer", "per_group", "split_by",
           "sub_keys", "ClusterConfig"]


@dataclass
class SampleContext:
    """Everything a reducer may read about one sample at a reduction layer.

    Attributes:
        hidden: ``[T, D]`` the layer's input for this sample (``T`` rows of the packed batch).
        queries: ``[T, H, d_h]`` queries before rotary (only for reducers registered with
            ``needs=("queries",)`` or ``("rotated_queries",)``, else None);
        keys: ``[T, H_kv, d_h]`` keys before rotary; rotated_keys: ``[T, H_kv, d_h]`` after rotary.
        visual_index: ``[N]`` ascending rows of the reducible visual tokens.
        groups: ``[N]`` image / video index of each visual token (for per-image reduction).
        rotated_queries: ``[T, H, d_h]`` queries after rotary (only for reducers registered
            with ``needs=("rotated_queries",)``, else None).
        real: ``[T]`` bool, rows that are tokens of this sample (False: padding, packing slots).
        positions: ``[T]`` original position of each row within the call (0 = its first token).
        sizes: ``[N]`` how many original tokens each visual token stands for (all 1 at the
            first reduction layer; merged tokens of progressive methods count more).
        extras: per visual token data some reducers need, each ``[N, ...]``: ``"grid"``
            (view, row, col), ``"priority"``, and the vision-tower readings of PruMerge / HiRED.
        layer: index of the decoder layer being reduced.
        mean_query: ``mean_query(rows) -> [H, d_h]``, the mean query before rotary over the rows
            ``rows`` (indices or a ``[T]`` mask) without computing every row's query (EUTI).
    """

    hidden: torch.Tensor
    queries: torch.Tensor | None
    keys: torch.Tensor
    rotated_keys: torch.Tensor
    visual_index: torch.Tensor
    groups: torch.Tensor
    rotated_queries: torch.Tensor | None = None
    real: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: int = 0
    mean_query: Callable[[torch.Tensor], torch.Tensor] | None = None


Reducer = Callable[[SampleContext, ReductionConfig], Reduction]
REDUCERS: dict[type, Reducer] = {}
NEEDS: dict[type, frozenset[str]] = {}
KNOWN_NEEDS = ("queries", "rotated_queries", "grid", "priority", "vision")


def reads_vision_tower(config) -> bool:
    """Whether ``config``'s method reads the vision tower (``needs=("vision",)``: VisionZip, PruMerge,
    HiRED), so its prompts must carry pixels, not pre-encoded image features."""
    return "vision" in NEEDS.get(type(config), ())


def register_reducer(config_type: type, *, needs: tuple[str, ...] = ()) -> Callable[[Reducer], Reducer]:
    """Register the reducer of a config type.

    ``needs`` names optional inputs the reducer reads: ``"queries"`` (every row's query before
    rotary; EUTI needs only ``ctx.mean_query``), ``"rotated_queries"``, ``"grid"`` (the
    visual tokens' grid layout), ``"priority"`` (set on the handle) or ``"vision"`` (vision-tower
    readings; PruMerge / HiRED).
    """
    unknown = set(needs) - set(KNOWN_NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {', '.join(KNOWN_NEEDS)}")

    def deco(fn: Reducer) -> Reducer:
        REDUCERS[config_type] = fn
        NEEDS[config_type] = frozenset(needs)
        return fn
    return deco


def per_group(ctx: SampleContext, group: str, reduce_one: Callable[[torch.Tensor], Reduction]) -> Reduction:
    """Run ``reduce_one`` on the whole visual set, or on each image / video separately.

    ``reduce_one`` receives the rows of one visual set (a subset of ``ctx.visual_index``) and
    returns a Reduction over them."""
    if group == "sample" or int(ctx.groups.max()) == int(ctx.groups.min()):
        return reduce_one(ctx.visual_index)
    return split_by(ctx.groups, lambda sel: reduce_one(ctx.visual_index[sel]))


def split_by(groups: torch.Tensor, reduce_sel: Callable[[torch.Tensor], Reduction]) -> Reduction:
    """One Reduction over ``N`` tokens from one per value of ``groups`` ``[N]`` (each sees ``sel``,
    the ascending indices of its tokens)."""
    parts, sels = [], []
    for g in groups.unique().tolist():
        sel = torch.nonzero(groups == g).flatten()
        red = reduce_sel(sel)
        labels = torch.where(red.labels >= 0, sel[red.labels.clamp(min=0)], red.labels)
        parts.append(Reduction(sel[red.keep_index], red.hidden, red.sizes, labels))
        sels.append(sel)
    keep = torch.cat([p.keep_index for p in parts])
    order = keep.argsort()
    labels = torch.full((groups.numel(),), -1, dtype=torch.long, device=keep.device)
    for p, sel in zip(parts, sels):
        labels[sel] = p.labels
    return Reduction(keep[order], torch.cat([p.hidden for p in parts])[order],
                     torch.cat([p.sizes for p in parts])[order], labels)


def sub_keys(ctx: SampleContext, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and flat rotated keys of the rows ``rows``."""
    return ctx.hidden[rows], bl.flat_keys(ctx.rotated_keys[rows])


class ClusterConfig(ReductionConfig):
    """Shared validation of the clustering alternatives (not a method)."""

    def _check_common(self) -> None:
        check_layer(self.layer)
        check_bool("proportional_attention", self.proportional_attention)
        check_choice("group", self.group, GROUPS)
