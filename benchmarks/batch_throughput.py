"""Prefill throughput at several batch sizes, with and without PACT, in one run.

    python benchmarks/batch_throughput.py [--synthetic llava-onevision-0.5b] [--layers 7] [--layer 1]
        [--batches 1 4 8] [--target-ratio 0.713] [--repeats 3] [--warmup 1] [--dtype float32]

A random-weight LLaVA-OneVision (``pact_vlm.bench.models``; default: the text-tower width of
LLaVA-OneVision-0.5B, 7 layers, L = 1) gets one 480x640 image per prompt (2929 placeholders) and
50 text tokens; every sample has its own synthetic scene, so samples keep different numbers of
tokens and the batch is re-packed after layer L. PACT's cutoff is calibrated once with
``pact_vlm.match_budget`` on the largest batch. For each batch size, ``measure_speed`` alternates
unreduced and PACT runs of ``generate(max_new_tokens=1)`` (the prefill) and the script reports
samples per second (batch / time to first token), the paired speed-up and the analytical limit.
Writes ``benchmarks/results/batch_throughput.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import pact_vlm
from pact_vlm.bench import SyntheticSpec, build_synthetic_model, measure_speed, resolve_device, synthetic_inputs
from pact_vlm.bench.limits import TextDims, work_fraction
from pact_vlm.bench.models import describe
from pact_vlm.bench.speed import machine_description, quartiles


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="llava-onevision-0.5b")
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--prune-ratio", type=float, default=0.45)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--target-ratio", type=float, default=0.713)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_throughput.json"))
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batches):
        ap.error(f"--batches {args.batches}: every batch size must be >= 1")
    if not 0 < args.target_ratio < 1:
        ap.error(f"--target-ratio={args.target_ratio} must lie strictly between 0 and 1")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = SyntheticSpec.preset(args.synthetic, layers=args.layers)
    base_cfg = pact_vlm.PACTConfig(layer=args.layer, prune_ratio=args.prune_ratio)
    if args.layer >= spec.layers:
        ap.error(f"--layer={args.layer} is beyond the model: it has {spec.layers} decoder layers")

    def say(line):
        print(line, file=sys.stderr, flush=True)

    model = build_synthetic_model(spec, device=device, dtype=getattr(torch, args.dtype))
    say(describe(spec, model))
    inputs = {b: synthetic_inputs(model, spec, batch=b) for b in sorted(set(args.batches))}
    largest = max(inputs)
    say(f"calibrating the cutoff on batch {largest} for reduction ratio {args.target_ratio} ...")
    cfg = pact_vlm.match_budget(model, base_cfg, inputs[largest], args.target_ratio, tol=0.005)
    say(f"  cutoff = {cfg.cutoff:.4f}")

    dims = TextDims.from_config(model.config)
    rows, runs = [], {}
    for b in args.batches:
        say(f"batch {b}:")
        res = measure_speed(model, cfg, inputs[b], repeats=args.repeats, warmup=args.warmup, max_new_tokens=1,
                            names=["pact"], model_description=describe(spec, model), progress=say)
        base, red = res.variant("unreduced"), res.variant("pact")
        tput_base = [b / t for t in base["samples"]["ttft_s"]]
        tput_red = [b / t for t in red["samples"]["ttft_s"]]
        rows.append({
            "batch": b,
            "unreduced_samples_per_s": quartiles(tput_base),
            "pact_samples_per_s": quartiles(tput_red),
            "throughput_ratio": quartiles([r / u for r, u in zip(tput_red, tput_base)]),
            "lm_prefill_speedup": red["ratios"]["lm_prefill_speedup"],
            "possible_speedup": red["limit"]["possible_speedup"],
            # the re-packed batch pads every sample to the longest one after layer L
            "possible_speedup_packed": work_fraction(
                dims, res.meta["prompt_tokens"], red["reduction"]["seq_lengths"][-1], cfg.layer)["possible_speedup"],
            "reduction_ratio": red["reduction"]["reduction_ratio"],
            "per_sample_visual_after": [a for _, a in red["reduction"]["per_sample_visual"]],
            "packed_length_after_layer": red["reduction"]["seq_lengths"][-1],
            "prompt_tokens": res.meta["prompt_tokens"],
            "peak_memory_ratio": red["ratios"].get("peak_memory_ratio"),
        })
        runs[str(b)] = res.to_dict()

    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(device),
        "device": str(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "model": describe(spec, model),
        "synthetic_spec": spec.to_dict(),
        "config": cfg.to_dict(),
        "target_ratio": args.target_ratio,
        "throughput": "samples per second = batch / time to first token of generate(max_new_tokens=1) "
                      "(embedding + every decoder layer incl. the reduction step + lm_head)",
        "limits": "possible_speedup: each sample on its own kept length; possible_speedup_packed: every "
                  "sample at the re-packed batch's length (padded to the longest reduced sample)",
        "rows": rows,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(f"{result['model']}\n{result['machine']}, {args.dtype}; PACT layer {cfg.layer}, prune_ratio "
          f"{cfg.prune_ratio}, cutoff {cfg.cutoff:.4f} (calibrated to {args.target_ratio})\n")
    print(f"{'batch':>5} {'unreduced samples/s':>22} {'PACT samples/s':>22} {'ratio':>7} {'q1-q3':>11} "
          f"{'limit':>6} {'packed':>6} {'reduction':>9}")
    for r in rows:
        u, p, t = r["unreduced_samples_per_s"], r["pact_samples_per_s"], r["throughput_ratio"]
        print(f"{r['batch']:>5} {u['median']:>9.3f} ({u['q1']:.3f}-{u['q3']:.3f}) {p['median']:>9.3f} "
              f"({p['q1']:.3f}-{p['q3']:.3f}) {t['median']:>6.2f}x {t['q1']:.2f}-{t['q3']:.2f} "
              f"{r['possible_speedup']:>5.2f}x {r['possible_speedup_packed']:>5.2f}x {r['reduction_ratio']:>8.1%}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
