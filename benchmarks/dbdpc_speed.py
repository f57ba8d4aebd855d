"""DBDPC speed against the bare distance product, on the CPU in float32.

    python benchmarks/dbdpc_speed.py [--kept 2400] [--pruned 600] [--dim 512] [--repeats 30] [--threads N]

Two inputs, both 2400 kept + 600 pruned keys of dimension 512 drawn around 400 random directions:

* ``few centers``: noise 0.35, cut-off 0.21 (about 400 centers: most kept keys join a cluster);
* ``many centers``: noise 0.337, cut-off 0.1 (about 1300 centers: most kept keys are centers,
  so the center rule, the assignment and the retrieval handle many clusters).

For each input, alternating in one run: (a) the bare distance product
``normalize(X) @ normalize(X).T`` on the kept keys, (b) ``pact_vlm.dbdpc`` on the kept keys plus
retrieval of the pruned keys. Reports medians, the spread (interquartile range), the per-repeat
ratio b / a and how dbdpc's time splits into distances, density, center selection (with the
assignment of the kept keys) and retrieval. Writes ``benchmarks/results/dbdpc_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import pact_vlm

CASES = {"few centers": {"noise": 0.35, "cutoff": 0.21}, "many centers": {"noise": 0.337, "cutoff": 0.1}}


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _keys(kept: int, pruned: int, dim: int, groups: int, noise: float):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(groups, dim, generator=g)
    n = kept + pruned
    x = centers[torch.randint(0, groups, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return x[:kept].contiguous(), x[kept:].contiguous()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=int, default=2400)
    ap.add_argument("--pruned", type=int, default=600)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--groups", type=int, default=400, help="number of key directions in the synthetic data")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dbdpc_speed.json"))
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error(f"--repeats={args.repeats} is too few for a median and spread; use 3 or more")
    if args.threads < 1:
        ap.error(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)

    inputs = {name: _keys(args.kept, args.pruned, args.dim, args.groups, case["noise"]) for name, case in CASES.items()}

    def bare(kept):
        xn = torch.nn.functional.normalize(kept, dim=-1)
        return xn @ xn.T

    def full(name):
        kept, pruned = inputs[name]
        return pact_vlm.dbdpc(kept, CASES[name]["cutoff"], pruned_keys=pruned, timings=True)

    for _ in range(3):
        for name, (kept, _) in inputs.items():
            bare(kept), full(name)
    t_bare = {name: [] for name in CASES}
    t_full = {name: [] for name in CASES}
    phases = {name: {} for name in CASES}
    last = {}
    for _ in range(args.repeats):
        for name, (kept, _) in inputs.items():
            t0 = time.perf_counter()
            bare(kept)
            t1 = time.perf_counter()
            last[name] = full(name)
            t2 = time.perf_counter()
            t_bare[name].append(t1 - t0)
            t_full[name].append(t2 - t1)
            for k, v in last[name].timings.items():
                phases[name].setdefault(k, []).append(v)
    cases = []
    for name, case in CASES.items():
        clusters = last[name]
        ratios = [f / b for f, b in zip(t_full[name], t_bare[name])]
        cases.append({
            "name": name,
            "shape": {"kept": args.kept, "pruned": args.pruned, "dim": args.dim, "groups": args.groups, **case},
            "n_centers": int(clusters.centers.numel()),
            "n_dropped": int((clusters.labels == -1).sum()),
            "bare_distance_product_s": _quartiles(t_bare[name]),
            "dbdpc_s": _quartiles(t_full[name]),
            "ratio_median_of_medians": statistics.median(t_full[name]) / statistics.median(t_bare[name]),
            "ratio_per_repeat": _quartiles(ratios),
            "dbdpc_phases_s": {k: statistics.median(v) for k, v in phases[name].items()},
        })
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpu_name()}, torch threads={args.threads}",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for c in cases:
        r = c["ratio_per_repeat"]
        print(f"{c['name']} (cut-off {c['shape']['cutoff']}): {c['n_centers']} centers, {c['n_dropped']} dropped; "
              f"bare {c['bare_distance_product_s']['median'] * 1e3:.1f} ms, dbdpc + retrieval "
              f"{c['dbdpc_s']['median'] * 1e3:.1f} ms; ratio per repeat {r['median']:.2f}x "
              f"(IQR {r['q1']:.2f}-{r['q3']:.2f})")
        print("  dbdpc phases (median ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in c["dbdpc_phases_s"].items()))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
