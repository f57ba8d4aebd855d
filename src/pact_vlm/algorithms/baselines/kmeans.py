"""k-means (Lloyd) with k-means++ seeding, pure torch."""

from __future__ import annotations

import torch

from ..merge import Reduction
from .common import best_per_cluster, flat_keys, merge_by_labels, num_kept

__all__ = ["kmeans", "kmeans_reduce"]


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_(min=0)


def kmeans(x: torch.Tensor, k: int, *, max_iter: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-means.

    Seeding: k-means++ (the first center uniformly, then each next one with probability
    proportional to the squared distance to the nearest chosen center) from a CPU generator seeded
    with ``seed``. Lloyd iterations until the assignment stops changing or ``max_iter``; a cluster
    that empties is re-seeded with the point farthest from its own centroid.

    Args:
        x: ``[N, d]`` points (float32 used); k: clusters, ``1 <= k <= N``.

    Returns:
        ``(assign [N] in 0..k-1, centroids [k, d] float32)``; at convergence every point is
        assigned to its nearest centroid (ties to the lower id) and every centroid is its
        cluster's mean.
    """
    x = x.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = _sq_dist(x, x[chosen[0]][None])[:, 0]
    for _ in range(1, k):
        w = closest.cpu().double()
        w[chosen] = 0
        if float(w.sum()) > 0:
            nxt = int(torch.multinomial(w, 1, generator=gen))
        else:                           # duplicates only: take the first unchosen point
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            nxt = int(torch.nonzero(free)[0])
        chosen.append(nxt)
        closest = torch.minimum(closest, _sq_dist(x, x[nxt][None])[:, 0])
    centroids = x[chosen].clone()
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        d = _sq_dist(x, centroids)
        new = d.argmin(dim=1)
        counts = torch.bincount(new, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            own = d.gather(1, new[:, None])[:, 0]
            own[counts[new] <= 1] = -1          # never empty another cluster
            far = int(own.argmax())
            counts[new[far]] -= 1
            new[far] = empty
            counts[empty] = 1
            d[far] = float("inf")
            d[far, empty] = 0
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = sums / torch.bincount(assign, minlength=k).clamp(min=1)[:, None].float()
    return assign, centroids


def kmeans_reduce(hidden: torch.Tensor, keys: torch.Tensor, keep_ratio: float, *, max_iter: int = 100,
                  seed: int = 0) -> Reduction:
    """k-means on ``keys`` (heads concatenated) with ``ceil(keep_ratio * N)`` clusters (at least one);
    each cluster becomes the mean of ``hidden`` ``[N, D]`` at the member closest to its centroid."""
    x = flat_keys(keys)
    assign, centroids = kmeans(x, num_kept(x.shape[0], keep_ratio, at_least_one=True), max_iter=max_iter, seed=seed)
    closeness = -((x - centroids[assign]) ** 2).sum(1)
    return merge_by_labels(hidden, best_per_cluster(closeness, assign, centroids.shape[0]))
