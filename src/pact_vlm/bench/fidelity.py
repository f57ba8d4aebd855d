"""Accuracy against reduction ratio on the shipped demo VLM (``pact-vlm fidelity``).

The demo model (``pact_vlm.demo``) answers one-word questions about synthetic images of coloured
shapes; only the visual tokens under the objects carry the answer. For every method and target
reduction ratio this module

1. calibrates the method's budget parameter with :func:`pact_vlm.match_budget` on a calibration
   set of held-out questions (disjoint from the evaluation set) so that methods are compared at the
   same measured reduction ratio;
2. answers ``n`` evaluation questions (held-out seeds, never used in training) under the reduction
   and reports accuracy, agreement with the unreduced model's answers and the per-type accuracy,
   each with its binomial standard error.

The answer is the greedy first token (every answer is one word, one token); it is computed with a
single forward pass per batch, which gives the same token as ``generate()``'s first step.

Two rows check the instrument itself: an *oracle* that keeps the object tokens first and an
*anti-oracle* that keeps the background first. If the instrument can tell a good reduction from a
bad one, the oracle beats random pruning, which beats the anti-oracle, by several standard errors.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..budget import ratio_terms

__all__ = ["FIDELITY_METHODS", "run_fidelity", "format_table", "plot_fidelity"]

EVAL_START = 100_000
"""Offset of the evaluation questions in ``HELDOUT_SEEDS`` (training never sees held-out seeds)."""
CALIB_START = 900_000
"""Offset of the calibration questions in ``HELDOUT_SEEDS`` (disjoint from the evaluation ones)."""


def _method_factories() -> dict[str, Callable[[int], Any]]:
    """Method name -> function of the reduction layer L giving that method's config (budget unset).

    Single-layer methods reduce at L; ToMe merges progressively from layer 0 and VTW withdraws at a
    later layer, both matched on the visual-token count averaged over the layers, expressed at L
    (``equivalent_layer``), as the PACT reference code compares them. PruMerge, HiRED and VisionZip
    reduce inside a vision tower whose patches are the visual tokens (a CLIP tower with a CLS token:
    the CLIP demo, ``--model-dir`` at ``CLIP_MODEL_DIR``); on the Qwen2-VL demo their rows record the refusal.
    """
    from .. import methods as C

    return {
        "pact": lambda layer: C.PACTConfig(layer=layer),
        "euti": lambda layer: C.EUTIConfig(layer=layer),
        "dbdpc": lambda layer: C.DBDPCConfig(layer=layer),
        "fastv": lambda layer: C.FastVConfig(layer=layer),
        "tome": lambda layer: C.ToMeConfig(layer=0, equivalent_layer=layer),
        "vtw": lambda layer: C.VTWConfig(layer=layer + 1, equivalent_layer=layer),
        "prumerge": lambda layer: C.PruMergeConfig(),
        "hired": lambda layer: C.HiREDConfig(),
        "visionzip": lambda layer: C.VisionZipConfig(),
        "divprune": lambda layer: C.DivPruneConfig(layer=layer),
        "dart": lambda layer: C.DARTConfig(layer=layer),
        "random": lambda layer: C.RandomConfig(layer=layer),
        "pooling": lambda layer: C.PoolingConfig(layer=layer),
        "kmeans": lambda layer: C.KMeansConfig(layer=layer),
        "dpc": lambda layer: C.DPCConfig(layer=layer),
        "dbscan": lambda layer: C.DBSCANConfig(layer=layer),
        "agglomerative-single": lambda layer: C.AgglomerativeConfig(layer=layer, linkage="single"),
        "agglomerative-average": lambda layer: C.AgglomerativeConfig(layer=layer, linkage="average"),
        "agglomerative-complete": lambda layer: C.AgglomerativeConfig(layer=layer, linkage="complete"),
        "pact_budget": lambda layer: C.PACTBudgetConfig(),   # always before the language model (layer 0)
    }


TUNED = "pact-tuned"
"""The method name of the row "pact (tuned)": for each target ratio, :func:`pact_vlm.tune` on the
calibration questions (never the evaluation ones) picks λ (d_c matched), then that config is evaluated."""
TUNED_LABEL = "pact (tuned)"

FIDELITY_METHODS = (*_method_factories(), TUNED)
"""Methods ``run_fidelity`` knows by name (PACT, PACT tuned per ratio and every baseline available)."""


def _method_config(spec: str, factories: dict[str, Callable[[int], Any]], layer: int):
    """``"name"`` or ``"name:key=value,key=value"`` (values in JSON) -> that method's config at ``layer``."""
    from ..config import config_from_spec

    if spec.partition(":")[0] == TUNED:
        factories = dict(factories, **{TUNED: factories["pact"]})

    def base_for(name):
        if name not in factories:
            raise ValueError(f"unknown method {name!r} in {spec!r}; known: {', '.join(factories)} "
                             "(optionally with options, e.g. pact:prune_ratio=0.2)")
        return factories[name](layer)

    return config_from_spec(spec, base_for, where=repr(spec), example="pact:prune_ratio=0.2")[0]


