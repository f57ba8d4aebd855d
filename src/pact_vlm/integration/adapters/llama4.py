"""Llama 4: refused, naming why (the issue allows it when the per-layer policy cannot carry it cleanly)."""

from __future__ import annotations

from . import Adapter, register_adapter

register_adapter(Adapter(
    name="Llama 4", model_types=("llama4",), classes=("Llama4ForConditionalGeneration",),
    token_id_attrs=("image_token_id",), inner_model="", language_model="language_model.model",
    refused="its chunked-attention layers keep sliding caches over chunks of original positions, its "
            "attention temperature tuning reads each layer's cache length as the query positions (a reduced "
            "layer would see reduced lengths and scale queries wrongly), and the unreduced model's forward "
            "fails in transformers 5.24 ('MoeCausalLMOutputWithPast' has no attribute 'image_outputs'); "
            "run it unreduced"))
