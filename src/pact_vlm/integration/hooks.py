"""``apply()`` / ``remove()``: the reduction at layer L through forward pre-hooks.

No forward function is replaced. Three kinds of hooks are registered:

* on the inner VLM model (the one that receives ``input_ids``): starts a call, finds the visual
  placeholder positions, reads the 2-D padding mask and the cache;
* on the text model: finds ``image_newline`` embeddings among the placeholders (they share the
  image token id in LLaVA-NeXT / OneVision and are never reduced);
* on every decoder layer ``>= L``: at layer L in a call that carries visual tokens, reduces each
  sample, re-packs the batch (left-padded to the longest reduced sample) and computes, once,
  the rotary tables, position ids and the attention mask every later layer receives.

The attention mask of layers ``>= L`` is built here as an additive float mask ``[B, 1, q, kv]``:
causal over *original* positions, padding, re-packing slots, plus ``log(cluster size)`` on every
merged key column (proportional attention). sdpa and eager attention take it as it is.

The KV cache of layers ``>= L`` holds only the kept tokens; the state remembers each cache slot's
original position and size, so decode steps (and later turns) mask and weigh it correctly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..algorithms.merge import Reduction
from ..algorithms.pact import pact_reduce
from ..config import PACTConfig, ReductionConfig
from .adapters import Adapter, get_adapter

__all__ = ["apply", "ReductionHandle", "ReductionStats", "REDUCERS", "register_reducer", "SampleContext"]

_ATTR = "_pact_vlm_handle"
_SUPPORTED_ATTENTION = ("sdpa", "eager")


# -- reducers: one per method config ------------------------------------------------------------

@dataclass
class SampleContext:
    """Everything a reducer may read about one sample at layer L.

    Attributes:
        hidden: ``[T, D]`` layer L's input for this sample.
        queries: ``[T, H, d_h]`` and keys ``[T, H_kv, d_h]`` before rotary;
        rotated_keys: ``[T, H_kv, d_h]`` after rotary.
        visual_index: ``[N]`` ascending positions of the reducible visual tokens.
        groups: ``[N]`` image / video index of each visual token (for per-image reduction).
    """

    hidden: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    rotated_keys: torch.Tensor
    visual_index: torch.Tensor
    groups: torch.Tensor


Reducer = Callable[[SampleContext, ReductionConfig], Reduction]
REDUCERS: dict[type, Reducer] = {}


def register_reducer(config_type: type) -> Callable[[Reducer], Reducer]:
    def deco(fn: Reducer) -> Reducer:
        REDUCERS[config_type] = fn
        return fn
    return deco


@register_reducer(PACTConfig)
def _reduce_pact(ctx: SampleContext, cfg: PACTConfig) -> Reduction:
    kwargs = dict(prune_ratio=cfg.prune_ratio, cutoff=cfg.cutoff, alpha=cfg.alpha, density=cfg.density,
                  dn=cfg.dn, euti_context=cfg.euti_context, euti_variant=cfg.euti_variant)
    return _per_group(ctx, cfg.group, lambda vi: pact_reduce(
        ctx.hidden, ctx.queries, ctx.keys, ctx.rotated_keys, visual_index=vi, **kwargs))


def _per_group(ctx: SampleContext, group: str, reduce_one: Callable[[torch.Tensor], Reduction]) -> Reduction:
    """Run ``reduce_one`` on the whole visual set, or on each image / video separately."""
    if group == "sample" or int(ctx.groups.max()) == 0:
        return reduce_one(ctx.visual_index)
    parts = []
    for g in ctx.groups.unique().tolist():
        sel = torch.nonzero(ctx.groups == g).flatten()
        red = reduce_one(ctx.visual_index[sel])
        labels = torch.where(red.labels >= 0, sel[red.labels.clamp(min=0)], red.labels)
        parts.append(Reduction(sel[red.keep_index], red.hidden, red.sizes, labels))
    keep = torch.cat([p.keep_index for p in parts])
    order = keep.argsort()
    labels = torch.full((ctx.visual_index.numel(),), -1, dtype=torch.long, device=keep.device)
    for p, g in zip(parts, ctx.groups.unique().tolist()):
        labels[ctx.groups == g] = p.labels
    return Reduction(keep[order], torch.cat([p.hidden for p in parts])[order],
                     torch.cat([p.sizes for p in parts])[order], labels)


# -- statistics -----------------------------------------------------------------------------------

@dataclass
class ReductionStats:
    """The last call that reduced visual tokens (usually the prefill).

    Attributes:
        visual_before / visual_after: visual tokens before and after, summed over the batch.
        per_sample: one dict per sample (``visual_before``, ``visual_after``, ``kept_positions``
            (original positions still present after layer L), ``labels``).
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
        """1 - (mean visual tokens over the layers from the first reducing layer on) / visual_before.

        The budget measure of progressive methods (ToMe): layers before the first reduction see
        every token whatever the method, so they are left out. For a method that reduces at one
        layer this equals :attr:`reduction_ratio`.
        """
        if not self.visual_before or not self.reduction_layers or not self.visual_per_layer:
            return 0.0
        counts = self.visual_per_layer[self.reduction_layers[0]:]
        return 1.0 - sum(counts) / (len(counts) * self.visual_before)

    def __repr__(self) -> str:
        return (f"ReductionStats(visual {self.visual_before} -> {self.visual_after}, "
                f"reduction_ratio={self.reduction_ratio:.3f}, seconds={self.seconds:.4f})")


