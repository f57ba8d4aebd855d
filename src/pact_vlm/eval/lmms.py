"""The lmms-eval model wrapper: any supported HF VLM with a pact-vlm reduction applied.

Importing this module imports lmms-eval; lmms-eval imports it when a run names ``pact_vlm``.

Conventions followed (those of lmms-eval 0.7.3's own Hugging Face wrappers):

* ``loglikelihood`` returns ``(loss, is_greedy)`` per request, ``loss`` being the mean negative
  log-likelihood of the continuation's tokens (what ``llava_hf`` / ``llava_onevision`` return);
  lmms-eval's multiple-choice scoring picks the choice with the *smallest* value (``np.argmin``).
* Requests are grouped by generation settings, sorted by prompt length (longest first) and run in
  left-padded batches of ``batch_size`` (``auto``: the largest batch up to ``max_batch_size`` that
  fits in memory, halved on out-of-memory).
* Under ``torchrun`` / ``accelerate launch`` each rank binds ``cuda:LOCAL_RANK``; lmms-eval splits
  the documents, the reduction summary is gathered over every rank.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from typing import Any, Callable

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from PIL import Image
from tqdm.auto import tqdm

from ..config import CONFIG_REGISTRY, ReductionConfig, load_config
from ..integration.loading import load_vlm

__all__ = ["ModelFailure", "PactVLM", "ReductionTally", "travelling_config"]

NO_REDUCTION = "none"
PROCESSOR_SETTINGS = ("max_pixels", "min_pixels")
"""Model arguments passed to the processor's ``from_pretrained`` (as lmms-eval's ``qwen2_vl`` does)."""
ERROR_POLICIES = ("exit", "raise")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpeg", ".mpg")
# generate() options lmms-eval tasks set, passed through as they are
_GENERATE_OPTIONS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams",
                     "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "do_sample")
# options read by the wrapper itself
_WRAPPER_OPTIONS = ("until", "stop_sequences", "skip_special_tokens", "seed", "num_return_sequences")
# preprocessing hints for the original LLaVA code: Hugging Face processors choose the image layout
# from the checkpoint's own processor config, so these have no meaning here (logged once, not used)
_ORIGINAL_LLAVA_HINTS = ("image_aspect_ratio",)
_PLACEHOLDER = re.compile(r"<image(?:[ _]?(\d+))?>")


class ModelFailure(SystemExit):
    """The model failed inside an lmms-eval run: the run stops with exit status 1.

    lmms-eval's command line catches every ``Exception`` of an evaluation, logs one ERROR line and
    exits 0; a ``SystemExit`` passes through it. The original error is ``__cause__``; its
    traceback is printed to stderr first. Model argument ``on_error=raise`` raises the original
    error instead (lmms-eval then logs it and goes on).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReductionTally:
    """Visual tokens and timing summed over the prompts of a run (padding requests excluded)."""

    FIELDS = ("prompts", "visual_before", "visual_after", "reduction_seconds", "model_seconds", "new_tokens")

    def __init__(self, **values) -> None:
        for name in self.FIELDS:
            setattr(self, name, values.get(name, 0))

    def add(self, *, prompts: int, visual_before: int, visual_after: int, reduction_seconds: float,
            model_seconds: float, new_tokens: int) -> None:
        self.prompts += prompts
        self.visual_before += visual_before
        self.visual_after += visual_after
        self.reduction_seconds += reduction_seconds
        self.model_seconds += model_seconds
        self.new_tokens += new_tokens

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def merged(cls, tallies) -> "ReductionTally":
        out = cls()
        for t in tallies:
            d = t.as_dict() if isinstance(t, ReductionTally) else t
            out.add(**d)
        return out

    @property
    def reduction_ratio(self) -> float:
        """1 - (visual tokens after) / (visual tokens before), both summed over prompts (0 if none)."""
        return 1.0 - self.visual_after / self.visual_before if self.visual_before else 0.0

    def summary(self, ranks: int) -> dict[str, Any]:
        """The fields of the reduction summary, each named for what it is."""
        n = self.prompts
        return {
            "pact_reduction_ratio_token_weighted": self.reduction_ratio,
            "pact_visual_tokens_before_total": self.visual_before,
            "pact_visual_tokens_after_total": self.visual_after,
            "pact_visual_tokens_before_mean_per_prompt": self.visual_before / n if n else 0.0,
            "pact_visual_tokens_after_mean_per_prompt": self.visual_after / n if n else 0.0,
            "pact_prompts_total": n,
            "pact_reduction_seconds_total": self.reduction_seconds,
            "pact_model_seconds_total": self.model_seconds,
            "pact_new_tokens_total": self.new_tokens,
            "pact_ranks": ranks,
        }


