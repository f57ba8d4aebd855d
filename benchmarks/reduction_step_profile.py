"""Where the time of PACT's reduction step goes, at real width, on a random-weight model.

    python benchmarks/reduction_step_profile.py [--synthetic llava-onevision-7b] [--layers 2] [--layer 1]
        [--cutoff 0.24] [--dtype bfloat16] [--repeats 5]

Runs the prefill of a synthetic LLaVA-OneVision (``pact_vlm.bench.models``: one 480x640 image,
2929 placeholders, 50 text tokens) with PACT applied, under ``cProfile``, and reports for the
functions the reduction step calls at layer L (recomputing the layer's keys and EUTI's mean query, EUTI,
the split, DBDPC with retrieval, merging) their cumulative wall time per prefill (median over
repeats), beside ``handle.stats.seconds`` and the time of one unreduced decoder layer. Also times
the one product EUTI needs from the queries: the mean query computed as ``q_proj`` of the mean
normalised input (``q_proj`` is affine) instead of the mean of every token's query.
Prints a table and writes ``benchmarks/results/speed_reduction_step_profile.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

import pact_vlm
from pact_vlm.bench import SyntheticSpec, build_synthetic_model, synthetic_inputs
from pact_vlm.bench.models import describe
from pact_vlm.bench.speed import machine_description

# (label, function name, file-name fragment) of the pieces of the step, as cProfile names them
PIECES = [
    ("keys of layer L (all tokens)", "queries_keys", "adapters"),
    ("EUTI's mean query (one row through q_proj)", "mean_query", "adapters"),
    ("PACT on the visual tokens", "pact_reduce", "pact.py"),
    ("  EUTI scores", "euti_scores", "euti.py"),
    ("  DBDPC + retrieval", "dbdpc", "dbdpc.py"),
    ("  merging", "merge_clusters", "merge.py"),
]


def _cumulative(stats: pstats.Stats, name: str, fragment: str) -> float:
    total = 0.0
    for (filename, _, func), (_, _, _, cum, _) in stats.stats.items():
        if func == name and fragment in filename:
            total += cum
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="llava-onevision-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--cutoff", type=float, default=0.24)
    ap.add_argument("--prune-ratio", type=float, default=0.45)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_reduction_step_profile.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")
    if not 0 <= args.layer < args.layers:
        ap.error(f"--layer={args.layer} must lie in [0, {args.layers - 1}] for a {args.layers}-layer model")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = SyntheticSpec.preset(args.synthetic, layers=args.layers)
    dtype = getattr(torch, args.dtype)
    model = build_synthetic_model(spec, dtype=dtype)
    inputs = synthetic_inputs(model, spec)
    cfg = pact_vlm.PACTConfig(layer=args.layer, prune_ratio=args.prune_ratio, cutoff=args.cutoff)
    layer = model.model.language_model.layers[args.layer]

    # one unreduced decoder layer at full length, and the mean-query alternative, on layer L's input
    captured = {}

    def grab(module, a, kw):
        captured["hidden"] = a[0] if a else kw["hidden_states"]
        captured["kw"] = kw

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    h.remove()
    hidden, kw = captured["hidden"], captured["kw"]
    layer_s, meanq_s, allq_s = [], [], []
    attn = layer.self_attn
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            layer(hidden, **kw)
            t1 = time.perf_counter()
            normed = layer.input_layernorm(hidden)
            t2 = time.perf_counter()
            attn.q_proj(normed).mean(dim=1)
            t3 = time.perf_counter()
            attn.q_proj(normed.mean(dim=1))
            t4 = time.perf_counter()
            layer_s.append(t1 - t0)
            allq_s.append(t3 - t2)
            meanq_s.append(t4 - t3)

    per_piece = {label: [] for label, _, _ in PIECES}
    step_s, after = [], None
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs, use_cache=False)      # warm-up
        for _ in range(args.repeats):
            prof = cProfile.Profile()
            prof.enable()
            model(**inputs, use_cache=False)
            prof.disable()
            stats = pstats.Stats(prof)
            for label, name, fragment in PIECES:
                per_piece[label].append(_cumulative(stats, name, fragment))
            step_s.append(handle.stats.seconds)
            after = handle.stats
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(torch.device("cpu")),
        "dtype": args.dtype,
        "model": describe(spec, model),
        "config": cfg.to_dict(),
        "visual_before": after.visual_before,
        "visual_after": after.visual_after,
        "stats_seconds_median": statistics.median(step_s),
        "profiled_median_s": {label: statistics.median(v) for label, v in per_piece.items()},
        "one_unreduced_layer_median_s": statistics.median(layer_s),
        "q_proj_all_tokens_then_mean_s": statistics.median(allq_s),
        "q_proj_of_mean_input_s": statistics.median(meanq_s),
        "note": "cProfile times include the profiler's overhead; handle.stats.seconds is the unprofiled "
                "measure of the same step",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(result["model"])
    print(f"{result['machine']}, {args.dtype}; PACT layer {cfg.layer}, cutoff {cfg.cutoff}: visual "
          f"{after.visual_before} -> {after.visual_after}")
    print(f"reduction step (handle.stats.seconds, median): {result['stats_seconds_median'] * 1e3:.0f} ms; "
          f"one unreduced decoder layer: {result['one_unreduced_layer_median_s'] * 1e3:.0f} ms")
    for label, value in result["profiled_median_s"].items():
        shown = f"{value * 1e3:8.1f} ms (profiled)" if value else "     not found (renamed?)"
        print(f"  {label:<42} {shown}")
    print(f"EUTI's mean query: q_proj on every token then mean {result['q_proj_all_tokens_then_mean_s'] * 1e3:.0f} ms;"
          f" q_proj of the mean normalised input {result['q_proj_of_mean_input_s'] * 1e3:.2f} ms")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
