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


SPEED_SPEC = dict(layers=2, image_size=(280, 280), tile=280, text_tokens=30, vocab=4096)
"""The demo's speed line: the LLaVA-OneVision-7B text tower's width (hidden 3584, 28 / 4 heads, MLP
18944), 2 random-weight layers, reduction at layer 1, one 280x280 image on a 280-pixel anyres tile
(820 placeholders: 400 base + 20x20 grid + 20 newlines). The checkpoint's 384-pixel tile gives 1485
placeholders per image, which takes the line past a minute on two cores; ``pact-vlm bench`` measures
that geometry at full depth."""


def speed_line(spec=None, *, layer: int = 1, repeats: int = 3, dtype=torch.float32) -> dict[str, Any]:
    """Prefill speed-up of PACT at a real model width, measured in this run, with the analytical limit.

    Builds a random-weight LLaVA-OneVision text tower (:mod:`pact_vlm.bench.models`; ``spec``:
    default :data:`SPEED_SPEC` at the 7B width), applies the paper's LLaVA-OneVision preset at
    ``layer`` and times it against the unreduced model, alternating, ``repeats`` rounds
    (:func:`pact_vlm.bench.speed.measure_speed`).

    Returns:
        ``{"model", "reduction_ratio", "prefill_speedup" (median, q1, q3), "limit", "unreduced_prefill_s",
        "reduced_prefill_s"}``.
    """
    import statistics

    from .. import PACTConfig
    from ..bench.models import SyntheticSpec, build_synthetic_model, describe, synthetic_inputs
    from ..bench.speed import measure_speed

    spec = spec or SyntheticSpec.preset("llava-onevision-7b", **SPEED_SPEC)
    _check_speed_memory(spec, dtype)
    model = build_synthetic_model(spec, dtype=dtype)
    inputs = synthetic_inputs(model, spec)
    config = PACTConfig.preset("llava-onevision-7b").replace(layer=layer)
    result = measure_speed(model, [config], inputs, repeats=repeats, warmup=1, max_new_tokens=1,
                           model_description=describe(spec, model))
    base, reduced = result.variant("unreduced"), result.reduced[0]
    return {"model": result.meta.get("model", describe(spec, model)),
            "reduction_ratio": reduced["reduction"]["reduction_ratio"],
            "prefill_speedup": reduced["ratios"]["lm_prefill_speedup"],
            "limit": reduced["limit"]["possible_speedup"],
            "unreduced_prefill_s": statistics.median(base["samples"]["lm_prefill_s"])
            if "samples" in base else None,
            "reduced_prefill_s": statistics.median(reduced["samples"]["lm_prefill_s"])
            if "samples" in reduced else None}


def _check_speed_memory(spec, dtype: torch.dtype, free: int | None = None) -> None:
    """Refuse the speed line before building its model when its estimated peak exceeds the free memory."""
    from ..bench import memory
    from ..bench.command import _synthetic_sequence_length

    estimate = memory.estimate_memory(spec.text_dims(), seq_len=_synthetic_sequence_length(spec), batch=1, max_new_tokens=1,
                                      dtype_bytes=dtype.itemsize)
    free = memory.available_memory(torch.device("cpu")) if free is None else free
    if free is not None and estimate.total > free:
        raise MemoryError(f"the demo's speed line needs {estimate.describe(str(dtype).replace('torch.', ''))} but "
                          f"{free / memory.GB:.1f} GB is free; run `pact-vlm demo --no-speed`")


