"""Matching budgets: the parameter value that gives a method a target reduction ratio.

Methods are compared at the same reduction ratio (the paper's tables). :func:`match_budget`
finds, for any method config, the value of one numeric parameter whose reduction ratio over a
set of inputs is closest to a target, by bisection over the parameter's search range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch

from .config import ReductionConfig

__all__ = ["match_budget", "measure_ratio"]


class _StatsFinal(Exception):
    """Ends a forward pass of :func:`measure_ratio` once the reduction statistics are final."""


def _stop_forward(module, args, kwargs):
    raise _StatsFinal


def ratio_terms(stats, budget_layer: int | None) -> tuple[float, int]:
    """``(removed, visual_before)`` of one prefill's stats: the reduction ratio :func:`match_budget`
    calibrates (``stats.equivalent_ratio(budget_layer)``), weighted by the prefill's visual tokens."""
    return stats.equivalent_ratio(budget_layer) * stats.visual_before, stats.visual_before


def _as_list(inputs) -> list[dict[str, Any]]:
    items = [inputs] if isinstance(inputs, dict) else list(inputs) if isinstance(inputs, Iterable) else None
    if not items or not all(isinstance(x, dict) for x in items):
        raise ValueError("inputs must be one input dict (model(**inputs)) or a non-empty list of them, got "
                         f"{type(inputs).__name__}")
    return items


def measure_ratio(model, config: ReductionConfig, inputs) -> float:
    """Token-weighted reduction ratio of ``config`` on ``inputs`` (forward passes, no gradients,
    each stopped once the last reducing layer has reduced).

    The ratio of each prefill is ``stats.equivalent_ratio(config.budget_layer)``: for a method
    that reduces once, at its own layer, exactly :attr:`ReductionStats.reduction_ratio`; for
    progressive or layer-budgeted methods (ToMe, VTW), the single-layer ratio at
    ``equivalent_layer`` that removes the same visual-token work averaged over the layers (as
    the PACT reference code matches them). Prefills are weighted by their visual-token count.

    Args:
        model: a supported VLM without a reduction applied.
        config: the method config to apply.
        inputs: one ``model(**inputs)`` dict or a list of them.

    Returns:
        ``sum(ratio_i * visual_i) / sum(visual_i)`` over the inputs.
    """
    from .integration.handle import apply

    items = _as_list(inputs)
    removed = total = 0.0
    with torch.no_grad(), apply(model, config) as handle:
        # the statistics are final in the pre-hook of the last reducing layer: the layers after it
        # (and the head) need not run
        last = handle.adapter.layers(model)[handle._stage_layers[-1]]
        stop = last.register_forward_pre_hook(_stop_forward, with_kwargs=True)
        try:
            for item in items:
                try:
                    model(**({"use_cache": False} | item))
                except _StatsFinal:
                    pass
                r, v = ratio_terms(handle.stats, config.budget_layer)
                removed, total = removed + r, total + v
        finally:
            stop.remove()
    if total == 0:
        raise ValueError("the inputs carry no visual tokens to reduce; pass inputs with images or videos")
    return removed / total


def match_budget(model, config: ReductionConfig, inputs, target_ratio: float, *, param: str | None = None,
                 tol: float = 0.01, max_iter: int = 30) -> ReductionConfig:
    """The copy of ``config`` whose reduction ratio on ``inputs`` is closest to ``target_ratio``.

    Bisection over one numeric parameter, within the range and in the direction the config class
    declares (``budget_search``): the ratio is assumed monotone in the parameter. Each evaluation
    applies the config, runs ``model(**x)`` for every input under ``torch.no_grad`` and removes it
    again (see :func:`measure_ratio` for the ratio; for ToMe and VTW it is the layer-averaged
    work expressed at the config's ``equivalent_layer``).

    Args:
        model: a supported VLM without a reduction applied.
        config: the method config; every field but ``param`` is kept.
        inputs: one input dict or a list of them (e.g. a processor's output per sample).
        target_ratio: the wanted fraction of visual tokens removed, in ``[0, 1]``.
        param: the field to search; default the config class's ``budget_param`` (``cutoff`` for
            PACT, ``keep_ratio`` for FastV, ...).
        tol: stop as soon as the ratio is within ``tol`` of the target.
        max_iter: at most this many bisection steps (after the two range ends).

    Returns:
        ``config.replace(**{param: value})``, the closest value found (integers stay integers).

    Raises:
        ValueError: the target lies outside the reachable range (the ratios at the two ends of
            the search range, widened by ``tol``), or a bad argument.
    """
    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a pact_vlm config such as PACTConfig(...), got {type(config).__name__}")
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) \
            or not 0.0 <= target_ratio <= 1.0:
        raise ValueError(f"target_ratio={target_ratio!r} must be a fraction in [0, 1] (e.g. 0.7 to remove 70% "
                         "of the visual tokens)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol={tol!r} must be a number >= 0 (e.g. 0.01)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    cls = type(config)
    param = param if param is not None else cls.budget_param
    searchable = ", ".join(sorted(cls.budget_search)) or "none"
    if param is None or param not in cls.budget_search:
        raise ValueError(f"param={param!r} cannot be searched for {cls.__name__}; searchable parameters: "
                         f"{searchable}")
    if param not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"{cls.__name__} has no field {param!r}; searchable parameters: {searchable}")
    items = _as_list(inputs)
    low, high, direction = cls.budget_search[param]
    if high is None:             # the model's last decoder layer
        from .integration import get_adapter

        high = len(get_adapter(model).layers(model)) - 1
    integer = isinstance(low, int) and isinstance(high, int)

    cache: dict[float, float] = {}

    def ratio(value):
        if value not in cache:
            cache[value] = measure_ratio(model, config.replace(**{param: value}), items)
        return cache[value]

    r_low, r_high = ratio(low), ratio(high)
    reach_lo, reach_hi = min(r_low, r_high), max(r_low, r_high)
    if not reach_lo - tol <= target_ratio <= reach_hi + tol:
        raise ValueError(f"target_ratio={target_ratio} cannot be reached with {cls.__name__}.{param} in "
                         f"[{low}, {high}] on these inputs: the reachable reduction ratios are "
                         f"[{reach_lo:.4f}, {reach_hi:.4f}]; choose a target in that range or another "
                         "method / parameter")
    # lo_v gives a ratio below the target, hi_v one above (in the direction of the parameter)
    lo_v, hi_v = (low, high) if direction > 0 else (high, low)
    for _ in range(max_iter):
        best = min(cache, key=lambda v: (abs(cache[v] - target_ratio), v))
        if abs(cache[best] - target_ratio) <= tol:
            break
        if integer:
            if abs(hi_v - lo_v) <= 1:
                break
            mid = (lo_v + hi_v) // 2
        else:
            mid = (lo_v + hi_v) / 2
            if mid in (lo_v, hi_v) or math.isclose(lo_v, hi_v, rel_tol=0, abs_tol=1e-12):
                break
        if ratio(mid) < target_ratio:
            lo_v = mid
        else:
            hi_v = mid
    best = min(cache, key=lambda v: (abs(cache[v] - target_ratio), v))
    return config.replace(**{param: best})