@dataclasses.dataclass
class _Encoded:
    batches: list[dict[str, torch.Tensor]]
    answers: torch.Tensor          # [n] token id of the right answer
    qtypes: list[str]
    object_masks: list[torch.Tensor]   # per batch: [B, N] bool, True = visual token over an object
    pixel_batches: list[dict[str, torch.Tensor]] | None = None   # the same batches with pixel_values

    def batches_for(self, config) -> list[dict[str, torch.Tensor]]:
        """The batches ``config`` runs on: with the pixels for methods that read the vision tower."""
        from ..methods.base import reads_vision_tower

        if not reads_vision_tower(config):
            return self.batches
        if self.pixel_batches is None:
            raise RuntimeError(f"{type(config).__name__} reads the vision tower but the questions were encoded "
                               "without their pixels (_encode(..., keep_pixels=True))")
        return self.pixel_batches


def _image_features(model, batch: dict[str, torch.Tensor]):
    """The language model's image input for ``batch`` (``mm_encoder_outputs["image"]``), from its pixels."""
    pixels = batch.pop("pixel_values")
    if "image_grid_thw" in batch:                                        # Qwen2-VL
        return model.model.get_image_features(pixels, batch["image_grid_thw"], return_dict=True)
    config = model.config                                                # LLaVA
    return model.model.get_image_features(pixels, vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                                          return_dict=True)


@torch.no_grad()
def _encode(model, processor, samples, batch_size: int, keep_pixels: bool = False) -> _Encoded:
    """Processor inputs per batch, with the vision tower run once: its output replaces the pixels.

    Methods that reduce inside the language model do not change the vision tower's output, so each
    batch carries ``mm_encoder_outputs`` (the transformers input for precomputed image features)
    instead of ``pixel_values`` and calibration does not re-encode.  With ``keep_pixels`` the
    batches are also kept with their ``pixel_values``, for methods that act inside the vision
    tower (VisionZip, PruMerge, HiRED).
    """
    from ..demo.model import prompt

    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batches, pixel_batches, masks = [], [], []
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = dict(processor(images=[s.image for s in chunk], text=[prompt(processor, s.question) for s in chunk],
                                   return_tensors="pt", padding=True))
            if keep_pixels:
                pixel_batches.append(dict(batch))
            batch["mm_encoder_outputs"] = {"image": _image_features(model, batch)}
            batches.append(batch)
            masks.append(torch.stack([torch.from_numpy(s.object_patch_mask).flatten() for s in chunk]))
    finally:
        tokenizer.padding_side = side
    answers = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]))
    return _Encoded(batches, answers, [s.qtype for s in samples], masks, pixel_batches if keep_pixels else None)