def travelling_config(source, method: str | None) -> tuple[ReductionConfig, str]:
    """``method`` (or, if None, whatever method) as the model itself configures it: the model
    folder's ``pact_config.json`` or preset (:func:`pact_vlm.model_config`) when its method is
    ``method``, else that method's defaults."""
    from ..presets import model_config

    cfg, origin = model_config(source)
    if method is None or cfg.method == method:
        return cfg, origin
    return ReductionConfig.from_dict({"method": method}), f"{method} defaults (the model's own config is {cfg.method})"


def _config(config: str | None, method: str | None, options: dict[str, Any],
            pretrained: str) -> tuple[ReductionConfig | None, str]:
    if config is not None:
        cfg = load_config(config)
        if method is not None and method != cfg.method:
            raise ValueError(f"method={method!r} contradicts the config file's method {cfg.method!r}")
        return (ReductionConfig.from_dict({**cfg.to_dict(), **options}) if options else cfg), f"config file {config}"
    if method == NO_REDUCTION and NO_REDUCTION not in CONFIG_REGISTRY:
        if options:
            raise ValueError(f"method={NO_REDUCTION} takes no options, got {sorted(options)}")
        return None, "no reduction"
    if method is not None and method not in CONFIG_REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(CONFIG_REGISTRY) + [NO_REDUCTION])}")
    cfg, origin = travelling_config(pretrained, method or "pact")    # the model's own, fields on top
    if not options:
        return cfg, origin
    return ReductionConfig.from_dict({**cfg.to_dict(), **options}), f"{origin}, model_args on top"


def _positive_int(name: str, value) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out < 1 or str(value).strip() not in (str(out), f"{out}.0"):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return out


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} must be true or false")


def _rank_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate launch set them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def rank_device(device: str | None, world_size: int, local_rank: int) -> str | None:
    """The device of this rank: ``cuda:LOCAL_RANK`` in a multi-process run on GPUs (as lmms-eval's
    Hugging Face wrappers bind it), else ``device``."""
    if world_size <= 1:
        return device
    if device is None or device == "cuda":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else (device or "cpu")
    if device.startswith("cuda:"):
        raise ValueError(f"device={device!r} with WORLD_SIZE={world_size} would put every rank on one GPU; "
                         "pass device=cuda (each rank takes cuda:LOCAL_RANK) or leave device unset")
    return device


def _is_video_path(value: str) -> bool:
    return value.lower().endswith(VIDEO_EXTENSIONS)


def split_visuals(visuals) -> list[tuple[str, Any]]:
    """lmms-eval visuals -> ``[("image", PIL.Image) | ("video", path or list of frames), ...]`` in order.

    A PIL image or an image path is an image; a path with a video extension (``.mp4`` ...) is a
    video the processor reads; a list of PIL images inside the visuals is the frames of one video;
    a multi-frame GIF path is a video of its frames.
    """
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    out: list[tuple[str, Any]] = []
    for v in items:
        if v is None:
            continue
        if isinstance(v, Image.Image):
            out.append(("image", v.convert("RGB")))
        elif isinstance(v, (list, tuple)):
            if v and all(isinstance(f, Image.Image) for f in v):
                out.append(("video", [f.convert("RGB") for f in v]))
            else:
                out.extend(split_visuals(v))
        elif isinstance(v, (str, os.PathLike)):
            path = os.fspath(v)
            if _is_video_path(path):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"video {path!r} does not exist")
                out.append(("video", path))
                continue
            with Image.open(path) as img:
                if getattr(img, "n_frames", 1) > 1:
                    from PIL import ImageSequence

                    out.append(("video", [f.convert("RGB") for f in ImageSequence.Iterator(img)]))
                else:
                    out.append(("image", img.convert("RGB")))
        elif isinstance(v, dict):
            raise ValueError("visual of type dict (audio or a message part) is not supported; the task's "
                             "doc_to_visual must return PIL images, image paths, video paths or frame lists")
        else:
            raise ValueError(f"visual of type {type(v).__name__} is not supported; the task's doc_to_visual "
                             "must return PIL images, image paths, video paths or frame lists")
    return out


