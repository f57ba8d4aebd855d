"""``apply()`` and :class:`ReductionHandle`: the reduction at layer L (or at several layers) through hooks.

No forward function is replaced. ``apply`` registers forward hooks

* on the model itself: a loss over the text targets that survive the reduction when ``labels``
  are given, and the logits at the input's positions for a right-padded batch;
* on the inner VLM model (the one that receives ``input_ids``): starts a
  :class:`~.session.Session` for the call (in the calling thread only), finds the visual
  placeholder positions, reads the 2-D padding mask and the cache;
* on the text model: finds ``image_newline`` embeddings among the placeholders (never reduced);
* on every decoder layer from the first reduction layer on: reduces at each reduction layer and
  gives every layer the reduced rows, their rotary tables and position ids;
* for methods that read the vision tower (PruMerge, HiRED): see :mod:`.vision`;

and routes the attention of those layers through :func:`.attention.route` (their attention
modules' ``config`` is a :class:`~.attention.RoutedConfig` while applied), which computes
attention over the reduced sequence with the backend the model is set to at each call.
``remove()`` undoes all of it exactly.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any

import torch

from ..config import ReductionConfig
from ..methods import KeepPriorityConfig
from ..methods.base import NEEDS, REDUCERS
from ..presets import model_config
from .adapters import Adapter, get_adapter
from .attention import RoutedConfig, SUPPORTED_BACKENDS, attend, check_backend, model_backend, register_route
from .session import CacheRecord, Session
from .stats import ReductionStats

__all__ = ["apply", "ReductionHandle"]

_ATTR = "_pact_vlm_handle"
_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds", "mm_encoder_outputs")


class ReductionHandle:
    """Returned by :func:`apply`: statistics of the last reducing call, and the exact undo.

    Use as a context manager to remove the reduction on exit.

    Attributes:
        config: the config in use, a frozen copy of the one given (edits raise; the caller's
            object can change without effect on this reduction).
        config_origin: where the config came from (``"given"``, a model folder's file, a preset).
        stats: :class:`ReductionStats` of the last call that reduced visual tokens (usually the
            prefill) in this thread, or in any thread before this one made a call.
    """

    def __init__(self, model, config: ReductionConfig, adapter: Adapter, stage_layers: list[int], n_layers: int):
        self.model = model
        self.config = config
        self.config_origin = "given"
        self.adapter = adapter
        self._stage_layers = stage_layers
        self._n_layers = n_layers
        self._reducer = REDUCERS[type(config)]
        self._needs = NEEDS.get(type(config), frozenset())
        self._hooks: list = []
        self._routed: list[tuple[torch.nn.Module, Any]] = []
        self._removed = False
        self._priority: list[torch.Tensor] | None = None
        self._vision = None
        self._local = threading.local()
        self._records: "weakref.WeakKeyDictionary[Any, CacheRecord]" = weakref.WeakKeyDictionary()
        self._records_lock = threading.Lock()
        self._last_stats = ReductionStats()

    # -- public --------------------------------------------------------------------------------
    @property
    def stats(self) -> ReductionStats:
        return getattr(self._local, "stats", None) or self._last_stats

    @stats.setter
    def stats(self, value: ReductionStats) -> None:
        self._local.stats = value
        self._last_stats = value

    def set_priority(self, priority) -> None:
        """The per-token priority :class:`~pact_vlm.KeepPriorityConfig` ranks by, for the next calls.

        Args:
            priority: per sample of the batch, one value per reducible visual token in sequence
                order (``image_newline`` placeholders excluded): a list of 1-D tensors, or a 2-D
                tensor ``[B, N]`` when every sample has ``N`` visual tokens. Higher is kept first.
        """
        if not isinstance(self.config, KeepPriorityConfig):
            raise ValueError(f"set_priority() is for KeepPriorityConfig; this handle applies {self.config.method!r}")
        if isinstance(priority, torch.Tensor):
            if priority.dim() != 2:
                raise ValueError(f"priority tensor must be [batch, visual tokens], got shape {tuple(priority.shape)}; "
                                 "pass a list of 1-D tensors when samples differ in length")
            priority = list(priority)
        if not isinstance(priority, (list, tuple)) or not all(
                isinstance(p, torch.Tensor) and p.dim() == 1 for p in priority):
            raise ValueError("priority must be a [batch, N] tensor or a list of 1-D tensors (one per sample)")
        self._priority = [p.detach().float() for p in priority]

    def remove(self) -> None:
        """Remove every hook and routing; the model is exactly as before :func:`apply`."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for attn, original in self._routed:
            attn.config = original
        self._routed.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self._removed = True

    def __enter__(self) -> "ReductionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"ReductionHandle({self.adapter.name}, {self.config!r}, {state})"

    # -- used by the session ---------------------------------------------------------------------
    def _reduces_at(self, layer: int) -> bool:
        first = self.config.layer
        return layer == first or (self.config.progressive and layer > first)

    def _priority_extras(self, visual: torch.Tensor) -> torch.Tensor:
        prio = self._priority
        b = visual.shape[0]
        if prio is None:
            raise ValueError("KeepPriorityConfig needs a priority per visual token: call "
                             "handle.set_priority(...) before running the model")
        if len(prio) != b:
            raise ValueError(f"the priority covers {len(prio)} sample(s) but the batch has {b}; "
                             "call handle.set_priority(...) with one entry per sample")
        out = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for i in range(b):
            n = int(visual[i].sum())
            if prio[i].numel() != n:
                raise ValueError(f"sample {i} has {n} reducible visual tokens but its priority has "
                                 f"{prio[i].numel()} values; give one value per visual token in sequence order "
                                 "(image_newline placeholders excluded)")
            out[i][visual[i]] = prio[i].to(visual.device)
        return out

    def _session(self) -> Session | None:
        return getattr(self._local, "session", None)

    def _record_of(self, cache, past: int) -> CacheRecord:
        with self._records_lock:
            if past == 0 or cache not in self._records:
                self._records[cache] = CacheRecord([None] * len(self._stage_layers))
            return self._records[cache]

    def _knows(self, cache) -> bool:
        with self._records_lock:
            return cache in self._records

    # -- hooks ---------------------------------------------------------------------------------
    def _on_top(self, module, args, kwargs):
        self._local.labels = None
        labels = kwargs.get("labels")
        if labels is None or not _has_visual_inputs(kwargs):
            return None
        kwargs = dict(kwargs)
        self._local.labels = (kwargs.pop("labels"), kwargs.get("num_items_in_batch"))
        return args, kwargs

    def _after_top(self, module, args, kwargs, output):
        labels, self._local.labels = getattr(self._local, "labels", None), None
        session, self._local.finished = getattr(self._local, "finished", None), None
        rows = session.output_rows() if session is not None else None
        if rows is None:
            if labels is not None:      # nothing was reduced after all: the model's own loss
                output.loss = _loss(module, output.logits, labels[0], labels[1], None, None)
            return output
        if labels is not None:
            output.loss = _loss(module, output.logits, labels[0], labels[1], rows, session.visual.shape[1])
        if session.pad2d is not None and _right_padded(session.pad2d[:, session.past:]):
            output.logits = _at_input_positions(output.logits, rows, session.visual.shape[1])
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep < output.logits.shape[1]:
            # a model that slices by comparing its rows with the input's length (Gemma 4) keeps them all
            output.logits = output.logits[:, -keep:]
        return output

    def _on_inner(self, module, args, kwargs):
        self._check_routing()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        _check_cache(cache, self._stage_layers[0])
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None and _has_visual_inputs(kwargs):
                raise ValueError("pact_vlm needs input_ids to find the visual tokens; pass input_ids "
                                 "instead of inputs_embeds")
            visual = None
        elif not _has_visual_inputs(kwargs):
            # placeholders carry image features only in a call that has pixels (a generated token
            # that happens to equal the image id in a decode step is text)
            visual = None
        else:
            visual = self.adapter.placeholders(self.model.config, input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        if past and not self._knows(cache):
            raise ValueError(f"this cache already holds {past} tokens that were computed without this reduction "
                             "applied (before apply(), or under another handle); continue it without the reduction, "
                             "or start generation from an empty cache after apply() (the cache was filled without "
                             "the reduction)")
        record = self._record_of(cache, past) if cache is not None else None
        mask2d = kwargs.get("attention_mask")
        self._local.session = Session(
            self, input_ids=input_ids, visual=visual,
            pad2d=mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None,
            past=past, record=record, inputs={k: v for k, v in kwargs.items()
                                              if isinstance(v, torch.Tensor) or k == "mm_encoder_outputs"},
            backend=self._backend())
        return None

    def _after_inner(self, module, args, output):
        self._local.finished, self._local.session = self._session(), None
        return None

    def _on_text(self, module, args, kwargs):
        session = self._session()
        if session is None:
            return None
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3:
            session.inputs["rope_position_ids"] = position_ids[-3:]     # M-RoPE (t, h, w)
        embeds = kwargs.get("inputs_embeds")
        if session.visual is not None and embeds is not None and bool(session.visual.any()):
            # newline embeddings share the image id: never reduced, but they stay inside their
            # image's run of placeholders, so the image groups (computed on the placeholders) are unchanged
            session.drop_from_visual(self.adapter.fixed_placeholders(self.model, embeds, session.visual))
        keep = kwargs.get("logits_to_keep")
        if (isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 and session.visual is not None
                and bool(session.visual[:, -keep:].any())):
            # a text model that slices its rows to the last `keep` before some layers (Gemma 4's
            # KV-shared ones) slices its per-position inputs to the last `keep` positions: after a
            # reduction these differ when a reducible token is among them, so it keeps every row
            return args, {**kwargs, "logits_to_keep": 0}
        return None

    def _on_layer(self, index: int, stage: int | None, kind: str, names: list[str]):
        def hook(module, args, kwargs):
            session = self._session()
            if session is None:
                return None
            if len(args) > 1:       # inputs after the hidden states passed by position (Gemma 4's per-layer input)
                kwargs = {**dict(zip(names[1:], args[1:])), **kwargs}
                args = args[:1]
            if stage is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                session.enter_stage(stage, index, module, hidden, kwargs)
            return session.layer_kwargs(index, kind, args, kwargs)
        return hook

    def _attention(self, module, layer: int, real_config, query, key, value, attention_mask, **kwargs):
        """The attention of a routed layer (see :mod:`.attention`)."""
        session = self._session()
        window = kwargs.get("sliding_window")
        bidirectional = self.adapter.layer_kind(self.model, layer) in self.adapter.bidirectional_kinds
        found = session.layout(layer, key.shape[2], window, bidirectional) if session is not None else None
        if found is None:       # not reduced in this call: exactly the model's own attention
            return model_backend(module, real_config)(module, query, key, value, attention_mask, **kwargs)
        layout, plain = found
        return attend(real_config._attn_implementation, query, key, value, layout,
                      scaling=kwargs.get("scaling") if kwargs.get("scaling") is not None else module.scaling,
                      dropout=kwargs.get("dropout", 0.0) or 0.0, softcap=kwargs.get("softcap"),
                      training=module.training, plain=plain)

    def _backend(self) -> str:
        text_config = self.model.config.get_text_config()
        impl = getattr(text_config, "_attn_implementation", None)
        check_backend(impl)
        return impl

    def _check_routing(self) -> None:
        if self._removed:
            raise RuntimeError("this reduction was removed; its hooks should not run")
        for attn, _ in self._routed:
            if not isinstance(attn.config, RoutedConfig):
                raise ValueError(f"the attention module {type(attn).__name__} lost the reduction's routing (its "
                                 "config was replaced after apply()); call handle.remove() and apply() again")


# -- apply ------------------------------------------------------------------------------------------

def _stage_layers(config: ReductionConfig, n_layers: int) -> list[int]:
    """The layers where the sequence changes: the reduction layers, plus layer 1 after a reduction
    at layer 0 (see :meth:`Session.enter_stage`)."""
    layer = config.layer
    stages = list(range(layer, n_layers)) if config.progressive else [layer]
    if stages[0] == 0 and n_layers > 1 and (len(stages) == 1 or stages[1] != 1):
        stages.insert(1, 1)
    return stages


def apply(model, config: ReductionConfig | None = None) -> ReductionHandle:
    """Patch ``model`` in place with hooks; see :func:`pact_vlm.apply` (``config=None``: the config that
    travels with the model, :func:`pact_vlm.presets.model_config`)."""
    origin = "given"
    if config is None:
        config, origin = model_config(model)
    handle = _apply(model, config)
    handle.config_origin = origin
    return handle


def _apply(model, config: ReductionConfig) -> ReductionHandle:
    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a pact_vlm config such as PACTConfig(...), got {type(config).__name__}")
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        raise ValueError(f"a reduction is already applied to this model ({existing.config!r}); "
                         "call handle.remove() before applying another")
    if type(config) not in REDUCERS:
        raise ValueError(f"method {config.method!r} cannot be applied through hooks at a layer; "
                         f"layer methods: {', '.join(sorted(c.method for c in REDUCERS))}")
    config = config.frozen()        # validated again; edits of the caller's object have no effect
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    layer = config.layer
    n_layers = len(layers)
    if layer >= n_layers:
        raise ValueError(f"layer={layer} but the model has {n_layers} decoder layers (0..{n_layers - 1}); "
                         "choose a smaller layer")
    if config.budget_layer >= n_layers:
        raise ValueError(f"equivalent_layer={config.budget_layer} but the model has {n_layers} decoder layers; "
                         "choose a smaller equivalent_layer")
    min_layer = adapter.min_layer(model.config)
    if layer < min_layer:
        raise ValueError(f"layer={layer} is too early for {adapter.name}: layers 0..{min_layer - 1} "
                         f"{adapter.min_layer_reason}; use layer >= {min_layer}")
    text_config = model.config.get_text_config()
    impl = getattr(text_config, "_attn_implementation", None)
    if impl not in SUPPORTED_BACKENDS:
        raise ValueError(f"attention implementation {impl!r} is not supported with proportional attention "
                         f"and reduced masks; load the model with attn_implementation= one of "
                         f"{', '.join(SUPPORTED_BACKENDS)}")
    check_backend(impl)
    adapter.check_layers(model, layer, progressive=config.progressive)

    stage_layers = _stage_layers(config, n_layers)
    handle = ReductionHandle(model, config, adapter, stage_layers, n_layers)
    if "vision" in handle._needs:
        from .vision import VisionTap

        handle._vision = VisionTap(model, config)         # refuses unsupported towers
    if "grid" in handle._needs:
        from .vision import check_grid_support

        check_grid_support(model)
    register_route()
    stage_of = {start: s for s, start in enumerate(stage_layers)}
    hooks = handle._hooks
    hooks.append(model.register_forward_pre_hook(handle._on_top, with_kwargs=True))
    hooks.append(model.register_forward_hook(handle._after_top, with_kwargs=True))
    inner = adapter.inner(model)
    hooks.append(inner.register_forward_pre_hook(handle._on_inner, with_kwargs=True))
    hooks.append(inner.register_forward_hook(handle._after_inner))
    hooks.append(adapter.text_model(model).register_forward_pre_hook(handle._on_text, with_kwargs=True))
    for i in range(stage_layers[0], n_layers):
        kind = adapter.layer_kind(model, i)
        names = list(inspect.signature(layers[i].forward).parameters)
        hooks.append(layers[i].register_forward_pre_hook(handle._on_layer(i, stage_of.get(i), kind, names),
                                                         with_kwargs=True))
        attn = adapter.attention(layers[i])
        if attn is not None:
            original = attn.config
            attn.config = RoutedConfig(original, handle._attention, i)
            handle._routed.append((attn, original))
    if handle._vision is not None:
        hooks.extend(handle._vision.attach())
    setattr(model, _ATTR, handle)
    return handle


def _has_visual_inputs(kwargs) -> bool:
    return any(kwargs.get(k) is not None for k in _VISUAL_INPUTS)


def _check_cache(cache, layer: int) -> None:
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache) or type(cache).__name__ not in ("DynamicCache",):
        raise ValueError(f"cache type {type(cache).__name__} is not supported: layers >= L hold fewer "
                         "entries than the prompt, which only DynamicCache allows; use the default "
                         "DynamicCache (do not pass cache_implementation='static')")
    for i, cl in enumerate(getattr(cache, "layers", [])):
        if i >= layer and type(cl).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer",
                                                    "LinearAttentionLayer", "DummyLayer"):
            raise ValueError(f"cache layer {i} is a {type(cl).__name__}; only DynamicLayer, DynamicSlidingWindowLayer, "
                             "(recurrent layers) LinearAttentionLayer and (KV-shared layers) DummyLayer caches are "
                             "supported after the reduction layer")


