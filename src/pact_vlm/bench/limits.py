"""The analytical limit: how much prefill work is left when layers >= L see the reduced sequence.

Counted per decoder layer on a sequence of ``n`` tokens (one multiply-add = 2 FLOPs):

* linear terms ``2 n (D·H·d_h + 2·D·H_kv·d_h + H·d_h·D + 3·D·F)``: the q, k, v, o projections and
  the gated MLP (gate, up, down);
* the attention term ``2·H·d_h·n(n+1)``: ``QKᵀ`` and ``PV`` over the causal triangle
  (``n(n+1)/2`` query-key pairs, each ``d_h`` multiply-adds per head for each product).

Plus ``lm_head`` on the tokens whose logits are computed (one per sample in ``generate()``).
Norms, rotary, softmax and the reduction step itself are left out: the limit is what a perfect
implementation of "layers >= L run on fewer tokens" would save, so measured / possible shows the
overheads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["TextDims", "layer_flops", "prefill_flops", "work_fraction", "layer_work_fraction", "kv_cache_bytes"]


@dataclass(frozen=True)
class TextDims:
    """Widths of a decoder-only text tower.

    Attributes:
        hidden: D. heads: H query heads. kv_heads: H_kv key/value heads. head_dim: d_h.
        intermediate: F, the MLP width. layers: N decoder layers. vocab: V (``lm_head`` rows).
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def from_config(cls, config) -> "TextDims":
        """From a ``transformers`` config (a VLM config's ``text_config`` is used when present)."""
        text = getattr(config, "text_config", None) or config
        if hasattr(text, "get_text_config"):
            text = text.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(hidden=text.hidden_size, heads=text.num_attention_heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                   head_dim=head_dim, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                   vocab=text.vocab_size)


def _check_length(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}={n!r} must be an integer >= 0 (a number of tokens)")


def layer_flops(dims: TextDims, n: int) -> dict[str, float]:
    """FLOPs of one decoder layer on ``n`` tokens: ``{"linear", "attention"}``."""
    _check_length("n", n)
    d, h, hkv, dh, f = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.intermediate
    linear = 2.0 * n * (d * h * dh + 2 * d * hkv * dh + h * dh * d + 3 * d * f)
    attention = 2.0 * h * dh * n * (n + 1)
    return {"linear": linear, "attention": attention}


def prefill_flops(dims: TextDims, seq_lengths: Sequence[int], logits_tokens: int = 1) -> dict[str, float]:
    """FLOPs of one sample's prefill when decoder layer ``l`` sees ``seq_lengths[l]`` tokens.

    Returns:
        ``{"linear", "attention", "lm_head", "total"}``.
    """
    if len(seq_lengths) != dims.layers:
        raise ValueError(f"seq_lengths has {len(seq_lengths)} entries but the model has {dims.layers} layers; "
                         "give one length per decoder layer")
    _check_length("logits_tokens", logits_tokens)
    out = {"linear": 0.0, "attention": 0.0}
    for n in seq_lengths:
        for k, v in layer_flops(dims, n).items():
            out[k] += v
    out["lm_head"] = 2.0 * logits_tokens * dims.hidden * dims.vocab
    out["total"] = out["linear"] + out["attention"] + out["lm_head"]
    return out


def work_fraction(dims: TextDims, full_length: int | Sequence[int], reduced_length: int | Sequence[int],
                  layer: int, logits_tokens: int = 1) -> dict[str, float]:
    """Fraction of prefill work left when layers ``>= layer`` see ``reduced_length`` of ``full_length`` tokens.

    ``full_length`` and ``reduced_length`` are one sample's token counts, or one count per sample of
    a batch (each sample counted on its own length: padding is not work the method has to do).

    Returns:
        ``{"fraction", "possible_speedup", "linear_fraction", "attention_fraction", "kv_fraction",
        "flops_full", "flops_reduced"}``; ``kv_fraction`` is the share of KV-cache entries left.
    """
    fulls = [full_length] if isinstance(full_length, int) else list(full_length)
    reds = [reduced_length] if isinstance(reduced_length, int) else list(reduced_length)
    if len(fulls) != len(reds) or not fulls:
        raise ValueError(f"full_length and reduced_length must give the same number (>= 1) of samples, "
                         f"got {len(fulls)} and {len(reds)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < dims.layers:
        raise ValueError(f"layer={layer!r} must be an integer in [0, {dims.layers - 1}] (the model has "
                         f"{dims.layers} decoder layers)")
    totals = {"full": {"linear": 0.0, "attention": 0.0, "total": 0.0},
              "reduced": {"linear": 0.0, "attention": 0.0, "total": 0.0}}
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
        kv_full += full_n * dims.layers
        kv_reduced += sum(lengths)
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
    return _fractions(full, reduced, sum(lengths) / (full_length * dims.layers))


def _fractions(full: dict[str, float], reduced: dict[str, float], kv_fraction: float) -> dict[str, float]:
    """The work left, from the FLOP counts of the full and the reduced prefill."""
    fraction = reduced["total"] / full["total"]
    return {
        "fraction": fraction,
        "possible_speedup": 1.0 / fraction,
        "linear_fraction": reduced["linear"] / full["linear"],
        "attention_fraction": reduced["attention"] / full["attention"],
        "kv_fraction": kv_fraction,
        "flops_full": full["total"],
        "flops_reduced": reduced["total"],
    }


def kv_cache_bytes(dims: TextDims, seq_lengths: Sequence[int], batch: int = 1, itemsize: int = 2) -> int:
    """Bytes of keys + values when layer ``l`` holds ``seq_lengths[l]`` entries per sample."""
    if len(seq_lengths) != dims.layers:
        raise ValueError(f"seq_lengths has {len(seq_lengths)} entries but the model has {dims.layers} layers")
    return int(2 * batch * dims.kv_heads * dims.head_dim * itemsize * sum(seq_lengths))
