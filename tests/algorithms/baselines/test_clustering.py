"""The clustering alternatives satisfy their own definitions on small hand-checkable inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from pact_vlm.algorithms import baselines as bl
from pact_vlm.algorithms.dbdpc import cosine_distances


def _line(points):
    """Points on a line, as a 1-D distance matrix |x_i - x_j|."""
    x = torch.tensor(points, dtype=torch.float64)
    return (x[:, None] - x[None, :]).abs()


def _partition(ids):
    return sorted(sorted(i for i in range(len(ids)) if ids[i] == c) for c in set(ids.tolist()))


def _brute_agglomerative(dist, k, linkage):
    """Textbook agglomerative clustering: recompute every cluster distance at every step."""
    clusters = [[i] for i in range(dist.shape[0])]
    agg = {"single": min, "complete": max, "average": lambda v: sum(v) / len(v)}[linkage]
    while len(clusters) > k:
        best = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            d = agg([float(dist[i, j]) for i in clusters[a] for j in clusters[b]])
            if best is None or d < best[0]:
                best = (d, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return sorted(sorted(c) for c in clusters)


# -- agglomerative -----------------------------------------------------------------------------------

def test_agglomerative_linkages_differ_as_defined_on_a_line():
    dist = _line([0, 1, 2, 3.5, 6, 6.4])
    # all linkages: (6, 6.4) at 0.4, then (0, 1) at 1 (tie with (1, 2): the lower pair first)
    # single: {0,1}-2 is 1 -> {0,1,2}; complete: {0,1}-2 is 2 > 2-3.5 = 1.5 -> {2,3.5};
    # average: {0,1}-2 is 1.5 = 2-3.5 -> tie, the pair with the lower index ({0,1}, 2) wins
    assert _partition(bl.agglomerative(dist, 3, "single")) == [[0, 1, 2], [3], [4, 5]]
    assert _partition(bl.agglomerative(dist, 3, "complete")) == [[0, 1], [2, 3], [4, 5]]
    assert _partition(bl.agglomerative(dist, 3, "average")) == [[0, 1, 2], [3], [4, 5]]
    # single linkage chains: 2-3.2-4.2 (gaps 1.2, 1.0) beat 0-2 (2.0); complete pairs 0 with 2 (2.0)
    # rather than joining 2 to {3.2, 4.2} (2.2)
    dist = _line([0, 2, 3.2, 4.2, 7.5, 8])
    assert _partition(bl.agglomerative(dist, 3, "single")) == [[0], [1, 2, 3], [4, 5]]
    assert _partition(bl.agglomerative(dist, 3, "complete")) == [[0, 1], [2, 3], [4, 5]]
    assert _partition(bl.agglomerative(dist, 1, "average")) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="linkage='ward'"):
        bl.agglomerative(dist, 2, "ward")


@pytest.mark.parametrize("linkage", bl.agglomerative.__globals__["LINKAGES"])
@pytest.mark.parametrize("seed", range(4))
def test_agglomerative_equals_the_textbook_algorithm(linkage, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(14, 5, generator=g)
    dist = cosine_distances(x).double()
    for k in (1, 3, 6, 14):
        ids = bl.agglomerative(dist, k, linkage)
        assert ids.unique().numel() == k
        assert _partition(ids) == _brute_agglomerative(dist, k, linkage)
        # ids are numbered by first member
        firsts = [int(torch.nonzero(ids == c)[0]) for c in range(k)]
        assert firsts == sorted(firsts)


def test_agglomerative_reduce_keeps_the_member_closest_to_the_mean():
    keys = torch.tensor([[1.0, 0.0], [0.95, 0.31], [0.9, 0.2], [-1.0, 0.05], [-1.0, -0.05]])
    hidden = torch.arange(10.0).view(5, 2)
    red = bl.agglomerative_reduce(hidden, keys, 0.4, "average")          # ceil(2) clusters
    assert red.labels.tolist() == [2, 2, 2, 3, 3]      # [0.9, 0.2] is the closest to its cluster's mean
    assert red.keep_index.tolist() == [2, 3]
    torch.testing.assert_close(red.hidden, torch.stack([hidden[:3].mean(0), hidden[3:].mean(0)]))
    assert red.sizes.tolist() == [3.0, 2.0]


# -- k-means -----------------------------------------------------------------------------------------

def test_kmeans_finds_well_separated_blobs_and_is_a_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(7, 2, generator=g) for c in centers])
    assign, centroids = bl.kmeans(x, 3, seed=1)
    assert _partition(assign) == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    # fixed point: nearest centroid for every point, centroid = mean of its points
    d = torch.cdist(x, centroids)
    assert torch.equal(d.argmin(1), assign)
    for c in range(3):
        torch.testing.assert_close(centroids[c], x[assign == c].mean(0))


def test_kmeans_uses_every_cluster_and_is_seeded():
    x = torch.tensor([[0.0], [0.0], [0.0], [1.0], [5.0]])         # duplicates: k-means++ falls back
    assign, _ = bl.kmeans(x, 4, seed=0)
    assert assign.unique().numel() == 4
    g = torch.Generator().manual_seed(3)
    y = torch.randn(30, 4, generator=g)
    a1, _ = bl.kmeans(y, 5, seed=7)
    a2, _ = bl.kmeans(y, 5, seed=7)
    assert torch.equal(a1, a2)
    with pytest.raises(ValueError, match="k=6 must be in"):
        bl.kmeans(x, 6)


def test_kmeans_reduce_keeps_the_member_closest_to_the_centroid():
    keys = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.3, 0.0], [10.0, 0.0], [10.4, 0.0]])
    hidden = torch.arange(5.0)[:, None]
    red = bl.kmeans_reduce(hidden, keys, 0.4, seed=0)              # k = 2
    # centroids 0.1667 and 10.2: closest members 1 (0.2) and 3 (10.0, tie with 10.4 -> earlier)
    assert red.keep_index.tolist() == [1, 3]
    assert red.labels.tolist() == [1, 1, 1, 3, 3]
    torch.testing.assert_close(red.hidden[:, 0], torch.tensor([1.0, 3.5]))


# -- DPC ---------------------------------------------------------------------------------------------

def test_dpc_centers_are_the_largest_rho_times_delta_and_points_follow_their_nearest_denser():
    dist = _line([0.0, 0.1, 0.2, 3.0, 3.1, 4.5])
    dc = 0.5
    centers, labels = bl.dpc(dist, 2, dc)
    rho = torch.exp(-(dist.float() / dc) ** 2).sum(1)
    # by hand: the two dense groups' peaks (index 1 and one of 3/4) have the largest rho * delta
    order = sorted(range(6), key=lambda i: (-float(rho[i]), i))
    delta = []
    for i in range(6):
        earlier = order[: order.index(i)]
        delta.append(float("inf") if not earlier else min(float(dist[i, j]) for j in earlier))
    gamma = [float(rho[i]) * delta[i] for i in range(6)]
    want = sorted(sorted(range(6), key=lambda i: (-gamma[i], i))[:2])
    assert centers.tolist() == want == [1, 4]       # 3.1 is denser than 3.0 (4.5 is nearer)
    # every non-center takes the label of its nearest denser point
    for i in range(6):
        if i in want:
            assert labels[i] == i
        else:
            earlier = order[: order.index(i)]
            parent = min(earlier, key=lambda j: (float(dist[i, j]), j))
            assert labels[i] == labels[parent]
    assert labels.tolist() == [1, 1, 1, 4, 4, 4]


def test_dpc_reduce_merges_at_the_centers():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0]])
    hidden = torch.arange(8.0).view(4, 2)
    red = bl.dpc_reduce(hidden, keys, 0.5, dc=0.5)
    assert red.num_after == 2 and set(red.labels.tolist()) == set(red.keep_index.tolist())
    assert red.labels[0] == red.labels[1] != red.labels[2] == red.labels[3]


# -- DBSCAN ------------------------------------------------------------------------------------------

def test_dbscan_core_border_and_noise():
    # 0 0.1 0.2 0.3 form a chain of cores (eps 0.15, min_samples 3); 0.42 is a border of 0.3;
    # 5.0 5.1 have 2 neighbours each (not core) -> noise; 9 is noise
    dist = _line([0.0, 0.1, 0.2, 0.3, 0.42, 5.0, 5.1, 9.0])
    cluster, core = bl.dbscan(dist, 0.15, 3)
    assert core.tolist() == [False, True, True, True, False, False, False, False]
    # 0.0 is within eps of the core 0.1 -> border; 0.42 border of 0.3
    assert cluster.tolist() == [0, 0, 0, 0, 0, -1, -1, -1]
    cluster, core = bl.dbscan(dist, 0.15, 2)
    assert cluster.tolist() == [0, 0, 0, 0, 0, 1, 1, -1]
    # two core chains that do not touch are two clusters
    cluster, _ = bl.dbscan(_line([0.0, 0.1, 0.2, 1.0, 1.1, 1.2]), 0.15, 2)
    assert cluster.tolist() == [0, 0, 0, 1, 1, 1]


def test_dbscan_reduce_keeps_or_drops_noise_and_merges_at_the_best_connected_member():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.02], [1.0, -0.02], [0.0, 1.0]])
    hidden = torch.arange(8.0).view(4, 2)
    kept = bl.dbscan_reduce(hidden, keys, eps=0.01, min_samples=2, noise="keep")
    # 0 has two neighbours within eps, 1 and 2 one each (their mutual distance is larger)
    assert kept.labels.tolist() == [0, 0, 0, 3]
    assert kept.keep_index.tolist() == [0, 3] and kept.sizes.tolist() == [3.0, 1.0]
    dropped = bl.dbscan_reduce(hidden, keys, eps=0.01, min_samples=2, noise="drop")
    assert dropped.labels.tolist() == [0, 0, 0, -1] and dropped.keep_index.tolist() == [0]


# -- pooling -----------------------------------------------------------------------------------------

def test_pooling_windows_on_a_grid_and_views_never_mix():
    # one 3x3 view and one 2x2 view
    grid = torch.tensor([[0, r, c] for r in range(3) for c in range(3)] + [[1, r, c] for r in range(2) for c in range(2)])
    labels = bl.pool_labels(grid, 2)
    assert labels.tolist() == [0, 0, 2, 0, 0, 2, 6, 6, 8, 9, 9, 9, 9]
    hidden = torch.arange(13.0)[:, None]
    red = bl.pool_reduce(hidden, grid, 2)
    assert red.keep_index.tolist() == [0, 2, 6, 8, 9]
    assert red.sizes.tolist() == [4.0, 2.0, 2.0, 1.0, 4.0]
    torch.testing.assert_close(red.hidden[:, 0], torch.tensor([2.0, 3.5, 6.5, 8.0, 10.5]))
    assert bl.pool_labels(grid, 1).tolist() == list(range(13))
