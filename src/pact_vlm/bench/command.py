"""``pact-vlm bench``: arguments and the run behind them (the CLI in ``pact_vlm.cli`` only wires it in)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

__all__ = ["add_arguments", "run"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 480x640") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be >= 1")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    model = parser.add_argument_group("model (one of)")
    src = model.add_mutually_exclusive_group()
    src.add_argument("--synthetic", default=None, metavar="NAME",
                     help="random-weight LLaVA-OneVision at a real checkpoint's text-tower width, no download: "
                          "llava-onevision-7b (default) or llava-onevision-0.5b; or qwen3.5: Qwen3.5 (gated delta "
                          "net + full-attention layers) at the widths of transformers' Qwen3_5TextConfig defaults")
    src.add_argument("--model", default=None, metavar="ID_OR_PATH",
                     help="a Hugging Face VLM (hub id or local directory) with its processor; the prompt holds "
                          "one generated test picture of --image-size")
    model.add_argument("--layers", type=int, default=None,
                       help="synthetic: decoder layers to build (default: the checkpoint's, 28 for 7B)")
    model.add_argument("--image-size", type=_image_size, default=(480, 640), metavar="HxW",
                       help="image size in pixels (default 480x640: 2929 LLaVA-OneVision placeholders; Qwen3.5: "
                            "one visual token per 32x32 px, 300)")
    model.add_argument("--vision-layers", type=int, default=0, metavar="N",
                       help="synthetic LLaVA-OneVision: 0 (default) feeds pre-encoded image features (the vision "
                            "tower never runs); N >= 1 builds a random-weight SigLIP-so400m tower of N layers "
                            "(hidden 1152, 16 heads, MLP 4304, 14 px patches, 384 px tiles) that runs on pixels "
                            "in every generate(), so methods that read the vision tower (visionzip) can run and "
                            "the tower's time is reported (vision_s)")
    model.add_argument("--text-tokens", type=int, default=50, help="synthetic: text tokens per prompt")
    model.add_argument("--vocab", type=int, default=4096, help="synthetic: vocabulary size")
    model.add_argument("--prompt", default="Describe the image in detail.", help="--model: the question")
    model.add_argument("--batch", type=int, default=1, help="prompts per generate() call")
    model.add_argument("--seed", type=int, default=0, help="synthetic: seed of the weights and image features")
    method = parser.add_argument_group("method")
    method.add_argument("--config", default=None, metavar="FILE", help="a method config JSON (pact_vlm.load_config)")
    method.add_argument("--method", nargs="+", default=None, metavar="METHOD",
                        help="methods measured in the same run, by name (`pact-vlm methods`), each optionally "
                             "with config fields, e.g. dart:layer=1,image_pivots=8 (values in JSON); 'pact' is "
                             "the PACT config below (default: --config, else pact)")
    method.add_argument("--preset", default=None,
                        help="PACTConfig preset when no --config (default: with --model, the config that travels "
                             "with the model, pact_vlm.model_config: its folder's pact_config.json, else its "
                             "family's preset, else the library defaults; synthetic: llava-onevision-7b)")
    method.add_argument("--layer", type=int, default=None,
                        help="override the reduction layer L of every method that has one (a method's own "
                             "layer=... option wins)")
    method.add_argument("--prune-ratio", type=float, default=None, help="override PACT's prune_ratio")
    method.add_argument("--cutoff", type=float, default=None, help="override PACT's cutoff")
    method.add_argument("--alpha", type=float, default=None, help="override PACT's alpha")
    method.add_argument("--target-ratio", type=float, nargs="+", default=None, metavar="R",
                        help="calibrate the config's budget parameter (PACT: cutoff) with pact_vlm.match_budget "
                             "on the benchmark inputs so that a fraction R of the visual tokens is removed; "
                             "several values give several variants (a sweep)")
    run_ = parser.add_argument_group("measurement")
    run_.add_argument("--repeats", type=int, default=5, help="timed rounds, each runs every variant (>= 3)")
    run_.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    run_.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per run")
    run_.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    run_.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                                      "bfloat16 or float16 (CUDA only)")
    run_.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    run_.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    run_.add_argument("--png", default=None, metavar="PATH",
                      help="plot latency against reduction ratio (needs matplotlib)")
    run_.add_argument("--no-fresh-memory", action="store_true",
                      help="synthetic on the CPU: skip the peak-memory measurement in one fresh process per "
                           "variant (the in-process peak RSS depends on what ran before)")
    run_.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse nonsense before anything is built."""
    def positive(name, value, low=1, why=""):
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= {low}{why}")

    positive("repeats", args.repeats, 3, " (medians and interquartile ranges need at least 3 rounds)")
    positive("warmup", args.warmup, 0)
    positive("max_new_tokens", args.max_new_tokens, 1)
    positive("batch", args.batch, 1)
    positive("layers", args.layers, 1)
    positive("text_tokens", args.text_tokens, 1)
    positive("threads", args.threads, 1)
    positive("layer", args.layer, 0)
    positive("vision_layers", args.vision_layers, 0, " (0: pre-encoded image features; N: a SigLIP tower of N "
             "layers runs on pixels)")
    if args.dtype not in _DTYPES:
        raise ValueError(f"--dtype={args.dtype!r} is not one of {', '.join(_DTYPES)}")
    for r in args.target_ratio or []:
        if not 0.0 < r < 1.0:
            raise ValueError(f"--target-ratio={r} must lie strictly between 0 and 1 (e.g. 0.713 removes 71.3% "
                             "of the visual tokens)")
    if args.target_ratio and len(set(args.target_ratio)) != len(args.target_ratio):
        raise ValueError(f"--target-ratio {args.target_ratio} repeats a value; give each ratio once")
    if args.model is not None and args.layers is not None:
        raise ValueError("--layers builds a synthetic model of that depth; it cannot be used with --model")
    if args.model is not None and args.vision_layers:
        raise ValueError("--vision-layers builds the synthetic model's vision tower; it cannot be used with --model "
                         "(a hub model runs its own tower on the test picture)")
    if args.vision_layers and args.synthetic == "qwen3.5":
        raise ValueError(f"--vision-layers {args.vision_layers}: a running vision tower is built for the synthetic "
                         "LLaVA-OneVision models only; drop --vision-layers with --synthetic qwen3.5")


