"""Where the CLS token of a demo VLM's CLIP tower looks: the object tokens, or the background?

PruMerge, HiRED and VisionZip keep the visual tokens the CLS token attends to most. This script
measures, on the fidelity benchmark's evaluation questions, how many of the most-attended patches
lie under an object (the tokens that carry the answer) in each layer of the tower, for the two
forms the methods use: one softmax over the concatenated heads (PruMerge's reference code) and the
per-head softmax summed over heads (HiRED, VisionZip). A fraction near the image's object share
is chance; below it, the CLS token prefers the background. Then, through ``pact_vlm.apply``, the
share of object tokens among the tokens PruMerge actually kept (the rows its merge changed).

    python benchmarks/cls_attention.py [--model-dir src/pact_vlm/demo/model_clip] [--n 500]

Writes benchmarks/results/fidelity_clip_demo/cls_attention.json (and prints a table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import pact_vlm
from pact_vlm.algorithms import baselines as bl
from pact_vlm.bench.fidelity import EVAL_START, _image_features
from pact_vlm.demo import CLIP_MODEL_DIR, load_demo_model, make_dataset
from pact_vlm.demo.model import prompt
from pact_vlm.integration.vision import _encoder_layers

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity_clip_demo" / "cls_attention.json"


@torch.no_grad()
def measure(model, processor, n: int, keep_ratio: float = 0.5, batch_size: int = 100) -> dict:
    """Object share of the top ``keep_ratio`` CLS-attended patches per layer and form, and of PruMerge's kept tokens."""
    if model.config.model_type != "llava":
        raise ValueError(f"this measures a CLIP tower with a CLS token (the LLaVA demo); got {model.config.model_type!r}")
    layers = _encoder_layers(model.model.vision_tower)
    heads = layers[0].self_attn.num_heads
    captured: dict = {}
    hooks = [getattr(layer.self_attn, proj).register_forward_hook(
        lambda mod, args, out, key=(i, proj): captured.__setitem__(key, out))
        for i, layer in enumerate(layers) for proj in ("q_proj", "k_proj")]
    samples = make_dataset("heldout", n, start=EVAL_START)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    sums: dict = {}
    object_share, kept_object, kept_total = [], 0, 0
    try:
        for start in range(0, n, batch_size):
            chunk = samples[start:start + batch_size]
            batch = dict(processor(images=[s.image for s in chunk], text=[prompt(processor, s.question) for s in chunk],
                                   return_tensors="pt", padding=True))
            mask = torch.stack([torch.from_numpy(s.object_patch_mask).flatten() for s in chunk]).bool()
            object_share.append(mask.float().mean(dim=1))
            reference = _projector_input(model, batch)           # also fills ``captured``
            k = max(1, round(keep_ratio * mask.shape[1]))
            for i in range(len(layers)):
                for form, h in (("concatenated heads", None), ("per-head, summed", heads)):
                    attn = bl.cls_attention(captured[i, "q_proj"], captured[i, "k_proj"], h)
                    top = attn.topk(k, dim=1).indices
                    entry = sums.setdefault((i, form), {"top_object": 0.0, "attn_object": 0.0, "attn_background": 0.0})
                    entry["top_object"] += float(mask.gather(1, top).float().mean(dim=1).sum())
                    entry["attn_object"] += float(((attn * mask).sum(1) / mask.sum(1).clamp(min=1)).sum())
                    entry["attn_background"] += float(((attn * ~mask).sum(1) / (~mask).sum(1).clamp(min=1)).sum())
            # PruMerge through the library: the rows of the projector's input its merge changed
            changed = _projector_input(model, batch, pact_vlm.PruMergeConfig(keep_ratio=keep_ratio))
            kept = (changed != reference).any(dim=-1)
            kept_object += int((kept & mask).sum())
            kept_total += int(kept.sum())
    finally:
        for hook in hooks:
            hook.remove()
    rows = [{"layer": i, "form": form, **{key: value / n for key, value in entry.items()}}
            for (i, form), entry in sums.items()]
    return {"keep_ratio": keep_ratio, "n": n, "object_share": float(torch.cat(object_share).mean()),
            "rows": rows, "prumerge_kept_object_share": kept_object / max(kept_total, 1),
            "prumerge_kept_per_image": kept_total / n, "prumerge_reads_layer": len(layers) - 1}


def _projector_input(model, batch, config=None) -> torch.Tensor:
    """The projector's input for ``batch`` (the selected layer, CLS dropped), under ``config`` if given."""
    seen = {}
    with contextlib.ExitStack() as stack:
        if config is not None:
            stack.enter_context(pact_vlm.apply(model, config))
        # registered after the method's own pre-hook, so it sees the merged features
        spy = model.model.multi_modal_projector.register_forward_pre_hook(lambda mod, args: seen.__setitem__("f", args[0]))
        stack.callback(spy.remove)
        if config is None:
            _image_features(model, dict(batch))
        else:
            model(**batch)
    return seen["f"]


def format_table(result: dict) -> str:
    lines = [f"object share of the patches: {result['object_share']:.3f} (chance level for the top-k columns)",
             f"top {result['keep_ratio']:.0%} of the CLS attention, n={result['n']} images", "",
             f"{'layer':>5}  {'form':<20} {'object share':>12} {'mean attn object':>17} {'mean attn background':>21}"]
    for row in result["rows"]:
        lines.append(f"{row['layer']:>5}  {row['form']:<20} {row['top_object']:>12.3f} {row['attn_object']:>17.4f} "
                     f"{row['attn_background']:>21.4f}")
    lines += ["", f"PruMerge(keep_ratio={result['keep_ratio']}) through pact_vlm.apply (reads layer "
              f"{result['prumerge_reads_layer']}, concatenated heads): {result['prumerge_kept_per_image']:.1f} tokens "
              f"kept per image, object share {result['prumerge_kept_object_share']:.3f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(CLIP_MODEL_DIR))
    parser.add_argument("--n", type=int, default=500, help="evaluation images")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.n < 1 or not 0.0 < args.keep_ratio < 1.0:
        parser.error(f"--n {args.n} must be >= 1 and --keep-ratio {args.keep_ratio} in (0, 1)")
    started = time.time()
    model, processor = load_demo_model(args.model_dir)
    result = measure(model, processor, args.n, args.keep_ratio)
    print(format_table(result))
    result.update(command="python benchmarks/cls_attention.py" + (f" --n {args.n}" if args.n != 500 else ""),
                  machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  seconds=round(time.time() - started, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
