"""DBDPC: Distance-Bounded Density-Peak Clustering (PACT paper, algorithm 2) and retrieval.

Semantics (pinned to the public reference implementation by ``tests/algorithms/test_dbdpc.py``):

1. ``d_ij = max(0, 1 - x̂_i · x̂_j)`` on L2-normalised rows, float32, ``d_ii = 0``; a distance
   under ``1e-6`` (the float32 rounding of a dot product of unit vectors) counts as 0, so exact
   duplicates are at distance 0 however the product was blocked.
2. Density ``rho_i = Σ_j exp(-(d_ij / d_n)^2)`` (``"gaussian"``, reference) or
   ``Σ_j exp(-d_ij / d_n)`` (``"exponential"``, paper eq. 6).
3. Centers: visit tokens by decreasing density (ties: lower index first); a token becomes a
   center iff its distance to every center chosen so far is ``> d_c``.
4. Every token joins its nearest center (always within ``d_c``).
5. Retrieval: a pruned token joins its nearest center iff that distance is ``<= alpha * d_c``,
   else it is dropped (label ``-1``).

Step 3 is inherently sequential. On the CPU it runs as a scan over batches of candidates (the
next uncovered tokens in density order, decided among themselves from their pairwise distances),
one vectorised coverage update per batch; the covered (token, distance) pairs it reads give every
token's nearest center (step 4) without a pass over all ``n x C`` distances. On CUDA it runs in
parallel rounds (paper appendix D): every round decides, at once, all tokens whose
higher-density neighbours within ``d_c`` are already decided, with one host synchronisation per
round and none per token. Both give exactly the sequential result.

On the CPU only the lower half of the distance matrix is multiplied (the upper half is its exact
transpose), one panel of columns at a time, each turned into distances and densities while it
is in cache, so DBDPC costs little more than the bare distance product
(``benchmarks/dbdpc_speed.py`` measures the ratio).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Clusters", "dbdpc", "cosine_distances"]

_DENSITIES = ("gaussian", "exponential")
_CPU_BLOCK = 256   # columns per panel of the distance matrix on the CPU
_ROUNDING = 1e-6   # distances below this are float32 rounding of 1 - x̂·x̂ and count as 0


def _to_distances_(similarities: torch.Tensor) -> torch.Tensor:
    """In place: cosine similarities -> distances ``1 - s``, values up to ``_ROUNDING`` (and negatives) 0."""
    return torch.nn.functional.threshold_(similarities.neg_().add_(1.0), _ROUNDING, 0.0)


@dataclass(frozen=True)
class Clusters:
    """Result of :func:`dbdpc`.

    Attributes:
        centers: ``[C]`` LongTensor, ascending indices into ``keys`` of the cluster centers.
        labels: ``[n + m]`` LongTensor: for each row of ``keys`` then of ``pruned_keys``, the index
            (into ``keys``) of the center whose cluster it joined; a center carries its own index;
            ``-1`` marks a pruned row that joined no cluster.
        timings: seconds spent per phase (``distances``, ``density``, ``centers``, ``assign``),
            filled when ``dbdpc(..., timings=True)``; CUDA work is synchronised for it.
    """

    centers: torch.Tensor
    labels: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def sizes(self) -> torch.Tensor:
        """``[C]`` number of rows (kept and retrieved) in each center's cluster."""
        counts = torch.bincount(self.labels[self.labels >= 0], minlength=int(self.labels.numel()))
        return counts[self.centers]


def _check_keys(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [tokens, dim] (or [tokens, heads, head_dim]), "
                         f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 tokens); DBDPC needs at least one token to cluster")
    x = x.reshape(x.shape[0], -1)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; DBDPC needs finite keys "
                         "(check the model's dtype / overflow before the reduction layer)")
    return x.float()


