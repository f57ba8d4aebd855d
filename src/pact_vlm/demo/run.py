"""``pact-vlm demo``: the shipped demo VLM answering questions with and without PACT."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import shapes

__all__ = ["DEMO_CONFIG_FILE", "demo_config_path", "run_demo"]

DEMO_CONFIG_FILE = "pact_config.json"
"""File, next to the demo model's weights, holding the PACT setting the demo uses."""


def demo_config_path(model_dir: str | Path | None = None) -> Path:
    """Path of the PACT config shipped with the demo model (``pact_config.json`` in its folder).

    That setting is :func:`pact_vlm.tune`'s choice at 70% visual-token reduction on the fidelity
    benchmark's calibration questions (``python benchmarks/tune_demo_config.py``; see
    ``benchmarks/results/fidelity/tune_demo_config.txt``).
    """
    from .model import DEFAULT_MODEL_DIR

    path = Path(model_dir or DEFAULT_MODEL_DIR) / DEMO_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {DEMO_CONFIG_FILE} in {str(path.parent)!r}; pass --config FILE or --method, "
                                "or point --model-dir at a folder with a trained demo model")
    return path


@torch.no_grad()
def _timed_answer(model, processor, sample, handle=None) -> dict[str, Any]:
    from .model import prompt

    inputs = processor(images=[sample.image], text=[prompt(processor, sample.question)], return_tensors="pt")
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    row = {"answer": text, "seconds": seconds}
    if handle is not None:
        row["visual_before"] = handle.stats.visual_before
        row["visual_after"] = handle.stats.visual_after
    return row


def run_demo(model_dir: str | Path | None = None, config=None, *, n: int = 5, seed: int = 0,
             picture: str | Path | None = "pact_demo.png", repeats: int = 3, echo=print) -> dict[str, Any]:
    """Ask the demo model ``n`` held-out questions with and without PACT; print and return the results.

    Args:
        model_dir: folder of the demo model (default: the copy inside the package).
        config: a method config (default: the shipped ``pact_config.json``).
        n: questions (one per question type first, from held-out seed ``seed`` on).
        seed: offset of the first question in the held-out seeds.
        picture: PNG path for the picture of the kept / merged / dropped tokens of the first
            question, or ``None`` for no picture.
        repeats: each answer is timed this many times; the median is reported.
        echo: where the lines go (``print`` by default).

    Returns:
        ``{"config", "questions": [...], "accuracy_unreduced", "accuracy_reduced", "picture"}``.
    """
    from ..integration.handle import apply
    from .model import load_demo_model

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (the number of questions)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an integer >= 1")
    model, processor = load_demo_model(model_dir)
    if config is None:
        from ..config import load_config

        config = load_config(demo_config_path(model_dir))
    samples = [shapes.make_sample(shapes.HELDOUT_SEEDS[seed + i], qtype=shapes.QTYPES[i % len(shapes.QTYPES)])
               for i in range(n)]
    echo(f"demo VLM: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
         f"method: {config!r}")
    _timed_answer(model, processor, samples[0])     # warm-up
    rows = []
    for sample in samples:
        plain = min((_timed_answer(model, processor, sample) for _ in range(repeats)), key=lambda r: r["seconds"])
        with apply(model, config) as handle:
            reduced = min((_timed_answer(model, processor, sample, handle) for _ in range(repeats)),
                          key=lambda r: r["seconds"])
        row = {"seed": sample.seed, "question": sample.question, "truth": sample.answer,
               "unreduced": plain, "reduced": reduced}
        rows.append(row)
        mark = lambda a: "ok" if a == sample.answer else "WRONG"  # noqa: E731
        echo(f"\nQ: {sample.question}  (truth: {sample.answer})")
        echo(f"   unreduced: {plain['answer']:<12} [{mark(plain['answer'])}]  {plain['seconds'] * 1e3:6.1f} ms")
        echo(f"   {config.method:<9}: {reduced['answer']:<12} [{mark(reduced['answer'])}]  "
             f"{reduced['seconds'] * 1e3:6.1f} ms   visual tokens {reduced['visual_before']} -> "
             f"{reduced['visual_after']}")
    acc = lambda key: sum(r[key]["answer"] == r["truth"] for r in rows) / len(rows)  # noqa: E731
    before = sum(r["reduced"]["visual_before"] for r in rows)
    after = sum(r["reduced"]["visual_after"] for r in rows)
    echo(f"\n{len(rows)} questions: unreduced {acc('unreduced'):.0%} right, {config.method} {acc('reduced'):.0%} "
         f"right; visual tokens {before} -> {after} ({1 - after / before:.0%} fewer)")
    result = {"config": config.to_dict(), "questions": rows, "accuracy_unreduced": acc("unreduced"),
              "accuracy_reduced": acc("reduced"), "picture": None}
    if picture is not None:
        result["picture"] = str(_picture(model, processor, config, samples[0], picture))
        echo(f"token picture of the first question: {result['picture']}")
    return result


def _picture(model, processor, config, sample, path) -> Path:
    from .. import viz

    # drawn 4x larger so the legend does not hide the 128-px image; the processor resizes it back
    big = sample.image.resize((4 * sample.image.width, 4 * sample.image.height), Image.NEAREST)
    result = viz.visualize(model, processor, big, config, sample.question)
    path = Path(path)
    result.image.save(path)
    return path
