"""VisionZip's dominant / contextual split and merge on tensors whose answer is known."""

from __future__ import annotations

import pytest
import torch

from pact_vlm.algorithms import baselines as bl


@pytest.mark.parametrize("p, keep_ratio, want", [
    (576, 64 / 576, (54, 10)), (576, 128 / 576, (108, 20)), (576, 192 / 576, (162, 30)),   # the paper's settings
    (10, 0.5, (4, 1)), (10, 0.0, (0, 0)), (3, 1.0, (3, 0))])
def test_counts_split_the_budget_as_the_paper(p, keep_ratio, want):
    assert bl.visionzip_counts(p, keep_ratio, 10 / 64) == want


def test_dominant_tokens_are_the_most_attended_and_targets_are_evenly_spaced():
    attn = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.7])
    # metric: tokens 0, 2, 3 point along x, 5-8 along y
    metric = torch.tensor([[1.0, 0], [0, 0], [1, 0.1], [1, -0.1], [0, 0], [0, 1], [0.1, 1], [-0.1, 1],
                           [0.2, 1], [0, 0]])
    labels = bl.visionzip_labels(attn, metric, dominant=3, contextual=2)
    # dominant 1, 4, 9; remaining 0 2 3 5 6 7 8 (R = 7): step 3 -> targets 0 and 5; 2, 3 join 0, the rest 5
    assert labels.tolist() == [0, 1, 0, 0, 4, 5, 5, 5, 5, 9]
    assert bl.visionzip_labels(attn, metric, 3, 0).tolist() == [-1, 1, -1, -1, 4, -1, -1, -1, -1, 9]


def test_contextual_tokens_are_the_means_of_their_groups():
    attn = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    metric = torch.tensor([[1.0, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [0, 1]])
    features = torch.arange(10, dtype=torch.float32).view(5, 2)
    red = bl.visionzip_reduce(features, attn, metric, keep_ratio=0.6, contextual_share=0.67)   # 1 dominant + 2
    # dominant 1; remaining 0 2 3 4: step 2 -> targets 0 and 3; 2 joins 0, 4 joins 3
    assert red.keep_index.tolist() == [0, 1, 3] and red.labels.tolist() == [0, 1, 0, 3, 3]
    torch.testing.assert_close(red.hidden, torch.stack([(features[0] + features[2]) / 2, features[1],
                                                        (features[3] + features[4]) / 2]))
    assert red.sizes.tolist() == [2.0, 1.0, 2.0]


def test_ties_go_to_the_earlier_token_and_bad_counts_are_refused():
    labels = bl.visionzip_labels(torch.zeros(6), torch.ones(6, 2), dominant=2, contextual=2)
    assert labels.tolist() == [0, 1, 2, 2, 4, 2]           # targets 2, 4 (step 2); 3 and 5 tie: target 2
    with pytest.raises(ValueError, match="dominant=4 \\+ contextual=3 tokens"):
        bl.visionzip_labels(torch.zeros(6), torch.ones(6, 2), 4, 3)


def test_mean_attention_received_averages_each_heads_softmax_over_queries_then_sums_heads():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    got = bl.mean_attention_received(q, k, heads=3)
    want = torch.zeros(2, 5)
    for v in range(2):
        for h in range(3):
            qh, kh = q[v, :, 2 * h:2 * h + 2], k[v, :, 2 * h:2 * h + 2]
            probs = torch.softmax(qh @ kh.T / 2 ** 0.5, dim=-1)      # row: one query over the 5 keys
            want[v] += probs.mean(dim=0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(dim=1), torch.full((2,), 3.0))   # each head hands out one unit
    # a key every query attends to strongly receives the most
    k2 = k.clone()
    k2[0, 3] = 10 * q[0].mean(dim=0)
    assert int(bl.mean_attention_received(q, k2, heads=1)[0].argmax()) == 3
    with pytest.raises(ValueError, match="divisible by heads=4"):
        bl.mean_attention_received(q, k, heads=4)