def cosine_distances(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``max(0, 1 - â·b̂)`` in float32 (under ``1e-6``: 0, see the module docstring).

    Args:
        a: ``[n, d]``; b: ``[m, d]`` or ``None`` for ``a`` against itself (diagonal set to 0).

    Returns:
        ``[n, m]`` (or ``[n, n]``) float32 distances. Zero rows are at distance 1 from everything
        but themselves.
    """
    an = torch.nn.functional.normalize(a.float(), dim=-1)
    bn = an if b is None else torch.nn.functional.normalize(b.float(), dim=-1)
    dist = _to_distances_(torch.mm(an, bn.T))
    if b is None:
        dist.fill_diagonal_(0.0)
    return dist


def _distances_and_density(x: torch.Tensor, kind: str, dn: float, block: int, clock: "_Clock | None"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised rows, the (exactly symmetric) distance matrix and the density, block by block.

    Only the blocks on and below the diagonal are multiplied (half the products of ``x̂ x̂ᵀ``): for
    each block of ``block`` columns, the panel from its diagonal block down. The block's rows are
    then complete: left of the panel from earlier panels, right of it the transpose of the panel
    just computed (still in cache), and the diagonal block takes its lower triangle mirrored, so
    ``dist == dist.T`` holds bit for bit and a center's row can stand for its column. Each block
    of rows is turned into densities (full-row sums, as the reference computes them) while it is
    in cache. Returns ``(x̂ [n, d], dist [n, n], rho [n])``; ``clock`` (optional) accumulates the
    time of the two parts under ``distances`` and ``density``.
    """
    xn = torch.nn.functional.normalize(x, dim=-1)
    n = xn.shape[0]
    dist = torch.empty(n, n, dtype=torch.float32, device=x.device)
    rho = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        panel = dist[r0:, r0:r1]
        torch.mm(xn[r0:], xn[r0:r1].T, out=panel)
        _to_distances_(panel)
        diag = panel[: r1 - r0]
        diag.copy_(diag.tril(-1) + diag.tril(-1).T)       # zero diagonal, mirrored lower triangle
        rows = dist[r0:r1]
        rows[:, r1:] = dist[r1:, r0:r1].T
        if clock:
            clock.lap("distances", accumulate=True)
        tmp = rows / dn
        if kind == "gaussian":
            tmp.square_()
        rho[r0:r1] = tmp.neg_().exp_().sum(dim=1)
        if clock:
            clock.lap("density", accumulate=True)
    return xn, dist, rho


def _centers_scan(dist: torch.Tensor, order: torch.Tensor, cutoff: float, batch: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential rule on the CPU, a batch of candidates at a time, and every row's nearest center.

    Walks the tokens in density order. The next ``batch`` tokens that no center covers (within
    ``cutoff``) are the candidates; among them, in order, a candidate is a center iff no earlier
    candidate that became a center covers it (their ``batch x batch`` distances), which is the
    sequential rule since only centers cover. Then the new centers' rows mark what they cover,
    in one vectorised step. Only the centers' rows of ``dist`` are read.

    Every token ends up within ``cutoff`` of some center, so its nearest center is among the
    centers that cover it: the covered (token, distance) pairs of the centers' rows are all the
    assignment needs (``dist`` is exactly symmetric: a center's row is its column).

    Returns:
        ``(centers [C] ascending, labels [n])``, labels as ``centers[argmin(dist[:, centers])]``
        (ties: the lower center index).
    """
    d = dist.numpy()
    order_np = order.numpy()
    n = order_np.shape[0]
    rank = np.empty(n, dtype=np.int64)
    rank[order_np] = np.arange(n)
    covered = np.zeros(n, dtype=bool)          # in density-rank order
    centers, owners, tokens, gaps = [], [], [], []   # per batch: its centers, the (center, token,
                                                     # distance) pairs they cover
    pos = 0                                    # every rank before pos is decided
    while True:
        free = np.flatnonzero(~covered[pos:pos + 8 * batch])[:batch]
        if free.size == 0:
            free = np.flatnonzero(~covered[pos:])[:batch]
            if free.size == 0:
                break
        cand = order_np[pos + free]
        # candidate j's earlier neighbours as the bits of one integer: one test per candidate
        near = np.packbits(d[np.ix_(cand, cand)] <= cutoff, axis=1, bitorder="little")
        chosen, chosen_bits = [], 0
        for j in range(cand.shape[0]):
            if not int.from_bytes(near[j].tobytes(), "little") & chosen_bits:
                chosen.append(j)
                chosen_bits |= 1 << j
        new = cand[chosen]
        centers.append(new)
        rows = d[new]
        hit = np.flatnonzero(rows <= cutoff)
        which, token = np.divmod(hit, n)
        owners.append(new[which])
        tokens.append(token)
        gaps.append(rows.ravel()[hit])
        covered[rank[token]] = True
        pos += int(free[-1]) + 1
    owner, token, gap = np.concatenate(owners), np.concatenate(tokens), np.concatenate(gaps)
    first = np.lexsort((owner, gap, token))            # by token, then distance, then center index
    token, owner = token[first], owner[first]
    head = np.ones(token.shape[0], dtype=bool)
    head[1:] = token[1:] != token[:-1]
    nearest = np.empty(n, dtype=np.int64)
    nearest[token[head]] = owner[head]
    return torch.as_tensor(np.sort(np.concatenate(centers))), torch.as_tensor(nearest)


def _centers_rounds(adjacent: torch.Tensor, order: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """Sequential rule computed in parallel rounds (appendix D); no per-token host sync.

    In rank order, ``pred[i, j]`` says that ``j`` comes before ``i`` and lies within ``d_c``.
    A token is a non-center as soon as one predecessor is a center, and a center as soon as all
    its predecessors are decided non-centers. Each round decides at least the first undecided
    token, so the loop ends; usually after a few rounds.
    """
    n = order.shape[0]
    pred = adjacent[order][:, order].tril(diagonal=-1).float()
    is_center = torch.zeros(n, dtype=torch.bool, device=order.device)
    decided = torch.zeros(n, dtype=torch.bool, device=order.device)
    rounds = 0
    while True:
        for _ in range(check_every):
            counts = pred @ torch.stack([is_center, ~decided], dim=1).float()   # [n, 2]
            covered = counts[:, 0] > 0
            waiting = counts[:, 1] > 0
            new_center = ~decided & ~covered & ~waiting
            is_center |= new_center
            decided |= new_center | covered
            rounds += 1
        if bool(decided.all()) or rounds > n + check_every:
            break
    return order[is_center].sort().values


def _select(dist: torch.Tensor, order: torch.Tensor, cutoff: float, method: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centers [C], labels [n])``: the centers and the nearest center of every row."""
    if method == "auto":
        method = "rounds" if dist.is_cuda else "scan"
    if method == "scan":
        centers, labels = _centers_scan(dist.cpu(), order.cpu(), cutoff)
        return centers.to(dist.device), labels.to(dist.device)
    centers = _centers_rounds(dist <= cutoff, order)
    # dist is exactly symmetric, so the centers' rows (contiguous) serve as their columns;
    # argmin takes the first (lowest-index) center of a tie
    return centers, centers[dist.index_select(0, centers).argmin(dim=0)]


def dbdpc(
    keys: torch.Tensor,
    cutoff: float,
    *,
    pruned_keys: torch.Tensor | None = None,
    alpha: float = 1.5,
    density: str = "gaussian",
    dn: float = 2.0,
    method: str = "auto",
    timings: bool = False,
) -> Clusters:
    """Cluster ``keys`` with DBDPC and retrieve ``pruned_keys`` into the clusters.

    Args:
        keys: ``[n, d]`` (or ``[n, heads, head_dim]``, heads concatenated) keys of the kept tokens;
            any float dtype, computed in float32.
        cutoff: ``d_c >= 0``, the cut-off cosine distance.
        pruned_keys: ``[m, d]`` keys of the set-aside tokens, or ``None``.
        alpha: retrieval factor ``> 0``: a pruned row joins its nearest center iff within
            ``alpha * cutoff``.
        density: ``"gaussian"`` (reference) or ``"exponential"`` (paper eq. 6).
        dn: density scale ``d_n > 0``.
        method: center selection, ``"auto"``, ``"scan"`` or ``"rounds"`` (same result).
        timings: record per-phase seconds in ``Clusters.timings``.

    Returns:
        :class:`Clusters` with ``centers [C]`` and ``labels [n + m]``.
    """
    x = _check_keys("keys", keys)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not cutoff >= 0:
        raise ValueError(f"cutoff={cutoff!r} must be a number >= 0 (cosine distance; the paper uses 0.1-0.21)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0 (retrieval radius factor; the paper uses 1.5)")
    if density not in _DENSITIES:
        raise ValueError(f"density={density!r} is not one of {_DENSITIES}")
    if not dn > 0:
        raise ValueError(f"dn={dn!r} must be > 0 (the reference uses 2.0)")
    if method not in ("auto", "scan", "rounds"):
        raise ValueError(f"method={method!r} is not one of 'auto', 'scan', 'rounds'")
    p = None
    if pruned_keys is not None:
        p = _check_keys("pruned_keys", pruned_keys) if pruned_keys.shape[0] else pruned_keys.reshape(0, x.shape[1]).float()
        if p.shape[1] != x.shape[1]:
            raise ValueError(f"pruned_keys has dimension {p.shape[1]} but keys has {x.shape[1]}")
        if p.device != x.device:
            raise ValueError(f"pruned_keys is on {p.device} but keys is on {x.device}; move both to one device")

    clock = _Clock(x.is_cuda) if timings else None
    # on the CPU blocks of rows that stay in cache; on a GPU one block
    block = x.shape[0] if x.is_cuda else _CPU_BLOCK
    xn, dist, rho = _distances_and_density(x, density, dn, block, clock)
    order = torch.sort(rho, descending=True, stable=True).indices
    if clock:
        clock.lap("density", accumulate=True)
    centers, labels = _select(dist, order, cutoff, method)
    if clock:
        clock.lap("centers")

    if p is not None and p.shape[0]:
        pn = torch.nn.functional.normalize(p, dim=-1)
        # [C, m]: the GEMM runs faster with the longer side first; min takes the first of a tie
        to_pruned = _to_distances_(torch.mm(xn[centers], pn.T))
        nearest, which = to_pruned.min(dim=0)
        joined = torch.where(nearest <= alpha * cutoff, centers[which], torch.full_like(which, -1))
        labels = torch.cat([labels, joined])
    if clock:
        clock.lap("assign")
    return Clusters(centers=centers, labels=labels, timings=clock.laps if clock else {})


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.laps: dict[str, float] = {}
        self._sync()
        self._last = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def lap(self, name: str, accumulate: bool = False) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[name] = (self.laps.get(name, 0.0) if accumulate else 0.0) + now - self._last
        self._last = now
