"""Checks of the tiny random-weight VLMs in ``tiny_models`` (every arch x attention backend)."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_models as tm  # noqa: E402

BACKENDS = ["sdpa", "eager"]


def _warm(arch: str) -> None:
    # transformers imports model modules lazily; keep that one-off import out of the build timing
    tm.model_class(arch)
    tm.tiny_config(arch)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_build_forward_generate(arch, attn):
    _warm(arch)
    t0 = time.perf_counter()
    model = tm.build_tiny(arch, attn)
    build_s = time.perf_counter() - t0
    assert build_s < 2.0, f"building {arch} took {build_s:.2f}s"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == attn
    assert model.config.get_text_config()._attn_implementation == attn
    layers = tm.decoder_layers(model)
    text_model = model.model.text_model if arch in tm.TILED_ARCHS else model.model.language_model
    assert layers is text_model.layers
    assert len(layers) == tm.NUM_LAYERS.get(arch, 4)
    for name in tm.VISUAL_TOKEN_IDS[arch]:
        assert isinstance(getattr(model.config, name), int)

    for batch in (1, 2):
        inputs = tm.make_inputs(model, arch, batch=batch)
        ids = inputs["input_ids"]
        n_vis = tm.visual_token_mask(model, ids).sum(-1)
        assert ((n_vis > 16) & (n_vis <= 200)).all(), n_vis
        if batch == 2:
            assert (inputs["attention_mask"] == 0).any(), "batch 2 should be left-padded"
            assert (inputs["attention_mask"][:, -1] == 1).all()
        with torch.no_grad():
            out = model(**inputs)
            assert out.logits.shape == (*ids.shape, tm.VOCAB)
            assert torch.isfinite(out.logits).all()
            gen = model.generate(**inputs, max_new_tokens=3)
        assert gen.shape == (batch, ids.shape[1] + 3)
        assert torch.equal(gen[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_sdpa_matches_eager(arch):
    models = {attn: tm.build_tiny(arch, attn) for attn in BACKENDS}
    inputs = tm.make_inputs(models["sdpa"], arch, batch=2)
    with torch.no_grad():
        logits = {attn: m(**inputs).logits for attn, m in models.items()}
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits["sdpa"][valid], logits["eager"][valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", tm.VIDEO_ARCHS)
def test_video(arch, attn):
    model = tm.build_tiny(arch, attn)
    for with_image in (True, False):
        inputs = tm.make_inputs(model, arch, batch=2, video=True, with_image=with_image)
        ids = inputs["input_ids"]
        assert (ids == model.config.video_token_id).sum(-1).min() > 16
        with torch.no_grad():
            out = model(**inputs)
            assert torch.isfinite(out.logits).all()
            gen = model.generate(**inputs, max_new_tokens=3)
        assert gen.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_mixed_batch(arch):
    """Different image sizes, a sample without image, a sample with two images; left padding."""
    model = tm.build_tiny(arch, "eager")
    sizes = tm.DEFAULT_IMAGE_SIZES[arch]
    image_sizes = [sizes[0], None, [sizes[-1], sizes[0]]]
    inputs = tm.make_inputs(model, arch, batch=3, image_sizes=image_sizes)
    n_vis = tm.visual_token_mask(model, inputs["input_ids"]).sum(-1)
    assert n_vis[1] == 0 and n_vis[0] > 16 and n_vis[2] > 16
    with torch.no_grad():
        out = model(**inputs)
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inputs, max_new_tokens=3)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_no_image_at_all():
    for arch in tm.ARCHS:
        model = tm.build_tiny(arch)
        inputs = tm.make_inputs(model, arch, batch=2, with_image=False)
        assert "pixel_values" not in inputs
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)


def _layer0_input(model, inputs) -> torch.Tensor:
    seen = {}

    def hook(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    h = tm.decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["h"]


@pytest.mark.parametrize(
    "arch,kwargs,aspect",
    [
        ("llava_next", dict(batch=2), None),
        ("llava_next", dict(batch=3, image_sizes=[(40, 60), None, [(30, 90), (60, 40)]]), None),
        ("llava_onevision", dict(batch=2), None),
        ("llava_onevision", dict(batch=2), "anyres_max_1"),  # exercises the bilinear down-scaling branch
        ("llava_onevision", dict(batch=3, image_sizes=[(40, 60), None, [(30, 90), (60, 40)]]), None),
        ("llava_onevision", dict(batch=2, video=True), None),
        ("llava_onevision", dict(batch=2, video=True, with_image=False), None),
    ],
)
def test_anyres_token_kinds_match_model(arch, kwargs, aspect):
    """Placeholders ``image_token_kinds`` calls 'newline' hold exactly ``image_newline``; the others do not."""
    model = tm.build_tiny(arch, "sdpa")
    if aspect is not None:
        model.config.vision_aspect_ratio = aspect
    inputs = tm.make_inputs(model, arch, **kwargs)
    kinds = tm.image_token_kinds(model, arch, inputs)
    counts = [Counter(k) for k in kinds]
    if aspect == "anyres_max_1":
        # 1x2/2x1 tiles of 4x4 -> unpadded 4x6 / 6x4 grid, scaled by 1/sqrt(1.5)
        assert all(c["tile"] < 20 for c in counts)
    h = _layer0_input(model, inputs)
    newline = model.model.image_newline.detach()
    vis = tm.visual_token_mask(model, inputs["input_ids"])
    for b, ks in enumerate(kinds):
        is_nl = torch.tensor([k == "newline" for k in ks])
        assert (is_nl <= vis[b]).all(), "newlines are placeholders"
        assert int(vis[b].sum()) == sum(v for k, v in counts[b].items() if k not in ("text", "pad"))
        eq = (h[b] == newline).all(-1)
        assert torch.equal(eq & vis[b], is_nl), (b, eq.nonzero().flatten().tolist(), is_nl.nonzero().flatten().tolist())


def test_qwen_placeholder_count_matches_grid():
    for arch in (a for a in tm.QWEN_ARCHS if a in tm.VIDEO_ARCHS):   # the others are covered by their own tests
        model = tm.build_tiny(arch)
        inputs = tm.make_inputs(model, arch, batch=2, video=True)
        m = model.config.vision_config.spatial_merge_size
        n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
        n_vid = int((inputs["input_ids"] == model.config.video_token_id).sum())
        assert n_img == int(inputs["image_grid_thw"].prod(-1).sum()) // m**2
        assert n_vid == int(inputs["video_grid_thw"].prod(-1).sum()) // m**2
        assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_decoder_layer_call_convention(arch, attn):
    """Pins what a forward pre-hook (with_kwargs=True) on a text decoder layer receives in transformers 5.24."""
    from transformers import DynamicCache

    model = tm.build_tiny(arch, attn)
    layers = tm.decoder_layers(model)
    calls = []

    def hook(mod, args, kwargs):
        calls.append((mod, args, dict(kwargs)))

    hs = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    inputs = tm.make_inputs(model, arch, batch=2)
    B, S = inputs["input_ids"].shape
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)
    finally:
        for h in hs:
            h.remove()
    assert len(calls) == 2 * len(layers)  # prefill + one decode step
    head_dim = next(layer.self_attn.head_dim for layer in layers if hasattr(layer, "self_attn"))
    # Gemma 4: in prefill, generate keeps only the last row from the first KV-shared layer on
    first_shared = len(layers) - tm.GEMMA4_SHARED if arch == "gemma4" else len(layers)
    for step, s_q in ((0, S), (1, 1)):
        for i in range(len(layers)):
            q = 1 if i >= first_shared else s_q
            mod, args, kw = calls[step * len(layers) + i]
            assert mod is layers[i]
            if arch == "gemma4":        # the per-layer input follows the hidden states, by position too
                assert len(args) == 2 and args[1].shape == (B, q, 8)
                head_dim = mod.self_attn.head_dim      # full layers: a wider head
                assert head_dim == (2 * tm.HEAD_DIM if mod.self_attn.layer_type == "full_attention" else tm.HEAD_DIM)
            else:
                assert len(args) == 1
            assert args[0].shape == (B, q, tm.HIDDEN)  # hidden_states: positional
            other = ({"cache", "past_key_values"} - {tm.CACHE_KWARG}).pop()
            assert other not in kw and "cache_position" not in kw
            assert isinstance(kw[tm.CACHE_KWARG], DynamicCache)
            cos, sin = kw["position_embeddings"]
            rotary = head_dim // 2 if arch in ("glm4v",) + tm.HYBRID_ARCHS else head_dim     # partial rotary
            assert cos.shape == sin.shape == (B, q, rotary)  # M-RoPE already folded into (B, q, head_dim)
            # generate passes 1-D text positions (Qwen: row 0 of 4); Gemma 4 leaves them unsliced
            assert kw["position_ids"].shape == (B, s_q)
            mask = kw["attention_mask"]  # padded batch: 4-D mask over the full (layer-0) cache length
            kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
            if i < len(kinds) and kinds[i] == "linear_attention":   # Qwen3.5: a 2-D 0/1 padding mask, or none
                assert mask is None or (step == 0 and mask.shape == (B, q))
                continue
            window = getattr(model.config.get_text_config(), "sliding_window", None)
            kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
            if i < len(kinds) and kinds[i] == "sliding_attention" and step:   # the cache keeps window - 1
                assert mask.shape == (B, 1, q, min(S, window - 1) + step)
            else:
                assert mask.shape == (B, 1, q, S + step)
            assert mask.dtype == (torch.bool if attn == "sdpa" else torch.float32)
    if arch == "gemma4":    # KV-shared layers keep no cache of their own
        assert [type(layer).__name__ for layer in kw[tm.CACHE_KWARG].layers][first_shared:] == ["DummyLayer"] * 2
