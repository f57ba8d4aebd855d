"""``pact-vlm bench`` on a tiny synthetic preset, for the bench test modules."""

from __future__ import annotations

import torch

from pact_vlm.bench.models import SyntheticSpec
from pact_vlm.cli import main


def run_tiny_bench(monkeypatch, name: str, preset: dict, args) -> int:
    """``pact-vlm bench --synthetic NAME`` (one thread, CPU, quiet) with ``preset`` registered as
    ``NAME`` for the test; torch's thread count, which ``--threads`` sets for the whole process, is
    restored afterwards."""
    monkeypatch.setitem(SyntheticSpec.PRESETS, name, preset)
    before = torch.get_num_threads()
    try:
        return main(["bench", "--threads", "1", "--synthetic", name, "--device", "cpu", "--quiet", *map(str, args)])
    finally:
        torch.set_num_threads(before)