@torch.no_grad()
def _predict(model, encoded: _Encoded, handle=None, before_batch=None) -> tuple[torch.Tensor, float]:
    """Greedy answer token of every question; with a handle, also the measured reduction ratio.

    The ratio is the one :func:`pact_vlm.match_budget` calibrates (``stats.equivalent_ratio`` at
    the config's ``budget_layer``: the plain reduction ratio for methods that reduce once, the
    layer-averaged work for ToMe / VTW), weighted by each batch's visual tokens.
    """
    preds, removed, total = [], 0.0, 0
    for index, batch in enumerate(encoded.batches_for(handle.config if handle is not None else None)):
        if before_batch is not None:
            before_batch(index)
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        preds.append(logits.argmax(-1))
        if handle is not None:
            r, v = ratio_terms(handle.stats, handle.config.budget_layer)
            removed, total = removed + r, total + v
    return torch.cat(preds), removed / total if total else 0.0


def _binomial(correct: torch.Tensor) -> tuple[float, float]:
    n = correct.numel()
    p = float(correct.float().mean())
    return p, math.sqrt(max(p * (1 - p), 0.0) / n) if n > 1 else float("nan")


def _score(preds: torch.Tensor, encoded: _Encoded, reference: torch.Tensor | None) -> dict[str, Any]:
    correct = preds == encoded.answers
    acc, se = _binomial(correct)
    row: dict[str, Any] = {"accuracy": acc, "se": se}
    if reference is not None:
        row["agreement"], row["agreement_se"] = _binomial(preds == reference)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, ok in zip(encoded.qtypes, correct.tolist()):
        by_type[qtype].append(ok)
    row["per_type"] = {q: _binomial(torch.tensor(v))[0] for q, v in sorted(by_type.items())}
    return row


