"""``apply()`` / ``remove()``: the reduction at layer L (or at several layers) through forward pre-hooks.

No forward function is replaced. These hooks are registered:

* on the inner VLM model (the one that receives ``input_ids``): starts a call, finds the visual
  placeholder positions, reads the 2-D padding mask and the cache;
* on the text model: finds ``image_newline`` embeddings among the placeholders (they share the
  image token id in LLaVA-NeXT / OneVision and are never reduced);
* on every decoder layer ``>= L``: at each *reduction layer* (L for most methods; every layer from
  L on for progressive ones such as ToMe) in a call that carries visual tokens, reduces each
  sample, re-packs the batch (left-padded to the longest reduced sample) and computes, once per
  reduction layer, the rotary tables, position ids and the attention mask the layers up to the
  next reduction layer receive;
* for methods that read the vision tower (PruMerge, HiRED): hooks on the vision tower and the
  projector, see :mod:`.vision`.

The attention mask of layers ``>= L`` is built here as an additive float mask ``[B, 1, q, kv]``:
causal over *original* positions, padding, re-packing slots, plus ``log(size)`` on every merged
key column (proportional attention). sdpa and eager attention take it as it is.

The KV cache of each layer ``>= L`` holds only the tokens that layer saw; the state remembers,
per reduction layer, each cache slot's original position and size, so decode steps (and later
turns) mask and weigh it correctly.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import ReductionConfig
from ..methods import KeepPriorityConfig
from ..methods.base import NEEDS, REDUCERS, SampleContext
from .adapters import Adapter, get_adapter

__all__ = ["apply", "ReductionHandle", "ReductionStats"]

_ATTR = "_pact_vlm_handle"
_SUPPORTED_ATTENTION = ("sdpa", "eager")


# -- statistics -----------------------------------------------------------------------------------

@dataclass
class ReductionStats:
    """The last call that reduced visual tokens (usually the prefill).

    Attributes:
        visual_before / visual_after: visual tokens before and after (after the last reduction
            layer), summed over the batch.
        per_sample: one dict per sample (``visual_before``, ``visual_after``, ``kept_positions``
            (original positions still present after the last reduction layer), ``labels`` (for
            each visual token, the index of the visual token that represents it, -1 if dropped)).
        seq_lengths: the sequence length each decoder layer saw.
        visual_per_layer: the visual tokens each decoder layer saw, summed over the batch.
        reduction_layers: the decoder layers whose input was reduced (one for most methods,
            several for progressive ones such as ToMe).
        seconds: wall time of the reduction step(s) (CUDA synchronised).
    """

    visual_before: int = 0
    visual_after: int = 0
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    seq_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    visual_per_layer: list[int] = field(default_factory=list)
    reduction_layers: list[int] = field(default_factory=list)

    @property
    def reduction_ratio(self) -> float:
        """Fraction of visual tokens removed after the last reduction (0 when there were none)."""
        return 1.0 - self.visual_after / self.visual_before if self.visual_before else 0.0

    @property
    def layer_averaged_ratio(self) -> float:
        """1 - (visual tokens averaged over all decoder layers) / visual_before: the fraction of
        visual-token work removed (0 when there were no visual tokens)."""
        if not self.visual_before or not self.visual_per_layer:
            return 0.0
        return 1.0 - sum(self.visual_per_layer) / (len(self.visual_per_layer) * self.visual_before)

    def equivalent_ratio(self, layer: int) -> float:
        """The reduction ratio a method reducing once, at the input of ``layer``, would need to
        remove the same layer-averaged visual-token work (the PACT reference code's budget of
        progressive methods). Equals :attr:`reduction_ratio` for a method that reduces at ``layer``.
        """
        n = len(self.visual_per_layer)
        if not 0 <= layer < n:
            raise ValueError(f"layer={layer} is not a decoder layer of this model (0..{n - 1})")
        return self.layer_averaged_ratio * n / (n - layer)

    def __repr__(self) -> str:
        return (f"ReductionStats(visual {self.visual_before} -> {self.visual_after}, "
                f"reduction_ratio={self.reduction_ratio:.3f}, seconds={self.seconds:.4f})")


# -- per-model state ------------------------------------------------------------------------------

@dataclass
class _Call:
    """State of one forward call of the inner model."""

    visual: torch.Tensor | None = None          # [B, T] bool, reducible visual positions
    placeholders: torch.Tensor | None = None    # [B, T] bool, every visual placeholder (newlines too)
    groups: torch.Tensor | None = None          # [B, T] long, image index of each visual token
    pad2d: torch.Tensor | None = None           # [B, past + T] bool, True = real token
    past: int = 0                               # full (un-reduced) length already in the cache
    input_ids: torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)   # the inner model's tensor kwargs
    # filled at the first reduction layer, updated at each later one
    passthrough: bool = False
    reducing: bool = False                      # this call carries visual tokens to reduce
    hidden: torch.Tensor | None = None          # a reduction layer's packed input, consumed by its hook
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None           # [B, T'] original position (in the call) of each row
    valid: torch.Tensor | None = None           # [B, T'] False = packing slot
    sizes: torch.Tensor | None = None           # [B, T'] tokens each row stands for
    cur_visual: torch.Tensor | None = None      # [B, T'] rows that are (reduced) visual tokens
    ghost: torch.Tensor | None = None           # [B, T'] rows dropped at layer 0, still present (masked)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)   # [B, T, ...] per position
    samples: list[dict[str, Any]] = field(default_factory=list)
    visual_counts: list[int] = field(default_factory=list)          # per stage, summed over the batch
    lengths: list[int] = field(default_factory=list)                # per stage
    seconds: float = 0.0


class _State:
    def __init__(self, stages: int) -> None:
        self.call = _Call()
        self.stages = stages
        self.kv_pos: list[torch.Tensor | None] = [None] * stages       # per stage [B, S], -1 = pad
        self.kv_logsize: list[torch.Tensor | None] = [None] * stages   # per stage [B, S]
        self.reduced: bool = False                    # did any call of this cache reduce tokens?
        self.cache_ref: Any = None

    def reset_cache(self) -> None:
        self.kv_pos = [None] * self.stages
        self.kv_logsize = [None] * self.stages
        self.reduced = False
        self.cache_ref = None


class ReductionHandle:
    """Returned by :func:`apply`: statistics of the last reducing call, and the exact undo.

    Use as a context manager to remove the reduction on exit.
    """

    def __init__(self, model, config: ReductionConfig, adapter: Adapter, stage_layers: list[int]):
        self.model = model
        self.config = config
        self.adapter = adapter
        self.stats = ReductionStats()
        self._stage_layers = stage_layers
        self._state = _State(len(stage_layers))
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removed = False
        self._priority: list[torch.Tensor] | None = None
        self._vision = None
        self.config_origin = "given"

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
        """Remove every hook; the model is exactly as before :func:`apply`."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
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


