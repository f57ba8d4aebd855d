"""Speed and memory of a reduced model against the same model unreduced, in one run.

    from pact_vlm.bench import measure_speed
    result = measure_speed(model, pact_vlm.PACTConfig(layer=4, cutoff=0.21), inputs, repeats=5)
    print(result.table())
    result.save("speed.json")

Every repeat runs each variant once (unreduced and one per config), in an order that rotates from
repeat to repeat, after ``warmup`` untimed rounds. Each run is one ``model.generate(**inputs)``
with ``max_new_tokens`` greedy tokens and records:

* ``lm_prefill_s``: the text model's forward in the prefill call (every decoder layer, the
  reduction step at layer L included; not the vision tower, not ``lm_head``; an image encoding
  that ran inside that call would be subtracted, so it never counts in one variant and not in
  another);
* ``vision_s``: the image encoder, when ``inputs`` carry pixels (``None`` for pre-encoded
  features): the wall time of the inner model's ``get_image_features`` calls in the
  ``generate()`` (vision tower, projector, packing) with the work of a method that reduces in the
  vision encoder inside it (VisionZip's attention and merge run in a pre-hook of the projector;
  the language-model side of its step is ``reduction_s``);
* ``ttft_s``: time to first token, from calling ``generate()`` to the first logits (includes the
  vision tower when ``inputs`` carry pixels, which ``generate()`` encodes before the prefill);
* ``decode_per_token_s``: (last logits - first logits) / (new tokens - 1);
* ``generate_s``: the whole ``generate()`` call;
* ``peak_memory_bytes`` / ``memory_increase_bytes``: CUDA ``max_memory_allocated`` during the call,
  and its increase over the memory allocated before it; on the CPU the peak resident set size
  (Linux ``VmHWM``, reset before each call through ``/proc/self/clear_refs`` after returning freed
  heap memory with ``malloc_trim``) and its increase over the resident size before the call;
* ``kv_cache_bytes``: keys + values held by the cache after the call;
* ``reduction_s``: the reduction step (``handle.stats.seconds``), reduced variants only.

Beside each reduced variant: the analytical limit (:mod:`pact_vlm.bench.limits`) for the token
counts it actually kept, and measured speed-up / possible speed-up. Both are of the text model's
prefill alone (the limit counts decoder layers and ``lm_head``, ``lm_prefill_s`` times the decoder
layers), whether or not the vision tower runs; the vision encoder's time is reported beside them
(``vision_s``, and a reduced variant's extra vision time over the unreduced one, paired per round).
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ReductionConfig
from .limits import TextDims, kv_cache_bytes, layer_work_fraction, work_fraction

__all__ = ["measure_speed", "SpeedResult", "resolve_device", "quartiles", "paired_ratio", "machine_description"]

UNREDUCED = "unreduced"
TIME_METRICS = ("lm_prefill_s", "ttft_s", "decode_per_token_s", "generate_s")
METRICS = TIME_METRICS + ("peak_memory_bytes", "memory_increase_bytes", "kv_cache_bytes", "reduction_s", "vision_s")
IMAGE_ENCODER = "get_image_features"
"""The inner model's method that runs the vision tower and projector (timed as ``vision_s``)."""


# -- small helpers --------------------------------------------------------------------------------

def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; anything else is refused."""
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device={text!r} is not supported by the benchmark; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device={text!r} but CUDA is not available on this machine; use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={text!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def quartiles(xs: Sequence[float]) -> dict[str, float]:
    """``{"median", "q1", "q3"}`` (inclusive quartiles; all equal for a single value)."""
    xs = list(xs)
    if not xs:
        raise ValueError("no values to summarise")
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Quartiles of ``numerators[r] / denominators[r]`` over repeats ``r`` (runs of the same round)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need the same number (>= 1) of values on both sides, got {len(numerators)} and "
                         f"{len(denominators)}")
    return quartiles([a / b for a, b in zip(numerators, denominators)])


def machine_description(device: torch.device) -> str:
    """One line naming the processor or GPU, and torch's thread count on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch threads={torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory probes ----------------------------------------------------------------------------------

