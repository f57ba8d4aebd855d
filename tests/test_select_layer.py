"""select-layer: per-layer statistics of the visual tokens' key distances, and the suggested layer."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from PIL import Image

import vlm_folder
from pact_vlm import cli
from pact_vlm.demo import make_dataset
from pact_vlm.integration.adapters import get_adapter
from pact_vlm.integration.loading import build_inputs, load_vlm
from pact_vlm.select_layer import key_distance_stats, pairwise_distance_stats, select_layer, suggest_layer


def test_pairwise_distance_stats_on_known_keys():
    same = torch.ones(5, 8)
    s = pairwise_distance_stats(same, cutoff=0.1)
    assert s["mean"] == pytest.approx(0.0, abs=1e-6) and s["within_cutoff"] == 1.0
    eye = torch.eye(6)
    s = pairwise_distance_stats(eye, cutoff=0.5)
    assert s["mean"] == pytest.approx(1.0) and s["median"] == pytest.approx(1.0) and s["within_cutoff"] == 0.0
    mixed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])      # distances 0, 2, 2
    s = pairwise_distance_stats(mixed, cutoff=0.5)
    assert s["mean"] == pytest.approx(4 / 3) and s["within_cutoff"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_distance_stats(torch.ones(1, 4), 0.1)


def test_suggest_layer_rule():
    values = [0.05, 0.2, 0.45, 0.5, 0.48]
    assert suggest_layer(values, 0.9) == 2          # 0.45 >= 0.9 * 0.5
    assert suggest_layer(values, 1.0) == 3
    assert suggest_layer(values, 0.3) == 1
    assert suggest_layer(values, 0.3, min_layer=2) == 2
    with pytest.raises(ValueError, match="min_layer"):
        suggest_layer(values, 0.9, min_layer=5)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = vlm_folder.save_demo_architecture(tmp_path_factory.mktemp("vlm"))
    model, processor = load_vlm(folder, device="cpu")
    return folder, model, processor


def _manual_layer_keys(model, inputs):
    """Post-rotary keys of the visual tokens at every layer's input, captured independently here."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    keys = {}

    def grab(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            attn = module.self_attn
            k = attn.k_proj(module.input_layernorm(hidden)).view(1, hidden.shape[1], -1, attn.head_dim)
            rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            k_rot = rotate(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1].transpose(1, 2)
            keys[i] = k_rot[0, visual].flatten(1)
        return hook

    hs = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for h in hs:
        h.remove()
    return keys


def test_key_distance_stats_match_a_direct_computation(loaded):
    _, model, processor = loaded
    images = [s.image for s in make_dataset("heldout", 2)]
    inputs = [build_inputs(processor, "Describe the image.", [img]) for img in images]
    stats = key_distance_stats(model, inputs, cutoff=0.3, progress=False)
    assert [s.layer for s in stats] == list(range(len(get_adapter(model).layers(model))))
    manual = [_manual_layer_keys(model, x) for x in inputs]
    for s in stats:
        expected = [pairwise_distance_stats(m[s.layer], 0.3) for m in manual]
        for key in ("mean", "median", "p10", "p90", "within_cutoff"):
            assert getattr(s, key) == pytest.approx(sum(e[key] for e in expected) / 2, rel=1e-4, abs=1e-6)
        assert s.tokens == 2 * 64
    assert not any(m._forward_pre_hooks for m in model.modules())      # hooks removed


def test_select_layer_subsamples_and_refuses_bad_input(loaded):
    _, model, processor = loaded
    image = make_dataset("heldout", 1)[0].image
    sel = select_layer(model, processor, [image], max_tokens=10, progress=False)
    assert all(s.tokens == 10 for s in sel.layers)
    assert sel.suggested == suggest_layer([s.median for s in sel.layers], 0.9)
    with pytest.raises(ValueError, match="statistic"):
        select_layer(model, processor, [image], statistic="max", progress=False)
    with pytest.raises(ValueError, match="threshold"):
        select_layer(model, processor, [image], threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="no sample images"):
        select_layer(model, processor, [], progress=False)


def test_select_layer_command(loaded, tmp_path, capsys):
    folder, _, _ = loaded
    paths = []
    for i, s in enumerate(make_dataset("heldout", 2)):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        s.image.save(tmp_path / f"{i}.png")
    plot = tmp_path / "layers.png"
    rc = cli.main(["select-layer", str(folder), *paths, "--plot", str(plot), "--device", "cpu", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "key distances" in captured.err                               # the progress bar
    medians = [layer["median"] for layer in data["layers"]]
    assert data["suggested"] == suggest_layer(medians, 0.9)
    assert Image.open(plot).size[0] > 100
    rc = cli.main(["select-layer", str(folder), *paths, "--device", "cpu", "--no-progress", "--statistic", "mean",
                   "--threshold", "1.0", "-o", "cutoff=0.4"])
    out = capsys.readouterr().out
    means = [layer["mean"] for layer in data["layers"]]
    assert rc == 0 and f"suggested layer: {max(range(len(means)), key=means.__getitem__)} " in out
    assert "d_c = 0.4" in out and out.count("<- suggested") == 1


def test_layers_without_keys_are_measured_as_nan_and_never_suggested():
    """Qwen3.5's linear-attention layers have no keys: NaN, and the suggestion is a full-attention layer."""
    import tiny_models as tm

    torch.manual_seed(0)
    model = tm.build_tiny("qwen3_5", "sdpa")
    stats = key_distance_stats(model, [tm.make_inputs(model, "qwen3_5")], cutoff=0.3, progress=False)
    kinds = [get_adapter(model).layer_kind(model, i) for i in range(len(stats))]
    for s, kind in zip(stats, kinds):
        assert math.isnan(s.median) == (kind == "linear_attention")
        assert (s.tokens == 0) == (kind == "linear_attention")
    min_layer = get_adapter(model).min_layer(model.config)
    assert kinds[suggest_layer([s.median for s in stats], 0.5, min_layer)] == "full_attention"
    assert suggest_layer([math.nan, 1.0, math.nan, 3.0], 0.9) == 3


def test_gemma4_shared_layers_are_nan_and_no_layer_past_a_producer_is_suggested(monkeypatch):
    """Gemma 4: the KV-shared layers (4, 5) compute no keys: NaN; layer 3 has keys, but layer 4
    reuses layer 2's, so a reduction cannot start at 3 and it is never suggested."""
    import tiny_models as tm
    from pact_vlm.integration import loading

    torch.manual_seed(0)
    model = tm.build_tiny("gemma4", "sdpa")
    inputs = tm.make_inputs(model, "gemma4")
    monkeypatch.setattr(loading, "build_inputs", lambda processor, prompt, images, device=None: inputs)
    measured = key_distance_stats(model, [inputs], progress=False)
    medians = [s.median for s in measured]
    assert [math.isnan(m) for m in medians] == [False] * 4 + [True] * 2
    assert measured[3].tokens == int((inputs["input_ids"] == tm.IMAGE_ID).sum())     # the wide full layer
    # layer 3 made the one that levels off last: still not suggested
    from dataclasses import replace

    import pact_vlm.select_layer as select_layer_module

    raised = [replace(s, median=2.0) if s.layer == 3 else s for s in measured]
    monkeypatch.setattr(select_layer_module, "key_distance_stats", lambda *a, **k: raised)
    sel = select_layer(model, None, [None], threshold=1.0, progress=False)
    assert sel.suggested == max(range(3), key=medians.__getitem__)
