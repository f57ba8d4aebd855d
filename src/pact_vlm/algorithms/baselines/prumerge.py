"""LLaVA-PruMerge (Shang et al., 2024): CLS-attention outliers, merged with their key neighbours.

Pure torch on one CLIP view (an image or an anyres tile): ``P`` patch tokens plus the CLS token.
"""

from __future__ import annotations

import torch

from .common import num_kept, top_k

__all__ = ["cls_attention", "iqr_outliers", "prumerge_select", "prumerge_merge"]


def cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """Attention of the CLS query (row 0) to the patch keys.

    Args:
        q, k: ``[V, 1 + P, C]`` the attention layer's query / key projections (CLS first).
        heads: ``None``: one softmax over the concatenated heads, scaled by ``C ** -0.5`` (the
            PruMerge reference code); an integer: per-head softmax (scale ``(C / heads) ** -0.5``)
            summed over heads (the HiRED reference code).

    Returns:
        ``[V, P]`` float32: the CLS row of the attention, without the CLS column.
    """
    q, k = q.float(), k.float()
    v, t, c = q.shape
    if heads is None:
        logits = torch.einsum("vc,vtc->vt", q[:, 0], k) * c ** -0.5
        return logits.softmax(dim=-1)[:, 1:]
    d = c // heads
    qh = q[:, 0].view(v, heads, d)
    kh = k.view(v, t, heads, d)
    logits = torch.einsum("vhd,vthd->vht", qh, kh) * d ** -0.5
    return logits.softmax(dim=-1).sum(dim=1)[:, 1:]


def iqr_outliers(attn: torch.Tensor, factor: float = 1.5) -> int:
    """How many values of ``attn`` ``[P]`` lie above ``Q3 + factor * IQR`` (linear quantiles)."""
    q1, q3 = torch.quantile(attn.float(), torch.tensor([0.25, 0.75], device=attn.device))
    return int((attn > q3 + factor * (q3 - q1)).sum())


def prumerge_select(attn: torch.Tensor, keep_ratio: float | None = None, plus: bool = False) -> torch.Tensor:
    """Indices (ascending) of the tokens PruMerge keeps in one view.

    Args:
        attn: ``[P]`` CLS attention.
        keep_ratio: ``None``: the IQR outliers (adaptive, the paper); else the
            ``ceil(keep_ratio * P)`` most attended. At least one token is kept.
        plus: PruMerge+: also every ``max(1, int(int(P / K) / 3))``-th token (``K`` tokens selected).
    """
    p = attn.shape[0]
    k = iqr_outliers(attn) if keep_ratio is None else num_kept(p, keep_ratio)
    k = max(k, 1)
    keep = top_k(attn, k)
    if plus:
        step = max(1, int(int(p / k) / 3))
        grid = torch.arange(0, p - 1, step, device=attn.device)
        keep = torch.unique(torch.cat([keep, grid]))
    return keep


def prumerge_merge(features: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor,
                   neighbors: int = 32) -> torch.Tensor:
    """New features of the kept tokens: ``x_i + sum_j a_j x_j`` over the ``neighbors`` tokens
    (other than ``i``; ties to the earlier token) whose keys are most cosine-similar to ``i``'s,
    ``a`` the CLS attention (unnormalised, as the reference code).

    Args:
        features: ``[P, C]`` the view's patch features; keys: ``[P, C_k]``; attn: ``[P]``;
        keep: ``[K]`` kept indices; neighbors: k (capped at ``P - 1``).

    Returns:
        ``[K, C]`` in ``features``' dtype.
    """
    p = features.shape[0]
    nb = min(int(neighbors), p - 1)
    if nb <= 0 or keep.numel() == 0:
        return features[keep].clone()
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = kn[keep] @ kn.T                                             # [K, P]
    sim[torch.arange(keep.numel(), device=sim.device), keep] = float("-inf")
    idx = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :nb]   # [K, nb], ties: earlier
    extra = (attn.float()[idx][..., None] * features.float()[idx]).sum(dim=1)
    return (features[keep].float() + extra).to(features.dtype)