def interleave(context: str, n_images: int) -> list[tuple[str, Any]]:
    """The user turn as ``[("image", index) | ("text", str), ...]``.

    ``<image>`` placeholders take the images in order; numbered ones (``<image 1>``, ``<image_2>``)
    take that image (1-based). Images no placeholder names go first, as lmms-eval's own wrappers
    put them. A placeholder with no image is an error.
    """
    parts: list[tuple[str, Any]] = []
    used: set[int] = set()
    position, next_image = 0, 0
    for match in _PLACEHOLDER.finditer(context):
        if match.start() > position:
            parts.append(("text", context[position:match.start()]))
        if match.group(1) is not None:
            index = int(match.group(1)) - 1
        else:
            index = next_image
            next_image += 1
        if not 0 <= index < n_images:
            raise ValueError(f"the prompt's placeholder {match.group(0)!r} names image {index + 1}, but the "
                             f"document has {n_images} image(s); check the task's doc_to_text / doc_to_visual")
        parts.append(("image", index))
        used.add(index)
        position = match.end()
    if position < len(context):
        parts.append(("text", context[position:]))
    lead = [("image", i) for i in range(n_images) if i not in used]
    parts = lead + parts
    # text next to a placeholder keeps its words, not the newline that separated the tag
    return [(kind, value.strip() if kind == "text" else value) for kind, value in parts
            if kind != "text" or value.strip()]


