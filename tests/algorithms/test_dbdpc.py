"""DBDPC: parity with the public reference implementation, properties, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pact_vlm
from pact_vlm.algorithms.dbdpc import _CPU_BLOCK, cosine_distances
from pact_vlm.algorithms.merge import merge_clusters

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "dbdpc_reference"
CASES = [c["file"] for c in json.loads((REFERENCE / "cases.json").read_text())]


# -- parity with the reference implementation ---------------------------------------------------

@pytest.mark.parametrize("method", ["scan", "rounds"])
@pytest.mark.parametrize("case", CASES)
def test_reference_parity(case, method):
    z = np.load(REFERENCE / case)
    x = torch.from_numpy(z["X"])
    n = int(z["n_kept"])
    clusters = pact_vlm.dbdpc(x[:n], float(z["cutoff"]), pruned_keys=x[n:] if x.shape[0] > n else None,
                              alpha=float(z["alpha"]), method=method)
    np.testing.assert_array_equal(clusters.centers.numpy(), z["centers"])
    np.testing.assert_array_equal(clusters.labels.numpy(), z["labels"])

    merged, sizes = merge_clusters(torch.from_numpy(z["H"]), clusters.labels, clusters.centers)
    np.testing.assert_allclose(merged.numpy(), z["merged"][z["mask"]], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sizes.numpy(), z["weights"][z["mask"]])
    np.testing.assert_array_equal(clusters.sizes.numpy(), z["weights"][z["mask"]])


# -- a brute-force sequential implementation, written independently -----------------------------

def brute_force(keys: np.ndarray, cutoff: float, pruned: np.ndarray | None, alpha: float,
                density: str = "gaussian", dn: float = 2.0):
    x = keys.astype(np.float32)
    n = x.shape[0]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    dist = np.maximum(0.0, 1.0 - xn @ xn.T).astype(np.float32)
    np.fill_diagonal(dist, 0.0)
    kernel = np.exp(-((dist / dn) ** 2)) if density == "gaussian" else np.exp(-dist / dn)
    rho = kernel.sum(axis=1)
    order = sorted(range(n), key=lambda i: (-rho[i], i))
    centers: list[int] = []
    for i in order:
        if all(dist[i, c] > cutoff for c in centers):
            centers.append(i)
    centers.sort()
    labels = [centers[int(np.argmin(dist[i, centers]))] for i in range(n)]
    decisive = [dist[~np.eye(n, dtype=bool)] - cutoff]          # gaps that decide the result
    if len(centers) > 1:
        two = np.sort(dist[:, centers], axis=1)[:, :2]
        decisive.append(two[:, 1] - two[:, 0])
    if pruned is not None:
        p = pruned.astype(np.float32)
        pn_norm = np.linalg.norm(p, axis=1, keepdims=True)
        pn = np.where(pn_norm > 0, p / np.maximum(pn_norm, 1e-12), 0.0).astype(np.float32)
        dp = np.maximum(0.0, 1.0 - pn @ xn[centers].T)
        decisive.append((dp.min(axis=1) - alpha * cutoff))
        if len(centers) > 1:
            two = np.sort(dp, axis=1)[:, :2]
            decisive.append(two[:, 1] - two[:, 0])
        for row in dp:
            j = int(np.argmin(row))
            labels.append(centers[j] if row[j] <= alpha * cutoff else -1)
    s = np.sort(rho)
    decisive.append(np.diff(s) / max(1.0, s.max()))
    margin = min((np.abs(g).min() for g in decisive if g.size), default=np.inf)
    return np.array(centers), np.array(labels), margin





@st.composite
def clustered_keys(draw):
    n = draw(st.integers(1, 60))
    m = draw(st.integers(0, 20))
    d = draw(st.sampled_from([2, 3, 8, 32]))
    n_groups = draw(st.integers(1, 6))
    spread = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_groups, d, generator=g)
    rows = centers[torch.randint(0, n_groups, (n + m,), generator=g)]
    rows = rows + spread * torch.randn(n + m, d, generator=g)
    if draw(st.booleans()):     # exact duplicates
        k = draw(st.integers(1, n))
        rows[:k] = rows[0]
    if draw(st.booleans()):     # zero vectors
        rows[draw(st.integers(0, n + m - 1))] = 0.0
    cutoff = draw(st.sampled_from([0.0, 0.05, 0.1, 0.21, 0.5, 1.0, 2.0]))
    return rows[:n], rows[n:], cutoff


@settings(max_examples=300, deadline=None)
@given(clustered_keys(), st.sampled_from(["scan", "rounds"]), st.sampled_from(["gaussian", "exponential"]))
def test_properties_and_brute_force(data, method, density):
    keys, pruned, cutoff = data
    clusters = pact_vlm.dbdpc(keys, cutoff, pruned_keys=pruned if len(pruned) else None,
                              alpha=1.5, density=density, method=method)
    n = keys.shape[0]
    centers, labels = clusters.centers, clusters.labels
    dist = cosine_distances(keys)

    # centers pairwise farther than d_c
    if centers.numel() > 1:
        dc = dist[centers][:, centers]
        off = ~torch.eye(centers.numel(), dtype=torch.bool)
        assert bool((dc[off] > cutoff).all())
    # every kept token in exactly one cluster, within d_c of its center; centers label themselves
    assert labels.shape == (n + len(pruned),)
    kept_labels = labels[:n]
    assert bool(torch.isin(kept_labels, centers).all())
    assert bool((dist[torch.arange(n), kept_labels] <= cutoff).all())
    assert bool((kept_labels[centers] == centers).all())
    # retrieved tokens within alpha * d_c of their center
    if len(pruned):
        joined = labels[n:] >= 0
        if joined.any():
            d_p = cosine_distances(pruned[joined], keys[labels[n:][joined]]).diagonal()
            assert bool((d_p <= 1.5 * cutoff + 1e-6).all())

    # Exact equality with the brute force wherever float rounding cannot decide the result
    # (every deciding comparison has a margin over 1e-4, as in the reference vectors).
    ref_centers, ref_labels, margin = brute_force(
        keys.numpy(), cutoff, pruned.numpy() if len(pruned) else None, 1.5, density)
    if margin > 1e-4:
        np.testing.assert_array_equal(centers.numpy(), ref_centers)
        np.testing.assert_array_equal(labels.numpy(), ref_labels)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.integers(0, 30), st.sampled_from([0.05, 0.2, 0.6]), st.integers(0, 2**31 - 1))
def test_equals_brute_force_on_well_separated_draws(n, m, cutoff, seed):
    """Random unit vectors in few dimensions: margins are large, the comparison is exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 6, generator=g)
    clusters = pact_vlm.dbdpc(x[:n], cutoff, pruned_keys=x[n:] if m else None)
    ref_centers, ref_labels, margin = brute_force(x[:n].numpy(), cutoff, x[n:].numpy() if m else None, 1.5)
    if margin > 1e-5:
        np.testing.assert_array_equal(clusters.centers.numpy(), ref_centers)
        np.testing.assert_array_equal(clusters.labels.numpy(), ref_labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    keys = (torch.randn(8, 64, generator=g).repeat(10, 1) + 0.2 * torch.randn(80, 64, generator=g))
    low = keys.to(dtype)
    got = pact_vlm.dbdpc(low, 0.3)
    want = pact_vlm.dbdpc(low.float(), 0.3)
    assert torch.equal(got.centers, want.centers) and torch.equal(got.labels, want.labels)
    assert got.centers.dtype == torch.long


def test_single_token_and_identical_tokens():
    one = pact_vlm.dbdpc(torch.randn(1, 4), 0.2)
    assert one.centers.tolist() == [0] and one.labels.tolist() == [0]
    same = pact_vlm.dbdpc(torch.ones(5, 3), 1e-6)
    assert same.centers.tolist() == [0] and same.labels.tolist() == [0] * 5


def test_headed_keys_are_concatenated():
    keys = torch.randn(30, 2, 8)
    a = pact_vlm.dbdpc(keys, 0.5)
    b = pact_vlm.dbdpc(keys.reshape(30, 16), 0.5)
    assert torch.equal(a.labels, b.labels)


def test_timings_cover_every_phase():
    clusters = pact_vlm.dbdpc(torch.randn(50, 8), 0.3, pruned_keys=torch.randn(10, 8), timings=True)
    assert set(clusters.timings) == {"distances", "density", "centers", "assign"}
    assert all(v >= 0 for v in clusters.timings.values())


@pytest.mark.parametrize("bad, match", [
    (dict(keys=torch.tensor([[float("nan"), 1.0]])), "NaN or inf"),
    (dict(keys=torch.tensor([[float("inf"), 1.0]])), "NaN or inf"),
    (dict(keys=torch.zeros(0, 4)), "empty"),
    (dict(cutoff=-0.1), "cutoff=-0.1"),
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(density="cosine"), "density='cosine'"),
    (dict(dn=0.0), "dn=0.0"),
    (dict(method="fast"), "method='fast'"),
    (dict(pruned_keys=torch.randn(3, 5)), "dimension 5"),
    (dict(pruned_keys=torch.tensor([[float("nan")] * 4])), "pruned_keys contains NaN"),
    (dict(keys=torch.randn(4)), "shape"),
])
def test_bad_input_is_refused(bad, match):
    kwargs = dict(keys=torch.randn(6, 4), cutoff=0.2)
    kwargs.update(bad)
    keys = kwargs.pop("keys")
    cutoff = kwargs.pop("cutoff")
    with pytest.raises(ValueError, match=match):
        pact_vlm.dbdpc(keys, cutoff, **kwargs)


