"""The analytical limit: how much prefill work is left when layers >= L see the reduced sequence.

Counted per decoder layer on a sequence of ``n`` tokens (one multiply-add = 2 FLOPs):

* linear terms ``2 n (D·H·d_h + 2·D·H_kv·d_h + H·d_h·D + 3·D·F)``: the q, k, v, o projections and
  the gated MLP (gate, up, down);
* the attention term ``2·H·d_h·n(n+1)``: ``QKᵀ`` and ``PV`` over the causal triangle
  (``n(n+1)/2`` query-key pairs, each ``d_h`` multiply-adds per head for each product).

Hybrid towers (Qwen3.5: ``layer_types`` mixing ``"full_attention"`` and ``"linear_attention"``)
are counted per layer type. A full-attention layer as above, except that its ``q_proj`` also
yields each head's output gate (``2·H·d_h`` outputs, ``query_gate``). A linear-attention layer
(gated delta net) costs O(n), with no ``n²`` term at all:

* linear terms ``2 n (D·C + D·H_v·d_v + 2·D·H_v + H_v·d_v·D + C·K + 3·D·F)`` with
  ``C = 2·H_k·d_k + H_v·d_v`` the convolution's channels: ``in_proj_qkv``, ``in_proj_z``,
  ``in_proj_b`` / ``in_proj_a``, ``out_proj``, the depthwise causal convolution of kernel ``K``
  and the MLP;
* the recurrence ``2·c·n·H_v·d_k·d_v`` with ``c =`` :data:`RECURRENCE_MACS` ``= 5``: per token and
  value head the chunked gated delta rule (transformers' ``torch_chunk_gated_delta_rule``, chunks
  of 64) reads the state twice (``k_cumdecay @ S`` and ``q @ S``) and writes it once (``kᵀ v``):
  3·d_k·d_v multiply-adds; its intra-chunk products (``k_β kᵀ``, ``q kᵀ``, ``A v`` and the two
  triangular solves) add ``64·(2.5·d_k + 1.5·d_v)``, which is ``2·d_k·d_v`` at Qwen3.5's
  ``d_k = d_v = 128``. It runs in float32 whatever the model's dtype.

So reducing at L saves, in a linear-attention layer, the same share of its work as of its tokens;
the ``n²`` saving exists only in the few full-attention layers, and the limit of a hybrid tower
is lower than that of a tower of full-attention layers at the same widths and length.

Plus ``lm_head`` on the tokens whose logits are computed (one per sample in ``generate()``).
Norms, rotary, softmax and the reduction step itself are left out: the limit is what a perfect
implementation of "layers >= L run on fewer tokens" would save, so measured / possible shows the
overheads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

__all__ = ["TextDims", "layer_flops", "prefill_flops", "work_fraction", "layer_work_fraction", "kv_cache_bytes",
           "state_bytes", "RECURRENCE_MACS"]

RECURRENCE_MACS = 5
"""Multiply-adds of the gated delta rule per token, per value head, per ``d_k·d_v`` (see the module doc)."""

FULL, LINEAR = "full_attention", "linear_attention"
_HYBRID_FIELDS = ("layer_types", "query_gate", "linear_key_heads", "linear_value_heads", "linear_key_dim",
                  "linear_value_dim", "conv_kernel")


@dataclass(frozen=True)
class TextDims:
    """Widths of a decoder-only text tower.

    Attributes:
        hidden: D. heads: H query heads. kv_heads: H_kv key/value heads. head_dim: d_h.
        intermediate: F, the MLP width. layers: N decoder layers. vocab: V (``lm_head`` rows).
        layer_types: hybrid towers only: each layer's type, ``"full_attention"`` or
            ``"linear_attention"`` (``None``: every layer full attention).
        query_gate: ``q_proj`` also yields an output gate per head (Qwen3.5's full-attention layers).
        linear_key_heads, linear_value_heads, linear_key_dim, linear_value_dim, conv_kernel: the
            linear-attention layers' H_k, H_v, d_k, d_v and convolution kernel K (0 without them).
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    layer_types: tuple[str, ...] | None = None
    query_gate: bool = False
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    conv_kernel: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.layer_types is None:
            return
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.layers or not set(self.layer_types) <= {FULL, LINEAR}:
            raise ValueError(f"layer_types={list(self.layer_types)!r} must give one of {FULL!r} / {LINEAR!r} "
                             f"per decoder layer ({self.layers})")
        if LINEAR in self.layer_types:
            for name in ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim",
                         "conv_kernel"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}={value!r} must be a positive integer: the tower has "
                                     "linear-attention layers")

    @property
    def hybrid(self) -> bool:
        """Whether the layers are of several types (their FLOPs are counted per type)."""
        return self.layer_types is not None

    def kind(self, layer: int) -> str:
        """The type of decoder layer ``layer``."""
        return FULL if self.layer_types is None else self.layer_types[layer]

    def full_attention_layers(self) -> list[int]:
        """The layers that keep a KV cache."""
        return [i for i in range(self.layers) if self.kind(i) == FULL]

    def linear_attention_layers(self) -> list[int]:
        """The layers that keep a fixed-size state instead (gated delta nets)."""
        return [i for i in range(self.layers) if self.kind(i) == LINEAR]

    @property
    def conv_channels(self) -> int:
        """C: the q, k, v channels of a linear-attention layer's causal convolution (0 without them)."""
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim

    def to_dict(self) -> dict:
        """The widths as a JSON-ready dict (the hybrid fields only for a hybrid tower)."""
        out = dataclasses.asdict(self)
        if not self.hybrid:
            for name in _HYBRID_FIELDS:
                out.pop(name)
        else:
            out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_config(cls, config) -> "TextDims":
        """From a ``transformers`` config (a VLM config's ``text_config`` is used when present)."""
        text = getattr(config, "text_config", None) or config
        if hasattr(text, "get_text_config"):
            text = text.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        hybrid = {}
        kinds = list(getattr(text, "layer_types", None) or [])
        if LINEAR in kinds:
            if set(kinds) - {FULL, LINEAR}:
                raise ValueError(f"layer types {sorted(set(kinds) - {FULL, LINEAR})} are not counted by the "
                                 f"analytical limit (it counts {FULL!r} and {LINEAR!r} layers)")
            # Qwen3.5 / Qwen3-Next: gated delta net layers, and a gated q_proj in the full-attention ones
            hybrid = dict(layer_types=tuple(kinds), query_gate=True,
                          linear_key_heads=text.linear_num_key_heads, linear_value_heads=text.linear_num_value_heads,
                          linear_key_dim=text.linear_key_head_dim, linear_value_dim=text.linear_value_head_dim,
                          conv_kernel=text.linear_conv_kernel_dim)
        return cls(hidden=text.hidden_size, heads=text.num_attention_heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                   head_dim=head_dim, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                   vocab=text.vocab_size, **hybrid)


