"""Models dispatched by accelerate (``device_map`` with offloaded layers) keep working under apply()."""

from __future__ import annotations

import pytest
import torch

import pact_vlm
import tiny_models as tm

pytest.importorskip("accelerate")


def _cfg():
    return pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.3)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_offloaded_model_gives_the_same_reduction_and_keeps_its_hooks(arch, tmp_path):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    model.save_pretrained(tmp_path / "model")
    inputs = tm.make_inputs(model, arch)
    cls = type(model)
    # layers 2 and 3 of the text model live on "disk": accelerate hooks load them at each call
    device_map = {"model.visual" if arch == "qwen2_vl" else "model.vision_tower": "cpu",
                  "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "cpu",
                  "model.language_model.layers.2": "disk", "model.language_model.layers.3": "disk",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offloaded = cls.from_pretrained(tmp_path / "model", device_map=_complete(model, device_map),
                                    offload_folder=str(tmp_path / "offload"), attn_implementation="sdpa").eval()
    layer3 = offloaded.model.language_model.layers[3]
    assert hasattr(layer3, "_hf_hook"), "the test needs accelerate hooks on the offloaded layers"
    hooked_forward = layer3.forward

    def run(m):
        with torch.no_grad(), pact_vlm.apply(m, _cfg()) as handle:
            out = m.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        return out, handle.stats

    want, want_stats = run(model)
    got, got_stats = run(offloaded)
    assert 0 < got_stats.visual_after == want_stats.visual_after < got_stats.visual_before
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # remove() left accelerate's own wrapping in place
    assert layer3.forward == hooked_forward and hasattr(layer3, "_hf_hook")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def _complete(model, device_map):
    """Every parameter or buffer not covered by ``device_map`` goes to the CPU."""
    full = dict(device_map)
    for name in model.state_dict():
        if not any(name == k or name.startswith(k + ".") for k in full):
            full[name] = "cpu"
    return full