def test_brute_force_comparison_is_not_vacuous():
    """The margin filter above must leave most random draws compared exactly."""
    compared = 0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 6, generator=g)
        compared += brute_force(x[:30].numpy(), 0.2, x[30:].numpy(), 1.5)[2] > 1e-5
    assert compared >= 40


@pytest.mark.parametrize("method", ["scan", "rounds"])
@pytest.mark.parametrize("d", [2, 32, 512])
def test_exact_duplicates_are_one_cluster_at_cutoff_zero(method, d):
    """Rounding of x̂·x̂ must not split duplicates (found by the property test: 5 copies of a row,
    d_c = 0, two of them centers)."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        row = torch.randn(d, generator=g)
        keys = torch.cat([row.expand(5, d), torch.randn(3, d, generator=g)])
        clusters = pact_vlm.dbdpc(keys, 0.0, method=method)
        assert int(torch.isin(clusters.centers, torch.arange(5)).sum()) == 1, seed
        assert bool((clusters.labels[:5] == clusters.labels[0]).all()), seed
        assert bool((cosine_distances(keys[:5]) == 0).all()), seed


# -- the CPU path with many centers (half the product, batched scan) ----------------------------

def _many_center_keys(n, m, d, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(groups, d, generator=g)
    x = centers[torch.randint(0, groups, (n + m,), generator=g)] + 0.35 * torch.randn(n + m, d, generator=g)
    return x[:n].contiguous(), x[n:].contiguous()


@pytest.mark.parametrize("n, block", [(1, 4), (7, 3), (600, 256), (513, 128)])
def test_blocked_distances_are_exactly_symmetric_and_match_the_full_product(n, block):
    from pact_vlm.algorithms.dbdpc import _distances_and_density

    keys, _ = _many_center_keys(n, 0, 64, 20)
    _, dist, rho = _distances_and_density(keys, "gaussian", 2.0, block, None)
    assert torch.equal(dist, dist.T)                     # a center's row stands for its column
    assert bool((dist.diagonal() == 0).all())
    torch.testing.assert_close(dist, cosine_distances(keys), atol=1e-6, rtol=0)
    want = torch.exp(-(cosine_distances(keys).double() / 2.0) ** 2).sum(dim=1)
    torch.testing.assert_close(rho.double(), want, atol=0, rtol=1e-5)


def _sequential(dist: torch.Tensor, order: torch.Tensor, cutoff: float):
    centers = []
    for i in order.tolist():
        if not centers or bool((dist[i, centers] > cutoff).all()):
            centers.append(i)
    centers = torch.tensor(sorted(centers))
    return centers, centers[dist[:, centers].argmin(dim=1)]


@pytest.mark.parametrize("batch", [1, 2, 5, 64, 1000])
@pytest.mark.parametrize("cutoff", [0.0, 0.1, 0.21, 2.0])
def test_batched_scan_is_the_sequential_rule_on_the_same_distances(batch, cutoff):
    """Same distance matrix, so the comparison is exact whatever the margins (ties included)."""
    from pact_vlm.algorithms.dbdpc import _centers_scan, _distances_and_density

    keys, _ = _many_center_keys(300, 0, 32, 60, seed=1)
    keys[10:15] = keys[3]                                 # duplicates: ties in distance and density
    _, dist, rho = _distances_and_density(keys, "gaussian", 2.0, 64, None)
    order = torch.sort(rho, descending=True, stable=True).indices
    centers, labels = _centers_scan(dist, order, cutoff, batch=batch)
    want_centers, want_labels = _sequential(dist, order, cutoff)
    assert torch.equal(centers, want_centers) and torch.equal(labels, want_labels)
    if cutoff == 0.1:
        assert centers.numel() > 100                      # the many-centers regime


def test_distance_product_is_computed_once_per_pair(monkeypatch):
    """Half of x̂ x̂ᵀ (the blocks on and below the diagonal) plus the retrieval product, no more."""
    calls = []
    mm = torch.mm

    def counting_mm(a, b, **kwargs):
        calls.append(a.shape[0] * a.shape[1] * b.shape[1])
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", counting_mm)
    n, m, d = 1024, 200, 64
    keys, pruned = _many_center_keys(n, m, d, 300)
    clusters = pact_vlm.dbdpc(keys, 0.1, pruned_keys=pruned)
    c = clusters.centers.numel()
    block = _CPU_BLOCK
    lower = sum((n - r0) * min(block, n - r0) for r0 in range(0, n, block)) * d
    assert sum(calls) == lower + c * m * d
    assert lower < 0.65 * n * n * d


@pytest.mark.slow
def test_many_centers_cost_at_most_1_5x_the_bare_product():
    """2400 kept + 600 pruned keys, d = 512, cut-off 0.1 (about 1300 centers), as in
    benchmarks/dbdpc_speed.py: the median per-repeat ratio to ``normalize(X) @ normalize(X).T``."""
    import importlib.util
    import statistics
    import time

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "dbdpc_speed.py"
    spec = importlib.util.spec_from_file_location("dbdpc_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    case = bench.CASES["many centers"]
    kept, pruned = bench._keys(2400, 600, 512, 400, case["noise"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the committed result; no oversubscription on a shared machine
    try:
        ratios = []
        for i in range(12):
            t0 = time.perf_counter()
            xn = torch.nn.functional.normalize(kept, dim=-1)
            xn @ xn.T
            t1 = time.perf_counter()
            clusters = pact_vlm.dbdpc(kept, case["cutoff"], pruned_keys=pruned)
            t2 = time.perf_counter()
            if i >= 2:
                ratios.append((t2 - t1) / (t1 - t0))
    finally:
        torch.set_num_threads(threads)
    assert clusters.centers.numel() > 1000
    assert statistics.median(ratios) <= 1.5, ratios
