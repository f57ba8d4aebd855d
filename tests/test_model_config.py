"""The config that travels with a model: folder file, else family preset, else defaults."""

from __future__ import annotations

import json

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.presets import CONFIG_FILENAME, model_config


def test_folder_file_then_preset_then_defaults(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert model_config(folder) == (pact_vlm.PACTConfig(), "library defaults")
    pact_vlm.PACTConfig(layer=1, cutoff=0.05).save(folder / CONFIG_FILENAME)
    cfg, origin = model_config(str(folder))
    assert cfg == pact_vlm.PACTConfig(layer=1, cutoff=0.05)
    assert str(folder / CONFIG_FILENAME) in origin
    assert model_config("llava-hf/llava-onevision-qwen2-7b-ov-hf") == (
        pact_vlm.PACTConfig.preset("llava-onevision-7b"), "preset 'llava-onevision-7b'")
    assert model_config("Qwen/Qwen2-VL-7B-Instruct")[0] == pact_vlm.PACTConfig.preset("qwen2-vl-7b")
    assert model_config("Qwen/Qwen2-VL-2B-Instruct")[1] == "library defaults"
    assert model_config(None)[1] == "library defaults"


def test_a_bad_folder_file_names_the_file(tmp_path):
    (tmp_path / CONFIG_FILENAME).write_text(json.dumps({"method": "pact", "cutoff": 7}))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILENAME}': cutoff=7 is outside"):
        model_config(tmp_path)


def test_apply_without_config_uses_the_model_folder(tmp_path):
    model = tm.build_tiny("qwen2_vl")
    model.save_pretrained(tmp_path)
    pact_vlm.PACTConfig(layer=1, prune_ratio=0.0, cutoff=0.4).save(tmp_path / CONFIG_FILENAME)
    loaded = type(model).from_pretrained(tmp_path).eval()
    inputs = tm.make_inputs(loaded, "qwen2_vl")
    with torch.no_grad(), pact_vlm.apply(loaded) as handle:
        loaded(**inputs)
    assert handle.config == pact_vlm.PACTConfig(layer=1, prune_ratio=0.0, cutoff=0.4)
    assert CONFIG_FILENAME in handle.config_origin
    assert handle.stats.reduction_layers == [1] and handle.stats.visual_after < handle.stats.visual_before