def _named_config(spec: str, pact_base):
    """``"name"`` or ``"name:key=value,..."`` -> (that method's config, the fields the spec set)."""
    from ..config import CONFIG_REGISTRY, config_from_spec

    def base_for(name):
        if name not in CONFIG_REGISTRY:
            raise ValueError(f"unknown method {name!r} in --method {spec}; known: {', '.join(sorted(CONFIG_REGISTRY))}")
        return pact_base if name == "pact" else CONFIG_REGISTRY[name]()

    return config_from_spec(spec, base_for, where=f"--method {spec}", example="dart:layer=1")


def _pact_base(args: argparse.Namespace):
    """The PACT config without --config, and where it came from: --preset, else (with --model) the
    config that travels with the model, else the llava-onevision-7b preset (synthetic models)."""
    from ..methods import PACTConfig
    from ..presets import model_config

    if args.preset:
        return PACTConfig.preset(args.preset), f"preset {args.preset!r}"
    if args.model is not None:
        return model_config(args.model)
    return PACTConfig.preset("llava-onevision-7b"), "preset 'llava-onevision-7b'"


def _configs(args: argparse.Namespace) -> tuple[list, list[str], str]:
    """The configs to measure, their names (``--method`` specs, or the config's method) and where the
    config came from."""
    import dataclasses

    from ..config import load_config

    if args.config and args.method:
        raise ValueError("--config and --method both choose the method; give one of them")
    if args.config and args.preset:
        raise ValueError("--config and --preset both give the config; pass one of them")
    if args.method:
        if len(set(args.method)) != len(args.method):
            raise ValueError(f"--method {' '.join(args.method)} repeats a method; give each once")
        uses_pact = "pact" in {spec.partition(":")[0] for spec in args.method}
        base, origin = _pact_base(args) if uses_pact else (None, "given")
        named = [_named_config(spec, base) for spec in args.method]
        names = list(args.method)
    else:
        cfg, origin = (load_config(args.config), f"--config {args.config}") if args.config else _pact_base(args)
        named, names = [(cfg, set())], [cfg.method]
    overrides = {k: v for k, v in (("layer", args.layer), ("prune_ratio", args.prune_ratio),
                                   ("cutoff", args.cutoff), ("alpha", args.alpha)) if v is not None}
    fields = [{f.name for f in dataclasses.fields(cfg)} for cfg, _ in named]
    for name in overrides:
        if not any(name in f for f in fields):
            methods = ", ".join(sorted({cfg.method for cfg, _ in named}))
            raise ValueError(f"--{name.replace('_', '-')} does not apply to method {methods!r}")
    configs = []
    for (cfg, own), f in zip(named, fields):
        mine = {k: v for k, v in overrides.items() if k in f and k not in own}
        configs.append(cfg.replace(**mine) if mine else cfg)
    if overrides:
        origin += ", options on top"
    return configs, names, origin


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type != "cuda":
        raise ValueError("--dtype float16 is only supported on CUDA; use float32 or bfloat16 on the CPU")
    return getattr(torch, name)