def _check_length(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}={n!r} must be an integer >= 0 (a number of tokens)")


def layer_flops(dims: TextDims, n: int, layer: int | None = None) -> dict[str, float]:
    """FLOPs of one decoder layer on ``n`` tokens: ``{"linear", "attention"}``, plus ``"recurrence"``
    for a hybrid tower, whose layer index ``layer`` (required there) gives the layer's type."""
    _check_length("n", n)
    if dims.hybrid:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < dims.layers:
            raise ValueError(f"layer={layer!r} must be a layer index in [0, {dims.layers - 1}]: the layers of a "
                             "hybrid tower are counted by their type")
    d, h, hkv, dh, f = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.intermediate
    if dims.kind(layer or 0) == LINEAR:
        hv, dk, dv = dims.linear_value_heads, dims.linear_key_dim, dims.linear_value_dim
        conv = dims.conv_channels
        per_token = d * conv + d * hv * dv + 2 * d * hv + hv * dv * d + conv * dims.conv_kernel + 3 * d * f
        return {"linear": 2.0 * n * per_token, "attention": 0.0,
                "recurrence": 2.0 * RECURRENCE_MACS * n * hv * dk * dv}
    q_out = h * dh * (2 if dims.query_gate else 1)
    linear = 2.0 * n * (d * q_out + 2 * d * hkv * dh + h * dh * d + 3 * d * f)
    attention = 2.0 * h * dh * n * (n + 1)
    out = {"linear": linear, "attention": attention}
    if dims.hybrid:
        out["recurrence"] = 0.0
    return out


def prefill_flops(dims: TextDims, seq_lengths: Sequence[int], logits_tokens: int = 1) -> dict[str, float]:
    """FLOPs of one sample's prefill when decoder layer ``l`` sees ``seq_lengths[l]`` tokens.

    Returns:
        ``{"linear", "attention", "lm_head", "total"}``, plus ``"recurrence"`` for a hybrid tower.
    """
    if len(seq_lengths) != dims.layers:
        raise ValueError(f"seq_lengths has {len(seq_lengths)} entries but the model has {dims.layers} layers; "
                         "give one length per decoder layer")
    _check_length("logits_tokens", logits_tokens)
    out = {"linear": 0.0, "attention": 0.0, **({"recurrence": 0.0} if dims.hybrid else {})}
    for i, n in enumerate(seq_lengths):
        for k, v in layer_flops(dims, n, i).items():
            out[k] += v
    out["lm_head"] = 2.0 * logits_tokens * dims.hidden * dims.vocab
    out["total"] = out["linear"] + out["attention"] + out.get("recurrence", 0.0) + out["lm_head"]
    return out


