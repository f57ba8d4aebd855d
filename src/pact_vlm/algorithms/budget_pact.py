"""PACT with a fixed budget per image, before the language model (the form a serving engine can run).

A serving engine (vLLM) fixes the number of placeholder tokens of an image before the vision encoder
runs, so the kept count can depend only on the image's grid and a keep ratio:
``K = ceil(keep_ratio * N)`` (at least one) for an image of ``N`` visual tokens
(:func:`budget_keep_count`). The content decides which tokens stand for the image:

1. EUTI (eq. 2, visual context) on the image's ``N`` tokens sets aside the ``prune_ratio`` least
   important (the reference's ``int(N * (1 - prune_ratio))`` kept; never fewer than ``K``: when the
   budget is larger, the ``K`` most important are kept).
2. DBDPC on the kept tokens' keys, with the cut-off ``d_c`` searched for this image: the smallest
   distance among the kept tokens' pairwise distances (or 0) at which DBDPC picks at most ``K``
   centers; when it picks fewer, the non-center tokens of highest density complete the centers to
   exactly ``K`` (density order, ties to the lower index). Every kept token joins its nearest center.
3. Retrieval: a set-aside token joins its nearest center iff within ``alpha * d_c``, else it is dropped.
4. Merging: each center becomes the unweighted mean of its members, at the center's own position.

The keys are the pre-rotary keys of the language model's first layer (``k_proj`` of its
``input_layernorm`` of the embeddings), so the reduction depends on neither the position of the
image in the prompt nor the rotary form, and EUTI's mean query is that layer's query projection
of the mean normalised embedding of the image. Proportional attention is left to the caller.
"""

from __future__ import annotations

import torch

from .baselines.common import num_kept
from .dbdpc import _distances_and_density, _select, _to_distances_
from .euti import euti_scores, num_kept_after_pruning
from .merge import Reduction, merge_clusters

__all__ = ["budget_keep_count", "budget_pact_reduce", "BudgetResult"]


def budget_keep_count(n: int, keep_ratio: float) -> int:
    """``ceil(keep_ratio * n)``, at least one (0 for ``n = 0``): the kept tokens of an image of ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be an integer >= 0 (the number of visual tokens of one image)")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio!r} is outside (0, 1]; the fraction of visual tokens kept, "
                         "e.g. 0.3 keeps 30%")
    return num_kept(n, float(keep_ratio), at_least_one=True) if n else 0


class BudgetResult(Reduction):
    """A :class:`Reduction` that also says which cut-off the search found (``cutoff``) and how many
    of the ``K`` centers DBDPC chose itself (``dbdpc_centers``; the rest completed it)."""

    cutoff: float
    dbdpc_centers: int


def _centers_at(dist: torch.Tensor, order: torch.Tensor, cutoff: float) -> torch.Tensor:
    return _select(dist, order, float(cutoff), "auto")


def budget_pact_reduce(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    mean_query: torch.Tensor | None,
    *,
    keep_ratio: float,
    prune_ratio: float = 0.2,
    alpha: float = 1.5,
    density: str = "gaussian",
    dn: float = 2.0,
    euti_variant: str = "full",
) -> BudgetResult:
    """Reduce the ``N`` visual tokens of one image to exactly :func:`budget_keep_count` ``(N, keep_ratio)``.

    Args:
        hidden: ``[N, D]`` the image's embeddings (the projector's output).
        keys: ``[N, H_kv, d_h]`` (or ``[N, d]``) their keys before rotary; heads concatenated for DBDPC.
        mean_query: ``[H, d_h]`` EUTI's mean query over the image's tokens (``None`` only with
            ``euti_variant="norm"``).
        keep_ratio: the budget, in ``(0, 1]``.
        prune_ratio, alpha, density, dn, euti_variant: as in :class:`pact_vlm.PACTConfig`.

    Returns:
        :class:`BudgetResult`: ``keep_index [K]`` (the centers, ascending), ``hidden [K, D]``
        (member means), ``sizes [K]``, ``labels [N]``, and the ``cutoff`` found.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got {tuple(hidden.shape)}")
    n = hidden.shape[0]
    if n == 0:
        raise ValueError("no visual tokens to reduce (hidden has 0 rows)")
    if keys.shape[0] != n:
        raise ValueError(f"keys {tuple(keys.shape)} and hidden {tuple(hidden.shape)} disagree on tokens")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio={prune_ratio!r} must be in [0, 1)")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0 (the paper uses 1.5)")
    budget = budget_keep_count(n, keep_ratio)
    keys3 = keys if keys.dim() == 3 else keys.reshape(n, 1, -1)
    device = hidden.device

    scores = euti_scores(hidden, keys3, None, context="visual", variant=euti_variant, mean_query=mean_query)
    n_kept = max(budget, num_kept_after_pruning(n, prune_ratio))
    order_s = torch.sort(scores.float(), descending=True, stable=True).indices
    kept = order_s[:n_kept].sort().values
    pruned = order_s[n_kept:].sort().values

    flat = keys3.reshape(n, -1).float()
    x = flat[kept]
    xn, dist, rho = _distances_and_density(x, density, dn, x.shape[0] if x.is_cuda else 128, None)
    order = torch.sort(rho, descending=True, stable=True).indices

    # the smallest cut-off, among 0 and the pairwise distances, at which DBDPC picks <= budget centers
    cutoff = 0.0
    centers = _centers_at(dist, order, 0.0)
    if centers.numel() > budget:
        values = torch.unique(dist)          # ascending; includes 0 (the diagonal)
        lo, hi = 0, values.numel() - 1       # C(values[lo]) > budget; C(values[hi]) == 1 <= budget
        best = _centers_at(dist, order, float(values[hi]))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = _centers_at(dist, order, float(values[mid]))
            if c.numel() <= budget:
                hi, best = mid, c
            else:
                lo = mid
        cutoff, centers = float(values[hi]), best
    chosen = centers.numel()
    if chosen < budget:
        is_center = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        is_center[centers] = True
        extra = order[~is_center[order]][: budget - chosen]
        centers = torch.cat([centers, extra]).sort().values

    local = centers[dist.index_select(1, centers).argmin(dim=1)]
    local[centers] = centers                   # a center (even a duplicate of another) stands for itself
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    labels[kept] = kept[local]
    if pruned.numel():
        pn = torch.nn.functional.normalize(flat[pruned], dim=-1)
        nearest, which = _to_distances_(torch.mm(pn, xn[centers].T)).min(dim=1)
        labels[pruned] = torch.where(nearest <= alpha * cutoff, kept[centers[which]], torch.full_like(which, -1))

    keep_index = kept[centers]
    merged, sizes = merge_clusters(hidden, labels, keep_index)
    result = BudgetResult(keep_index=keep_index, hidden=merged, sizes=sizes, labels=labels)
    result.cutoff = cutoff
    result.dbdpc_centers = chosen
    return result
