"""Speed and memory benchmark: the reduced model against itself unreduced, and against the limit.

* :func:`measure_speed` (``speed.py``): prefill, time to first token, decode per token, end-to-end
  generate, peak memory, KV-cache bytes and the reduction step, alternating variants in one run.
* :mod:`~pact_vlm.bench.limits`: the analytical limit (prefill work left when layers >= L see
  the reduced sequence).
* :mod:`~pact_vlm.bench.models`: random-weight LLaVA-OneVision models at real widths and prompts
  with synthetic, redundant image features (no download).

``pact-vlm bench`` is the command line in front of these.
"""

from __future__ import annotations

from .limits import TextDims, kv_cache_bytes, prefill_flops, work_fraction
from .models import SyntheticSpec, build_synthetic_model, synthetic_inputs
from .speed import SpeedResult, measure_speed, resolve_device

__all__ = [
    "SpeedResult",
    "SyntheticSpec",
    "TextDims",
    "build_synthetic_model",
    "kv_cache_bytes",
    "measure_speed",
    "prefill_flops",
    "resolve_device",
    "synthetic_inputs",
    "work_fraction",
]
