"""The ``pact-vlm`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

__all__ = ["main"]


class _UsageError(Exception):
    """A command-line usage problem, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the help is, no usage dump."""

    def error(self, message):
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _ranged(kind=float, low=None, high=None, *, low_open=False, high_open=False, hint=""):
    """An argparse ``type`` that parses ``kind`` and refuses values outside the given bounds."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} must be finite")
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            if high is None:
                rule = f"must be {'>' if low_open else '>='} {low}"
            elif low is None:
                rule = f"must be {'<' if high_open else '<='} {high}"
            else:
                rule = f"must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} {rule}" + (f" ({hint})" if hint else ""))
        return value

    parse.__name__ = kind.__name__        # argparse names the type in its messages
    return parse


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _check_output_file(option: str, path: str, extensions: tuple[str, ...], example: str) -> None:
    """Refuse an output path that cannot be written as a file of one of ``extensions``, before any work."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file name, e.g. "
                         f"{option} {os.path.join(path, example)}")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder {out_dir!r} of {option} {path!r} does not exist; "
                                f"create it or pick another {option}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise ValueError(f"{option} {path!r} needs one of the file extensions {', '.join(extensions)} "
                         f"(it sets the format), e.g. {option} {os.path.splitext(path)[0]}{extensions[0]}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    if args.method == NO_REDUCTION:
        raise ValueError("the demo compares a method with no reduction; pick a method, e.g. --method pact")
    from .demo.model import DEFAULT_MODEL_DIR

    # without method options: the config that travels with the model (its pact_config.json), -o on top
    config, origin = _model_method_config(args, args.model_dir or DEFAULT_MODEL_DIR)
    if not args.json:
        print(f"config: {origin}")
    if not args.no_picture:
        _check_output_file("--picture", args.picture, _IMAGE_EXTENSIONS, "pact_demo.png")
    result = run_demo(args.model_dir, config, n=args.n, seed=args.seed, repeats=args.repeats,
                      batch_size=args.batch_size, speed=not args.no_speed,
                      picture=None if args.no_picture else args.picture,
                      echo=(lambda *_: None) if args.json else print)
    if args.json:
        _emit_json(dict(result, config_origin=origin))
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    import shlex

    from .bench import fidelity

    layer, origin = args.layer, "given (--layer)"
    if layer is None:       # the layer of the config that travels with the model (its pact_config.json)
        from .demo.model import DEFAULT_MODEL_DIR
        from .presets import model_config

        cfg, origin = model_config(args.model_dir or DEFAULT_MODEL_DIR)
        if not hasattr(cfg, "layer"):
            raise ValueError(f"--layer is not given and the model's config ({origin}) is a {cfg.method!r} config "
                             "without a layer; pass --layer N (e.g. the layer `pact-vlm select-layer` suggests)")
        layer = cfg.layer
    from .demo.model import load_demo_model
    from .integration.adapters import get_adapter

    model, processor = load_demo_model(args.model_dir)
    n_layers = len(get_adapter(model).layers(model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"reduction layer {layer} ({origin}) is not a decoder layer of this model (0..{n_layers - 1}); "
                         "pass --layer N or put a pact_config.json in the model folder (pact-vlm tune --out DIR)")
    if not args.json:
        print(f"reduction layer {layer}: {origin}", file=sys.stderr)
    result = fidelity.run_fidelity(model, processor, n=args.n, ratios=args.ratios, methods=args.methods,
                                   layer=layer, batch_size=args.batch_size, calib_n=args.calib_n,
                                   random_seeds=args.random_seeds, eval_start=args.eval_start,
                                   instrument_keep=args.instrument_keep, progress=not args.no_progress)
    result["settings"]["layer_origin"] = origin
    command = "pact-vlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "pact-vlm fidelity"
    paths = fidelity.save_result(result, args.out_dir, command)
    if args.json:
        _emit_json(result)
    else:
        print(fidelity.format_table(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_demo_commands(sub) -> None:
    """Register demo and fidelity (the shipped demo VLM)."""
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, epilog=_EPILOG,
        help="the shipped demo VLM answers questions with and without PACT",
        description="Loads the small VLM shipped with the package (a Qwen2-VL trained here on synthetic "
                    "shapes), answers held-out questions in batches with and without the reduction, prints "
                    "a few answers, both accuracies and visual tokens before -> after, writes the token picture "
                    "of the first question, and measures one speed line at the "
                    "LLaVA-OneVision-7B width (2 random-weight layers) beside its analytical limit (--no-speed skips it). Without --method / --config it "
                    "uses the config that travels with the model (its pact_config.json).")
    demo.add_argument("--model-dir", default=None, metavar="DIR",
                      help="demo model folder (default: the copy inside the package)")
    demo.add_argument("--n", type=_ranged(int, 1), default=60,
                      help="held-out questions (from the evaluation split of `pact-vlm fidelity`)")
    demo.add_argument("--seed", type=_ranged(int, 0), default=0,
                      help="offset of the first question in the evaluation split")
    demo.add_argument("--batch-size", type=_ranged(int, 1), default=30, help="questions per forward pass")
    demo.add_argument("--repeats", type=_ranged(int, 3), default=3,
                      help="timed rounds of the speed line (medians and quartiles)")
    demo.add_argument("--no-speed", action="store_true",
                      help="skip the speed line (PACT against the unreduced model at the LLaVA-OneVision-7B "
                           "width: 2 random-weight layers, one 280x280 image, with the analytical limit; "
                           "about half a minute on a 2-core CPU)")
    demo.add_argument("--picture", default="pact_demo.png", metavar="PNG", help="where to write the token picture")
    demo.add_argument("--no-picture", action="store_true", help="do not write the picture")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_method_args(demo)
    demo.set_defaults(func=_cmd_demo)

    from .bench.fidelity import FIDELITY_METHODS

    fid = sub.add_parser(
        "fidelity", formatter_class=_Formatter,
        help="accuracy of the demo VLM against reduction ratio, PACT and every baseline at matched ratios",
        description="Calibrates each method's budget parameter to each target ratio on held-out calibration "
                    "questions, then answers N evaluation questions (held-out seeds never used in training): "
                    "accuracy, agreement with the unreduced answers and per-type accuracy with standard "
                    "errors, plus the instrument check (object-tokens-first oracle, random, background-first). "
                    "Writes fidelity.json, fidelity.txt and fidelity.png to --out-dir.")
    fid.add_argument("--model-dir", default=None, metavar="DIR",
                     help="demo model folder (default: the copy inside the package)")
    fid.add_argument("--n", type=_ranged(int, 1), default=2000, help="evaluation questions")
    fid.add_argument("--ratios", type=_ranged(float, 0, 1, low_open=True, high_open=True), nargs="+",
                     default=[0.5, 0.6, 0.7, 0.8],
                     help="target reduction ratios")
    fid.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                     help=f"methods to compare (default: all of {', '.join(FIDELITY_METHODS)}); a method may "
                          "carry config fields, e.g. pact:prune_ratio=0.2,alpha=1.0; each starts from its "
                          "config class's defaults (pact: the paper's λ = 0.45, not the model folder's "
                          "pact_config.json; pact-tuned runs pact_vlm.tune per ratio)")
    fid.add_argument("--layer", type=_ranged(int, 0), default=None,
                     help="decoder layer every method reduces at (default: the layer of the config that travels "
                          "with the model, pact_vlm.model_config: the demo model's pact_config.json, layer 0)")
    fid.add_argument("--batch-size", type=_ranged(int, 1), default=100, help="questions per forward pass")
    fid.add_argument("--calib-n", type=_ranged(int, 1), default=200, help="calibration questions per budget search")
    fid.add_argument("--random-seeds", type=_ranged(int, 1), default=3, help="seeds random pruning is averaged over")
    fid.add_argument("--eval-start", type=_ranged(int, 0), default=100_000,
                     help="offset of the evaluation questions in the held-out seeds (use another offset as a "
                          "separate split for choosing the layer or λ)")
    fid.add_argument("--instrument-keep", type=float, nargs="*", default=[0.15, 0.2, 0.25, 0.3], metavar="K",
                     help="keep fractions of the instrument check (none: skip it, e.g. to add one row quickly)")
    fid.add_argument("--out-dir", default="fidelity_results", metavar="DIR", help="where the results go")
    fid.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fid.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    fid.set_defaults(func=_cmd_fidelity)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run

    return run(args)


# -- shared options of the model commands ------------------------------------------------------

NO_REDUCTION = "none"
# = integration.attention.SUPPORTED_BACKENDS (not imported here: --help stays free of torch)
ATTN_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

_EPILOG = ("Method options: -o KEY=VALUE sets any field of the method's config (values are JSON: "
           "numbers, true/false, strings), e.g. -o layer=2 -o prune_ratio=0.3. A --config file "
           "(written by PACTConfig.save) gives the method and all its options; -o overrides them. "
           "Without --method and --config the config that travels with the model is used (the model "
           "folder's pact_config.json, e.g. written by `pact-vlm tune --out MODEL_DIR`; else the paper's "
           "preset for the model's family; else the library defaults), -o on top; the output names it.")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf) or local folder "
                                 "written by save_pretrained (offline: a folder)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--attn", default="sdpa", choices=ATTN_BACKENDS,
                   help="attention implementation (flash_attention_2/3 need a CUDA GPU and the flash-attn package)")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_method_args(p: argparse.ArgumentParser, default: str = "pact") -> None:
    p.add_argument("--method", default=None,
                   help=f"reduction method (default {default}; '{NO_REDUCTION}' = no reduction); "
                        "`pact-vlm methods` lists them")
    p.add_argument("--config", default=None, metavar="FILE", help="method config JSON (PACTConfig.save)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="set one option of the method's config (repeatable)")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(args: argparse.Namespace) -> dict:
    """The -o KEY=VALUE options as a dict (values parsed as JSON where they are JSON)."""
    overrides = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {item!r} is not KEY=VALUE; write e.g. -o layer=2")
        key = key.strip()
        if key == "method":
            raise ValueError(f"-o {item}: the method is not an option of a config; choose it with "
                             f"--method {value.strip() or 'NAME'}")
        if key == "format_version":
            raise ValueError(f"-o {item}: format_version belongs to config files, not to -o; drop it")
        overrides[key] = _parse_value(value.strip())
    return overrides


def _method_config(args: argparse.Namespace, default: str = "pact"):
    """The config the method options describe, or None for no reduction."""
    from .config import CONFIG_REGISTRY, ReductionConfig, load_config

    overrides = _overrides(args)
    if args.config is not None:
        cfg = load_config(args.config)
        if args.method is not None and args.method != cfg.method:
            raise ValueError(f"--method {args.method!r} contradicts the config file's method {cfg.method!r}; "
                             "drop --method or use another file")
        return ReductionConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
    method = args.method or default
    if method == NO_REDUCTION and NO_REDUCTION not in CONFIG_REGISTRY:
        if overrides:
            raise ValueError(f"method '{NO_REDUCTION}' takes no options; drop -o or pick a method")
        return None
    if method not in CONFIG_REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: "
                         f"{', '.join(sorted(CONFIG_REGISTRY) + [NO_REDUCTION])}")
    return ReductionConfig.from_dict({"method": method, **overrides})


def _model_method_config(args: argparse.Namespace, source) -> tuple[object, str]:
    """The config of the method options, or, with no --method / --config, the one that travels with the
    model (:func:`pact_vlm.model_config`: its folder's pact_config.json, else its family's preset, else
    the library defaults) with any -o on top; and where it came from."""
    if args.config is not None or args.method is not None:
        return _method_config(args), "given"
    from .config import ReductionConfig
    from .presets import model_config

    cfg, origin = model_config(source)
    overrides = _overrides(args)
    if overrides:
        cfg = ReductionConfig.from_dict({**cfg.to_dict(), **overrides})
        origin += ", -o on top"
    return cfg, origin


def _origin_note(origin: str) -> str:
    return "" if origin == "given" else f" | config: {origin}"


def _open_images(paths: list[str]):
    from .viz import _open_image

    return [_open_image(p) for p in paths]


def _open_video(path: str):
    """Frames of a video given as a folder of images (sorted by name) or a multi-frame GIF / TIFF."""
    from PIL import Image, ImageSequence

    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not names:
            raise FileNotFoundError(f"video folder {path!r} holds no PNG / JPEG frames")
        return _open_images([os.path.join(path, n) for n in names])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist; pass a folder of frames or an animated GIF")
    from .viz import strict_loading

    try:
        with strict_loading(), Image.open(path) as img:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(img)]
    except (OSError, ValueError, SyntaxError) as err:    # PIL: unreadable, truncated, corrupt
        raise ValueError(f"video {path!r} cannot be read ({' '.join(str(err).split()) or type(err).__name__}); "
                         "pass a folder of PNG / JPEG frames or an animated GIF") from None
    if len(frames) < 2:
        raise ValueError(f"{path!r} has a single frame; pass it with --image, or a folder of frames as --video")
    return frames


def _load(args: argparse.Namespace):
    from .integration.loading import load_vlm

    return load_vlm(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn,
                    local_files_only=args.local_files_only)


def _describe(cfg) -> str:
    if cfg is None:
        return "no reduction"
    defaults = type(cfg)().to_dict() if _has_defaults(type(cfg)) else {}
    fields = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()
                       if k not in ("method", "format_version") and defaults.get(k, object()) != v)
    return f"{cfg.method}({fields})"


def _has_defaults(cls) -> bool:
    import dataclasses

    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _emit_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- generate -------------------------------------------------------------------------------------

def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .integration.handle import apply
    from .integration.loading import build_inputs

    cfg, origin = _model_method_config(args, args.model)
    images = _open_images(args.image)
    videos = [_open_video(args.video)] if args.video else []
    if cfg is not None and not images and not videos:
        raise ValueError("the prompt has no visual tokens to reduce: pass --image FILE (or --video), "
                         f"or --method {NO_REDUCTION}")
    model, processor = _load(args)
    device = next(model.parameters()).device
    inputs = build_inputs(processor, args.prompt, images, videos, device=device)
    tokenizer = getattr(processor, "tokenizer", processor)
    handle = apply(model, cfg) if cfg is not None else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        if handle is not None:
            handle.remove()
    new = out[0, inputs["input_ids"].shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    stats = handle.stats if handle is not None else None
    visual = int(sum(int((inputs["input_ids"][0] == t).sum())
                     for t in _visual_ids(model))) if stats is None else stats.visual_before
    result = dict(answer=answer, model=args.model, method=cfg.method if cfg else NO_REDUCTION,
                  config=cfg.to_dict() if cfg else None, config_origin=origin, visual_before=visual,
                  visual_after=stats.visual_after if stats else visual,
                  reduction_ratio=stats.reduction_ratio if stats else 0.0,
                  reduction_seconds=stats.seconds if stats else 0.0, generate_seconds=seconds,
                  new_tokens=int(new.numel()), prompt_tokens=int(inputs["input_ids"].shape[1]))
    if args.json:
        _emit_json(result)
        return 0
    print(answer)
    print(f"[{_describe(cfg)}] visual tokens {result['visual_before']} -> {result['visual_after']} "
          f"({result['reduction_ratio']:.1%} fewer) | generate {seconds:.2f} s for {result['new_tokens']} "
          f"new tokens | reduction step {result['reduction_seconds'] * 1e3:.1f} ms{_origin_note(origin)}")
    return 0


def _visual_ids(model) -> list[int]:
    from .integration.adapters import get_adapter

    return get_adapter(model).visual_token_ids(model.config)


# -- viz ------------------------------------------------------------------------------------------

def _cmd_viz(args: argparse.Namespace) -> int:
    from .viz import _open_image, visualize

    cfg, origin = _model_method_config(args, args.model)
    if cfg is None:
        raise ValueError(f"viz needs a reduction method; drop --method {NO_REDUCTION}")
    _check_output_file("--out", args.out, _IMAGE_EXTENSIONS, "pact_viz.png")
    image = _open_image(args.image)
    model, processor = _load(args)
    result = visualize(model, processor, image, cfg, args.prompt, view=args.view, alpha=args.alpha,
                       legend=not args.no_legend)
    result.image.save(args.out)
    summary = dict(png=args.out, model=args.model, config=cfg.to_dict(), config_origin=origin, **result.summary())
    if args.json:
        _emit_json(summary)
        return 0
    fewer = 1 - result.visual_after / result.visual_before if result.visual_before else 0.0
    print(f"wrote {args.out} ({result.image.width}x{result.image.height}, view '{result.view}')")
    print(f"[{_describe(cfg)}] visual tokens {result.visual_before} -> {result.visual_after} ({fewer:.1%} fewer): "
          f"{result.merged_clusters} merged clusters of {result.merged_tokens} tokens, {result.singletons} kept "
          f"alone, {result.dropped} dropped{_origin_note(origin)}")
    return 0


# -- select-layer ---------------------------------------------------------------------------------

def _cmd_select_layer(args: argparse.Namespace) -> int:
    from .select_layer import select_layer

    cutoff = args.cutoff
    if cutoff is None:
        cfg = _method_config(args) if (args.config or args.option or args.method) else None
        cutoff = getattr(cfg, "cutoff", 0.21)
    images = _open_images(args.image)
    if not images:
        raise ValueError("select-layer needs sample images: pass --image FILE (several times for several samples)")
    if args.plot:
        _check_output_file("--plot", args.plot, _PLOT_EXTENSIONS, "layers.png")
    model, processor = _load(args)
    selection = select_layer(model, processor, images, args.prompt, statistic=args.statistic,
                             threshold=args.threshold, cutoff=cutoff, max_tokens=args.max_tokens,
                             progress=not args.no_progress)
    if args.plot:
        selection.plot(args.plot, title=f"{args.model}: visual key distances per layer")
    data = dict(model=args.model, plot=args.plot, **selection.to_dict())
    if args.json:
        _emit_json(data)
        return 0
    print(f"{'layer':>5} {'mean':>7} {'median':>7} {'p10':>7} {'p90':>7} {'<=d_c':>7}")
    for s in selection.layers:
        mark = "  <- suggested" if s.layer == selection.suggested else ""
        print(f"{s.layer:>5} {s.mean:>7.3f} {s.median:>7.3f} {s.p10:>7.3f} {s.p90:>7.3f} "
              f"{s.within_cutoff:>7.1%}{mark}")
    print(f"suggested layer: {selection.suggested} ({selection.reason}; d_c = {cutoff})")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


# -- tune -----------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _tune_images(args: argparse.Namespace) -> list[str]:
    paths = list(args.image)
    for folder in args.images:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--images {folder!r} is not a folder; pass a folder of PNG / JPEG files "
                                    "or single files with --image")
        found = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"--images {folder!r} holds no PNG / JPEG files")
        paths += found
    if not paths:
        raise ValueError("tune needs calibration images: pass --image FILE (repeatable) or --images DIR")
    return paths


def _tune_out(out: str | None, model: str) -> str | None:
    """Where the chosen config goes: a file, or pact_config.json inside a folder (the model's, for the
    convention that a config travels with its model)."""
    if out is None:
        return None
    from .presets import CONFIG_FILENAME

    if os.path.isdir(out):
        return os.path.join(out, CONFIG_FILENAME)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--out {out!r}: folder {parent!r} does not exist; create it, or pass the model "
                                f"folder (e.g. --out {model}) to write {CONFIG_FILENAME} there")
    if not out.lower().endswith(".json"):
        raise ValueError(f"--out {out!r} is neither a folder nor a .json file; pass e.g. --out pact_config.json "
                         "or the model folder")
    return out


def _cmd_tune(args: argparse.Namespace) -> int:
    import pact_vlm

    from .integration.loading import build_inputs

    if not 0.0 < args.target_ratio < 1.0:
        raise ValueError(f"--target-ratio {args.target_ratio} must lie strictly between 0 and 1 (e.g. 0.7 removes "
                         "70% of the visual tokens)")
    paths = _tune_images(args)
    out = _tune_out(args.out, args.model)
    args.prompt = args.prompt or ["Describe the image."]
    if args.png:
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
            raise FileNotFoundError(f"--png {args.png!r}: its folder does not exist; create it or pick another path")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--png needs matplotlib: pip install 'pact-vlm[plot]'")
    images = _open_images(paths)
    model, processor = _load(args)
    if args.config is not None:
        base, origin = pact_vlm.load_config(args.config), f"--config {args.config}"
        if not isinstance(base, pact_vlm.PACTConfig):
            raise ValueError(f"--config {args.config!r} is a {base.method!r} config; tune searches PACT, pass a "
                             "PACT config (or none: the model's own, else the defaults)")
    else:
        base, origin = pact_vlm.model_config(args.model)
        if not isinstance(base, pact_vlm.PACTConfig):
            base, origin = pact_vlm.PACTConfig(), f"library defaults (the model's config, {origin}, is not PACT)"
    layer = args.layer[0] if args.layer and len(args.layer) == 1 else args.layer
    device = next(model.parameters()).device
    calibration = [build_inputs(processor, prompt, [image], device=device) for image in images for prompt in args.prompt]
    result = pact_vlm.tune(model, calibration, target_ratio=args.target_ratio, layer=layer,
                           prune_ratios=args.prune_ratios, base=base, objective=args.objective,
                           new_tokens=args.new_tokens, progress=not args.no_progress)
    if out is not None:
        result.config.save(out)
    if args.png:
        result.plot(args.png, title=f"{args.model}: {result.samples} calibration prompts, target {args.target_ratio:g}")
    if args.json:
        _emit_json(dict(result.to_dict(), model=args.model, base_origin=origin, out=out, png=args.png))
        return 0
    print(f"{result.samples} calibration prompts ({len(images)} images x {len(args.prompt)} prompts); "
          f"other fields from {origin}")
    print(result.format_table())
    print(f"chosen: {_describe(result.config)}: reduction {result.ratio:.3f} (target {args.target_ratio:g}), "
          f"agreement {result.agreement:.3f}, KL {result.kl:.5f}")
    print(result.config.to_json())
    if out is not None:
        print(f"wrote {out}")
    else:
        print("not written: pass --out FILE.json or --out MODEL_DIR (then every command uses it for that model)")
    if args.png:
        print(f"wrote {args.png}")
    return 0


# -- methods --------------------------------------------------------------------------------------

def _cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import CONFIG_REGISTRY

    rows = {}
    for name, cls in sorted(CONFIG_REGISTRY.items()):
        rows[name] = {f.name: f.default for f in dataclasses.fields(cls)
                      if f.default is not dataclasses.MISSING}
    if args.json:
        _emit_json(rows)
        return 0
    for name, defaults in rows.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    print(f"{NO_REDUCTION}: the model as it is")
    return 0


def _add_tool_commands(sub) -> None:
    """Register generate, viz, select-layer and methods."""
    gen = sub.add_parser(
        "generate", formatter_class=_Formatter, epilog=_EPILOG,
        help="answer a prompt about image(s) / a video with a reduction applied",
        description="Load a VLM, apply a reduction method, generate greedily; prints the answer and one "
                    "summary line (visual tokens before -> after, time).")
    _add_model_args(gen)
    gen.add_argument("--image", action="append", default=[], metavar="FILE", help="input image (repeatable)")
    gen.add_argument("--video", default=None, metavar="PATH", help="a folder of frames or an animated GIF")
    gen.add_argument("--prompt", required=True, help="the question / instruction")
    gen.add_argument("--max-new-tokens", type=_ranged(int, 1), default=64, help="tokens to generate at most")
    _add_method_args(gen)
    gen.set_defaults(func=_cmd_generate)

    viz = sub.add_parser(
        "viz", formatter_class=_Formatter, epilog=_EPILOG,
        help="PNG of the image with each visual token's patch coloured by its cluster",
        description="Run the prompt once with the method applied and paint every visual token's region: "
                    "tinted by cluster, greyed out if dropped, a dot on each cluster center, a legend "
                    "with the counts. The PNG has the input image's size.")
    _add_model_args(viz)
    viz.add_argument("--image", required=True, metavar="FILE", help="input image")
    viz.add_argument("--prompt", default="Describe the image.", help="text that goes with the image")
    viz.add_argument("--out", default="pact_viz.png", metavar="PNG", help="where to write the picture")
    viz.add_argument("--view", default=None,
                     help="for images seen twice (anyres base + tiles, InternVL thumbnail + tiles): "
                          "which view to paint (default: the finest)")
    viz.add_argument("--alpha", type=_ranged(float, 0, 1), default=0.55,
                     help="opacity of the cluster colours (1 = solid)")
    viz.add_argument("--no-legend", action="store_true", help="leave out the legend")
    _add_method_args(viz)
    viz.set_defaults(func=_cmd_viz)

    sel = sub.add_parser(
        "select-layer", formatter_class=_Formatter, epilog=_EPILOG,
        help="suggest the reduction layer L from the visual tokens' key distances (paper, appendix K)",
        description="For every decoder layer, statistics of the pairwise cosine distances between the "
                    "visual tokens' keys on sample images; suggests the earliest layer whose keys are "
                    "distinct enough (its statistic reaches THRESHOLD x the largest over the layers).")
    _add_model_args(sel)
    sel.add_argument("--image", action="append", default=[], metavar="FILE",
                     help="sample image (repeatable; a few varied images are enough)")
    sel.add_argument("--prompt", default="Describe the image.", help="text that goes with each image")
    sel.add_argument("--statistic", default="median", choices=("median", "mean", "p10"),
                     help="which statistic of the distances the rule reads")
    sel.add_argument("--threshold", type=_ranged(float, 0, 1, low_open=True), default=0.9,
                     help="fraction of the largest value to reach")
    sel.add_argument("--cutoff", type=_ranged(float, 0, hint="a cosine distance"), default=None,
                     help="d_c for the share of pairs within the cut-off (default: the config's, else 0.21)")
    sel.add_argument("--max-tokens", type=_ranged(int, 2), default=1024,
                     help="visual tokens per sample (random subset)")
    sel.add_argument("--plot", default=None, metavar="PNG", help="draw the per-layer curve to this PNG")
    sel.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_method_args(sel)
    sel.set_defaults(func=_cmd_select_layer)

    from .tune import DEFAULT_PRUNE_RATIOS, OBJECTIVES

    tune = sub.add_parser(
        "tune", formatter_class=_Formatter,
        help="find the PACT config that keeps the model's answers at a target reduction, from unlabelled images",
        description="For every λ (prune_ratio) of a grid from 0 (DBDPC alone) to the paper's values, and every "
                    "candidate layer, matches the cut-off d_c to --target-ratio on the calibration prompts, then "
                    "compares the reduced model's next-token distribution with the unreduced one (top-1 "
                    "agreement, KL). Prints the table (with the analytical work fraction per candidate) and the "
                    "chosen config; --out MODEL_DIR writes it as the model's pact_config.json, which generate, "
                    "viz, bench, fidelity, demo, the lmms-eval plugin and pact_vlm.apply(model) then use. "
                    "Cost: about (1 + candidates) full forward passes per prompt, plus the budget search's "
                    "shortened passes.")
    _add_model_args(tune)
    tune.add_argument("--image", action="append", default=[], metavar="FILE", help="calibration image (repeatable)")
    tune.add_argument("--images", action="append", default=[], metavar="DIR",
                      help="a folder of calibration images (PNG / JPEG, repeatable)")
    tune.add_argument("--prompt", action="append", default=None,
                      help="text asked with every image (repeatable: every image with every prompt; "
                           "default: 'Describe the image.')")
    tune.add_argument("--target-ratio", type=float, default=0.7, help="fraction of visual tokens to remove")
    tune.add_argument("--layer", type=int, nargs="+", default=None,
                      help="reduction layer L, or several candidates (default: the layer of the model's own config)")
    tune.add_argument("--prune-ratios", type=float, nargs="+", default=list(DEFAULT_PRUNE_RATIOS), metavar="λ",
                      help="the λ grid")
    tune.add_argument("--objective", default="agreement", choices=OBJECTIVES,
                      help="agreement (ties broken by KL) or kl")
    tune.add_argument("--new-tokens", type=int, default=0,
                      help="also compare this many greedy tokens after each prompt (teacher-forced)")
    tune.add_argument("--config", default=None, metavar="FILE",
                      help="PACT config whose other fields (alpha, ...) the candidates keep (default: the model's own)")
    tune.add_argument("--out", default=None, metavar="FILE|DIR",
                      help="write the chosen config: a .json file, or a folder (the model folder: its pact_config.json)")
    tune.add_argument("--png", default=None, metavar="PNG", help="plot fidelity against reduction for the candidates")
    tune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tune.set_defaults(func=_cmd_tune)

    methods = sub.add_parser("methods", help="list the reduction methods and their default options")
    methods.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    methods.set_defaults(func=_cmd_methods)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pact-vlm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_commands(sub)
    _add_tool_commands(sub)
    bench = sub.add_parser("bench", help="speed and memory, reduced against unreduced and against the "
                                         "analytical limit")
    from .bench.command import add_arguments as _bench_arguments

    _bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"pact-vlm: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:      # output piped into e.g. `head`
        return 0
    except Exception as err:  # noqa: BLE001 - one line, no traceback, unless --debug
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, (ValueError, FileNotFoundError, TypeError, ImportError, OSError, MemoryError)):
            message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
        print(f"pact-vlm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
