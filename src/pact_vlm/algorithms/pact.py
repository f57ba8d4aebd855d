"""PACT on one sequence: EUTI -> DBDPC -> retrieval -> merging."""

from __future__ import annotations

import torch

from .dbdpc import dbdpc
from .euti import euti_scores, split_by_importance
from .merge import Reduction, merge_clusters

__all__ = ["pact_reduce"]


def pact_reduce(
    hidden: torch.Tensor,
    queries: torch.Tensor | None,
    keys: torch.Tensor,
    rotated_keys: torch.Tensor,
    *,
    visual_index: torch.Tensor | None = None,
    prune_ratio: float = 0.45,
    cutoff: float = 0.21,
    alpha: float = 1.5,
    density: str = "gaussian",
    dn: float = 2.0,
    euti_context: str = "visual",
    euti_variant: str = "full",
    mean_query: torch.Tensor | None = None,
) -> Reduction:
    """Reduce the visual tokens of one sequence with PACT.

    Args:
        hidden: ``[T, D]`` input hidden states of layer L.
        queries: ``[T, H, d_h]`` layer L's queries before rotary (for EUTI); ``None`` when
            ``mean_query`` is given.
        keys: ``[T, H_kv, d_h]`` layer L's keys before rotary (for EUTI).
        rotated_keys: ``[T, H_kv, d_h]`` the same keys after rotary (for DBDPC, heads concatenated).
        visual_index: ``[N]`` ascending positions of the visual tokens in ``T``; ``None`` = all.
            With ``euti_context="prefix"`` the context is every row up to the last visual one.
        prune_ratio, cutoff, alpha, density, dn, euti_context, euti_variant: see
            :class:`pact_vlm.PACTConfig`.
        mean_query: ``[H, d_h]`` EUTI's mean query over its context, in place of ``queries``
            (see :func:`pact_vlm.euti_scores`).

    Returns:
        :class:`Reduction` over the ``N`` visual tokens: kept indices (the cluster centers,
        ascending), their merged hidden states, cluster sizes and every token's label.
    """
    t = hidden.shape[0]
    if visual_index is None:
        visual_index = torch.arange(t, device=hidden.device)
    if visual_index.numel() == 0:
        raise ValueError("no visual tokens to reduce (visual_index is empty)")
    last = int(visual_index[-1]) + 1
    visual_mask = torch.zeros(last, dtype=torch.bool, device=hidden.device)
    visual_mask[visual_index] = True
    scores = euti_scores(hidden[:last], keys[:last], None if queries is None else queries[:last],
                         visual_mask=visual_mask, context=euti_context, variant=euti_variant,
                         mean_query=mean_query)
    kept, pruned = split_by_importance(scores, prune_ratio)

    flat = rotated_keys[visual_index].reshape(visual_index.numel(), -1)
    clusters = dbdpc(flat[kept], cutoff, pruned_keys=flat[pruned] if pruned.numel() else None,
                     alpha=alpha, density=density, dn=dn)

    # rows of the clustering (kept, then pruned) back to visual-token indices
    rows = torch.cat([kept, pruned])
    labels = torch.full_like(visual_index, -1)
    joined = clusters.labels >= 0
    labels[rows[joined]] = kept[clusters.labels[joined]]

    keep_index = kept[clusters.centers]
    visual_hidden = hidden[visual_index]
    merged, sizes = merge_clusters(visual_hidden, labels, keep_index)
    return Reduction(keep_index=keep_index, hidden=merged, sizes=sizes, labels=labels)