class _MemoryProbe:
    """Peak memory of one call: CUDA allocator statistics, or the process's resident set on Linux."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.note = ""
        self._libc = None
        if device.type == "cpu":
            if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")):
                self.note = "peak RSS needs Linux /proc (clear_refs, status); not measured"
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @property
    def available(self) -> bool:
        return not self.note

    @staticmethod
    def _status_kb(field_name: str) -> int:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field_name} missing from /proc/self/status")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            if self._libc is not None:
                self._libc.malloc_trim(0)   # give freed heap pages back, so the base is live memory
            self.base = self._status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")               # reset the peak (VmHWM) to the current resident size

    def stop(self) -> tuple[int | None, int | None]:
        """(peak, peak - base) in bytes, or (None, None) when not measurable."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.available:
            peak = self._status_kb("VmHWM")
        else:
            return None, None
        return peak, peak - self.base


# -- timing instrumentation ----------------------------------------------------------------------

class _Timeline:
    """Timestamps of one ``generate()``: text-model forwards, image-encoder calls and each step's logits."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lm_calls: list[list[float]] = []
        self.vision_calls: list[list[float]] = []
        self.logits: list[float] = []

    def reset(self) -> None:
        self.lm_calls, self.vision_calls, self.logits = [], [], []

    def timed_encoder(self, encode):
        """``encode`` (a bound ``get_image_features``) timed into :attr:`vision_calls`; its signature
        is kept (``generate()`` picks the encoder's arguments by it)."""
        @functools.wraps(encode)
        def timed(*args, **kwargs):
            _sync(self.device)
            call = [time.perf_counter(), float("nan")]
            try:
                return encode(*args, **kwargs)
            finally:
                _sync(self.device)
                call[1] = time.perf_counter()
                self.vision_calls.append(call)

        return timed

    def prefill_seconds(self) -> float:
        """The first text-model call, less any image encoding that ran inside it."""
        start, end = self.lm_calls[0]
        inside = sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.vision_calls)
        return end - start - inside

    def vision_seconds(self) -> float | None:
        """Time in the image encoder during the call (``None``: it did not run)."""
        return sum(e - s for s, e in self.vision_calls) if self.vision_calls else None

    def lm_start(self, module, args, kwargs) -> None:
        _sync(self.device)
        self.lm_calls.append([time.perf_counter(), float("nan")])

    def lm_end(self, module, args, kwargs, output) -> None:
        _sync(self.device)
        self.lm_calls[-1][1] = time.perf_counter()


class _EncoderTimer:
    """Times the inner model's ``get_image_features`` through an instance attribute over the class
    method; :meth:`remove` restores exactly what was there (an earlier instance attribute or none)."""

    def __init__(self, inner, timeline: _Timeline):
        self.inner = inner
        self.had = IMAGE_ENCODER in vars(inner)
        self.previous = vars(inner).get(IMAGE_ENCODER)
        self.wrapper = None
        encode = getattr(inner, IMAGE_ENCODER, None)
        if callable(encode):
            self.wrapper = timeline.timed_encoder(encode)
            setattr(inner, IMAGE_ENCODER, self.wrapper)

    def remove(self) -> None:
        if self.wrapper is None or vars(self.inner).get(IMAGE_ENCODER) is not self.wrapper:
            return
        if self.had:
            setattr(self.inner, IMAGE_ENCODER, self.previous)
        else:
            delattr(self.inner, IMAGE_ENCODER)


def _logits_recorder(timeline: _Timeline):
    from transformers import LogitsProcessor

    class _Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(timeline.device)
            timeline.logits.append(time.perf_counter())
            return scores

    return _Record()


def _cache_of(output) -> Any:
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def _cache_layout(cache) -> tuple[int, list[int]]:
    """(bytes of keys + values, entries per layer) of a ``DynamicCache``."""
    total, lengths = 0, []
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.numel() == 0:
            lengths.append(0)
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        lengths.append(int(keys.shape[-2]))
    return total, lengths


# -- result ---------------------------------------------------------------------------------------