# -- apply ----------------------------------------------------------------------------------------

def _stage_layers(config: ReductionConfig, n_layers: int) -> list[int]:
    """The layers where the sequence changes: the reduction layers, plus layer 1 after a reduction
    at layer 0 (see :func:`_at_stage`)."""
    layer = int(getattr(config, "layer", 0))
    stages = list(range(layer, n_layers)) if getattr(config, "progressive", False) else [layer]
    if stages[0] == 0 and n_layers > 1 and (len(stages) == 1 or stages[1] != 1):
        stages.insert(1, 1)
    return stages


def _reduces_at(config: ReductionConfig, layer: int) -> bool:
    first = int(getattr(config, "layer", 0))
    return layer == first or (getattr(config, "progressive", False) and layer > first)


def apply(model, config: ReductionConfig) -> ReductionHandle:
    """Patch ``model`` in place with forward pre-hooks; see :func:`pact_vlm.apply`."""
    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a pact_vlm config such as PACTConfig(...), got {type(config).__name__}")
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        raise ValueError(f"a reduction is already applied to this model ({existing.config!r}); "
                         "call handle.remove() before applying another")
    reducer = REDUCERS.get(type(config))
    if reducer is None:
        raise ValueError(f"method {config.method!r} cannot be applied through hooks at a layer; "
                         f"layer methods: {', '.join(sorted(c.method for c in REDUCERS))}")
    needs = NEEDS.get(type(config), frozenset())
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    layer = int(getattr(config, "layer", 0))
    n_layers = len(layers)
    if layer >= n_layers:
        raise ValueError(f"layer={layer} but the model has {n_layers} decoder layers (0..{n_layers - 1}); "
                         "choose a smaller layer")
    if config.budget_layer >= n_layers:
        raise ValueError(f"equivalent_layer={config.budget_layer} but the model has {n_layers} decoder layers; "
                         "choose a smaller equivalent_layer")
    min_layer = adapter.min_layer(model.config)
    if layer < min_layer:
        raise ValueError(f"layer={layer} is too early for {adapter.name}: layers 0..{min_layer - 1} receive "
                         f"deepstack visual features; use layer >= {min_layer}")
    text_config = getattr(model.config, "text_config", model.config)
    impl = getattr(text_config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if impl not in _SUPPORTED_ATTENTION:
        raise ValueError(f"attention implementation {impl!r} is not supported with proportional attention "
                         f"and reduced masks; load the model with attn_implementation='sdpa' or 'eager'")
    if getattr(text_config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported (the reduced cache breaks the window); "
                         "load the model with use_sliding_window=False")

    stage_layers = _stage_layers(config, n_layers)
    handle = ReductionHandle(model, config, adapter, stage_layers)
    if "vision" in needs:
        from .vision import VisionTap

        handle._vision = VisionTap(model, config)         # refuses unsupported towers
    if "grid" in needs:
        from .vision import check_grid_support

        check_grid_support(model)
    visual_ids = torch.tensor(adapter.visual_token_ids(model.config))
    inner = _get(model, adapter.inner_model)
    text_model = adapter.text_model(model)
    state = handle._state
    stage_of = {l: s for s, l in enumerate(stage_layers)}

    def on_inner(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        _check_cache(cache, stage_layers[0])
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
            visual = torch.isin(input_ids, visual_ids.to(input_ids.device))
        past = cache.get_seq_length(0) if cache is not None else 0
        if past == 0:
            state.reset_cache()
        elif cache is not state.cache_ref:
            raise ValueError("this cache was filled without the reduction (or by another handle); "
                             "start generation from an empty cache after apply()")
        mask2d = kwargs.get("attention_mask")
        state.call = _Call(
            visual=visual,
            placeholders=visual,
            groups=_image_groups(visual) if visual is not None else None,
            pad2d=mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None,
            past=past,
            input_ids=input_ids,
            inputs={k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def on_text(module, args, kwargs):
        call = state.call
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3:
            call.inputs["rope_position_ids"] = position_ids[-3:]     # M-RoPE (t, h, w)
        newline = adapter.newline(model)
        embeds = kwargs.get("inputs_embeds")
        if newline is None or call.visual is None or embeds is None or not bool(call.visual.any()):
            return
        # newline embeddings share the image id: never reduced, but they stay inside their image's
        # run of placeholders, so the image groups (computed on the placeholders) are unchanged
        is_newline = (embeds == newline.to(embeds.dtype)).all(dim=-1)
        call.visual = call.visual & ~is_newline

    def on_layer(index):
        def hook(module, args, kwargs):
            call = state.call
            if index in stage_of:
                _at_stage(handle, reducer, needs, stage_of[index], index, module, args, kwargs, n_layers)
            if call.passthrough:
                return None
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = call.position_embeddings
            if call.position_ids is not None or kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = call.position_ids
            kwargs["attention_mask"] = call.mask
            if index in stage_of and call.hidden is not None:
                if args:
                    args = (call.hidden,) + tuple(args[1:])
                else:
                    kwargs["hidden_states"] = call.hidden
                call.hidden = None
            return args, kwargs
        return hook

    handle._hooks.append(inner.register_forward_pre_hook(on_inner, with_kwargs=True))
    handle._hooks.append(text_model.register_forward_pre_hook(on_text, with_kwargs=True))
    for i in range(stage_layers[0], n_layers):
        handle._hooks.append(layers[i].register_forward_pre_hook(on_layer(i), with_kwargs=True))
    if handle._vision is not None:
        handle._hooks.extend(handle._vision.attach())
    setattr(model, _ATTR, handle)
    return handle


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds", "mm_encoder_outputs")


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
        if i >= layer and type(cl).__name__ != "DynamicLayer":
            raise ValueError(f"cache layer {i} is a {type(cl).__name__}; only full-attention "
                             "DynamicLayer caches are supported after the reduction layer")


def _image_groups(visual: torch.Tensor) -> torch.Tensor:
    """Index of the image / video each visual token belongs to: contiguous runs of placeholders."""
    starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    return (starts.long().cumsum(dim=1) - 1).clamp(min=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rotate_queries(layer_module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, d_h]`` queries after the layer's own rotary function."""
    attn = layer_module.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q_t = q.transpose(1, 2)
    return rotate(q_t, q_t, cos, sin)[0].transpose(1, 2)


def _start_call(handle: ReductionHandle, needs, hidden: torch.Tensor, kwargs, n_layers: int) -> None:
    """At the first reduction layer: decide whether this call reduces, and set up the row tracking."""
    state, call = handle._state, handle._state.call
    b, t, _ = hidden.shape
    device = hidden.device
    visual = call.visual
    call.reducing = visual is not None and visual.shape == (b, t) and bool(visual.any())
    call.passthrough = not call.reducing and not state.reduced
    call.index = torch.arange(t, device=device).expand(b, -1)
    call.valid = torch.ones(b, t, dtype=torch.bool, device=device)
    call.sizes = torch.ones(b, t, device=device)
    call.cur_visual = visual if call.reducing else torch.zeros(b, t, dtype=torch.bool, device=device)
    call.ghost = torch.zeros(b, t, dtype=torch.bool, device=device)
    call.position_embeddings = kwargs["position_embeddings"]
    call.position_ids = kwargs.get("position_ids")
    if not call.reducing:
        if call.past == 0 and call.passthrough:     # a new prompt without visual tokens: nothing reduced
            handle.stats = ReductionStats(
                per_sample=[dict(visual_before=0, visual_after=0, labels=None,
                                 kept_positions=torch.arange(t, device=device)) for _ in range(b)],
                seq_lengths=[t] * n_layers, visual_per_layer=[0] * n_layers)
        return
    if "grid" in needs:
        from .vision import token_grid

        call.extras["grid"] = token_grid(handle.model, call.input_ids, call.placeholders, call.visual, call.inputs)
    if "priority" in needs:
        call.extras["priority"] = _priority_extras(handle, visual)
    if "vision" in needs:
        call.extras.update(handle._vision.extras(call.input_ids, call.placeholders, call.visual))
    call.samples = []
    for i in range(b):
        n = int(visual[i].sum())
        call.samples.append(dict(visual_before=n, visual_after=n, owner=torch.arange(n, device=device),
                                 vis_orig=torch.arange(n, device=device)))
    call.visual_counts = []
    call.lengths = []
    call.seconds = 0.0


def _priority_extras(handle: ReductionHandle, visual: torch.Tensor) -> torch.Tensor:
    prio = handle._priority
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


def _at_stage(handle: ReductionHandle, reducer, needs, stage: int, layer_index: int, layer_module, args, kwargs,
              n_layers: int) -> None:
    """Reduce at a reduction layer (if this call has visual tokens) and prepare what the layers
    up to the next reduction layer receive."""
    state, call, cfg = handle._state, handle._state.call, handle.config
    hidden = args[0] if args else kwargs["hidden_states"]
    b, t_cur, _ = hidden.shape
    device = hidden.device
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        held = state.kv_pos[stage].shape[1] if state.kv_pos[stage] is not None else 0
        if cache.get_seq_length(layer_index) != held:
            raise ValueError(f"the cache of layer {layer_index} holds {cache.get_seq_length(layer_index)} "
                             f"entries but the reduction recorded {held}; a cache must only be extended by "
                             "calls of this model while the reduction is applied (no cropping or reordering)")
    state.cache_ref = cache
    if stage == 0:
        _start_call(handle, needs, hidden, kwargs, n_layers)
    if call.passthrough:
        # nothing reduced in this cache: the layers see exactly what they would without us
        _append_kv(state, stage, _positions(call.past, t_cur, b, device), torch.zeros(b, t_cur, device=device))
        return

    call.hidden = None
    proportional = bool(getattr(cfg, "proportional_attention", False))
    reduces = _reduces_at(cfg, layer_index)
    if call.reducing and ((reduces and bool(call.cur_visual.any())) or bool(call.ghost.any())):
        _sync(device)
        start = time.perf_counter()
        # transformers reads the past length (hence decode positions) from layer 0's cache, so a
        # reduction at layer 0 keeps every row there: dropped rows become masked "ghosts" and
        # leave the sequence at the next stage
        _reduce_rows(handle, reducer if reduces else None, needs, layer_module, hidden, layer_index,
                     ghost=layer_index == 0)
        _sync(device)
        call.seconds += time.perf_counter() - start
        state.reduced = True
    if call.reducing:
        call.visual_counts.append(int(call.cur_visual.sum()))
        call.lengths.append(int(call.index.shape[1]))
        if stage == len(handle._stage_layers) - 1:
            _finish_stats(handle, n_layers)
    live = call.valid & ~call.ghost
    q_pos = torch.where(live, call.index + call.past, torch.full_like(call.index, -1))
    logsize = torch.where(live, call.sizes.log(), torch.zeros_like(call.sizes)) if proportional \
        else torch.zeros_like(call.sizes)
    _append_kv(state, stage, q_pos, logsize)
    call.mask = _build_mask(state, stage, call, q_pos, hidden.dtype, proportional)


def _mean_query_of(adapter: Adapter, layer_module, normed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> [H, d_h]``: the mean query of ``layer_module`` over those rows of its normalised
    input ``normed [T, D]``."""
    return lambda rows: adapter.mean_query(layer_module, normed[rows])


def _reduce_rows(handle: ReductionHandle, reducer, needs, layer_module, hidden: torch.Tensor, layer_index: int,
                 ghost: bool = False) -> None:
    """Reduce every sample's visual rows (``reducer=None``: only drop the ghost rows), re-pack the
    batch and update the call's row tracking. ``ghost``: keep the dropped rows, as ghosts."""
    call, cfg = handle._state.call, handle.config
    b, t_cur, _ = hidden.shape
    device = hidden.device
    cos, sin = call.position_embeddings
    cos_b, sin_b = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    if reducer is not None:
        with torch.no_grad():
            normed = layer_module.input_layernorm(hidden)
            q, k, rk = handle.adapter.queries_keys(layer_module, hidden, cos_b, sin_b, normed=normed,
                                                   queries=bool(needs & {"queries", "rotated_queries"}))
            rq = _rotate_queries(layer_module, q, cos_b, sin_b) if "rotated_queries" in needs else None
    real = call.valid & ~call.ghost
    if call.pad2d is not None:
        real &= call.pad2d.gather(1, (call.index + call.past).clamp(max=call.pad2d.shape[1] - 1))
    rows_per_sample, hid_rows, size_rows, vis_rows_out, ghost_out = [], [], [], [], []
    for i in range(b):
        live_rows = torch.nonzero(call.valid[i] & ~call.ghost[i]).flatten()     # padding rows stay
        vis = torch.nonzero(call.cur_visual[i]).flatten()
        if vis.numel() == 0 or reducer is None:
            rows_per_sample.append(live_rows)
            hid_rows.append(hidden[i][live_rows])
            size_rows.append(call.sizes[i][live_rows])
            vis_rows_out.append(call.cur_visual[i][live_rows])
            ghost_out.append(torch.zeros(live_rows.numel(), dtype=torch.bool, device=device))
            continue
        orig = call.index[i][vis]
        ctx = SampleContext(
            hidden[i], q[i] if q is not None else None, k[i], rk[i], vis, call.groups[i][orig],
            rotated_queries=rq[i] if rq is not None else None, real=real[i], positions=call.index[i],
            sizes=call.sizes[i][vis], extras={name: v[i][orig] for name, v in call.extras.items()},
            layer=layer_index, mean_query=_mean_query_of(handle.adapter, layer_module, normed[i]))
        with torch.no_grad():
            red = reducer(ctx, cfg)
        nonvis = torch.nonzero(call.valid[i] & ~call.cur_visual[i] & ~call.ghost[i]).flatten()
        kept = vis[red.keep_index]
        if ghost:
            dropped = vis[~torch.isin(vis, kept)]
            rows = torch.cat([nonvis, kept, dropped])
            new_h = torch.cat([hidden[i][nonvis], red.hidden.to(hidden.dtype), hidden[i][dropped]])
            new_s = torch.cat([call.sizes[i][nonvis], red.sizes.to(device).float(), call.sizes[i][dropped]])
            kinds = torch.cat([torch.zeros(nonvis.numel(), dtype=torch.long, device=device),
                               torch.ones(kept.numel(), dtype=torch.long, device=device),
                               torch.full((dropped.numel(),), 2, dtype=torch.long, device=device)])
        else:
            rows = torch.cat([nonvis, kept])
            new_h = torch.cat([hidden[i][nonvis], red.hidden.to(hidden.dtype)])
            new_s = torch.cat([call.sizes[i][nonvis], red.sizes.to(device).float()])
            kinds = torch.cat([torch.zeros(nonvis.numel(), dtype=torch.long, device=device),
                               torch.ones(kept.numel(), dtype=torch.long, device=device)])
        order = rows.argsort()
        rows_per_sample.append(rows[order])
        hid_rows.append(new_h[order])
        size_rows.append(new_s[order])
        vis_rows_out.append(kinds[order] == 1)
        ghost_out.append(kinds[order] == 2)
        # compose labels: original visual token -> current visual token -> kept visual token
        sample = call.samples[i]
        slot = torch.full((vis.numel(),), -1, dtype=torch.long, device=device)
        slot[red.keep_index] = torch.arange(red.num_after, device=device)
        owner = sample["owner"]
        rep = torch.where(owner >= 0, red.labels.to(device)[owner.clamp(min=0)], owner)
        sample["owner"] = torch.where(rep >= 0, slot[rep.clamp(min=0)], rep)
        sample["vis_orig"] = sample["vis_orig"][red.keep_index]
        sample["visual_after"] = red.num_after
    length = max(r.numel() for r in rows_per_sample)
    local = torch.zeros(b, length, dtype=torch.long, device=device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=device)
    packed = hidden.new_zeros(b, length, hidden.shape[-1])
    sizes = torch.ones(b, length, device=device)
    cur_visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    ghosts = torch.zeros(b, length, dtype=torch.bool, device=device)
    for i in range(b):
        n = rows_per_sample[i].numel()
        local[i, length - n:] = rows_per_sample[i]
        valid[i, length - n:] = True
        packed[i, length - n:] = hid_rows[i]
        sizes[i, length - n:] = size_rows[i]
        cur_visual[i, length - n:] = vis_rows_out[i]
        ghosts[i, length - n:] = ghost_out[i]
    call.hidden = packed
    call.index = call.index.gather(1, local)
    call.valid = valid
    call.sizes = sizes
    call.cur_visual = cur_visual
    call.ghost = ghosts
    call.position_embeddings = (cos_b.gather(1, local.unsqueeze(-1).expand(-1, -1, cos.shape[-1])),
                                sin_b.gather(1, local.unsqueeze(-1).expand(-1, -1, sin.shape[-1])))
    if call.position_ids is not None:
        call.position_ids = call.position_ids.expand(b, -1).gather(1, local)


def _finish_stats(handle: ReductionHandle, n_layers: int) -> None:
    call = handle._state.call
    stages = handle._stage_layers
    before = sum(s["visual_before"] for s in call.samples)
    visual_per_layer, seq_lengths = [], []
    t = call.visual.shape[1]
    for layer in range(n_layers):
        done = [s for s, l in enumerate(stages) if l <= layer]
        visual_per_layer.append(call.visual_counts[done[-1]] if done else before)
        seq_lengths.append(call.lengths[done[-1]] if done else t)
    samples = []
    for i, s in enumerate(call.samples):
        owner = s["owner"]
        padded = torch.cat([s["vis_orig"], owner.new_full((1,), -1)])      # owner -1 reads the -1
        labels = padded[owner] if s["visual_before"] else None
        kept = call.index[i][call.valid[i]]
        samples.append(dict(visual_before=s["visual_before"], visual_after=s["visual_after"] if s["visual_before"] else 0,
                            labels=labels, kept_positions=kept))
    reduced_at = [l for s, l in enumerate(stages)
                  if (call.visual_counts[s - 1] if s else before) != call.visual_counts[s]]
    handle.stats = ReductionStats(
        visual_before=before,
        visual_after=sum(s["visual_after"] for s in samples),
        per_sample=samples,
        seq_lengths=seq_lengths,
        seconds=call.seconds,
        visual_per_layer=visual_per_layer,
        reduction_layers=reduced_at or stages[:1])


def _positions(past: int, t: int, b: int, device) -> torch.Tensor:
    return (torch.arange(t, device=device) + past).expand(b, -1)


def _append_kv(state: _State, stage: int, q_pos: torch.Tensor, logsize: torch.Tensor) -> None:
    if state.cache_ref is None or state.kv_pos[stage] is None:    # no cache: nothing persists between calls
        state.kv_pos[stage], state.kv_logsize[stage] = q_pos, logsize
    else:
        state.kv_pos[stage] = torch.cat([state.kv_pos[stage], q_pos], dim=1)
        state.kv_logsize[stage] = torch.cat([state.kv_logsize[stage], logsize], dim=1)


def _build_mask(state: _State, stage: int, call: _Call, q_pos: torch.Tensor, dtype: torch.dtype,
                proportional: bool) -> torch.Tensor:
    """Additive float mask ``[B, 1, q, kv]`` for the layers of one stage (see the module docstring)."""
    kv_pos = state.kv_pos[stage]
    allowed = (kv_pos >= 0).unsqueeze(1) & (kv_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
    if call.pad2d is not None:
        real = call.pad2d.gather(1, kv_pos.clamp(min=0))
        allowed &= real.unsqueeze(1)
    # rows with nothing to attend to (padding / packing slots) attend everywhere instead of NaN
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed |= empty
    mask = torch.zeros(allowed.shape, dtype=dtype, device=kv_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    if proportional:
        mask = mask + state.kv_logsize[stage].to(dtype).unsqueeze(1)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
