"""Memory: an estimate before anything is built, and the peak CPU memory of one variant in a fresh process.

:func:`estimate_memory` counts what one benchmark process holds at its peak (weights, the largest
transient activations of one decoder layer, the KV cache, the runtime) from the text tower's
widths alone, so ``pact-vlm bench`` can refuse a run that would not fit in the free memory
(:func:`available_memory`: ``MemAvailable`` of ``/proc/meminfo``, or the free CUDA memory) before
it builds a model.

The peak resident set size of a process only grows, and the C allocator keeps some freed memory
between calls, so in-process measurements of successive calls depend on what ran before. For the
synthetic models (rebuilt identically from a :class:`SyntheticSpec`) each variant can instead run
in its own fresh Python process: build the model and the inputs, apply the config (or not), run
one ``generate()`` and report the peak resident set size during it (``VmHWM``, reset just
before) and its increase over the resident size before it.

    python -m pact_vlm.bench.memory '<json request>'   # prints one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["MemoryEstimate", "available_memory", "estimate_memory", "text_tower_params", "isolated_peak_memory"]

GB = 1e9
RUNTIME_BYTES = 600 * 2**20
"""Python, torch and transformers loaded in one process, before any model (measured here: about 0.4 GiB)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What one benchmark process holds at its peak, in bytes (an upper estimate).

    Attributes:
        weights: parameters in the run's dtype (the text tower, and the vision tower and projector
            where counted).
        activations: the largest transient tensors of one decoder layer in the prefill (the MLP's
            three ``[B, T, F]`` tensors, the hidden states, queries / keys / values, and the
            ``[B, H, T, T]`` attention scores, as if materialised), or of the vision tower when it
            runs and needs more.
        kv_cache: keys and values of every full-attention layer for the prompt and the generated
            tokens, plus the fixed-size convolution and recurrent states of linear-attention layers.
        runtime: the interpreter and libraries (:data:`RUNTIME_BYTES`).
        copies: copies of the weights held at once (2 while a fresh process measures memory next to
            the benchmark's own model).
    """

    weights: int
    activations: int
    kv_cache: int
    runtime: int = RUNTIME_BYTES
    copies: int = 1

    @property
    def total(self) -> int:
        return self.copies * self.weights + self.activations + self.kv_cache + self.runtime

    def describe(self, dtype: str) -> str:
        copies = f" x {self.copies} copies" if self.copies > 1 else ""
        return (f"about {self.total / GB:.1f} GB (weights {self.weights / GB:.1f} GB in {dtype}{copies}, activations "
                f"{self.activations / GB:.1f} GB, KV cache {self.kv_cache / GB:.2f} GB, runtime "
                f"{self.runtime / GB:.1f} GB)")


def text_tower_params(dims, *, tied_embeddings: bool = False) -> int:
    """Parameters of a Qwen2 / Llama-style decoder (q/k/v biases counted) with ``dims.layers`` layers.

    A hybrid tower (``dims.layer_types``) is counted per layer type: a full-attention layer as
    above with the gated ``q_proj`` (``2·H·d_h`` outputs) and q / k norms where ``dims.query_gate``,
    a linear-attention layer with its projections (qkv, z, b, a, out), convolution, decay and norm.
    """
    from .limits import LINEAR

    d, h, hkv, dh, f = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.intermediate
    q_out = h * dh * (2 if dims.query_gate else 1)
    full = ((d * q_out + q_out) + 2 * (d * hkv * dh + hkv * dh) + h * dh * d + 3 * d * f + 2 * d
            + (2 * dh if dims.query_gate else 0))
    hv, dv = dims.linear_value_heads, dims.linear_value_dim
    conv = dims.conv_channels
    linear = (d * conv + d * hv * dv + 2 * d * hv + conv * dims.conv_kernel + 2 * hv + dv + hv * dv * d
              + 3 * d * f + 2 * d)
    layers = sum(linear if dims.kind(i) == LINEAR else full for i in range(dims.layers))
    return layers + (1 if tied_embeddings else 2) * dims.vocab * d + d


def estimate_memory(dims, *, seq_len: int, batch: int, max_new_tokens: int, dtype_bytes: int,
                    extra_params: int = 0, extra_activations: int = 0) -> MemoryEstimate:
    """Peak memory of one ``generate()`` run of a text tower of ``dims`` (see :class:`MemoryEstimate`).

    Args:
        dims: a :class:`~pact_vlm.bench.limits.TextDims`.
        seq_len: prompt length T (text + visual tokens), an upper bound is fine.
        batch: prompts per call B.
        max_new_tokens: generated tokens (they lengthen the KV cache).
        dtype_bytes: bytes per weight / activation element (4 for float32, 2 for bfloat16).
        extra_params: parameters outside the text tower (projector, vision tower).
        extra_activations: bytes of the largest transient tensors outside the text tower (a vision
            tower that runs before the prefill); the peak holds the larger of these and one decoder
            layer's, since the tower's are freed before the prefill starts.
    """
    from .limits import state_bytes

    b, t = batch, seq_len
    weights = (text_tower_params(dims) + extra_params) * dtype_bytes
    per_token = 3 * dims.intermediate + 4 * dims.hidden + 2 * dims.heads * dims.head_dim * (2 if dims.query_gate else 1)
    activations = (b * t * per_token + b * dims.heads * t * t) * dtype_bytes
    if dims.linear_attention_layers():
        # a gated delta net layer: its projections in the run's dtype, and the chunked rule's float32
        # tensors (q, k, v, k_beta, v_beta, new values, decayed keys, output: at most 8 of H_v x d per
        # token, d = max(d_k, d_v); the three 64x64 intra-chunk matrices per value head)
        hv, width = dims.linear_value_heads, max(dims.linear_key_dim, dims.linear_value_dim)
        conv = dims.conv_channels
        linear_layer = (b * t * (3 * dims.intermediate + 4 * dims.hidden + 2 * conv + hv * dims.linear_value_dim)
                        * dtype_bytes + b * (t + 64) * hv * (8 * width + 3 * 64) * 4)
        activations = max(activations, linear_layer)
    activations = max(activations, extra_activations)
    kv_layers = len(dims.full_attention_layers())
    kv = 2 * kv_layers * b * dims.kv_heads * dims.head_dim * (t + max_new_tokens) * dtype_bytes
    kv += state_bytes(dims, b, dtype_bytes)       # the linear-attention layers' fixed-size states
    return MemoryEstimate(weights=int(weights), activations=int(activations), kv_cache=int(kv))


def available_memory(device=None) -> int | None:
    """Bytes free for a new run: the free CUDA memory on a GPU, else ``MemAvailable`` of
    ``/proc/meminfo`` (``None`` where it cannot be read)."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def isolated_peak_memory(spec, config, *, dtype: str, batch: int, max_new_tokens: int,
                         threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run one ``generate()`` of the synthetic model ``spec`` (with ``config`` applied, or unreduced
    when ``None``) in a fresh CPU process.

    Args:
        spec: a :class:`~pact_vlm.bench.models.SyntheticSpec`.
        config: a method config or ``None``.
        dtype: ``"float32"`` or ``"bfloat16"``.
        batch, max_new_tokens: as for the timed runs.
        threads: torch threads in the child (default: torch's default).
        timeout: seconds before the child is stopped (None: no limit).

    Returns:
        ``{"peak_rss_bytes", "rss_increase_bytes", "rss_before_bytes"}``.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise ValueError("a fresh-process peak-memory measurement needs Linux /proc (clear_refs)")
    request = {"spec": spec.to_dict(), "config": config.to_dict() if config is not None else None,
               "dtype": dtype, "batch": batch, "max_new_tokens": max_new_tokens, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "pact_vlm.bench.memory", json.dumps(request)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the memory-measurement process failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(request: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..config import config_from_dict
    from ..integration.handle import apply
    from .models import SyntheticSpec, build_synthetic_model, synthetic_inputs
    from .speed import _MemoryProbe

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    spec_data = dict(request["spec"])
    for key in ("image_size", "noise"):
        spec_data[key] = tuple(spec_data[key])
    spec = SyntheticSpec(**spec_data)
    model = build_synthetic_model(spec, dtype=getattr(torch, request["dtype"]))
    inputs = synthetic_inputs(model, spec, batch=int(request["batch"]))
    config = config_from_dict(request["config"]) if request["config"] else None
    handle = apply(model, config) if config is not None else None
    n = int(request["max_new_tokens"])
    probe = _MemoryProbe(torch.device("cpu"))
    probe.start()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    peak, increase = probe.stop()
    if handle is not None:
        handle.remove()
    return {"peak_rss_bytes": peak, "rss_increase_bytes": increase, "rss_before_bytes": probe.base}


if __name__ == "__main__":  # pragma: no cover - run as a child process
    print(json.dumps(_child(json.loads(sys.argv[1]))))