class PactVLM(lmms):
    """lmms-eval model ``pact_vlm``: a HF VLM loaded with ``from_pretrained``, reduced by pact-vlm.

    Model arguments (``--model_args key=value,...``):
        pretrained: hub id or local folder of a supported VLM.
        config: a method config JSON (``PACTConfig.save``); or
        method: a method name (``none`` = no reduction) and any of that method's config fields as
            further arguments (``layer=2,prune_ratio=0.3``), which also override the file's values.
            With no fields and no file, the model's own config is used: the folder's
            ``pact_config.json``, else its paper preset, else the method's defaults.
        device, dtype, attn_implementation: as in ``pact_vlm.integration.loading.load_vlm``;
            under torchrun / accelerate launch each rank takes ``cuda:LOCAL_RANK``.
        batch_size: prompts per forward (an int, or ``auto``: the largest that fits, up to
            max_batch_size, default 32).
        max_new_tokens: generation length when the task sets none.
        max_pixels, min_pixels: processor settings (Qwen2-VL family), as lmms-eval's ``qwen2_vl``.
        max_num_frames: frames sampled from a video file by the processor.
        system_prompt: a system message (text, or a file holding it).
        on_error: ``exit`` (default: a failure inside the model stops the run with exit status 1)
            or ``raise`` (the error goes to lmms-eval, which logs it and exits 0).
    """

    is_simple = True

    def __init__(self, pretrained: str, config: str | None = None, method: str | None = None,
                 device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa",
                 max_new_tokens: int = 32, batch_size: int | str | None = 1, max_batch_size=None,
                 system_prompt: str | None = None, max_num_frames: int | None = None,
                 on_error: str = "exit", **options) -> None:
        super().__init__()
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error={on_error!r} is not one of {', '.join(ERROR_POLICIES)}")
        self.on_error = on_error
        with self._failures("loading the model"):
            self._setup(pretrained, config, method, device, dtype, attn_implementation, max_new_tokens,
                        batch_size, max_batch_size, system_prompt, max_num_frames, options)

    def _setup(self, pretrained, config, method, device, dtype, attn_implementation, max_new_tokens,
               batch_size, max_batch_size, system_prompt, max_num_frames, options) -> None:
        processor_settings = {k: _positive_int(k, options.pop(k)) for k in PROCESSOR_SETTINGS if k in options}
        if batch_size in (None, ""):
            batch_size = 1
        self.auto_batch = str(batch_size).strip().lower() == "auto"
        self.batch_size = 0 if self.auto_batch else _positive_int("batch_size", batch_size)
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size) if max_batch_size not in (None, "") else 32
        self.batch_sizes: dict[str, int] = {}
        self.reduction_config, self.config_origin = _config(config, method, options, pretrained)
        self._rank, self._world_size, local_rank = _rank_env()
        device = rank_device(device, self._world_size, local_rank)
        self.model, self.processor = load_vlm(pretrained, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation)
        if processor_settings:
            self.processor = _processor_with(pretrained, self.processor, processor_settings)
        self.processor_settings = processor_settings
        self._device = next(self.model.parameters()).device
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.max_num_frames = _positive_int("max_num_frames", max_num_frames) if max_num_frames not in (None, "") else None
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        if self.system_prompt and not getattr(self.processor, "chat_template", None):
            raise ValueError(f"system_prompt needs a chat template; {pretrained!r}'s processor has none")
        self.tally = ReductionTally()
        self.pretrained = pretrained
        self._handle = None
        self._warned: set[str] = set()
        self._summary: dict[str, Any] | None = None
        if self.reduction_config is not None:
            from ..integration.handle import apply

            self._handle = apply(self.model, self.reduction_config)
        if self._rank == 0:
            eval_logger.info(f"pact_vlm: {self.reduction_config.method if self.reduction_config else NO_REDUCTION} "
                             f"from {self.config_origin}")

    @property
    def device(self) -> torch.device:
        return self._device

    # -- failures -----------------------------------------------------------------------------------
    def _failures(self, what: str):
        wrapper = self

        class _Guard:
            def __enter__(self):
                return self

            def __exit__(self, kind, err, tb):
                if err is None or not isinstance(err, Exception) or wrapper.on_error == "raise":
                    return False
                traceback.print_exception(kind, err, tb, file=sys.stderr)
                raise ModelFailure(f"pact_vlm failed while {what} on rank {wrapper._rank}: "
                                   f"{type(err).__name__}: {err} (the run stops; on_error=raise hands the "
                                   "error to lmms-eval instead)") from err

        return _Guard()

    # -- inputs -------------------------------------------------------------------------------------
    def _visual_token_ids(self) -> list[int]:
        from ..integration.adapters import get_adapter

        return list(get_adapter(self.model).visual_token_ids(self.model.config))

    def _messages(self, context: str, visuals: list[tuple[str, Any]]) -> tuple[str, list, list]:
        """(prompt text, images, videos) of one request, placeholders where the context puts them."""
        images = [v for kind, v in visuals if kind == "image"]
        videos = [v for kind, v in visuals if kind == "video"]
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(f"{type(self.processor).__name__} of {self.pretrained!r} takes no video; this task "
                             "gives videos (pick an image task or a model whose processor reads videos)")
        parts = [("video", i) for i in range(len(videos))] + interleave(context, len(images))
        ordered_images = [images[i] for kind, i in parts if kind == "image"]
        if getattr(self.processor, "chat_template", None):
            content = [{"type": kind} if kind != "text" else {"type": "text", "text": value} for kind, value in parts]
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            tags = {"image": getattr(self.processor, "image_token", "<image>"),
                    "video": getattr(self.processor, "video_token", "<video>")}
            text = "".join(tags[kind] if kind != "text" else f"\n{value}" for kind, value in parts).strip("\n")
        return text, ordered_images, videos

    def _batch_inputs(self, prompts: list[tuple[str, list, list]]) -> dict[str, torch.Tensor]:
        texts = [p[0] for p in prompts]
        images = [img for p in prompts for img in p[1]]
        videos = [vid for p in prompts for vid in p[2]]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            if self.max_num_frames is not None:
                kwargs["videos_kwargs"] = {"num_frames": self.max_num_frames, "do_sample_frames": True}
        return self.processor(**kwargs).to(self.device)

    def _request_visuals(self, doc_to_visual, doc_id, task, split) -> list[tuple[str, Any]]:
        return split_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

    # -- running ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable[[], Any], inputs, padding: list[bool], new_tokens: Callable[[Any], int]):
        """Run ``fn`` once; add the batch's visual tokens and times to the tally (padding excluded)."""
        if self._handle is not None:
            from ..integration.stats import ReductionStats

            self._handle.stats = ReductionStats()
        self._sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        self._sync()
        seconds = time.perf_counter() - start
        ids = inputs["input_ids"]
        visual = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        for t in self._visual_token_ids():
            visual += (ids == t).sum(dim=1)
        visual = visual.tolist()
        stats = self._handle.stats if self._handle is not None else None
        per_sample = stats.per_sample if stats is not None and stats.per_sample else None
        real = [i for i, pad in enumerate(padding) if not pad]
        if per_sample is not None and len(per_sample) == len(padding):
            before = sum(int(per_sample[i]["visual_before"]) for i in real)
            after = sum(int(per_sample[i]["visual_after"]) for i in real)
        else:   # nothing reduced (no reduction, or no visual tokens)
            before = after = sum(visual[i] for i in real)
        share = len(real) / len(padding) if padding else 0.0
        new = new_tokens(out)
        self.tally.add(prompts=len(real), visual_before=before, visual_after=after,
                       reduction_seconds=(stats.seconds if stats is not None else 0.0) * share,
                       model_seconds=seconds * share, new_tokens=sum(new[i] for i in real) if isinstance(new, list) else 0)
        return out

    def _batches(self, items: list, kind: str, run: Callable[[list], list]) -> list:
        """Run ``items`` (already grouped and sorted) in batches of ``batch_size``; ``auto``: the largest
        batch up to ``max_batch_size`` that fits, halved on out-of-memory and kept for what follows."""
        results: list = []
        size = self.batch_size if not self.auto_batch else self.batch_sizes.get(kind, self.max_batch_size)
        start = 0
        while start < len(items):
            chunk = items[start:start + size]
            try:
                results.extend(run(chunk))
            except torch.OutOfMemoryError:
                if not self.auto_batch or size == 1:
                    raise
                size = max(1, size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                eval_logger.warning(f"pact_vlm: out of memory at batch size {len(chunk)}; trying {size}")
                continue
            start += len(chunk)
        if self.auto_batch:
            self.batch_sizes[kind] = size      # lmms-eval reports these as config["batch_sizes"]
        return results

    def _ordered(self, requests: list[Instance], group: Callable[[Instance], str],
                 length: Callable[[Instance], int]) -> list[list[int]]:
        """Request indices grouped by ``group`` (first-seen order), each group longest first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(group(req), []).append(i)
        return [sorted(idx, key=lambda i: (-length(requests[i]), i)) for idx in groups.values()]

    def _context_length(self, context: str) -> int:
        return len(self.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0

    # -- generation options -------------------------------------------------------------------------
    def _generate_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str], bool, int | None]:
        gen = dict(gen_kwargs or {})
        unknown = sorted(set(gen) - set(_GENERATE_OPTIONS) - set(_WRAPPER_OPTIONS) - set(_ORIGINAL_LLAVA_HINTS))
        if unknown:
            raise ValueError(f"generation option(s) {unknown} are not supported by pact_vlm; supported: "
                             f"{', '.join(_GENERATE_OPTIONS + _WRAPPER_OPTIONS)}")
        for hint in _ORIGINAL_LLAVA_HINTS:
            if hint in gen and hint not in self._warned:
                self._warned.add(hint)
                eval_logger.warning(f"pact_vlm: generation option {hint}={gen[hint]!r} is for the original LLaVA "
                                    "code; the Hugging Face processor's own image layout is used")
        if int(gen.get("num_return_sequences", 1) or 1) != 1:
            raise ValueError(f"num_return_sequences={gen['num_return_sequences']!r}: pact_vlm returns one answer "
                             "per request (lmms-eval scores one); use repeats in the task instead")
        until = gen.get("until", None) or gen.get("stop_sequences", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.get("temperature", 0) or 0)
        do_sample = _bool("do_sample", gen["do_sample"]) if "do_sample" in gen else temperature > 0
        if temperature <= 0:
            do_sample = False       # lmms-eval's convention: temperature 0 means greedy
        kwargs: dict[str, Any] = dict(max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)),
                                      do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
            if gen.get("top_k") is not None:
                kwargs["top_k"] = int(gen["top_k"])
        for name, cast in (("num_beams", int), ("repetition_penalty", float), ("length_penalty", float),
                           ("no_repeat_ngram_size", int), ("min_new_tokens", int)):
            if gen.get(name) is not None:
                kwargs[name] = cast(gen[name])
        skip_special = _bool("skip_special_tokens", gen.get("skip_special_tokens", True))
        seed = int(gen["seed"]) if gen.get("seed") is not None else None
        return kwargs, until, skip_special, seed

    def _generate(self, prompts: list[tuple[str, list, list]], gen_kwargs: dict[str, Any],
                  padding: list[bool]) -> list[str]:
        kwargs, until, skip_special, seed = self._generate_kwargs(gen_kwargs)
        inputs = self._batch_inputs(prompts)
        if seed is not None:
            torch.manual_seed(seed)
        length = inputs["input_ids"].shape[1]
        eos = self.tokenizer.eos_token_id

        def new_tokens(out) -> list[int]:
            counts = []
            for row in out[:, length:]:
                stop = (row == eos).nonzero() if eos is not None else []
                counts.append(int(stop[0]) + 1 if len(stop) else int(row.numel()))
            return counts

        out = self._timed(lambda: self.model.generate(**inputs, **kwargs), inputs, padding, new_tokens)
        answers = []
        for row in out[:, length:]:
            answer = self.tokenizer.decode(row, skip_special_tokens=skip_special)
            for stop in until:
                if stop and stop in answer:
                    answer = answer.split(stop)[0]
            answers.append(answer.strip())
        return answers

    # -- lmms API -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers (greedy unless the task samples), cut at the task's stop strings."""
        with self._failures("generating"):
            return self._generate_until(requests)

    def _generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        order = self._ordered(requests, lambda r: _gen_key(r.args[1]), lambda r: self._context_length(r.args[0]))
        bar = tqdm(total=len(requests), desc="pact_vlm generate", disable=self.rank != 0)

        def run(idx: list[int]) -> list[str]:
            prompts = []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                prompts.append(self._messages(context, self._request_visuals(doc_to_visual, doc_id, task, split)))
            out = self._generate(prompts, requests[idx[0]].args[1], [_is_padding(requests[i]) for i in idx])
            for i, answer in zip(idx, out):
                answers[i] = answer
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), answer)
            bar.update(len(idx))
            return out

        for group in order:
            self._batches(group, "generate_until", run)
        bar.close()
        self._log_call(len(requests))
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list:
        """``(loss, is_greedy)`` per request: ``loss`` = mean negative log-likelihood of the
        continuation's tokens after the prompt (lower is likelier), as lmms-eval's own wrappers return."""
        with self._failures("scoring continuations"):
            pairs = self._loglikelihood(requests)
        return [_scored(pair) for pair in pairs]

    def _continuation(self, req: Instance) -> str:
        context, doc_to_target, doc_to_visual, doc_id, task, split = _ll_args(req)
        if isinstance(doc_to_target, str):
            return doc_to_target
        return doc_to_target(self.task_dict[task][split][doc_id])

    def _loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        continuations = [self._continuation(r) for r in requests]
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        for c, ids in zip(continuations, cont_ids):
            if not ids:
                raise ValueError(f"continuation {c!r} has no tokens; the task's choices must be non-empty")
        order = self._ordered(requests, lambda r: "", lambda r: self._context_length(r.args[0]))
        bar = tqdm(total=len(requests), desc="pact_vlm loglikelihood", disable=self.rank != 0)

        def run(idx: list[int]) -> list[tuple[float, bool]]:
            prompts = []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = _ll_args(requests[i])
                visuals = self._request_visuals(doc_to_visual, doc_id, task, split) if doc_to_visual else []
                prompts.append(self._messages(context, visuals))
            inputs = self._batch_inputs(prompts)
            full, longest = _append_right(inputs, [cont_ids[i] for i in idx], self.tokenizer.pad_token_id or 0)
            logits = self._timed(lambda: self.model(**full, use_cache=False, logits_to_keep=longest + 1).logits,
                                 full, [_is_padding(requests[i]) for i in idx], lambda out: 0)
            out = []
            for row, i in enumerate(idx):
                target = torch.tensor(cont_ids[i], device=logits.device)
                n = target.numel()
                logprobs = torch.log_softmax(logits[row, -n - 1:-1].float(), dim=-1)
                loss = float(-logprobs.gather(1, target[:, None]).mean())
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[i] = (loss, greedy)
                out.append((loss, greedy))
            bar.update(len(idx))
            return out

        for group in order:
            self._batches(group, "loglikelihood", run)
        bar.close()
        self._log_call(len(requests))
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round tasks: round 0 answers the context; each later round asks the task's
        ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` for its
        visuals and context until it signals the end. One list of answers (one per round) per request."""
        with self._failures("generating (multi-round)"):
            return self._multi_round(requests)

    def _multi_round(self, requests: list[Instance]) -> list[list[str]]:
        out = []
        for req in tqdm(requests, desc="pact_vlm multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals, rounds, info = doc_to_visual(doc), [], None
            padding = [_is_padding(req)]
            for round_idx in range(1000):
                if round_idx > 0:
                    visuals, context, terminal, _, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info)
                    if terminal:
                        break
                prompt = self._messages(context, split_visuals(visuals or []))
                rounds.append(self._generate([prompt], gen_kwargs, padding)[0])
            else:
                raise ValueError(f"multi-round doc {doc_id} of {task!r} did not end after 1000 rounds")
            out.append(rounds)
            self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), rounds)
        self._log_call(len(requests))
        return out

    # -- summary ------------------------------------------------------------------------------------
    def _log_call(self, n: int) -> None:
        d = self.tally.as_dict()
        eval_logger.info(f"pact_vlm rank {self.rank}: {n} requests; so far {d['prompts']} prompts, visual tokens "
                         f"{d['visual_before']} -> {d['visual_after']}")

    def reduction_summary(self) -> dict[str, Any]:
        """The reduction over every prompt of every rank so far (a collective call when several
        ranks run: every rank must call it), with the method's config."""
        tallies = [self.tally.as_dict()]
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tallies = [None] * self.world_size
            torch.distributed.all_gather_object(tallies, self.tally.as_dict())
        total = ReductionTally.merged(tallies)
        cfg = self.reduction_config
        return dict(total.summary(len(tallies)), method=cfg.method if cfg else NO_REDUCTION,
                    config=cfg.to_dict() if cfg else None, config_origin=self.config_origin, model=self.pretrained)

    def clean(self) -> None:
        """lmms-eval calls this on every rank once all requests ran: gather the reduction summary
        and log it once (rank 0), where lmms-eval's ``throughput`` block picks it up."""
        self._summary = self.reduction_summary()
        if self.rank == 0:
            s = self._summary
            numbers = {k: v for k, v in s.items() if k.startswith("pact_")}
            seconds, tokens = s["pact_model_seconds_total"], s["pact_new_tokens_total"]
            log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens,
                        avg_speed=tokens / seconds if seconds else 0.0, additional_metrics=numbers)
            eval_logger.info("pact_vlm reduction summary: " + json.dumps(s, default=str))
        self._handle = None     # it holds the model, which lmms-eval frees here
        super().clean()

    @property
    def summary(self) -> dict[str, Any] | None:
        """The summary gathered at the end of the last lmms-eval run (None before one ends)."""
        return self._summary


def _processor_with(pretrained: str, processor, settings: dict[str, int]):
    """``processor`` re-read from ``pretrained`` with ``settings`` (``max_pixels`` ...) as its image
    processor's ``size`` (``longest_edge`` / ``shortest_edge``: pixel counts in the Qwen2-VL
    family), checked to apply."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    edges = {k: _edge(size, k) for k in ("shortest_edge", "longest_edge")}
    if None in edges.values():
        raise ValueError(f"{type(image_processor).__name__} of {pretrained!r} takes no "
                         f"{', '.join(sorted(settings))} (its size is not in pixels); drop them from model_args")
    edges.update({_size_key(k): v for k, v in settings.items()})
    new = type(processor).from_pretrained(pretrained, size=edges)
    for key, value in settings.items():
        got = _edge(getattr(new.image_processor, "size", None), _size_key(key))
        if got != value:
            raise ValueError(f"{type(new).__name__} of {pretrained!r} did not take {key}={value} (it reads {got})")
    return new


def _edge(size, key: str):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _size_key(setting: str) -> str:
    return {"max_pixels": "longest_edge", "min_pixels": "shortest_edge"}[setting]


def _ll_args(req: Instance) -> tuple:
    """A loglikelihood request's arguments; the unconditional requests of ``acc_mutual_info`` carry
    only ``(context, continuation)``: no visuals, no document."""
    args = tuple(req.args)
    return args if len(args) == 6 else (*args[:2], None, None, None, None)


def _gen_key(gen_kwargs) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def _is_padding(req: Instance) -> bool:
    """lmms-eval pads the ranks' request lists to equal length with copies marked ``__padding_only__``."""
    return bool((req.metadata or {}).get("__padding_only__", False)) if isinstance(req.metadata, dict) else False


def _append_right(inputs, continuations: list[list[int]], pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """Each prompt of a left-padded batch followed by its continuation's tokens, re-padded on the left.

    Every per-token tensor of the processor (same shape as ``input_ids``: masks, token types) is
    laid out the same way (continuation tokens: mask 1, type 0); other inputs (pixels, grids) stay.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    per_token = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == ids.shape and k != "input_ids"]
    rows = []
    for b, cont in enumerate(continuations):
        real = mask[b].bool()
        cont_t = torch.tensor(cont, dtype=ids.dtype, device=ids.device)
        row = {"input_ids": torch.cat([ids[b][real], cont_t])}
        for k in per_token:
            fill = torch.ones_like(cont_t) if k == "attention_mask" else torch.zeros_like(cont_t)
            row[k] = torch.cat([inputs[k][b][real], fill.to(inputs[k].dtype)])
        rows.append(row)
    width = max(r["input_ids"].numel() for r in rows)
    full = dict(inputs)
    for k in ["input_ids", *per_token]:
        pad = pad_id if k == "input_ids" else 0
        full[k] = torch.stack([torch.cat([r[k].new_full((width - r[k].numel(),), pad), r[k]]) for r in rows])
    return full, max(len(c) for c in continuations)


def _tuples_survive() -> bool:
    """Whether the installed lmms-eval keeps a ``(float, bool)`` model output as it is (0.7.3 turns
    it into its ``str()``, which its multiple-choice scoring then cannot unpack)."""
    try:
        return unwrap_generation_output((0.5, True))[0] == (0.5, True)
    except Exception:  # noqa: BLE001 - an lmms-eval that rejects tuples outright: wrap them
        return False


_TUPLES_SURVIVE = _tuples_survive()


def _scored(pair: tuple[float, bool]):
    """A ``(loss, is_greedy)`` pair in the form the installed lmms-eval hands to its scoring intact:
    the plain tuple, or wrapped in its ``GenerationResult`` (whose ``text`` the evaluator unwraps)."""
    return pair if _TUPLES_SURVIVE else GenerationResult(text=pair)