def work_fraction(dims: TextDims, full_length: int | Sequence[int], reduced_length: int | Sequence[int],
                  layer: int, logits_tokens: int = 1) -> dict[str, float]:
    """Fraction of prefill work left when layers ``>= layer`` see ``reduced_length`` of ``full_length`` tokens.

    ``full_length`` and ``reduced_length`` are one sample's token counts, or one count per sample of
    a batch (each sample counted on its own length: padding is not work the method has to do).

    Returns:
        ``{"fraction", "possible_speedup", "linear_fraction", "attention_fraction", "kv_fraction",
        "flops_full", "flops_reduced"}``; ``kv_fraction`` is the share of KV-cache entries left (of
        the full-attention layers: linear-attention layers keep a fixed-size state). A hybrid tower
        adds ``"recurrence_fraction"``; its ``attention_fraction`` is that of its full-attention layers.
    """
    fulls = [full_length] if isinstance(full_length, int) else list(full_length)
    reds = [reduced_length] if isinstance(reduced_length, int) else list(reduced_length)
    if len(fulls) != len(reds) or not fulls:
        raise ValueError(f"full_length and reduced_length must give the same number (>= 1) of samples, "
                         f"got {len(fulls)} and {len(reds)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < dims.layers:
        raise ValueError(f"layer={layer!r} must be an integer in [0, {dims.layers - 1}] (the model has "
                         f"{dims.layers} decoder layers)")
    keys = ("linear", "attention", "recurrence", "total") if dims.hybrid else ("linear", "attention", "total")
    totals = {"full": dict.fromkeys(keys, 0.0), "reduced": dict.fromkeys(keys, 0.0)}
    kv_layers = dims.full_attention_layers()
    kv_full = kv_reduced = 0
    for full_n, red_n in zip(fulls, reds):
        _check_length("full_length", full_n)
        _check_length("reduced_length", red_n)
        if full_n == 0 or red_n > full_n:
            raise ValueError(f"reduced_length={red_n} must lie in [0, full_length={full_n}] and "
                             "full_length must be > 0")
        lengths = [full_n] * layer + [red_n] * (dims.layers - layer)
        for key, lens in (("full", [full_n] * dims.layers), ("reduced", lengths)):
            flops = prefill_flops(dims, lens, logits_tokens)
            for k in totals[key]:
                totals[key][k] += flops[k]
        kv_full += full_n * len(kv_layers)
        kv_reduced += sum(lengths[i] for i in kv_layers)
    return _fractions(totals["full"], totals["reduced"], kv_reduced / kv_full)


def layer_work_fraction(dims: TextDims, full_length: int, lengths: Sequence[int],
                        logits_tokens: int = 1) -> dict[str, float]:
    """Like :func:`work_fraction` for a method that shortens the sequence at several layers:
    decoder layer ``l`` sees ``lengths[l]`` of ``full_length`` tokens (one sample).

    Returns:
        The same keys as :func:`work_fraction`.
    """
    _check_length("full_length", full_length)
    if full_length == 0 or any(not 0 <= n <= full_length for n in lengths):
        raise ValueError(f"lengths {list(lengths)} must each lie in [0, full_length={full_length}] and "
                         "full_length must be > 0")
    full = prefill_flops(dims, [full_length] * dims.layers, logits_tokens)
    reduced = prefill_flops(dims, list(lengths), logits_tokens)
    kv_layers = dims.full_attention_layers()
    return _fractions(full, reduced, sum(lengths[i] for i in kv_layers) / (full_length * len(kv_layers)))


def _fractions(full: dict[str, float], reduced: dict[str, float], kv_fraction: float) -> dict[str, float]:
    """The work left, from the FLOP counts of the full and the reduced prefill."""
    fraction = reduced["total"] / full["total"]
    out = {
        "fraction": fraction,
        "possible_speedup": 1.0 / fraction,
        "linear_fraction": reduced["linear"] / full["linear"],
        "attention_fraction": reduced["attention"] / full["attention"],
        "kv_fraction": kv_fraction,
        "flops_full": full["total"],
        "flops_reduced": reduced["total"],
    }
    if "recurrence" in full:
        out["recurrence_fraction"] = reduced["recurrence"] / full["recurrence"] if full["recurrence"] else 1.0
    return out


def kv_cache_bytes(dims: TextDims, seq_lengths: Sequence[int], batch: int = 1, itemsize: int = 2) -> int:
    """Bytes of keys + values when layer ``l`` holds ``seq_lengths[l]`` entries per sample (the
    full-attention layers only: a linear-attention layer keeps a fixed-size state, see :func:`state_bytes`)."""
    if len(seq_lengths) != dims.layers:
        raise ValueError(f"seq_lengths has {len(seq_lengths)} entries but the model has {dims.layers} layers")
    entries = sum(seq_lengths[i] for i in dims.full_attention_layers())
    return int(2 * batch * dims.kv_heads * dims.head_dim * itemsize * entries)


def state_bytes(dims: TextDims, batch: int = 1, itemsize: int = 2) -> int:
    """Bytes of the linear-attention layers' fixed-size states, whatever the sequence length: the
    recurrent state ``[B, H_v, d_k, d_v]`` (float32, as the gated delta rule computes it) and the
    convolution state ``[B, C, K]`` in the model's dtype (0 without such layers)."""
    n = len(dims.linear_attention_layers())
    conv = dims.conv_channels
    recurrent = dims.linear_value_heads * dims.linear_key_dim * dims.linear_value_dim * 4
    return int(n * batch * (recurrent + conv * dims.conv_kernel * itemsize))
