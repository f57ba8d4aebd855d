"""vLLM throughput of a fixed set of image prompts, with and without the PACT plugin, in one run.

    python benchmarks/vllm_throughput.py [--arch qwen2_vl] [--layers 8] [--hidden 512] [--heads 8]
        [--prompts 16] [--image-size 448] [--keep-ratio 0.3] [--max-tokens 16] [--repeats 5] [--dtype float32]

Needs vLLM (the environment of ``.ci/vllm/setup-venv``). A random-weight Qwen2-VL / Qwen2.5-VL
(``tests/vllm_folder.py``; default: text width 512, 8 layers, head dim 64, 14-px patches, so a
448 x 448 image gives 256 visual tokens) is saved to a temporary folder and loaded twice in this
process: stock vLLM and ``Pact*ForConditionalGeneration`` (``keep_ratio``). Every repeat runs the
same prompts (one image each, new random images every repeat, the same for both engines) through both engines (prefix
caching and the multimodal processor cache off, so every repeat does all the work), in alternating order, as one ``LLM.generate`` call (greedy, ``max_tokens`` generated tokens each,
``ignore_eos``); the reported throughput is prompts per second of that call (median and quartiles
over repeats) and the paired ratio PACT / stock per repeat. Writes
``benchmarks/results/vllm/throughput_cpu_<arch>_<layers>x<hidden>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # both engines in this process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))                        # the tiny-model folder builder

from vllm_folder import MERGE, PLUGIN_ARCH, image, prompt, save_tiny  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2_vl", choices=sorted(PLUGIN_ARCH))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--keep-ratio", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "vllm"))
    args = ap.parse_args(argv)
    if not 0 < args.keep_ratio <= 1:
        ap.error(f"--keep-ratio={args.keep_ratio} must be in (0, 1]")
    if args.repeats < 1 or args.prompts < 1 or args.max_tokens < 1:
        ap.error("--repeats, --prompts and --max-tokens must be >= 1")

    import torch
    import vllm

    from pact_vlm.algorithms.budget_pact import budget_keep_count
    from pact_vlm.bench.speed import machine_description, paired_ratio, quartiles

    side = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(Path(tmp) / args.arch, args.arch, num_layers=args.layers, hidden_size=args.hidden,
                           num_heads=args.heads, patch=args.patch, max_pixels=side * side)

        def requests(round_: int) -> list[dict]:     # new images each round: vLLM's encoder cache never hits
            return [{"prompt": prompt(1), "multi_modal_data": {"image": image(side, side, 1000 * round_ + i)}}
                    for i in range(args.prompts)]
        params = vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        # no prefix caching and no processor cache: every repeat encodes, reduces and prefills every prompt
        common = dict(max_model_len=512, enforce_eager=True, dtype=args.dtype,
                      limit_mm_per_prompt={"image": 1, "video": 0}, seed=0,
                      enable_prefix_caching=False, mm_processor_cache_gb=0)
        engines = {
            "stock": vllm.LLM(model=str(folder), **common),
            "pact": vllm.LLM(model=str(folder), hf_overrides={"architectures": [PLUGIN_ARCH[args.arch]],
                                                              "pact": {"keep_ratio": args.keep_ratio}}, **common),
        }
        prompt_tokens = {}
        for name, llm in engines.items():          # warm-up, and the prompt lengths
            outs = llm.generate(requests(0), params, use_tqdm=False)
            prompt_tokens[name] = sum(len(o.prompt_token_ids) for o in outs)
        seconds = {name: [] for name in engines}
        for r in range(args.repeats):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            batch = requests(r + 1)
            for name in order:
                start = time.perf_counter()
                engines[name].generate(batch, params, use_tqdm=False)
                seconds[name].append(time.perf_counter() - start)
        del engines
        gc.collect()

    n_visual = (side // args.patch // MERGE) ** 2
    throughput = {name: [args.prompts / s for s in secs] for name, secs in seconds.items()}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)),
                                                                  *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(torch.device("cpu")),
        "platform": platform.platform(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "model": {"arch": args.arch, "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "head_dim": args.hidden // args.heads, "random_weights": True, "dtype": args.dtype},
        "workload": {"prompts": args.prompts, "image": [side, side], "visual_tokens_per_image": n_visual,
                     "kept_per_image": budget_keep_count(n_visual, args.keep_ratio), "max_tokens": args.max_tokens,
                     "keep_ratio": args.keep_ratio, "repeats": args.repeats},
        "prompt_tokens": prompt_tokens,
        "seconds": seconds,
        "prompts_per_second": {name: quartiles(v) for name, v in throughput.items()},
        "ratio_pact_over_stock": paired_ratio(throughput["pact"], throughput["stock"]),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput_cpu_{args.arch}_{args.layers}x{args.hidden}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    w, pps = r["workload"], r["prompts_per_second"]
    ratio = r["ratio_pact_over_stock"]
    rows = [f"| {name} | {r['prompt_tokens'][name]} | {pps[name]['median']:.2f} "
            f"({pps[name]['q1']:.2f}-{pps[name]['q3']:.2f}) |" for name in ("stock", "pact")]
    return "\n".join([
        "# vLLM throughput with and without the PACT plugin",
        "",
        f"`{r['command']}`  ",
        f"{r['date']}; {r['machine']}; vLLM {r['versions']['vllm']}, torch {r['versions']['torch']}, "
        f"transformers {r['versions']['transformers']}",
        "",
        f"{w['prompts']} prompts, one {w['image'][0]}x{w['image'][1]} image each ({w['visual_tokens_per_image']} "
        f"visual tokens; PACT keeps {w['kept_per_image']} at keep_ratio={w['keep_ratio']}), {w['max_tokens']} "
        f"generated tokens each; random-weight {r['model']['arch']} ({r['model']['layers']} layers, width "
        f"{r['model']['hidden']}, {r['model']['dtype']}); {w['repeats']} repeats, engines alternating.",
        "",
        "| engine | prompt tokens (all prompts) | prompts/s, median (quartiles) |",
        "|---|---|---|",
        *rows,
        "",
        f"PACT / stock throughput, paired per repeat: {ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f}).",
        "",
    ])


if __name__ == "__main__":
    main()
