"""Peak CPU memory of one variant in a fresh process.

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
from typing import Any

__all__ = ["isolated_peak_memory"]


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
