"""The attention of reduced layers, without a model: visibility rules and every backend's form of the bias."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from pact_vlm.integration.attention import KeyLayout, attend, check_backend, is_plain_causal, visible, with_bias_column


def _reference_allowed(layout: KeyLayout) -> torch.Tensor:
    """Visibility by the rules, one pair at a time (independent of the vectorised code)."""
    b, q = layout.q_pos.shape
    k = layout.kv_pos.shape[1]
    out = torch.zeros(b, q, k, dtype=torch.bool)
    for i in range(b):
        for r in range(q):
            qp = int(layout.q_pos[i, r])
            for c in range(k):
                kp = int(layout.kv_pos[i, c])
                if qp < 0 or kp < 0 or (layout.kv_real is not None and not bool(layout.kv_real[i, c])):
                    continue
                ok = kp <= qp
                if layout.q_group is not None:
                    g = int(layout.q_group[i, r])
                    ok = ok or (g >= 0 and g == int(layout.kv_group[i, c]))
                if layout.window is not None:
                    ok = ok and qp - kp < layout.window
                out[i, r, c] = ok
            if not out[i, r].any():
                out[i, r] = True
    return out


def _reference_attention(query, key, value, layout, scaling):
    """softmax(q·k·scale + log(size), visibility) @ v in float64 with a dense float mask."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(n_rep, 1).double(), value.repeat_interleave(n_rep, 1).double()
    scores = query.double() @ k.transpose(2, 3) * scaling
    if layout.kv_logsize is not None:
        scores = scores + layout.kv_logsize.double()[:, None, None, :]
    scores = scores.masked_fill(~_reference_allowed(layout)[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _layout(kind: str, g: torch.Generator) -> KeyLayout:
    b, q = 2, 7
    if kind == "prefill":                         # an unpadded reduced prefill: rows are the keys
        pos = torch.tensor([[0, 1, 2, 5, 9, 10, 11], [0, 2, 3, 4, 6, 7, 8]])
        return KeyLayout(pos, pos.clone(), kv_logsize=torch.rand(b, q, generator=g))
    if kind == "decode":
        kv = torch.tensor([[0, 1, 4, 6, 7, 8, 12, 13], [0, 1, 2, 3, 5, 9, 12, 13]])
        return KeyLayout(torch.tensor([[13], [13]]), kv, kv_logsize=torch.rand(b, 8, generator=g))
    if kind == "packed":                          # a re-packed batch: slots at -1, left padding
        pos = torch.tensor([[-1, -1, 3, 4, 7, 8, 9], [0, 1, 2, 5, 6, 8, 10]])
        real = torch.ones(b, q, dtype=torch.bool)
        real[1, :2] = False
        return KeyLayout(pos, pos.clone(), kv_real=real, kv_logsize=torch.rand(b, q, generator=g))
    if kind == "window":
        pos = torch.tensor([[0, 1, 2, 5, 9, 10, 11], [0, 2, 3, 4, 6, 7, 8]])
        return KeyLayout(pos, pos.clone(), kv_logsize=torch.rand(b, q, generator=g), window=4)
    if kind == "blocks":                          # two images attend inside themselves both ways
        pos = torch.tensor([[0, 1, 2, 5, 9, 10, 11], [0, 2, 3, 4, 6, 7, 8]])
        group = torch.tensor([[-1, 0, 0, 0, -1, 1, 1], [-1, -1, 0, 0, 0, -1, -1]])
        return KeyLayout(pos, pos.clone(), kv_logsize=torch.rand(b, q, generator=g), q_group=group,
                         kv_group=group.clone(), window=5)
    if kind == "chunk":                           # a second turn after a cache: q < K
        kv = torch.tensor([[0, 3, 4, 7, 8, 9, 10, 11, 12], [1, 2, 3, 5, 8, 9, 10, 11, 12]])
        return KeyLayout(kv[:, -4:].clone(), kv, kv_logsize=torch.rand(b, 9, generator=g))
    raise ValueError(kind)


KINDS = ["prefill", "decode", "packed", "window", "blocks", "chunk"]


@pytest.mark.parametrize("kind", KINDS)
def test_visible_follows_the_rules_on_original_positions(kind):
    layout = _layout(kind, torch.Generator().manual_seed(0))
    assert torch.equal(visible(layout), _reference_allowed(layout))


def test_plain_causal_is_recognised_only_where_no_mask_is_needed():
    g = torch.Generator().manual_seed(0)
    plain = {kind: is_plain_causal(_layout(kind, g)) for kind in KINDS}
    assert plain == {"prefill": True, "decode": True, "packed": False, "window": False, "blocks": False,
                     "chunk": True}
    # a window wider than every span cuts nothing: still plain
    wide = _layout("window", g)
    wide.window = 100
    assert is_plain_causal(wide)


def test_bias_column_adds_exactly_the_log_size():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    logsize = torch.rand(2, 6, generator=g) * 4
    q2, k2, v2 = with_bias_column(q, k, v, logsize, scaling=0.25)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 24          # 17 padded to a multiple of 8
    got = (q2[:, :2] @ k2[:, :1].transpose(2, 3)) * 0.25
    want = (q[:, :2] @ k[:, :1].transpose(2, 3)) * 0.25 + logsize[:, None, None, :]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(v2[..., :16], v) and not v2[..., 16:].any()


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_equals_the_dense_mask_reference(kind, backend):
    g = torch.Generator().manual_seed(2)
    layout = _layout(kind, g)
    b, q = layout.q_pos.shape
    k = layout.kv_pos.shape[1]
    query = torch.randn(b, 4, q, 16, generator=g)
    key, value = torch.randn(b, 2, k, 16, generator=g), torch.randn(b, 2, k, 16, generator=g)
    out, _ = attend(backend, query, key, value, layout, scaling=0.25)
    want = _reference_attention(query, key, value, layout, 0.25).float()
    valid = layout.q_pos >= 0          # rows that are no token: any output
    torch.testing.assert_close(out[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_no_float_mask_reaches_sdpa_where_visibility_is_plain(monkeypatch):
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(3)
    for kind, causal in (("prefill", True), ("decode", False)):
        layout = _layout(kind, g)
        b, q = layout.q_pos.shape
        k = layout.kv_pos.shape[1]
        attend("sdpa", torch.randn(b, 4, q, 16), torch.randn(b, 2, k, 16), torch.randn(b, 2, k, 16), layout, scaling=0.25)
        assert seen[-1] == (None, causal)
    attend("sdpa", torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16), _layout("packed", g),
           scaling=0.25)
    assert seen[-1][0].dtype == torch.bool and seen[-1][1] is False


def _fake_flash_module():
    """A pure-torch stand-in for the flash-attn kernels (bottom-right causal, varlen), to test our
    use of their interface on a machine without the package."""
    def dense(q, k, v, scale, causal):       # [L, H, d]
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
        if causal:
            lq, lk = q.shape[0], k.shape[0]
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)

    def flash_attn_func(q, k, v, softmax_scale, causal, **kw):
        return torch.stack([dense(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, **kw):
        parts = [dense(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]], softmax_scale, causal)
                 for i in range(len(cu_q) - 1)]
        return torch.cat(parts)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


@pytest.mark.parametrize("kind", ["prefill", "decode", "packed", "chunk"])
def test_flash_form_equals_the_reference_with_a_stand_in_kernel(kind, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    g = torch.Generator().manual_seed(4)
    layout = _layout(kind, g)
    b, q = layout.q_pos.shape
    k = layout.kv_pos.shape[1]
    query = torch.randn(b, 4, q, 16, generator=g)
    key, value = torch.randn(b, 2, k, 16, generator=g), torch.randn(b, 2, k, 16, generator=g)
    out, _ = attend("flash_attention_2", query, key, value, layout, scaling=0.25)
    want = _reference_attention(query, key, value, layout, 0.25).float()
    valid = layout.q_pos >= 0           # padding rows (kv_real False) attend to nothing there: any output
    if layout.kv_real is not None:
        valid &= layout.kv_real[:, k - q:]
    torch.testing.assert_close(out[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_flash_refuses_what_it_cannot_express(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    g = torch.Generator().manual_seed(5)
    for kind, match in (("window", "sliding window counts original positions"), ("blocks", "bidirectional")):
        layout = _layout(kind, g)
        if kind == "blocks":
            layout.window = None
        with pytest.raises(ValueError, match=match):
            attend("flash_attention_2", torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16),
                   layout, scaling=0.25)
    with pytest.raises(ValueError, match="head dim 256 leaves no room"):
        layout = _layout("prefill", g)
        attend("flash_attention_2", torch.randn(2, 4, 7, 256), torch.randn(2, 2, 7, 256), torch.randn(2, 2, 7, 256),
               layout, scaling=0.25)


def test_backends_are_checked_with_the_fix_in_the_message():
    check_backend("sdpa")
    with pytest.raises(ValueError, match=r"'flash_attention_3' needs the 'flash_attn_interface' package"):
        check_backend("flash_attention_3")
    with pytest.raises(ValueError, match=r"'paged\|eager' is not supported with a reduction"):
        check_backend("paged|eager")