# -- per-model state ------------------------------------------------------------------------------

@dataclass
class _Call:
    """State of one forward call of the inner model."""

    visual: torch.Tensor | None = None          # [B, T] bool, reducible visual positions
    groups: torch.Tensor | None = None          # [B, T] long, image index of each visual token
    pad2d: torch.Tensor | None = None           # [B, past + T] bool, True = real token
    past: int = 0                               # full (un-reduced) length already in the cache
    # filled at layer L, read by later layers
    ready: bool = False
    passthrough: bool = False
    hidden: torch.Tensor | None = None          # layer L's packed input, consumed by its hook
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class _State:
    def __init__(self) -> None:
        self.call = _Call()
        self.kv_pos: torch.Tensor | None = None       # [B, S] original position per cache slot, -1 = pad
        self.kv_logsize: torch.Tensor | None = None   # [B, S] log(cluster size) per cache slot
        self.reduced: bool = False                    # did any call of this cache reduce tokens?
        self.cache_ref: Any = None


class ReductionHandle:
    """Returned by :func:`apply`: statistics of the last reducing call, and the exact undo.

    Use as a context manager to remove the reduction on exit.
    """

    def __init__(self, model, config: ReductionConfig, adapter: Adapter):
        self.model = model
        self.config = config
        self.adapter = adapter
        self.stats = ReductionStats()
        self._state = _State()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removed = False

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
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    layer = getattr(config, "layer")
    if layer >= len(layers):
        raise ValueError(f"layer={layer} but the model has {len(layers)} decoder layers (0..{len(layers) - 1}); "
                         "choose a smaller layer")
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

    handle = ReductionHandle(model, config, adapter)
    visual_ids = torch.tensor(adapter.visual_token_ids(model.config))
    inner = _get(model, adapter.inner_model)
    text_model = adapter.text_model(model)
    state = handle._state
    n_layers = len(layers)

    def on_inner(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        _check_cache(cache, layer)
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
            state.kv_pos = state.kv_logsize = state.cache_ref = None
            state.reduced = False
        elif cache is not state.cache_ref:
            raise ValueError("this cache was filled without the reduction (or by another handle); "
                             "start generation from an empty cache after apply()")
        mask2d = kwargs.get("attention_mask")
        state.call = _Call(
            visual=visual,
            groups=_image_groups(visual) if visual is not None else None,
            pad2d=mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None,
            past=past)

    def on_text(module, args, kwargs):
        call = state.call
        newline = adapter.newline(model)
        embeds = kwargs.get("inputs_embeds")
        if newline is None or call.visual is None or embeds is None or not bool(call.visual.any()):
            return
        is_newline = (embeds == newline.to(embeds.dtype)).all(dim=-1)
        call.visual = call.visual & ~is_newline
        call.groups = _image_groups(call.visual)

    def on_layer(index):
        def hook(module, args, kwargs):
            call = state.call
            if index == layer:
                _at_layer_l(handle, reducer, module, args, kwargs, n_layers)
            if call.passthrough:
                return None
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = call.position_embeddings
            if call.position_ids is not None or kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = call.position_ids
            kwargs["attention_mask"] = call.mask
            if index == layer and call.hidden is not None:
                if args:
                    args = (call.hidden,) + tuple(args[1:])
                else:
                    kwargs["hidden_states"] = call.hidden
                call.hidden = None
            return args, kwargs
        return hook

    handle._hooks.append(inner.register_forward_pre_hook(on_inner, with_kwargs=True))
    handle._hooks.append(text_model.register_forward_pre_hook(on_text, with_kwargs=True))
    for i in range(layer, n_layers):
        handle._hooks.append(layers[i].register_forward_pre_hook(on_layer(i), with_kwargs=True))
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


def _at_layer_l(handle: ReductionHandle, reducer, layer_module, args, kwargs, n_layers: int) -> None:
    """Reduce (if this call has visual tokens) and prepare what layers >= L receive."""
    state, call, cfg = handle._state, handle._state.call, handle.config
    hidden = args[0] if args else kwargs["hidden_states"]
    b, t, _ = hidden.shape
    device = hidden.device
    cos, sin = kwargs["position_embeddings"]
    position_ids = kwargs.get("position_ids")
    visual = call.visual
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        held = state.kv_pos.shape[1] if state.kv_pos is not None else 0
        if cache.get_seq_length(handle.config.layer) != held:
            raise ValueError(f"the cache of layer {handle.config.layer} holds "
                             f"{cache.get_seq_length(handle.config.layer)} entries but the reduction "
                             f"recorded {held}; a cache must only be extended by calls of this model "
                             "while the reduction is applied (no cropping or reordering)")
    state.cache_ref = cache
    has_visual = visual is not None and visual.shape == (b, t) and bool(visual.any())

    if not has_visual and not state.reduced:
        # nothing reduced in this cache: layers >= L see exactly what they would without us
        call.passthrough = True
        if call.past == 0:       # a new prompt without visual tokens: nothing reduced
            handle.stats = ReductionStats(
                per_sample=[dict(visual_before=0, visual_after=0, labels=None,
                                 kept_positions=torch.arange(t, device=device)) for _ in range(b)],
                seq_lengths=[t] * n_layers, visual_per_layer=[0] * n_layers)
        _append_kv(state, _positions(call.past, t, b, device), torch.zeros(b, t, device=device))
        return

    call.hidden = None
    if has_visual:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            q, k, rk = handle.adapter.queries_keys(layer_module, hidden, cos.expand(b, -1, -1), sin.expand(b, -1, -1))
        keep_rows, hid_rows, size_rows, samples = [], [], [], []
        for i in range(b):
            vis_idx = torch.nonzero(visual[i]).flatten()
            if vis_idx.numel() == 0:
                keep_rows.append(torch.arange(t, device=device))
                hid_rows.append(hidden[i])
                size_rows.append(torch.ones(t, device=device))
                samples.append(dict(visual_before=0, visual_after=0, labels=None,
                                    kept_positions=keep_rows[-1]))
                continue
            ctx = SampleContext(hidden[i], q[i], k[i], rk[i], vis_idx, call.groups[i][vis_idx])
            with torch.no_grad():
                red = reducer(ctx, cfg)
            is_vis = visual[i]
            keep = torch.cat([torch.nonzero(~is_vis).flatten(), vis_idx[red.keep_index]])
            order = keep.argsort()
            keep = keep[order]
            new_hidden = torch.cat([hidden[i][~is_vis], red.hidden.to(hidden.dtype)])[order]
            sizes = torch.cat([torch.ones(int((~is_vis).sum()), device=device), red.sizes.to(device)])[order]
            keep_rows.append(keep)
            hid_rows.append(new_hidden)
            size_rows.append(sizes)
            samples.append(dict(visual_before=int(vis_idx.numel()), visual_after=red.num_after,
                                labels=red.labels, kept_positions=keep))
        length = max(r.numel() for r in keep_rows)
        index = torch.zeros(b, length, dtype=torch.long, device=device)
        valid = torch.zeros(b, length, dtype=torch.bool, device=device)
        packed = hidden.new_zeros(b, length, hidden.shape[-1])
        logsize = torch.zeros(b, length, device=device)
        for i in range(b):
            n = keep_rows[i].numel()
            index[i, length - n:] = keep_rows[i]
            valid[i, length - n:] = True
            packed[i, length - n:] = hid_rows[i]
            logsize[i, length - n:] = size_rows[i].log() if cfg.proportional_attention else 0.0
        _sync(device)
        seconds = time.perf_counter() - start
        handle.stats = ReductionStats(
            visual_before=sum(s["visual_before"] for s in samples),
            visual_after=sum(s["visual_after"] for s in samples),
            per_sample=samples,
            seq_lengths=[t] * cfg.layer + [length] * (n_layers - cfg.layer),
            seconds=seconds,
            visual_per_layer=[sum(s["visual_before"] for s in samples)] * cfg.layer
            + [sum(s["visual_after"] for s in samples)] * (n_layers - cfg.layer),
            reduction_layers=[cfg.layer])
        call.hidden = packed
        state.reduced = True
        q_pos = torch.where(valid, index + call.past, torch.full_like(index, -1))
        cos = cos.expand(b, -1, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
        sin = sin.expand(b, -1, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
        if position_ids is not None:
            position_ids = position_ids.expand(b, -1).gather(1, index)
        new_logsize = logsize
    else:
        q_pos = _positions(call.past, t, b, device)
        new_logsize = torch.zeros(b, t, device=device)

    _append_kv(state, q_pos, new_logsize)
    call.position_embeddings = (cos, sin)
    call.position_ids = position_ids
    call.mask = _build_mask(state, call, q_pos, hidden.dtype, handle.config)


def _positions(past: int, t: int, b: int, device) -> torch.Tensor:
    return (torch.arange(t, device=device) + past).expand(b, -1)


def _append_kv(state: _State, q_pos: torch.Tensor, logsize: torch.Tensor) -> None:
    if state.cache_ref is None or state.kv_pos is None:    # no cache: nothing persists between calls
        state.kv_pos, state.kv_logsize = q_pos, logsize
    else:
        state.kv_pos = torch.cat([state.kv_pos, q_pos], dim=1)
        state.kv_logsize = torch.cat([state.kv_logsize, logsize], dim=1)


def _build_mask(state: _State, call: _Call, q_pos: torch.Tensor, dtype: torch.dtype, cfg) -> torch.Tensor:
    """Additive float mask ``[B, 1, q, kv]`` for layers >= L (see the module docstring)."""
    kv_pos = state.kv_pos
    allowed = (kv_pos >= 0).unsqueeze(1) & (kv_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
    if call.pad2d is not None:
        real = call.pad2d.gather(1, kv_pos.clamp(min=0))
        allowed &= real.unsqueeze(1)
    # rows with nothing to attend to (padding / packing slots) attend everywhere instead of NaN
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed |= empty
    mask = torch.zeros(allowed.shape, dtype=dtype, device=kv_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    if getattr(cfg, "proportional_attention", False):
        mask = mask + state.kv_logsize.to(dtype).unsqueeze(1)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