def run_demo(model_dir: str | Path | None = None, config=None, *, n: int = 60, seed: int = 0,
             picture: str | Path | None = "pact_demo.png", repeats: int = 3, batch_size: int = 30,
             speed: bool = True, shown: int = 5, echo=print) -> dict[str, Any]:
    """Ask the demo model ``n`` held-out evaluation questions with and without the reduction.

    The questions come from the evaluation split of ``pact-vlm fidelity`` (held-out seeds from
    :data:`pact_vlm.bench.fidelity.EVAL_START` on: never used in training or calibration), one
    type after another, and are answered in batches of ``batch_size``; the first ``shown`` are
    printed with both answers.

    Args:
        model_dir: folder of the demo model (default: the copy inside the package).
        config: a method config (default: the shipped ``pact_config.json``).
        n: questions. seed: offset of the first question in the evaluation split.
        picture: PNG path for the picture of the kept / merged / dropped tokens of the first
            question, or ``None`` for no picture.
        repeats: timed rounds of the speed line (:func:`speed_line`).
        speed: also measure the speed line at the LLaVA-OneVision-7B width (:func:`speed_line`;
            about half a minute on a 2-core CPU); ``False`` skips it.
        echo: where the lines go (``print`` by default).

    Returns:
        ``{"config", "questions": [...], "accuracy_unreduced", "accuracy_reduced", "se_unreduced",
        "se_reduced", "agreement", "visual_before", "visual_after", "seconds", "speed", "picture"}``.
    """
    from ..integration.handle import apply
    from ..bench.fidelity import EVAL_START, _encode, _predict, _score
    from .model import load_demo_model

    for name, value, low in (("n", n, 1), ("repeats", repeats, 3 if speed else 1), ("batch_size", batch_size, 1),
                             ("seed", seed, 0), ("shown", shown, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    start_time = time.perf_counter()
    model, processor = load_demo_model(model_dir)
    if config is None:
        from ..config import load_config

        config = load_config(demo_config_path(model_dir))
    samples = [shapes.make_sample(shapes.HELDOUT_SEEDS[EVAL_START + seed + i], qtype=shapes.QTYPES[i % len(shapes.QTYPES)])
               for i in range(n)]
    echo(f"demo VLM: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
         f"method: {config!r}")
    from ..methods.base import reads_vision_tower

    encoded = _encode(model, processor, samples, batch_size, keep_pixels=reads_vision_tower(config))
    t0 = time.perf_counter()
    plain, _ = _predict(model, encoded)
    t_plain = time.perf_counter() - t0
    before = after = 0
    with apply(model, config) as handle:
        preds = []
        t0 = time.perf_counter()
        for batch in encoded.batches_for(config):
            with torch.no_grad():
                logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
            preds.append(logits.argmax(-1))
            before += handle.stats.visual_before
            after += handle.stats.visual_after
        t_reduced = time.perf_counter() - t0
    reduced = torch.cat(preds)
    words = processor.tokenizer.convert_ids_to_tokens
    plain_words, reduced_words = words(plain.tolist()), words(reduced.tolist())
    rows = [{"seed": s.seed, "qtype": s.qtype, "question": s.question, "truth": s.answer,
             "unreduced": a, "reduced": b} for s, a, b in zip(samples, plain_words, reduced_words)]
    mark = lambda a, truth: "ok" if a == truth else "WRONG"  # noqa: E731
    for row in rows[:shown]:
        echo(f"Q: {row['question']}  (truth: {row['truth']})")
        echo(f"   unreduced: {row['unreduced']:<10} [{mark(row['unreduced'], row['truth'])}]   "
             f"{config.method}: {row['reduced']:<10} [{mark(row['reduced'], row['truth'])}]")
    base, red = _score(plain, encoded, None), _score(reduced, encoded, plain)
    echo(f"{n} held-out questions (evaluation split, batches of {batch_size}): unreduced {base['accuracy']:.1%} "
         f"(± {base['se']:.1%}) right, {config.method} {red['accuracy']:.1%} (± {red['se']:.1%}) right, same answer "
         f"{red['agreement']:.0%}; visual tokens {before} -> {after} ({1 - after / before:.0%} fewer); "
         f"answering {t_plain:.2f} s -> {t_reduced:.2f} s (a 4-layer model on 64 visual tokens)")
    result = {"config": config.to_dict(), "questions": rows, "accuracy_unreduced": base["accuracy"],
              "accuracy_reduced": red["accuracy"], "se_unreduced": base["se"], "se_reduced": red["se"],
              "agreement": red["agreement"], "visual_before": before, "visual_after": after,
              "seconds": {"unreduced": t_plain, "reduced": t_reduced}, "speed": None, "picture": None}
    if picture is not None:
        result["picture"] = str(_picture(model, processor, config, samples[0], picture))
        echo(f"token picture of the first question: {result['picture']}")
    if speed:
        echo(f"speed line: PACT against the unreduced model at the LLaVA-OneVision-7B width, {repeats} rounds "
             "after a warm-up (about half a minute on 2 cores; --no-speed skips it) ...")
        line = speed_line(repeats=repeats)
        result["speed"] = line
        sp = line["prefill_speedup"]
        echo(f"speed at a real width ({line['model']}), PACT at layer 1, measured now: "
             f"{line['reduction_ratio']:.0%} fewer visual tokens, prefill {sp['median']:.2f}x faster "
             f"(q1-q3 {sp['q1']:.2f}-{sp['q3']:.2f}); analytical limit {line['limit']:.2f}x")
    result["total_seconds"] = time.perf_counter() - start_time
    echo(f"demo took {result['total_seconds']:.0f} s")
    return result


def _picture(model, processor, config, sample, path) -> Path:
    from .. import viz

    # drawn 4x larger so the legend does not hide the 128-px image; the processor resizes it back
    big = sample.image.resize((4 * sample.image.width, 4 * sample.image.height), Image.NEAREST)
    result = viz.visualize(model, processor, big, config, sample.question)
    path = Path(path)
    result.image.save(path)
    return path