@dataclass
class SpeedResult:
    """What :func:`measure_speed` measured.

    Attributes:
        meta: model, device, dtype, batch, prompt length, repeats, versions, machine, date.
        variants: one dict per variant (``"unreduced"`` first): ``name``, ``config`` (dict or None),
            ``samples`` (metric -> one value per repeat, in repeat order), ``summary`` (metric ->
            median / q1 / q3), and for reduced variants ``reduction`` (token counts, lengths per
            layer), ``limit`` (the analytical limit) and ``ratios`` (against unreduced).
    """

    meta: dict[str, Any]
    variants: list[dict[str, Any]] = field(default_factory=list)

    def variant(self, name: str) -> dict[str, Any]:
        for v in self.variants:
            if v["name"] == name:
                return v
        raise KeyError(f"no variant {name!r}; variants: {', '.join(v['name'] for v in self.variants)}")

    @property
    def reduced(self) -> list[dict[str, Any]]:
        return [v for v in self.variants if v["name"] != UNREDUCED]

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "variants": self.variants}

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        """Medians (q1-q3) per variant and the ratios against the unreduced model, as text."""
        return format_table(self)

    def plot(self, path: str | os.PathLike) -> None:
        """PNG of LM prefill and TTFT latency against the reduction ratio, with the analytical limit."""
        plot_latency(self, path)


def _unit(metric: str, value: float) -> tuple[float, str]:
    if metric.endswith("_s"):
        return (value * 1e3, "ms") if value < 10 else (value, "s")
    return value / 2**20, "MiB"


def _cell(metric: str, summary: dict[str, float] | None) -> str:
    """``"579.5 ms (571.4-603.7)"``: the median, then q1-q3 in the median's unit."""
    if summary is None:
        return "-"
    value, unit = _unit(metric, summary["median"])
    scale = value / summary["median"] if summary["median"] else 1.0
    return f"{value:.1f} {unit} ({summary['q1'] * scale:.1f}-{summary['q3'] * scale:.1f})"


def format_table(result: SpeedResult) -> str:
    lines = []
    m = result.meta
    lines.append(f"model: {m['model']}")
    lines.append(f"device: {m['device']} ({m['machine']}), dtype {m['dtype']}, batch {m['batch']}, prompt "
                 f"{m['prompt_tokens']} tokens, {m['max_new_tokens']} new tokens, {m['repeats']} repeats after "
                 f"{m['warmup']} warm-up round(s)")
    names = [v["name"] for v in result.variants]
    shown = [metric for metric in METRICS
             if metric != "vision_s" or any(v["summary"].get(metric) is not None for v in result.variants)]
    cells = {metric: [_cell(metric, v["summary"].get(metric)) for v in result.variants] for metric in shown}
    width = max(len(c) for row in [names, *cells.values()] for c in row) + 2
    lines.append("")
    lines.append("median (q1-q3)".ljust(24) + "".join(n.rjust(width) for n in names))
    for metric in shown:
        lines.append(metric.ljust(24) + "".join(c.rjust(width) for c in cells[metric]))
    for v in result.reduced:
        r, lim, red = v["ratios"], v["limit"], v["reduction"]
        lines.append("")
        lines.append(f"{v['name']}: visual tokens {red['visual_before']} -> {red['visual_after']} "
                     f"({red['reduction_ratio']:.1%} fewer), layers >= {red['layer']} see "
                     f"{red['seq_lengths'][-1]} of {m['prompt_tokens']} positions")
        sp = r["lm_prefill_speedup"]
        lines.append(f"  prefill speed-up (unreduced / reduced, LM prefill): {sp['median']:.2f}x "
                     f"(per-round q1-q3 {sp['q1']:.2f}-{sp['q3']:.2f}); analytical limit "
                     f"{lim['possible_speedup']:.2f}x (work left {lim['fraction']:.1%}); "
                     f"measured / possible = {r['of_possible']:.2f}")
        tt = r["ttft_speedup"]
        lines.append(f"  time-to-first-token speed-up: {tt['median']:.2f}x; end-to-end generate speed-up: "
                     f"{r['generate_speedup']['median']:.2f}x")
        if r.get("decode_ratio") is not None:
            d = r["decode_ratio"]
            lines.append(f"  decode time per token, reduced / unreduced: {d['median']:.3f} "
                         f"(q1-q3 {d['q1']:.3f}-{d['q3']:.3f})")
        lines.append(f"  reduction step: {r['reduction_s'] * 1e3:.1f} ms = {r['reduction_share']:.2%} of the "
                     f"unreduced LM prefill")
        if r.get("vision_extra_s") is not None:
            ve, vb = r["vision_extra_s"], result.variant(UNREDUCED)["summary"]["vision_s"]["median"]
            lines.append(f"  vision encoder (not in the LM prefill nor the limit; in TTFT): "
                         f"{v['summary']['vision_s']['median'] * 1e3:.1f} ms vs {vb * 1e3:.1f} ms unreduced, "
                         f"{ve['median'] * 1e3:+.1f} ms per round (q1-q3 {ve['q1'] * 1e3:+.1f} to {ve['q3'] * 1e3:+.1f}) "
                         f"= {r['vision_extra_share']:+.2%} of the unreduced LM prefill")
        lines.append(f"  KV cache: {r['kv_ratio']:.3f} of unreduced (predicted from the kept lengths "
                     f"{r['kv_ratio_predicted']:.3f}; limit for the prompt alone {lim['kv_fraction']:.3f})")
        if r.get("peak_memory_ratio_fresh_process") is not None:
            mem, base_mem = v["memory_fresh_process"], result.variant(UNREDUCED)["memory_fresh_process"]
            inc = r.get("memory_increase_ratio_fresh_process")
            lines.append(f"  peak memory, one fresh process per variant: {mem['peak_rss_bytes'] / 2**20:.0f} MiB vs "
                         f"{base_mem['peak_rss_bytes'] / 2**20:.0f} MiB unreduced ({r['peak_memory_ratio_fresh_process']:.3f}); "
                         f"increase over the memory before the call: {mem['rss_increase_bytes'] / 2**20:.0f} vs "
                         f"{base_mem['rss_increase_bytes'] / 2**20:.0f} MiB" + ("" if inc is None else f" ({inc:.3f})"))
        if r.get("peak_memory_ratio") is not None:
            inc = r.get("memory_increase_ratio")
            lines.append(f"  peak memory (in-process): {r['peak_memory_ratio']:.3f} of unreduced; increase over the memory "
                         f"before the call: " + ("-" if inc is None else f"{inc:.3f} of unreduced"))
    if m.get("memory_note"):
        lines.append("")
        lines.append(f"note: {m['memory_note']}")
    return "\n".join(lines)


