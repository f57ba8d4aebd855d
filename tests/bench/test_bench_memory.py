"""`pact-vlm bench` defaults run on the machine they are on; every fix a memory refusal offers fits."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import pact_vlm.bench.memory as memory
from pact_vlm.bench import command
from pact_vlm.bench.models import SyntheticSpec
from pact_vlm.cli import main

GB = 10**9
CPU = torch.device("cpu")


class Built(Exception):
    """Raised in place of building the model: the run got past the memory check with this spec."""


def _args(argv=()):
    ap = argparse.ArgumentParser()
    command.add_arguments(ap)
    return ap.parse_args(list(argv))


@pytest.fixture
def built(monkeypatch):
    specs = []

    def fake(spec, args, device, dtype):
        specs.append(spec)
        raise Built()

    monkeypatch.setattr(command, "_synthetic_model", fake)
    return specs


@pytest.mark.parametrize("free", [24 * GB, 16 * GB])
def test_the_default_builds_as_many_layers_as_fit(monkeypatch, built, capsys, free):
    """No options on a 24 GB machine: not the checkpoint's 28 float32 layers (about 56 GB with the
    fresh-process copy), but the most layers that fit, said on stderr."""
    monkeypatch.setattr(memory, "available_memory", lambda device=None: free)
    with pytest.raises(Built):
        main(["--debug", "bench", "--device", "cpu"])
    spec, = built
    assert 5 <= spec.layers < 28                       # the preset reduces at layer 4
    assert f"building {spec.layers} of the checkpoint's 28 decoder layers" in capsys.readouterr().err
    args = _args()
    assert command.check_memory(args, spec, torch.float32, CPU, free=free).total <= free
    deeper = SyntheticSpec.preset("llava-onevision-7b", layers=spec.layers + 1)
    with pytest.raises(MemoryError):
        command.check_memory(args, deeper, torch.float32, CPU, free=free)


def test_a_depth_that_is_asked_for_is_never_changed(monkeypatch, built, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 24 * GB)
    assert main(["bench", "--device", "cpu", "--layers", "20"]) == 2
    assert "for 20 layers" in capsys.readouterr().err and not built


def test_the_default_is_refused_when_not_even_the_reduction_layer_fits(monkeypatch, built, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 5 * GB)
    assert main(["bench", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pact-vlm: error: this run needs about") and "for 28 layers" in err and not built


@pytest.mark.parametrize("argv, free", [
    (["--layers", "28"], 24 * GB),
    (["--layers", "28"], 15 * GB),
    (["--layers", "28", "--no-fresh-memory"], 24 * GB),
    (["--layers", "28", "--dtype", "bfloat16"], 24 * GB),
    (["--layers", "12", "--layer", "1"], 8 * GB),
])
def test_every_offered_fix_fits(monkeypatch, built, capsys, argv, free):
    """Each alternative in "use A or B or C" makes the run fit on its own."""
    monkeypatch.setattr(memory, "available_memory", lambda device=None: free)
    assert main(["bench", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    fixes = re.search(r"; use (.*), or run on a machine with more memory$", err)[1].split(" or ")
    assert fixes and all(f.startswith("--") for f in fixes), err
    for fix in fixes:
        words = fix.split()
        args = _args([*argv, *words])             # a later option wins
        spec = SyntheticSpec.preset("llava-onevision-7b", layers=args.layers)
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32
        assert command.check_memory(args, spec, dtype, CPU, free=free).total <= free, (fix, err)
    assert not built
