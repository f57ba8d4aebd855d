"""DBDPC speed against the bare distance product, on the CPU in float32.

    python benchmarks/dbdpc_speed.py [--kept 2400] [--pruned 600] [--dim 512] [--repeats 30]

Times, alternating in one run: (a) the bare distance product ``normalize(X) @ normalize(X).T``
on the kept keys, (b) ``pact_vlm.dbdpc`` on the kept keys plus retrieval of the pruned keys.
Reports medians, the spread (interquartile range), the ratio b / a and how dbdpc's time splits
into distances, density, center selection and assignment. Writes
``benchmarks/results/dbdpc_speed.json``.
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


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=int, default=2400)
    ap.add_argument("--pruned", type=int, default=600)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--cutoff", type=float, default=0.21)
    ap.add_argument("--groups", type=int, default=400, help="number of key clusters in the synthetic data")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dbdpc_speed.json"))
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error(f"--repeats={args.repeats} is too few for a median and spread; use 3 or more")
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.groups, args.dim, generator=g)
    n = args.kept + args.pruned
    x = centers[torch.randint(0, args.groups, (n,), generator=g)] + 0.35 * torch.randn(n, args.dim, generator=g)
    kept, pruned = x[: args.kept].contiguous(), x[args.kept:].contiguous()

    def bare():
        xn = torch.nn.functional.normalize(kept, dim=-1)
        return xn @ xn.T

    def full():
        return pact_vlm.dbdpc(kept, args.cutoff, pruned_keys=pruned, timings=True)

    for _ in range(3):
        bare(), full()
    t_bare, t_full, phases = [], [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bare()
        t1 = time.perf_counter()
        clusters = full()
        t2 = time.perf_counter()
        t_bare.append(t1 - t0)
        t_full.append(t2 - t1)
        for k, v in clusters.timings.items():
            phases.setdefault(k, []).append(v)
    ratios = [f / b for f, b in zip(t_full, t_bare)]
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads={args.threads}",
        "torch": torch.__version__,
        "shape": {"kept": args.kept, "pruned": args.pruned, "dim": args.dim, "cutoff": args.cutoff},
        "n_centers": int(clusters.centers.numel()),
        "n_dropped": int((clusters.labels == -1).sum()),
        "bare_distance_product_s": _quartiles(t_bare),
        "dbdpc_s": _quartiles(t_full),
        "ratio_median_of_medians": statistics.median(t_full) / statistics.median(t_bare),
        "ratio_per_repeat": _quartiles(ratios),
        "dbdpc_phases_s": {k: statistics.median(v) for k, v in phases.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"bare distance product: {result['bare_distance_product_s']['median'] * 1e3:.1f} ms (median)")
    print(f"dbdpc + retrieval:     {result['dbdpc_s']['median'] * 1e3:.1f} ms (median), "
          f"{result['n_centers']} centers, {result['n_dropped']} dropped")
    r = result["ratio_per_repeat"]
    print(f"ratio dbdpc / bare:    {result['ratio_median_of_medians']:.2f}x "
          f"(per-repeat median {r['median']:.2f}, IQR {r['q1']:.2f}-{r['q3']:.2f})")
    print("dbdpc phases (median ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in result["dbdpc_phases_s"].items()))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
