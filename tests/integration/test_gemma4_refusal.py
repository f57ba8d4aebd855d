"""Gemma 4 under a transformers whose Gemma 4 has no ``kv_sharing_modes`` (an older layout, e.g. 5.19,
vLLM's pin) is refused at apply(), naming the version; under a newer one it applies."""

from __future__ import annotations

import types

import pytest
import transformers

import pact_vlm
import tiny_models as tm
from pact_vlm.integration.adapters.gemma import kv_producers


def _default_layout_model():
    """A tiny Gemma 4 from transformers' own defaults of the installed version (no pact-vlm test layout)."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=300, hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=300, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    return transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(text_config=text,
                                                                                 vision_config=vision)).eval()


def test_gemma4_is_refused_exactly_where_its_kv_sharing_layout_is_missing():
    model = _default_layout_model()
    if tm.GEMMA4_SUPPORTED:
        pact_vlm.apply(model, pact_vlm.PACTConfig(layer=1)).remove()
    else:
        with pytest.raises(ValueError, match=rf"Gemma 4 under transformers {transformers.__version__}: its config "
                                             r"has no kv_sharing_modes.*upgrade transformers"):
            pact_vlm.apply(model, pact_vlm.PACTConfig(layer=1))
    old = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(layer_types=["full_attention"]))
    with pytest.raises(ValueError, match="has no kv_sharing_modes"):
        kv_producers(old)
