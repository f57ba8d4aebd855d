"""Qwen3.5: gated delta net (linear attention) layers between full-attention layers.

Three of four decoder layers (``config.text_config.layer_types``: ``"linear_attention"``) mix
tokens with a gated delta rule: a causal convolution and a recurrent state instead of softmax
attention and a KV cache. After a reduction the reduced rows go through them as a shorter
sequence (fewer tokens, less work): their convolution and recurrent states are built over the
reduced sequence, in prefill and decode alike; proportional attention applies in the
full-attention layers only (there is no softmax in the others). They take a 2-D 0/1 padding mask
(packing slots are zero rows at the left, which a left-padded linear layer ignores).

The policy that keeps this correct:

* a reduction is scored at a full-attention layer (EUTI and DBDPC read its queries and keys;
  ``q_proj`` there yields each head's query and its output gate, split here);
* transformers reads the cache length, hence every decode position, from the *first*
  full-attention layer, so that layer must hold every token: L is after it (``min_layer``);
* a progressive reduction would reduce at linear layers: refused.

Image geometry: as Qwen3-VL (merged 2x2 patches, row-major).
"""

from __future__ import annotations

from . import Adapter, register_adapter
from .qwen_vl import qwen_geometry


def after_first_full_layer(config) -> int:
    """One past the first full-attention layer (the layer whose cache length sets the positions)."""
    kinds = list(getattr(config.get_text_config(), "layer_types", None) or [])
    if "full_attention" not in kinds:
        raise ValueError("Qwen3.5: the config has no full-attention layer; a reduction needs one to score tokens")
    return kinds.index("full_attention") + 1


for _name, _type, _cls in (("Qwen3.5", "qwen3_5", "Qwen3_5ForConditionalGeneration"),
                           ("Qwen3.5-MoE", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")):
    register_adapter(Adapter(
        name=_name, model_types=(_type,), classes=(_cls,), token_id_attrs=("image_token_id", "video_token_id"),
        geometry=qwen_geometry, supported_kinds=("full_attention", "linear_attention"),
        recurrent_kinds=("linear_attention",), mask_2d_kinds=("linear_attention",), query_gate=True,
        min_layer=after_first_full_layer,
        min_layer_reason="include the first full-attention layer, whose cache length sets every decode position "
                         "(it must keep every token)"))
