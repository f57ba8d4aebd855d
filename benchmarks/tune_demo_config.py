"""Regenerate a demo VLM's shipped config (``<model dir>/pact_config.json``) with pact_vlm.tune.

Calibration: the fidelity benchmark's calibration split (held-out seeds from ``CALIB_START``), never its
evaluation questions. Target: 70% fewer visual tokens at the layer of the folder's current config
(``--layer`` to choose; a folder without a config needs it).

    python benchmarks/tune_demo_config.py [--model-dir DIR] [--layer L] [--n 64] [--target-ratio 0.7] [--dry-run]

Writes the config, and the table beside the fidelity results: benchmarks/results/fidelity/tune_demo_config.*
for the Qwen2-VL demo (the default), benchmarks/results/fidelity_clip_demo/tune_demo_config.* for the
CLIP-tower demo (``--model-dir src/pact_vlm/demo/model_clip``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

import pact_vlm
from pact_vlm.bench.fidelity import CALIB_START, _encode
from pact_vlm.demo import make_dataset
from pact_vlm.demo.model import CLIP_MODEL_DIR, DEFAULT_MODEL_DIR, load_demo_model
from pact_vlm.presets import CONFIG_FILENAME

RESULTS = {DEFAULT_MODEL_DIR.resolve(): Path(__file__).resolve().parent / "results" / "fidelity",
           CLIP_MODEL_DIR.resolve(): Path(__file__).resolve().parent / "results" / "fidelity_clip_demo"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="a shipped demo model folder (default: the Qwen2-VL demo)")
    parser.add_argument("--layer", type=int, default=None,
                        help="reduction layer (default: the layer of the folder's pact_config.json)")
    parser.add_argument("--n", type=int, default=64, help="calibration questions")
    parser.add_argument("--target-ratio", type=float, default=0.7)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the config")
    args = parser.parse_args()
    model_dir = args.model_dir.resolve()
    if model_dir not in RESULTS:
        parser.error(f"--model-dir {args.model_dir} is not a shipped demo folder; use {DEFAULT_MODEL_DIR} or {CLIP_MODEL_DIR}")
    if not (model_dir / CONFIG_FILENAME).exists() and args.layer is None:
        parser.error(f"{model_dir} has no {CONFIG_FILENAME} to take the layer from; pass --layer (e.g. --layer 0)")
    started = time.time()
    model, processor = load_demo_model(model_dir)
    current, origin = pact_vlm.model_config(model_dir)
    layer = current.layer if args.layer is None else args.layer
    calibration = _encode(model, processor, make_dataset("heldout", args.n, start=CALIB_START), 32).batches
    result = pact_vlm.tune(model, calibration, target_ratio=args.target_ratio, layer=layer,
                           base=pact_vlm.PACTConfig(layer=layer))
    print(result.format_table())
    print(result.config.to_json())
    if args.dry_run:
        return
    result.config.save(model_dir / CONFIG_FILENAME)
    results = RESULTS[model_dir]
    command = "python benchmarks/tune_demo_config.py" + (
        f" --model-dir {os.path.relpath(model_dir, Path(__file__).resolve().parent.parent)}" if model_dir != DEFAULT_MODEL_DIR.resolve() else "") + (
        f" --layer {args.layer}" if args.layer is not None else "") + (f" --n {args.n}" if args.n != 64 else "") + (
        f" --target-ratio {args.target_ratio}" if args.target_ratio != 0.7 else "")
    record = dict(result.to_dict(), command=command, previous=current.to_dict(), previous_origin=origin,
                  calibration=f"heldout[{CALIB_START}:{CALIB_START + args.n}]",
                  machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads",
                  date=datetime.date.today().isoformat(), seconds=time.time() - started)
    results.mkdir(parents=True, exist_ok=True)
    (results / "tune_demo_config.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "tune_demo_config.txt").write_text(f"# {command}\n# {record['machine']}, {record['date']}\n"
                                                   + result.format_table() + "\n")
    result.plot(results / "tune_demo_config.png", title=f"{model.config.model_type} demo VLM: {result.samples} calibration questions, "
                                                       f"target {args.target_ratio:g}")
    print(f"wrote {model_dir / CONFIG_FILENAME} and {results}/tune_demo_config.*")


if __name__ == "__main__":
    main()