def _right_padded(pad2d: torch.Tensor) -> bool:
    """True if some row has padding after a real token."""
    seen = pad2d.long().cummax(dim=1).values.bool()
    return bool((seen & ~pad2d).any())


def _at_input_positions(logits: torch.Tensor, rows, length: int) -> torch.Tensor:
    """``[B, T', V]`` logits of the rows -> ``[B, T, V]`` at the call's positions; positions with no
    row (visual tokens merged into another or dropped) are NaN."""
    b, t_rows, v = logits.shape
    if t_rows != rows.index.shape[1]:
        return logits       # logits of some rows only (logits_to_keep): left as the model returned them
    out = logits.new_full((b, length, v), float("nan"))
    keep = rows.valid & ~rows.ghost
    for i in range(b):
        out[i, rows.index[i][keep[i]]] = logits[i][keep[i]]
    return out


def _loss(model, logits: torch.Tensor, labels: torch.Tensor, num_items, rows, length: int | None) -> torch.Tensor:
    """The model's own causal-LM loss over the text targets that survive the reduction.

    Each row predicts the token after its original position; a target whose predicting position
    was removed by the reduction cannot be scored and is refused."""
    vocab = model.config.get_text_config().vocab_size
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    if rows is None:
        return model.loss_function(logits=logits, labels=labels, vocab_size=vocab, **extra)
    if labels.shape != (rows.index.shape[0], length):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the input is {(rows.index.shape[0], length)}")
    labels = labels.to(logits.device)
    next_label = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]     # target of each position
    keep = rows.valid & ~rows.ghost
    shift = torch.where(keep, next_label.gather(1, rows.index), torch.full_like(rows.index, -100))
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored.scatter_(1, rows.index, keep)
    lost = (next_label != -100) & ~scored
    if bool(lost.any()):
        b, p = (int(v) for v in torch.nonzero(lost)[0])
        raise ValueError(f"sample {b}: the label at position {p + 1} is predicted by position {p}, a visual token the "
                         "reduction removed; give visual positions and the token right after an image the label "
                         "-100 (as training recipes do), or compute this loss without the reduction")
    if logits.shape[1] != shift.shape[1]:
        raise ValueError("labels need the logits of every position; do not pass logits_to_keep with labels")
    return model.loss_function(logits=logits, labels=None, shift_labels=shift, vocab_size=vocab, **extra)
