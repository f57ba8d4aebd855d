"""Configs: validation, presets, JSON round-trip."""

from __future__ import annotations

import json

import pytest

import pact_vlm
from pact_vlm.config import ReductionConfig


def test_defaults_are_the_paper_llava_onevision_setting():
    cfg = pact_vlm.PACTConfig()
    assert (cfg.layer, cfg.prune_ratio, cfg.cutoff, cfg.alpha) == (4, 0.45, 0.21, 1.5)
    assert cfg == pact_vlm.PACTConfig.preset("llava-onevision-7b")
    q = pact_vlm.PACTConfig.preset("qwen2-vl-7b")
    assert (q.layer, q.prune_ratio, q.cutoff, q.alpha) == (4, 0.2, 0.1, 1.5)


def test_json_round_trip(tmp_path):
    cfg = pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.15, density="exponential", euti_context="prefix")
    path = tmp_path / "c.json"
    cfg.save(path)
    data = json.loads(path.read_text())
    assert data["method"] == "pact" and data["format_version"] == 1
    assert pact_vlm.PACTConfig.load(path) == cfg
    assert pact_vlm.load_config(path) == cfg
    assert ReductionConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=-1), "layer=-1"),
    (dict(layer=1.5), "layer=1.5"),
    (dict(prune_ratio=1.0), r"prune_ratio=1.0 is outside \[0.0, 1.0\)"),
    (dict(prune_ratio=-0.1), "prune_ratio=-0.1"),
    (dict(cutoff=-0.2), "cutoff=-0.2"),
    (dict(cutoff=float("nan")), "cutoff=nan"),
    (dict(alpha=0), "alpha=0"),
    (dict(density="uniform"), "density='uniform'"),
    (dict(euti_context="all"), "euti_context='all'"),
    (dict(proportional_attention="yes"), "proportional_attention='yes'"),
])
def test_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pact_vlm.PACTConfig(**kwargs)


def test_wrong_keys_and_methods_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'cut_off'"):
        pact_vlm.PACTConfig.from_dict({"cut_off": 0.2})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ReductionConfig.from_dict({"method": "nope"})
    with pytest.raises(ValueError, match="format_version=99"):
        ReductionConfig.from_dict({"method": "pact", "format_version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        ReductionConfig.from_json("{")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pact_vlm.load_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown preset"):
        pact_vlm.PACTConfig.preset("gpt")


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="'method' must be a string naming one method, got \\['pact'\\]"):
        ReductionConfig.from_dict({"method": ["pact"]})
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"method": ["pact", "fastv"], "layer": 2}))
    with pytest.raises(ValueError, match=f"config file {str(path)!r}: config 'method' must be a string"):
        pact_vlm.load_config(path)
    path.write_text(json.dumps({"method": "pact", "cutof": 0.2}))
    with pytest.raises(ValueError, match="list.json.*unknown key.*'cutof'"):
        pact_vlm.load_config(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="list.json.*not valid JSON"):
        pact_vlm.load_config(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="list.json.*not UTF-8"):
        pact_vlm.load_config(path)
    with pytest.raises(ValueError, match="is a folder"):
        pact_vlm.load_config(tmp_path)
