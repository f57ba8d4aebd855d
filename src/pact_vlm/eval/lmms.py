"""The lmms-eval model wrapper: any supported HF VLM with a pact-vlm reduction applied.

Importing this module imports lmms-eval; lmms-eval imports it when a run names ``pact_vlm``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from tqdm.auto import tqdm

from ..config import CONFIG_REGISTRY, ReductionConfig, load_config
from ..integration.loading import build_inputs, load_vlm

__all__ = ["PactVLM", "ReductionTally"]

NO_REDUCTION = "none"


class ReductionTally:
    """Token-weighted reduction and timing over every prompt of a run."""

    def __init__(self) -> None:
        self.prompts = 0
        self.visual_before = 0
        self.visual_after = 0
        self.reduction_seconds = 0.0
        self.model_seconds = 0.0
        self.new_tokens = 0

    @property
    def reduction_ratio(self) -> float:
        """1 - (visual tokens after) / (visual tokens before), summed over prompts (0 if none)."""
        return 1.0 - self.visual_after / self.visual_before if self.visual_before else 0.0

    def add(self, stats, seconds: float, new_tokens: int, visual: int) -> None:
        self.prompts += 1
        self.visual_before += stats.visual_before if stats is not None else visual
        self.visual_after += stats.visual_after if stats is not None else visual
        self.reduction_seconds += stats.seconds if stats is not None else 0.0
        self.model_seconds += seconds
        self.new_tokens += new_tokens

    def as_dict(self) -> dict[str, Any]:
        return dict(prompts=self.prompts, visual_tokens_before=self.visual_before,
                    visual_tokens_after=self.visual_after, reduction_ratio=self.reduction_ratio,
                    reduction_seconds=self.reduction_seconds, model_seconds=self.model_seconds,
                    new_tokens=self.new_tokens)


def _config(config: str | None, method: str | None, options: dict[str, Any],
            pretrained: str | None = None) -> ReductionConfig | None:
    """The run's config. Without a config file, the one that travels with the model
    (:func:`pact_vlm.model_config`: its folder's pact_config.json, else its family's preset, else the
    library defaults) when it is of the method asked for (or none was), the fields on top; the origin
    is logged."""
    if config is not None:
        cfg = load_config(config)
        if method is not None and method != cfg.method:
            raise ValueError(f"method={method!r} contradicts the config file's method {cfg.method!r}")
        return ReductionConfig.from_dict({**cfg.to_dict(), **options}) if options else cfg
    if method != NO_REDUCTION:
        from loguru import logger

        from ..presets import model_config

        travelled, origin = model_config(pretrained)
        if method is None or method == travelled.method:
            logger.info(f"pact_vlm: {travelled.method} config from {origin}" + (", fields on top" if options else ""))
            return ReductionConfig.from_dict({**travelled.to_dict(), **options}) if options else travelled
    method = method or "pact"
    if method == NO_REDUCTION and NO_REDUCTION not in CONFIG_REGISTRY:
        if options:
            raise ValueError(f"method={NO_REDUCTION} takes no options, got {sorted(options)}")
        return None
    if method not in CONFIG_REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(CONFIG_REGISTRY) + [NO_REDUCTION])}")
    return ReductionConfig.from_dict({"method": method, **options})


def _images(visuals) -> list[Image.Image]:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(_images(v))
        elif isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        elif isinstance(v, str):
            with Image.open(v) as img:
                out.append(img.convert("RGB"))
        else:
            raise ValueError(f"visual of type {type(v).__name__} is not supported; the task's doc_to_visual "
                             "must return PIL images or image paths")
    return out


class PactVLM(lmms):
    """lmms-eval model ``pact_vlm``: a HF VLM loaded with ``from_pretrained``, reduced by pact-vlm.

    Model arguments (``--model_args key=value,...``):
        pretrained: hub id or local folder of a supported VLM.
        config: a method config JSON (``PACTConfig.save``); or
        method: a method name (default ``pact``; ``none`` = no reduction) and any of that method's
            config fields as further arguments (``layer=2,prune_ratio=0.3``), which also override
            the file's values. Without ``config``, the model's own config (its folder's
            ``pact_config.json``, else its family's preset, else the defaults; ``pact_vlm.model_config``)
            is the base when it is of that method; the log names its origin.
        device, dtype, attn_implementation: as in ``pact_vlm.integration.loading.load_vlm``.
        max_new_tokens: default generation length when the task sets none.
        batch_size: must be 1 (each prompt is reduced on its own).
    """

    is_simple = True

    def __init__(self, pretrained: str, config: str | None = None, method: str | None = None,
                 device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa",
                 max_new_tokens: int = 32, batch_size: int | str | None = 1, max_batch_size=None,
                 **options) -> None:
        super().__init__()
        if batch_size not in (None, 1, "1"):
            raise ValueError(f"batch_size={batch_size!r}: the pact_vlm model runs one prompt at a time; use 1")
        self.reduction_config = _config(config, method, options, pretrained)
        self.model, self.processor = load_vlm(pretrained, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation)
        self.device = next(self.model.parameters()).device
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_new_tokens = int(max_new_tokens)
        self.tally = ReductionTally()
        self.pretrained = pretrained
        self._handle = None
        if self.reduction_config is not None:
            from ..integration.handle import apply

            self._handle = apply(self.model, self.reduction_config)

    # -- helpers ------------------------------------------------------------------------------------
    def _doc_visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        return _images(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _visual_count(self, inputs) -> int:
        from ..integration.adapters import get_adapter

        ids = get_adapter(self.model).visual_token_ids(self.model.config)
        return int(sum(int((inputs["input_ids"] == t).sum()) for t in ids))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _report(self, tally: ReductionTally) -> None:
        """Log one request batch's numbers; lmms-eval prints them under the scores ("throughput")."""
        summary = tally.as_dict()
        log_metrics(total_elapsed_time=summary["model_seconds"], total_gen_tokens=summary["new_tokens"],
                    avg_speed=summary["new_tokens"] / summary["model_seconds"] if summary["model_seconds"] else 0.0,
                    additional_metrics={k: v for k, v in summary.items() if k not in ("model_seconds", "new_tokens")})

    def reduction_summary(self) -> dict[str, Any]:
        """Token-weighted reduction ratio and timing so far, with the method's config."""
        cfg = self.reduction_config
        return dict(self.tally.as_dict(), method=cfg.method if cfg else NO_REDUCTION,
                    config=cfg.to_dict() if cfg else None, model=self.pretrained)

    # -- lmms API -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if the task asks) answers, cut at the task's stop strings."""
        answers, tally = [], ReductionTally()
        for request in tqdm(requests, desc="pact_vlm generate", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = self._doc_visuals(doc_to_visual, doc_id, task, split)
            text = context.replace("<image>", "").strip()
            inputs = build_inputs(self.processor, text, images, device=self.device)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            kwargs = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                          do_sample=temperature > 0, pad_token_id=self.tokenizer.pad_token_id)
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))
            self._sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(**inputs, **kwargs)
            self._sync()
            seconds = time.perf_counter() - start
            new = out[0, inputs["input_ids"].shape[1]:]
            answer = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop and stop in answer:
                    answer = answer.split(stop)[0]
            stats = self._handle.stats if self._handle is not None else None
            for t in (tally, self.tally):
                t.add(stats, seconds, int(new.numel()), self._visual_count(inputs))
            answers.append(answer.strip())
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        self._report(tally)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after the prompt (and whether greedy decoding gives it)."""
        results, tally = [], ReductionTally()
        for request in tqdm(requests, desc="pact_vlm loglikelihood", disable=self.rank != 0):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._doc_visuals(doc_to_visual, doc_id, task, split)
            inputs = build_inputs(self.processor, context.replace("<image>", "").strip(), images, device=self.device)
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            full = dict(inputs)
            full["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
            full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
            if "mm_token_type_ids" in inputs:
                full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont)], dim=1)
            self._sync()
            start = time.perf_counter()
            with torch.no_grad():
                logits = self.model(**full, use_cache=False).logits[0, -cont.shape[1] - 1:-1].float()
            self._sync()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = cont[0]
            total = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            stats = self._handle.stats if self._handle is not None else None
            for t in (tally, self.tally):
                t.add(stats, time.perf_counter() - start, 0, self._visual_count(inputs))
            results.append((total, greedy))
        self._report(tally)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("pact_vlm does not run multi-round tasks; pick single-turn tasks")
