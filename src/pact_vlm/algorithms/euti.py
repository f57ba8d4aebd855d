"""EUTI: Efficient Unimportant Token Identification (PACT paper, eq. 1-4).

Importance needs no attention map: with the layer's queries and keys (before rotary) and
``Q_global`` the mean query over the context,

    s_i = mean_h softmax_i(k_i^h · Q_global^h / sqrt(d_h)) * ||h_i||_2,

computed in float32. Grouped-query attention: query head ``h`` reads key head ``h // (H / H_kv)``.
"""

from __future__ import annotations

import torch

__all__ = ["euti_scores", "split_by_importance", "num_kept_after_pruning"]

_VARIANTS = ("full", "norm", "softmax")
_CONTEXTS = ("visual", "prefix")


def euti_scores(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    queries: torch.Tensor | None,
    *,
    visual_mask: torch.Tensor | None = None,
    context: str = "visual",
    variant: str = "full",
    mean_query: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of visual tokens.

    Args:
        hidden: ``[T, D]`` the layer's input hidden states (before its layer norm).
        keys: ``[T, H_kv, d_h]`` keys before rotary.
        queries: ``[T, H, d_h]`` queries before rotary; ``H`` a multiple of ``H_kv``. ``None``
            when ``mean_query`` is given (or with ``variant="norm"``).
        visual_mask: ``[T]`` bool, the rows that are visual tokens; ``None`` = every row.
        context: ``"visual"``: mean query and softmax over the visual rows only (paper);
            ``"prefix"``: over every row given (reference code passes the sequence up to the last
            visual token).
        variant: ``"full"`` (eq. 2), ``"norm"`` (``||h_i||`` only), ``"softmax"`` (attention term only).
        mean_query: ``[H, d_h]`` ``Q_global`` computed by the caller, in place of ``queries``.
            Without a per-head query norm, ``q_proj`` is affine, so ``Q_global`` is ``q_proj`` of
            the mean normalised input over the context: one row through ``q_proj`` instead of
            ``T`` (what :func:`pact_vlm.apply` does).

    Returns:
        ``[N]`` float32 scores of the visual rows, in row order (higher = more important).
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {_VARIANTS}")
    if context not in _CONTEXTS:
        raise ValueError(f"context={context!r} is not one of {_CONTEXTS}")
    if (queries is None) == (mean_query is None) and variant != "norm":
        raise ValueError("pass exactly one of queries [T, H, d_h] and mean_query [H, d_h] "
                         f"(got {'both' if queries is not None else 'neither'})")
    if hidden.dim() != 2 or keys.dim() != 3:
        raise ValueError(f"expected hidden [T, D] and keys [T, H_kv, d_h]; got "
                         f"{tuple(hidden.shape)}, {tuple(keys.shape)}")
    t, h_kv, d_h = keys.shape
    if hidden.shape[0] != t:
        raise ValueError(f"hidden {tuple(hidden.shape)} and keys {tuple(keys.shape)} disagree on tokens")
    q_shape = None
    if queries is not None:
        if queries.dim() != 3 or queries.shape[0] != t:
            raise ValueError(f"expected queries [T={t}, H, d_h]; got {tuple(queries.shape)}")
        q_shape = queries.shape[1:]
    elif mean_query is not None:
        if mean_query.dim() != 2:
            raise ValueError(f"expected mean_query [H, d_h]; got {tuple(mean_query.shape)}")
        q_shape = mean_query.shape
    if q_shape is not None:
        n_heads = q_shape[0]
        if q_shape[1] != d_h:
            raise ValueError(f"queries have head size {q_shape[1]}, keys {d_h}")
        if n_heads % h_kv:
            raise ValueError(f"{n_heads} query heads is not a multiple of {h_kv} key heads")
    if visual_mask is None:
        visual_mask = torch.ones(t, dtype=torch.bool, device=hidden.device)
    elif visual_mask.shape != (t,):
        raise ValueError(f"visual_mask has shape {tuple(visual_mask.shape)}, expected ({t},)")

    norms = hidden[visual_mask].float().norm(dim=-1)
    if variant == "norm":
        return norms

    rows = visual_mask if context == "visual" else torch.ones_like(visual_mask)
    q_global = mean_query.float() if mean_query is not None else queries[rows].float().mean(dim=0)  # [H, d_h]
    k = keys[rows].float()                                                # [T', H_kv, d_h]
    # query head h reads key head h // g: group the query heads instead of repeating the keys
    grouped = q_global.reshape(h_kv, n_heads // h_kv, d_h)
    logits = torch.einsum("tkd,kgd->kgt", k, grouped).reshape(n_heads, -1) / d_h ** 0.5   # [H, T']
    attn = logits.softmax(dim=-1).mean(dim=0)                             # [T']
    if context == "prefix":
        attn = attn[visual_mask]
    return attn if variant == "softmax" else attn * norms


def split_by_importance(scores: torch.Tensor, prune_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices to keep and to set aside, each ascending.

    The reference implementation's rule: the ``int(N * (1 - prune_ratio))`` highest-scoring tokens
    are kept (at least one), computed exactly as written there in double precision, so the kept
    count equals the reference's on every ``N`` (e.g. ``N = 729, prune_ratio = 0.45``: 400 kept,
    where ``N - floor(prune_ratio * N)`` would give 401). Ties are broken by index (the earlier
    token counts as more important), so the split is deterministic.

    Args:
        scores: ``[N]`` importance scores.
        prune_ratio: fraction λ in ``[0, 1)``.

    Returns:
        ``(kept [K], pruned [N - K])`` LongTensors of indices into ``scores``.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio={prune_ratio!r} must be in [0, 1)")
    n = scores.shape[0]
    n_kept = num_kept_after_pruning(n, prune_ratio)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    kept = order[:n_kept].sort().values
    pruned = order[n_kept:].sort().values
    return kept, pruned


def num_kept_after_pruning(n: int, prune_ratio: float) -> int:
    """``max(1, int(n * (1 - prune_ratio)))`` (0 for ``n = 0``): the reference's kept count."""
    return min(n, max(1, int(n * (1.0 - prune_ratio)))) if n > 0 else 0
