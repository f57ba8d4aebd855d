"""The parts of ``pact_vlm.vllm`` that need no vLLM: the config lookup and checks, the position channels and
the prompt's M-RoPE layout (the main suite runs these; tests/test_vllm.py runs the plugin inside vLLM)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import pact_vlm
from pact_vlm.vllm.config import config_from_override, resolve_config
from pact_vlm.vllm.embeddings import append_positions, grid_offsets, mrope_positions, split_positions


def test_folder_config_of_another_method_refused(tmp_path):
    pact_vlm.PACTConfig(layer=0).save(tmp_path / "pact_config.json")
    with pytest.raises(ValueError, match="pact_budget"):
        resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path)))


def test_folder_config_is_read(tmp_path):
    pact_vlm.PACTBudgetConfig(keep_ratio=0.5, alpha=2.0).save(tmp_path / "pact_config.json")
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path)))
    assert (cfg.keep_ratio, cfg.alpha) == (0.5, 2.0) and "pact_config.json" in origin
    # hf_overrides come first
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(pact={"keep_ratio": 0.2}), model=str(tmp_path)))
    assert cfg.keep_ratio == 0.2 and origin == "hf_overrides 'pact'"
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path / "none")))
    assert cfg == pact_vlm.PACTBudgetConfig() and origin == "library defaults"


@pytest.mark.parametrize("raw, message", [
    ({"keep_ratio": 0.0}, "keep_ratio=0.0"),
    ({"keep_ratio": 0.3, "proportional_attention": True}, "proportional_attention=True cannot run in vLLM"),
    ({"keep_ratio": 0.3, "cutoff": 0.2}, "unknown key"),
    ({"method": "pact", "layer": 0}, "pact_budget"),
    (0.3, "must be a dict"),
])
def test_bad_override_messages(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_override(raw)


def test_position_channels_round_trip():
    emb = torch.randn(5, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([[0, 0, 0], [0, 3, 255], [0, 256, 1], [7, 300, 4000], [0, 65535, 2]])
    back, got = split_positions(append_positions(emb, offsets), 8)
    assert torch.equal(back, emb) and torch.equal(got, offsets)
    assert split_positions(emb, 8)[1] is None


def test_mrope_positions_keep_text_and_decode_positions():
    # prompt: 3 text, an image of 2x3 tokens (reduced to 2 placeholders), 4 text
    full, full_delta = mrope_positions(13, [(3, 6, 1, 2, 3, 1.0, False)])
    reduced, delta = mrope_positions(9, [(3, 2, 1, 2, 3, 1.0, True)])
    grid = grid_offsets(1, 2, 3)
    assert torch.equal(full[:, 3:9].T, grid + 3)                   # vLLM's own layout when not reduced
    assert torch.equal(reduced[:, 3:5], torch.full((3, 2), 3))      # placeholders at the image's start
    assert torch.equal(reduced[:, :3], full[:, :3]) and torch.equal(reduced[:, 5:], full[:, 9:])
    assert 9 + delta == 13 + full_delta                            # the first decoded token's position
    tall, _ = mrope_positions(8, [(0, 6, 1, 3, 2, 1.0, False)])
    assert int(tall[0, 6]) == 3                                    # text after a tall grid: its height