def _test_picture(height: int, width: int, seed: int):
    """A picture with flat regions and a few shapes (redundant like a photo, unlike noise)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 1, y1 + 1], fill=color)
    return img


def _hub_model(args, device, dtype) -> tuple[Any, dict[str, Any], str]:
    import torch

    from ..integration.loading import load_vlm, prompt_text

    model, processor = load_vlm(args.model, dtype=dtype, device=str(device))
    h, w = args.image_size
    text = prompt_text(processor, args.prompt, n_images=1)
    pictures = [_test_picture(h, w, args.seed + b) for b in range(args.batch)]
    batch = processor(images=pictures, text=[text] * args.batch, return_tensors="pt", padding=True)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
              else v for k, v in batch.items()}
    return model, inputs, f"{args.model} ({type(model).__name__}), one {h}x{w} test picture per prompt"


def _synthetic_spec(args):
    from .models import SyntheticSpec

    overrides = dict(image_size=tuple(args.image_size), text_tokens=args.text_tokens, vocab=args.vocab,
                     seed=args.seed, text_before=min(14, args.text_tokens))
    if args.layers is not None:
        overrides["layers"] = args.layers
    if args.vision_layers:
        overrides["vision_layers"] = args.vision_layers
    return SyntheticSpec.preset(args.synthetic or "llava-onevision-7b", **overrides)


def _check_hybrid_layers(spec, configs, labels) -> None:
    """Qwen3.5: refuse, before the model is built, a reduction layer its adapter refuses at apply()
    (before the first full-attention layer's end, or at a linear-attention layer)."""
    if spec.layer_types is None:
        return
    from ..integration.adapters.qwen3_5 import after_first_full_layer
    from .models import _config

    low = after_first_full_layer(_config(spec))
    full = [i for i, kind in enumerate(spec.layer_types) if kind == "full_attention" and i >= low]
    for config, label in zip(configs, labels):
        layer = getattr(config, "layer", None)
        if layer is None:
            continue
        if getattr(config, "progressive", False):
            raise ValueError(f"--method {label}: a progressive reduction would reduce at the linear-attention "
                             "layers of Qwen3.5 (no softmax attention there); use a method that reduces once")
        if layer < low or spec.layer_types[layer] != "full_attention":
            why = (f"layers 0..{layer - 1} must include the first full-attention layer ({low - 1}), whose cache "
                   "length sets every decode position" if layer < low else
                   f"decoder layer {layer} is a linear-attention layer (no softmax attention to score tokens with)")
            raise ValueError(f"--method {label}: layer={layer} cannot reduce Qwen3.5: {why}; use --layer with one of "
                             f"{full[:8] or 'the full-attention layers after the first (build more --layers)'}")


def _synthetic_model(spec, args, device, dtype) -> tuple[Any, dict[str, Any], str]:
    from .models import build_synthetic_model, describe, synthetic_inputs

    model = build_synthetic_model(spec, device=device, dtype=dtype)
    inputs = synthetic_inputs(model, spec, batch=args.batch)
    return model, inputs, describe(spec, model)


def _fresh_memory(result, spec, configs, args, say) -> None:
    """Peak RSS of each variant in its own fresh process (CPU, synthetic models)."""
    from .memory import isolated_peak_memory

    for variant, cfg in zip(result.variants, configs):
        say(f"peak memory of {variant['name']} in a fresh process ...")
        variant["memory_fresh_process"] = isolated_peak_memory(
            spec, cfg, dtype=result.meta["dtype"], batch=args.batch, max_new_tokens=args.max_new_tokens,
            threads=args.threads)
    base = result.variant("unreduced")["memory_fresh_process"]
    for variant in result.reduced:
        mem = variant["memory_fresh_process"]
        variant["ratios"]["peak_memory_ratio_fresh_process"] = mem["peak_rss_bytes"] / base["peak_rss_bytes"]
        variant["ratios"]["memory_increase_ratio_fresh_process"] = (
            mem["rss_increase_bytes"] / base["rss_increase_bytes"] if base["rss_increase_bytes"] > 0 else None)


def _synthetic_sequence_length(spec) -> int:
    """An upper bound on one prompt's length for ``spec``, from its config alone (nothing built)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    from .models import _config

    if spec.is_qwen:                                   # text, vision start, the visual tokens, vision end
        rows, cols = spec.visual_grid()
        return spec.text_tokens + 2 + rows * cols
    config = _config(spec)
    side = config.vision_config.image_size // config.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape(list(spec.image_size), config.image_grid_pinpoints,
                                           config.vision_config.image_size)
    return spec.text_tokens + side * side + nph * npw * side * side + nph * side


def _largest_fitting_layers(spec, estimate_for, free: int) -> int:
    """The most decoder layers (at least 0) whose estimate fits in ``free`` bytes."""
    lo, hi = 0, spec.layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_for(mid).total <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _estimator(args: argparse.Namespace, spec, itemsize: int, fresh: bool):
    """``estimate(layers, itemsize=..., fresh=...)``: the estimate of ``spec`` at another depth / dtype / mode."""
    import dataclasses

    from . import memory

    seq_len = _synthetic_sequence_length(spec)

    extra = spec.extra_params()                   # vision tower, projector, image_newline

    def estimate(layers: int, size: int = itemsize, fresh_copy: bool = fresh):
        dims = dataclasses.replace(spec, layers=max(layers, 1)).text_dims()
        est = memory.estimate_memory(dims, seq_len=seq_len, batch=args.batch, max_new_tokens=args.max_new_tokens,
                                     dtype_bytes=size, extra_params=extra,
                                     extra_activations=spec.vision_activation_bytes(args.batch, size))
        return dataclasses.replace(est, copies=2 if fresh_copy else 1)

    return estimate, seq_len


def _fresh(args: argparse.Namespace, device) -> bool:
    return device.type == "cpu" and not args.no_fresh_memory


def default_depth(args: argparse.Namespace, spec, dtype, device, min_layers: int = 1,
                  free: int | None = None) -> int:
    """The depth to build when ``--layers`` is not given: the checkpoint's if it fits in the free
    memory, else the most layers that fit (at least ``min_layers``, the reduction layer + 1; if not
    even that fits, the checkpoint's, which :func:`check_memory` then refuses with the fix)."""
    from . import memory

    free = memory.available_memory(device) if free is None else free
    estimate, _ = _estimator(args, spec, dtype.itemsize, _fresh(args, device))
    if free is None or estimate(spec.layers).total <= free:
        return spec.layers
    fit = _largest_fitting_layers(spec, estimate, free)
    return fit if fit >= min_layers else spec.layers


def check_memory(args: argparse.Namespace, spec, dtype, device, free: int | None = None,
                 min_layers: int | None = None):
    """Refuse, before anything is built, a synthetic run whose estimated peak exceeds the free memory.

    The estimate (:func:`pact_vlm.bench.memory.estimate_memory`) counts the weights in the run's
    dtype (text tower, vision tower, projector), the larger of one decoder layer's prefill
    activations and the vision tower's (when it runs, ``--vision-layers``) and the KV cache; on
    the CPU the fresh-process memory measurement runs a second copy of the model next to the
    first, so its weights count twice.
    ``free`` defaults to :func:`~pact_vlm.bench.memory.available_memory` (``MemAvailable``, or the
    free CUDA memory); ``None`` there skips the check. Every fix the refusal offers fits by itself
    (``--layers N`` only with ``N >= min_layers``, the reduction layer + 1). Returns the estimate.
    """
    from . import memory

    free = memory.available_memory(device) if free is None else free
    itemsize = dtype.itemsize
    fresh = _fresh(args, device)
    estimate_for, seq_len = _estimator(args, spec, itemsize, fresh)
    estimate = estimate_for(spec.layers)
    if free is None or estimate.total <= free:
        return estimate
    low = (args.layer or 0) + 1 if min_layers is None else min_layers
    dtype_name = str(dtype).replace("torch.", "")
    fixes = []
    fit = _largest_fitting_layers(spec, estimate_for, free)
    if fit >= max(low, 1):
        fixes.append(f"--layers {fit}")
    changes = []                                  # (option, itemsize, fresh) at the full depth
    if itemsize > 2:
        changes.append(("--dtype bfloat16", 2, fresh))
    if fresh:
        changes.append(("--no-fresh-memory", itemsize, False))
    if itemsize > 2 and fresh:
        changes.append(("--dtype bfloat16 --no-fresh-memory", 2, False))
    for option, size, fresh_copy in changes:
        if estimate_for(spec.layers, size, fresh_copy).total <= free:
            fixes.append(option)
            break                                 # the least change that fits at the full depth
    else:
        if itemsize > 2:
            half = _largest_fitting_layers(spec, lambda n: estimate_for(n, 2), free)
            if half >= max(low, 1) and half > fit:
                fixes.append(f"--dtype bfloat16 --layers {half}")
    where = "free CUDA memory" if device.type == "cuda" else "MemAvailable"
    raise MemoryError(
        f"this run needs {estimate.describe(dtype_name)}{' (the fresh-process memory measurement builds a second copy)' if fresh else ''} "
        f"for {spec.layers} layers of hidden {spec.hidden}"
        + (f" and a {spec.vision_layers}-layer vision tower" if spec.vision_layers else "")
        + f" and a {seq_len}-token prompt, but only "
        f"{free / memory.GB:.1f} GB is free ({where}); use " + (" or ".join(fixes) if fixes else "a smaller --image-size or --batch")
        + ", or run on a machine with more memory")


def _refuse_vision_methods(spec, configs, labels) -> None:
    """Without ``--vision-layers`` the synthetic model is fed pre-encoded image features (its vision
    tower never runs): methods that read the vision tower cannot run on it; refused before anything
    is built. With a running tower they pass here (the model refuses, when applied, a method its
    tower does not suit, e.g. PruMerge's CLS attention on SigLIP)."""
    from ..methods.base import reads_vision_tower

    if spec.vision_layers:
        return
    for config, label in zip(configs, labels):
        if reads_vision_tower(config):
            fix = ("pass --vision-layers N (N >= 1: a SigLIP tower of N layers runs on pixels), "
                   if not spec.is_qwen else "")
            raise ValueError(f"--method {label}: {type(config).__name__} reads the vision tower's attention, but the "
                             "synthetic model's vision tower never runs (its image features are pre-encoded); "
                             f"{fix}time it on a real model with --model ID, or drop it from --method")


def _check_methods_apply(model, configs, labels) -> None:
    """Apply and remove each config once, so that a method this model refuses fails before any work."""
    from ..integration.handle import apply

    for config, label in zip(configs, labels):
        try:
            apply(model, config).remove()
        except ValueError as err:
            raise ValueError(f"--method {label}: {err}") from None


def run(args: argparse.Namespace) -> int:
    """Build (or load) the model, calibrate, measure, print the table, write JSON / PNG."""
    import torch

    from ..budget import match_budget
    from .speed import check_configs, measure_speed, resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    dtype = _dtype(args.dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs, labels, origin = _configs(args)

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--png needs matplotlib: pip install 'pact-vlm[plot]'") from None
    spec = None
    if args.model is not None:
        say(f"loading {args.model} ...")
        model, inputs, description = _hub_model(args, device, dtype)
    else:
        spec = _synthetic_spec(args)
        check_configs(configs, spec.layers)          # refuse before building a large model
        _refuse_vision_methods(spec, configs, labels)
        _check_hybrid_layers(spec, configs, labels)
        low = max(int(getattr(c, "layer", 0) or 0) for c in configs) + 1   # the reduction layers must exist
        if args.layers is None:                       # a default must run here: as many layers as fit
            layers = default_depth(args, spec, dtype, device, min_layers=low)
            if layers != spec.layers:
                say(f"--layers not given: building {layers} of the checkpoint's {spec.layers} decoder layers, as "
                    "many as the free memory holds (pass --layers N to choose)")
                spec = dataclasses.replace(spec, layers=layers)
        estimate = check_memory(args, spec, dtype, device, min_layers=low)
        say(f"building the synthetic model (estimated peak {estimate.describe(str(dtype).replace('torch.', ''))}) ...")
        model, inputs, description = _synthetic_model(spec, args, device, dtype)
    say(description)
    say(f"config: {origin}")
    _check_methods_apply(model, configs, labels)     # every method, before any calibration or timing

    names, calibration = [], []
    if args.target_ratio:
        tuned_configs = []
        for config, label in zip(configs, labels):
            param = type(config).budget_param
            for target in args.target_ratio:
                say(f"calibrating {label}'s {param} for reduction ratio {target} (pact_vlm.match_budget) ...")
                tuned = match_budget(model, config, inputs, target, tol=0.005)
                tuned_configs.append(tuned)
                names.append(f"{label}@{target:g}")
                calibration.append({"method": label, "target_ratio": target, "param": param,
                                    "value": getattr(tuned, param), "tol": 0.005})
                say(f"  {param} = {getattr(tuned, param):.4f}")
        configs = tuned_configs
    else:
        names = labels
    result = measure_speed(model, configs, inputs, repeats=args.repeats, warmup=args.warmup,
                           max_new_tokens=args.max_new_tokens, names=names, model_description=description,
                           progress=say)
    if sys.argv[1:2] == ["bench"]:      # run as `pact-vlm bench ...`
        result.meta["command"] = " ".join(["pact-vlm", *sys.argv[1:]])
    if spec is not None:
        result.meta["synthetic_spec"] = spec.to_dict()
        if device.type == "cpu" and not args.no_fresh_memory:
            _fresh_memory(result, spec, [None, *configs], args, say)
    result.meta["config_origin"] = origin
    if calibration:
        result.meta["calibration"] = calibration
    print(result.table())
    if args.json:
        result.save(args.json)
        print(f"wrote {args.json}")
    if args.png:
        result.plot(args.png)
        print(f"wrote {args.png}")
    return 0