def plot_latency(result: SpeedResult, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result.variant(UNREDUCED)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for metric, label, marker in (("lm_prefill_s", "LM prefill", "o"), ("ttft_s", "time to first token", "s")):
        xs, ys, lo, hi = [], [], [], []
        for v in result.variants:
            s = v["summary"][metric]
            xs.append(0.0 if v["name"] == UNREDUCED else v["reduction"]["reduction_ratio"])
            ys.append(s["median"])
            lo.append(s["median"] - s["q1"])
            hi.append(s["q3"] - s["median"])
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.errorbar([xs[i] for i in order], [ys[i] for i in order], yerr=[[lo[i] for i in order],
                    [hi[i] for i in order]], marker=marker, capsize=3, label=f"{label} (median, IQR)")
    b = base["summary"]["lm_prefill_s"]["median"]
    lim = sorted((v["reduction"]["reduction_ratio"], b * v["limit"]["fraction"]) for v in result.reduced)
    ax.plot([0.0] + [x for x, _ in lim], [b] + [y for _, y in lim], "k--", label="analytical limit (LM prefill)")
    ax.set_xlabel("visual-token reduction ratio")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    m = result.meta
    ax.set_title(f"{m['device']}, {m['dtype']}, batch {m['batch']}, {m['prompt_tokens']} prompt tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the measurement ------------------------------------------------------------------------------

def _check_int(name: str, value: Any, low: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low} ({why})")


def _text_layers(model):
    from ..integration.adapters import get_adapter

    adapter = get_adapter(model)
    return adapter, adapter.text_model(model), len(adapter.layers(model))


def check_configs(configs: Sequence[ReductionConfig], n_layers: int) -> None:
    """Refuse configs that are not method configs or whose layer is beyond a model of ``n_layers`` layers."""
    for cfg in configs:
        if not isinstance(cfg, ReductionConfig):
            raise ValueError(f"config must be a pact_vlm config such as PACTConfig(...), got {type(cfg).__name__}")
        layer = getattr(cfg, "layer", None)
        if layer is not None and layer >= n_layers:
            raise ValueError(f"layer={layer} is beyond the model: it has {n_layers} decoder layers "
                             f"(0..{n_layers - 1}); choose a smaller layer")


def measure_speed(
    model,
    configs: ReductionConfig | Sequence[ReductionConfig],
    inputs: dict[str, Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 8,
    names: Sequence[str] | None = None,
    model_description: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> SpeedResult:
    """Measure ``model`` unreduced and with each config applied, alternating, in one run.

    Args:
        model: a supported VLM (see :func:`pact_vlm.apply`), already on its device, in eval mode.
        configs: one method config or several (e.g. a sweep of cutoffs); each becomes a variant.
        inputs: keyword arguments of ``model.generate`` (``input_ids`` required), on the model's device.
        repeats: timed rounds (>= 3: medians and quartiles need them); each round runs every variant once.
        warmup: untimed rounds first (>= 0).
        max_new_tokens: greedy tokens per run (>= 1; decode time per token needs >= 2).
        names: a name per config (default ``"reduced"``, or ``"reduced-<i>"`` for several).
        model_description: what the model is, for the report (default: its class name).
        progress: called with a short line after every run (e.g. ``print``).

    Returns:
        A :class:`SpeedResult`.
    """
    from ..integration.handle import apply

    configs = [configs] if isinstance(configs, ReductionConfig) else list(configs)
    if not configs:
        raise ValueError("configs is empty; give at least one method config to compare with the unreduced model")
    _check_int("repeats", repeats, 3, "the medians and interquartile ranges need at least 3 rounds")
    _check_int("warmup", warmup, 0, "untimed rounds before the measurement")
    _check_int("max_new_tokens", max_new_tokens, 1, "tokens generated per run")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise ValueError("inputs must be a dict of generate() arguments with an input_ids tensor "
                         "(pact_vlm finds the visual tokens through input_ids)")
    if names is None:
        names = ["reduced"] if len(configs) == 1 else [f"reduced-{i}" for i in range(len(configs))]
    names = list(names)
    if len(names) != len(configs) or len(set(names)) != len(names) or UNREDUCED in names:
        raise ValueError(f"names={names!r} must give one distinct name per config, not {UNREDUCED!r}")
    adapter, text_model, n_layers = _text_layers(model)
    check_configs(configs, n_layers)
    device = next(model.parameters()).device
    if inputs["input_ids"].device != device:
        raise ValueError(f"inputs are on {inputs['input_ids'].device} but the model is on {device}; "
                         "move them to the model's device")
    dims = TextDims.from_config(model.config)
    batch, prompt = inputs["input_ids"].shape
    mask = inputs.get("attention_mask")
    full_lengths = ([int(x) for x in mask.sum(dim=1).tolist()] if isinstance(mask, torch.Tensor)
                    else [prompt] * batch)

    timeline = _Timeline(device)
    probe = _MemoryProbe(device)
    hooks = [text_model.register_forward_pre_hook(timeline.lm_start, with_kwargs=True),
             text_model.register_forward_hook(timeline.lm_end, with_kwargs=True),
             _EncoderTimer(adapter.inner(model), timeline)]
    recorder = _logits_recorder(timeline)
    variants = [(UNREDUCED, None)] + list(zip(names, configs))
    samples = {name: {k: [] for k in METRICS} for name, _ in variants}
    reductions: dict[str, Any] = {}          # name -> ReductionStats of its last run
    kv_lengths: dict[str, list[int]] = {}     # name -> cache entries per layer after its last run
    encoded: dict[str, bool] = {}            # whether the image encoder runs (the same in every run)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                      return_dict_in_generate=True, logits_processor=[recorder])

    def run_once(name: str, cfg: ReductionConfig | None) -> dict[str, Any]:
        handle = apply(model, cfg) if cfg is not None else None
        try:
            timeline.reset()
            probe.start()
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, **gen_kwargs)
            _sync(device)
            t1 = time.perf_counter()
            peak, increase = probe.stop()
            kv_bytes, layer_lengths = _cache_layout(_cache_of(out))
            del out
            stats = handle.stats if handle is not None else None
        finally:
            if handle is not None:
                handle.remove()
        if len(timeline.logits) != max_new_tokens or not timeline.lm_calls:
            raise RuntimeError(f"generate() produced {len(timeline.logits)} logits steps, expected "
                               f"{max_new_tokens}; the timing hooks did not see every step")
        decode = ((timeline.logits[-1] - timeline.logits[0]) / (max_new_tokens - 1)
                  if max_new_tokens > 1 else None)
        vision = timeline.vision_seconds()
        ran = vision is not None
        if encoded.setdefault("ran", ran) != ran:
            raise RuntimeError(f"the image encoder ran in {'this' if ran else 'another'} run ({name}) but not in "
                               f"{'another' if ran else 'this one'}; every variant must see the same inputs")
        return dict(lm_prefill_s=timeline.prefill_seconds(),
                    ttft_s=timeline.logits[0] - t0, decode_per_token_s=decode, generate_s=t1 - t0,
                    peak_memory_bytes=peak, memory_increase_bytes=increase, kv_cache_bytes=kv_bytes,
                    reduction_s=stats.seconds if stats is not None else None, vision_s=vision,
                    _kv_lengths=layer_lengths, _stats=stats)

    try:
        order = list(range(len(variants)))
        for rnd in range(warmup + repeats):
            timed = rnd >= warmup
            shift = rnd % len(order)
            for i in order[shift:] + order[:shift]:      # rotate who goes first, round by round
                name, cfg = variants[i]
                rec = run_once(name, cfg)
                if timed:
                    for k in METRICS:
                        samples[name][k].append(rec[k])
                if cfg is not None:
                    reductions[name] = rec["_stats"]
                kv_lengths[name] = rec["_kv_lengths"]
                if progress is not None:
                    tag = "warm-up" if not timed else f"round {rnd - warmup + 1}/{repeats}"
                    extra = f", reduction {rec['reduction_s'] * 1e3:.0f} ms" if cfg is not None else ""
                    if rec["vision_s"] is not None:
                        extra += f", vision encoder {rec['vision_s'] * 1e3:.0f} ms"
                    progress(f"{tag} {name}: LM prefill {rec['lm_prefill_s']:.3f} s, ttft {rec['ttft_s']:.3f} s"
                             + extra)
    finally:
        for h in hooks:
            h.remove()

    meta = {
        "model": model_description or type(model).__name__,
        "text_dims": dims.to_dict(),
        "device": str(device),
        "machine": machine_description(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch": batch,
        "prompt_tokens": prompt,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "timed": "lm_prefill_s = the text model's prefill forward (all decoder layers, the reduction step "
                 "included; not the vision tower, not lm_head); ttft_s = generate() call to first logits",
    }
    if encoded.get("ran"):
        meta["timed"] += ("; vision_s = the image encoder (get_image_features: vision tower, projector, packing, and "
                          "a vision-side method's work such as VisionZip's attention and merge), before the prefill, "
                          "in neither lm_prefill_s nor the analytical limit (both of the text model alone), in ttft_s")
    if not probe.available:
        meta["memory_note"] = probe.note
    elif device.type == "cpu":
        meta["memory_note"] = ("CPU memory = peak resident set size of the process (VmHWM, reset before each "
                               "call), weights included; measured in-process it depends on what ran before "
                               "(freed memory the C allocator keeps), so small differences are noise")
    result = SpeedResult(meta=meta)
    base = samples[UNREDUCED]
    for name, cfg in variants:
        s = samples[name]
        entry: dict[str, Any] = {
            "name": name,
            "config": cfg.to_dict() if cfg is not None else None,
            "samples": s,
            "summary": {k: (quartiles(v) if v and v[0] is not None else None) for k, v in s.items()},
            "kv_lengths_per_layer": kv_lengths[name],
        }
        if cfg is not None:
            stats = reductions[name]
            limit, reduced_lengths, layer = _limit(dims, full_lengths, stats, cfg)
            entry["reduction"] = {
                "layer": layer, "reduction_layers": list(getattr(stats, "reduction_layers", []) or [layer]),
                "visual_before": stats.visual_before, "visual_after": stats.visual_after,
                "reduction_ratio": stats.reduction_ratio, "seq_lengths": list(stats.seq_lengths),
                "visual_per_layer": list(getattr(stats, "visual_per_layer", [])),
                "per_sample_visual": [[ps["visual_before"], ps["visual_after"]] for ps in stats.per_sample],
                "per_sample_lengths": reduced_lengths,
            }
            entry["limit"] = limit
            entry["ratios"] = _ratios(base, s, limit, stats, dims, batch, max_new_tokens,
                                      next(model.parameters()).element_size(), prompt)
        result.variants.append(entry)
    return result


def _limit(dims: TextDims, full_lengths: list[int], stats, cfg) -> tuple[dict[str, Any], list[int] | None, int]:
    """The analytical limit for what a run kept: (limit, per-sample lengths after reduction, first layer).

    One reduction layer: each sample on its own lengths (exact). Several (progressive methods):
    the batch's tokens per layer, from ``stats.visual_per_layer``, as one mean sample (exact for
    the linear terms, close for the attention term).
    """
    layers = list(getattr(stats, "reduction_layers", None) or [getattr(cfg, "layer", 0)])
    if len(layers) == 1:
        reduced = [full - (ps["visual_before"] - ps["visual_after"])
                   for full, ps in zip(full_lengths, stats.per_sample)]
        limit = work_fraction(dims, full_lengths, reduced, layers[0])
        limit["method"] = "per sample, one reduction layer"
        return limit, reduced, layers[0]
    b, total = len(full_lengths), sum(full_lengths)
    mean_full = round(total / b)
    lengths = [min(mean_full, round((total - (stats.visual_before - v)) / b)) for v in stats.visual_per_layer]
    limit = layer_work_fraction(dims, mean_full, lengths)
    limit["method"] = "mean sample, tokens per layer from stats.visual_per_layer"
    return limit, None, layers[0]


def _ratios(base, s, limit, stats, dims, batch, max_new_tokens, itemsize, prompt) -> dict[str, Any]:
    speed = {m: paired_ratio(base[m], s[m]) for m in ("lm_prefill_s", "ttft_s", "generate_s")}
    out: dict[str, Any] = {
        "lm_prefill_speedup": speed["lm_prefill_s"],
        "ttft_speedup": speed["ttft_s"],
        "generate_speedup": speed["generate_s"],
        "lm_prefill_speedup_of_medians": statistics.median(base["lm_prefill_s"]) / statistics.median(s["lm_prefill_s"]),
    }
    out["of_possible"] = speed["lm_prefill_s"]["median"] / limit["possible_speedup"]
    out["decode_ratio"] = (paired_ratio(s["decode_per_token_s"], base["decode_per_token_s"])
                           if max_new_tokens > 1 else None)
    out["reduction_s"] = statistics.median(s["reduction_s"])
    out["reduction_share"] = out["reduction_s"] / statistics.median(base["lm_prefill_s"])
    extra = max_new_tokens - 1           # tokens fed back after the prefill (the last one is not)
    kv_pred = kv_cache_bytes(dims, [n + extra for n in stats.seq_lengths], batch, itemsize)
    kv_full_pred = kv_cache_bytes(dims, [prompt + extra] * dims.layers, batch, itemsize)
    if base["vision_s"] and base["vision_s"][0] is not None:
        # the vision encoder runs before the prefill in every variant; what a method adds there
        # (VisionZip's attention and merge) is its extra time over the unreduced run of the same round
        out["vision_ratio"] = paired_ratio(s["vision_s"], base["vision_s"])
        out["vision_extra_s"] = quartiles([a - b for a, b in zip(s["vision_s"], base["vision_s"])])
        out["vision_extra_share"] = out["vision_extra_s"]["median"] / statistics.median(base["lm_prefill_s"])
    out["kv_ratio"] = statistics.median(s["kv_cache_bytes"]) / statistics.median(base["kv_cache_bytes"])
    out["kv_ratio_predicted"] = kv_pred / kv_full_pred
    out["kv_bytes_predicted"] = kv_pred
    if base["peak_memory_bytes"] and base["peak_memory_bytes"][0] is not None:
        out["peak_memory_ratio"] = statistics.median(s["peak_memory_bytes"]) / statistics.median(base["peak_memory_bytes"])
        inc_base = statistics.median(base["memory_increase_bytes"])
        out["memory_increase_ratio"] = (statistics.median(s["memory_increase_bytes"]) / inc_base
                                        if inc_base > 0 else None)
    return out