def run_fidelity(
    model=None,
    processor=None,
    *,
    n: int = 2000,
    ratios: Iterable[float] = (0.5, 0.6, 0.7, 0.8),
    methods: Iterable[str] | None = None,
    layer: int = 1,
    batch_size: int = 100,
    calib_n: int = 200,
    random_seeds: int = 3,
    instrument_keep: Iterable[float] = (0.15, 0.2, 0.25, 0.3),
    eval_start: int = EVAL_START,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of the demo model under every method at matched reduction ratios.

    Args:
        model, processor: the demo VLM (default: ``pact_vlm.demo.load_demo_model()``).
        n: evaluation questions (held-out seeds from ``EVAL_START``).
        ratios: target reduction ratios (fractions of visual tokens removed) in ``(0, 1)``.
        methods: names from ``FIDELITY_METHODS`` (default: all of them), each optionally with config
            fields after a colon, e.g. ``"pact:prune_ratio=0.2"`` (values in JSON). ``"pact-tuned"``
            (row "pact (tuned)") runs :func:`pact_vlm.tune` at each ratio on the calibration questions.
        layer: the decoder layer every method reduces at (ToMe starts there).
        batch_size: questions per forward pass.
        calib_n: calibration questions for :func:`pact_vlm.match_budget` (from ``CALIB_START``).
        random_seeds: seeds that random pruning is averaged over.
        instrument_keep: keep fractions at which oracle, anti-oracle and random are compared.
        eval_start: offset of the evaluation questions in the held-out seeds (another offset gives
            a separate split, e.g. to choose a layer or λ without touching the reported one).
        progress: show a progress bar.

    Returns:
        A JSON-ready dict: ``settings``, ``unreduced`` (accuracy, per type), ``rows`` (one per
        method and ratio: calibrated parameter, measured ratio, accuracy, standard error, agreement
        with the unreduced answers, per-type accuracy, or ``error`` where the ratio is out of the
        method's reach), ``instrument`` (oracle / random / anti-oracle per keep fraction).
    """
    from ..budget import match_budget
    from ..tune import tune
    from ..integration.handle import apply
    from ..methods import KeepPriorityConfig, RandomConfig
    from ..demo import shapes

    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"ratio {r!r} must lie in (0, 1), e.g. 0.7 to remove 70% of the visual tokens")
    factories = _method_factories()
    methods = list(FIDELITY_METHODS) if methods is None else list(methods)
    configs = {m: _method_config(m, factories, layer) for m in methods}
    for name, value, low in (("n", n, 1), ("batch_size", batch_size, 1), ("calib_n", calib_n, 1),
                             ("random_seeds", random_seeds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    keeps = [float(k) for k in instrument_keep]
    for k in keeps:
        if not 0.0 < k < 1.0:
            raise ValueError(f"instrument keep fraction {k!r} must lie in (0, 1), e.g. 0.25")
    if model is None:
        from ..demo import load_demo_model

        model, processor = load_demo_model()
    elif processor is None:
        raise ValueError("pass the processor with the model (model, processor = load_demo_model(path))")

    started = time.time()
    if eval_start < 0 or (eval_start < CALIB_START + calib_n and CALIB_START < eval_start + n):
        raise ValueError(f"eval_start={eval_start} is negative or makes the evaluation seeds overlap the calibration seeds "
                         f"[{CALIB_START}, {CALIB_START + calib_n}); choose an offset outside that range")
    from ..methods.base import reads_vision_tower

    pixels = any(reads_vision_tower(cfg) for cfg in configs.values())
    evaluation = _encode(model, processor, shapes.make_dataset("heldout", n, start=eval_start), batch_size, pixels)
    calibration = _encode(model, processor, shapes.make_dataset("heldout", calib_n, start=CALIB_START), batch_size,
                          pixels)

    from tqdm.auto import tqdm

    jobs = [(m, r) for m in methods for r in ratios]
    bar = tqdm(total=len(jobs) + 3 * len(keeps) + 1, desc="fidelity", disable=not progress)
    reference, _ = _predict(model, evaluation)
    unreduced = _score(reference, evaluation, None)
    bar.update()

    def evaluate(config, measured_on=evaluation, object_first=None) -> dict[str, Any]:
        def set_priority(index):
            # object tokens first (or last); within each class a seeded random order, so the
            # instrument does not favour the top of the image
            mask = measured_on.object_masks[index].float()
            noise = torch.rand(mask.shape, generator=torch.Generator().manual_seed(index)) * 0.5
            handle.set_priority((mask if object_first else 1.0 - mask) + noise)

        with apply(model, config) as handle:
            preds, ratio = _predict(model, measured_on, handle, None if object_first is None else set_priority)
        row = _score(preds, measured_on, reference)
        row["measured_ratio"] = ratio
        return row

    rows = []
    for method, target in jobs:
        bar.set_postfix_str(f"{method} @ {target:.2f}")
        base = configs[method]
        seeds = range(random_seeds) if method == "random" else [None]
        label = TUNED_LABEL + method[len(TUNED):] if method.startswith(TUNED) else method
        runs, tuned = [], None
        try:
            for seed in seeds:
                cfg = base if seed is None else base.replace(seed=seed)
                if method.startswith(TUNED):
                    tuned = tune(model, calibration.batches_for(cfg), target_ratio=target, layer=cfg.layer, base=cfg,
                                 progress=False)
                    cfg = tuned.config
                else:
                    cfg = match_budget(model, cfg, calibration.batches_for(cfg), target)
                runs.append((cfg, evaluate(cfg)))
        except ValueError as err:
            rows.append({"method": label, "target_ratio": target, "error": str(err)})
            bar.update()
            continue
        rows.append(_average_runs(label, target, runs, n))
        if tuned is not None:
            rows[-1]["tune"] = {k: v for k, v in tuned.to_dict().items() if k != "config"}
        bar.update()

    instrument = []
    for keep in keeps:
        entry: dict[str, Any] = {"keep": keep}
        for label, first in (("oracle", True), ("anti_oracle", False)):
            entry[label] = evaluate(KeepPriorityConfig(layer=layer, keep_ratio=keep), object_first=first)
            bar.update()
        runs = [(cfg, evaluate(cfg)) for cfg in
                (RandomConfig(layer=layer, keep_ratio=keep, seed=seed) for seed in range(random_seeds))]
        entry["random"] = _average_runs("random", 1.0 - keep, runs, n)
        entry["checks"] = _instrument_checks(entry)
        bar.update()
        instrument.append(entry)
    bar.close()

    return {
        "settings": {"n": n, "ratios": ratios, "methods": methods, "layer": layer, "batch_size": batch_size,
                     "calib_n": calib_n, "random_seeds": random_seeds, "eval_seeds": f"heldout[{eval_start}:"
                     f"{eval_start + n}]", "calib_seeds": f"heldout[{CALIB_START}:{CALIB_START + calib_n}]"},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "seconds": time.time() - started,
        "unreduced": unreduced,
        "rows": rows,
        "instrument": instrument,
    }


def _average_runs(method: str, target: float, runs, n: int) -> dict[str, Any]:
    """One row from one run, or the mean of several seeded runs (random pruning)."""
    cfg, first = runs[0]
    param = type(cfg).budget_param
    row: dict[str, Any] = {"method": method, "target_ratio": target, "config": cfg.to_dict(), "param": param,
                           "value": getattr(cfg, param)}
    if len(runs) == 1:
        return row | first
    mean = lambda key: sum(r[key] for _, r in runs) / len(runs)  # noqa: E731
    acc = mean("accuracy")
    agree = mean("agreement")
    row |= {
        "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n),
        "agreement": agree, "agreement_se": math.sqrt(agree * (1 - agree) / n),
        "measured_ratio": mean("measured_ratio"),
        "per_type": {q: sum(r["per_type"][q] for _, r in runs) / len(runs) for q in first["per_type"]},
        "seeds": len(runs), "seed_accuracies": [r["accuracy"] for _, r in runs],
    }
    return row


def _instrument_checks(entry: dict[str, Any]) -> dict[str, Any]:
    """Does the instrument discriminate? Oracle - anti-oracle in points, and the gaps to random in s.e."""
    def gap(a, b):
        # both accuracies exactly 0 or 1 have no binomial spread: equal ones are no gap (0 s.e.),
        # different ones an infinitely sure gap
        diff = entry[a]["accuracy"] - entry[b]["accuracy"]
        se = math.sqrt(entry[a]["se"] ** 2 + entry[b]["se"] ** 2)
        if se > 0:
            return diff, diff / se
        return diff, math.copysign(math.inf, diff) if diff else 0.0

    spread, _ = gap("oracle", "anti_oracle")
    above, above_se = gap("oracle", "random")
    below, below_se = gap("random", "anti_oracle")
    return {"oracle_minus_anti_oracle": spread, "oracle_minus_random_se": above_se,
            "random_minus_anti_oracle_se": below_se,
            "discriminates": spread >= 0.20 and above_se >= 3 and below_se >= 3}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: accuracy (± s.e.) per method and target ratio, then the instrument check."""
    ratios = result["settings"]["ratios"]
    base = result["unreduced"]
    lines = [f"unreduced accuracy {base['accuracy']:.3f} ± {base['se']:.3f} "
             f"(n={result['settings']['n']}); per type: "
             + ", ".join(f"{q} {a:.2f}" for q, a in base["per_type"].items()),
             "",
             "accuracy ± s.e. [agreement with unreduced] at reduction ratio (measured ratio in parentheses)",
             f"{'method':<24}" + "".join(f"{r:>28.2f}" for r in ratios)]
    by_method: dict[str, dict[float, dict]] = defaultdict(dict)
    for row in result["rows"]:
        by_method[row["method"]][row["target_ratio"]] = row
    for method, cells in by_method.items():
        text = f"{method:<24}"
        for r in ratios:
            row = cells.get(r)
            if row is None or "error" in row:
                text += f"{'n/a':>28}"
            else:
                text += f"{row['accuracy']:>8.3f} ±{row['se']:.3f} [{row['agreement']:.2f}] ({row['measured_ratio']:.2f})"
        lines.append(text)
    refused = {row["method"]: row["error"] for row in result["rows"] if "error" in row}
    for method, error in refused.items():
        lines.append(f"n/a {method}: {error.split(';')[0]}")
    lines += ["", "instrument check: accuracy of oracle (object tokens first) / random / anti-oracle "
              "(background first) at a keep fraction"]
    for entry in result["instrument"]:
        cells = " / ".join(f"{entry[k]['accuracy']:.3f} ± {entry[k]['se']:.3f}"
                           for k in ("oracle", "random", "anti_oracle"))
        c = entry["checks"]
        lines.append(f"keep {entry['keep']:.2f}: {cells}   oracle - anti {c['oracle_minus_anti_oracle'] * 100:.1f} pts, "
                     f"gaps to random {c['oracle_minus_random_se']:.1f} / {c['random_minus_anti_oracle_se']:.1f} s.e. "
                     f"-> {'discriminates' if c['discriminates'] else 'does NOT discriminate'}")
    return "\n".join(lines)


def plot_fidelity(result: dict[str, Any], path: str | Path) -> Path:
    """PNG of accuracy against measured reduction ratio, one curve per method (like the paper's fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in result["rows"]:
        if "error" not in row:
            by_method[row["method"]].append(row)
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>Ph*X"
    unreduced = result["unreduced"]["accuracy"]
    for ax, zoom in zip(axes, (False, True)):
        for i, (method, rows) in enumerate(by_method.items()):
            rows.sort(key=lambda r: r["measured_ratio"])
            style = (dict(lw=2.5, color="black", zorder=5) if method == "pact"
                     else dict(lw=2.5, color="tab:red", zorder=6) if method.startswith(TUNED_LABEL)
                     else dict(lw=2.0, color="tab:blue", zorder=4) if method.startswith("pact:")
                     else dict(lw=1.0, alpha=0.85, color=colours[(2 * i) % 20 + (i // 10) % 2]))
            ax.errorbar([r["measured_ratio"] for r in rows], [r["accuracy"] for r in rows],
                        yerr=[r["se"] for r in rows], marker=markers[i % len(markers)], ms=4, capsize=2,
                        label=method, **style)
        if not zoom:
            for key, colour in (("oracle", "darkgreen"), ("anti_oracle", "darkred")):
                pts = [(1 - e["keep"], e[key]["accuracy"]) for e in result["instrument"] if e.get(key)]
                if pts:
                    ax.plot(*zip(*sorted(pts)), ls=":", color=colour, marker="x", label=f"{key} (instrument)")
        ax.axhline(unreduced, color="grey", ls="--", lw=1, label="unreduced")
        ax.set_xlabel("visual-token reduction ratio (measured)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.axhline(0.986 * unreduced, color="grey", ls=":", lw=1, label="98.6% of unreduced")
            ax.set_ylim(unreduced - 0.08, unreduced + 0.015)
            ax.set_title("zoom: within 8 points of the unreduced model")
            ax.legend(fontsize=7, ncol=2, loc="lower left")
        else:
            ax.set_ylabel("held-out accuracy")
            handles, labels = ax.get_legend_handles_labels()
            keep = [i for i, lab in enumerate(labels) if "instrument" in lab or lab == "unreduced"]
            ax.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=7, loc="lower left")
            ax.set_title(f"demo VLM, reduction at layer {result['settings']['layer']}, "
                         f"n={result['settings']['n']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_result(result: dict[str, Any], out_dir: str | Path, command: str) -> dict[str, Path]:
    """Write ``fidelity.json``, ``fidelity.txt`` (the table) and ``fidelity.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result, command=command)
    paths = {"json": out / "fidelity.json", "table": out / "fidelity.txt", "png": out / "fidelity.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["table"].write_text(f"# {command}\n# {result['machine']}, {result['date']}\n" + format_table(result) + "\n")
    plot_fidelity(result, paths["png"])
    return paths
