"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention, the rest merged into contextual tokens.

Pure torch on one view of the vision tower (an image or an anyres tile) of ``P`` patch tokens.
"""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import merge_by_labels, num_kept, top_k

__all__ = ["mean_attention_received", "visionzip_counts", "visionzip_labels", "visionzip_reduce"]


def mean_attention_received(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention each patch receives, averaged over the queries, for towers without a CLS token.

    The VisionZip paper's rule for encoders without a CLS token (SigLIP): per head a softmax over
    the keys (scale ``(C / heads) ** -0.5``), the attention a key receives averaged over all queries
    of its view, then summed over heads (as the CLS variant sums its per-head rows).

    Args:
        q, k: ``[V, P, C]`` the attention layer's query / key projections (no CLS token).
        heads: attention heads of the layer.

    Returns:
        ``[V, P]`` float32.
    """
    v, t, c = q.shape
    if k.shape != q.shape or c % heads:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must have one shape with a channel "
                         f"count divisible by heads={heads}")
    d = c // heads
    out = torch.empty(v, t, dtype=torch.float32, device=q.device)
    for i in range(v):                                               # one view at a time: [H, P, P] at most
        qh = q[i].float().view(t, heads, d).transpose(0, 1)
        kh = k[i].float().view(t, heads, d).transpose(0, 1)
        probs = (qh @ kh.transpose(1, 2) * d ** -0.5).softmax(dim=-1)   # [H, Pq, Pk]
        out[i] = probs.mean(dim=1).sum(dim=0)
    return out


def visionzip_counts(p: int, keep_ratio: float, contextual_share: float) -> tuple[int, int]:
    """``(dominant, contextual)`` token counts for a view of ``p`` tokens: the budget
    ``B = ceil(keep_ratio * p)`` splits into ``round(contextual_share * B)`` contextual tokens and the
    rest dominant (the paper's 54 + 10, 108 + 20, 162 + 30 for ``contextual_share = 10 / 64``)."""
    budget = num_kept(p, keep_ratio)
    contextual = min(int(round(contextual_share * budget)), budget)
    return budget - contextual, contextual


def visionzip_labels(attn: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """Which kept token represents each of a view's ``P`` tokens.

    1. Dominant: the ``dominant`` tokens of highest ``attn`` (ties to the earlier token) stay as they are.
    2. Contextual: of the ``R`` remaining tokens (in order), every ``max(1, R // contextual)``-th, the
       first ``contextual`` of them, are targets; every other remaining token joins the target whose
       ``metric`` is most cosine-similar (ties to the earlier target) and each target becomes the mean
       of itself and the tokens that joined it. With ``contextual = 0`` the remaining tokens are dropped.

    Args:
        attn: ``[P]`` attention each token receives (CLS attention, summed over heads).
        metric: ``[P, d]`` the vectors similarity is measured on (keys averaged over heads).
        dominant, contextual: the two counts (:func:`visionzip_counts`), ``dominant + contextual <= P``.

    Returns:
        ``[P]`` LongTensor labels for :func:`~pact_vlm.algorithms.baselines.merge_by_labels`:
        a kept token's own index, the target's index for a merged token, ``-1`` for a dropped one.
    """
    p = attn.shape[0]
    if dominant < 0 or contextual < 0 or dominant + contextual > p:
        raise ValueError(f"dominant={dominant} + contextual={contextual} tokens must be >= 0 and at most the "
                         f"view's {p} tokens")
    device = attn.device
    labels = torch.full((p,), -1, dtype=torch.long, device=device)
    dom = top_k(attn, dominant)
    labels[dom] = dom
    if contextual == 0:
        return labels
    rest = torch.nonzero(labels < 0).flatten()                       # ascending
    step = max(1, rest.numel() // contextual)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
    is_target[torch.arange(0, rest.numel(), step, device=device)[:contextual]] = True
    targets, others = rest[is_target], rest[~is_target]
    labels[targets] = targets
    if others.numel():
        m = torch.nn.functional.normalize(metric.float(), dim=-1)
        sim = m[others] @ m[targets].T                                # [R - C, C]
        labels[others] = targets[sim.argmax(dim=1)]                   # first maximum: earlier target
    return labels


def visionzip_reduce(features: torch.Tensor, attn: torch.Tensor, metric: torch.Tensor, keep_ratio: float,
                     contextual_share: float) -> Reduction:
    """VisionZip on one view's ``features`` ``[P, C]``: dominant tokens kept, contextual tokens the
    (unweighted) means of their groups (:func:`visionzip_labels`); ``ceil(keep_ratio * P)`` tokens stay."""
    dominant, contextual = visionzip_counts(features.shape[0], keep_ratio, contextual_share)
    return merge_by_labels(features, visionzip_labels(attn, metric, dominant, contextual))
