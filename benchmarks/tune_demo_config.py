"""Regenerate the demo VLM's shipped config (src/pact_vlm/demo/model/pact_config.json) with pact_vlm.tune.

Calibration: the fidelity benchmark's calibration split (held-out seeds from ``CALIB_START``), never its
evaluation questions. Target: 70% fewer visual tokens at the layer of the current shipped config.

    python benchmarks/tune_demo_config.py [--n 64] [--target-ratio 0.7] [--dry-run]

Writes the config, and the table beside the fidelity results (benchmarks/results/fidelity/tune_demo_config.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import pact_vlm
from pact_vlm.bench.fidelity import CALIB_START, _encode
from pact_vlm.demo import make_dataset
from pact_vlm.demo.model import DEFAULT_MODEL_DIR, load_demo_model
from pact_vlm.presets import CONFIG_FILENAME

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="calibration questions")
    parser.add_argument("--target-ratio", type=float, default=0.7)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the config")
    args = parser.parse_args()
    started = time.time()
    model, processor = load_demo_model()
    current, origin = pact_vlm.model_config(DEFAULT_MODEL_DIR)
    calibration = _encode(model, processor, make_dataset("heldout", args.n, start=CALIB_START), 32).batches
    result = pact_vlm.tune(model, calibration, target_ratio=args.target_ratio, layer=current.layer,
                           base=pact_vlm.PACTConfig(layer=current.layer))
    print(result.format_table())
    print(result.config.to_json())
    if args.dry_run:
        return
    result.config.save(DEFAULT_MODEL_DIR / CONFIG_FILENAME)
    command = "python benchmarks/tune_demo_config.py" + (f" --n {args.n}" if args.n != 64 else "") + (
        f" --target-ratio {args.target_ratio}" if args.target_ratio != 0.7 else "")
    record = dict(result.to_dict(), command=command, previous=current.to_dict(), previous_origin=origin,
                  calibration=f"heldout[{CALIB_START}:{CALIB_START + args.n}]",
                  machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads",
                  date=datetime.date.today().isoformat(), seconds=time.time() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_demo_config.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "tune_demo_config.txt").write_text(f"# {command}\n# {record['machine']}, {record['date']}\n"
                                                   + result.format_table() + "\n")
    result.plot(RESULTS / "tune_demo_config.png", title=f"demo VLM: {result.samples} calibration questions, "
                                                       f"target {args.target_ratio:g}")
    print(f"wrote {DEFAULT_MODEL_DIR / CONFIG_FILENAME} and {RESULTS}/tune_demo_config.*")


if __name__ == "__main__":
    main()
