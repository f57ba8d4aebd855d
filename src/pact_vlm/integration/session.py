"""The state of one forward call (:class:`Session`) and of one KV cache (:class:`CacheRecord`).

A :class:`Session` is created by the inner model's pre-hook at the start of every forward call and
lives in the calling thread only, so two threads using one applied model never share call state.
It reduces at each reduction layer, tracks the rows (:class:`~.packing.Rows`), hands each layer
its inputs (the reduced hidden states, the rotary tables and position ids of the kept rows) and
each attention call its :class:`~.attention.KeyLayout`.

A :class:`CacheRecord` belongs to one cache object (a weak-keyed table on the handle, so it dies
with its cache): per stage, the original position, log-size and image block of every key the
layers of that stage hold. Any cache filled with the reduction applied can be continued, in any
order; a cache cropped at its end (assisted generation) is followed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..methods.base import SampleContext
from .attention import KeyLayout, is_plain_causal
from .packing import Rows, SampleRows, compose_labels, pack
from .stats import assemble_stats, empty_stats

if TYPE_CHECKING:  # pragma: no cover
    from .handle import ReductionHandle

__all__ = ["Session", "CacheRecord", "StageRecord"]


@dataclass
class StageRecord:
    """Every key the layers of one stage hold in one cache, in cache order.

    Attributes:
        pos: ``[B, n]`` long, original position (``-1``: no token).
        logsize: ``[B, n]`` float, ``log(size)`` (0 = not merged).
        group: ``[B, n]`` long, the bidirectional image block (``-1`` none).
    """

    pos: torch.Tensor
    logsize: torch.Tensor
    group: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.pos.shape[1])

    def extend(self, pos: torch.Tensor, logsize: torch.Tensor, group: torch.Tensor) -> "StageRecord":
        return StageRecord(torch.cat([self.pos, pos], 1), torch.cat([self.logsize, logsize], 1),
                           torch.cat([self.group, group], 1))

    def crop(self, length: int, layer: int, full_length: int) -> "StageRecord":
        """The record of a cache cut back at its end: layer ``layer`` now holds ``length`` entries
        and the un-reduced layers ``full_length``. Transformers removes the same number of
        entries from every layer, so this is right only when the removed entries are exactly the
        positions after ``full_length`` (tokens the reduction did not touch, e.g. rejected
        candidates of assisted generation)."""
        removed = self.pos[:, length:]
        expected = torch.arange(full_length, full_length + removed.shape[1], device=removed.device)
        if not bool((removed == expected).all()):
            raise ValueError(f"the cache of layer {layer} was cut back by {removed.shape[1]} entries, into the part "
                             "the reduction shortened; a reduced cache can only be cropped by tokens after the "
                             "reduced ones (as assisted generation does)")
        return StageRecord(self.pos[:, :length], self.logsize[:, :length], self.group[:, :length])


@dataclass
class CacheRecord:
    """What the reduction did to one cache: one :class:`StageRecord` per stage (None before any call)."""

    stages: list[StageRecord | None]
    reduced: bool = False       # did any call reduce tokens into this cache?
    biased: bool = False        # does any key carry a log-size bias?


@dataclass
class _Layouts:
    """Per stage: what attention calls of that stage share (computed once per key length)."""

    record: StageRecord
    q_pos: torch.Tensor
    q_group: torch.Tensor
    memo: dict = field(default_factory=dict)


class Session:
    """The state of one forward call of the inner model (see the module docstring).

    Args:
        handle: the handle of the applied reduction.
        visual: ``[B, T]`` reducible visual tokens of the call (None: no visual input).
        pad2d: ``[B, past + T]`` bool, True at real tokens (from a 2-D attention mask), or None.
        past: the length the cache held before the call (the un-reduced length).
        record: the cache's record (None: the call has no cache).
        inputs: the inner model's tensor keyword arguments.
    """

    def __init__(self, handle: "ReductionHandle", *, input_ids: torch.Tensor | None, visual: torch.Tensor | None,
                 pad2d: torch.Tensor | None, past: int, record: CacheRecord | None, inputs: dict[str, Any],
                 backend: str):
        self.handle = handle
        self.config = handle.config
        self.input_ids = input_ids
        self.visual = visual
        self.placeholders = visual
        self.pad2d = pad2d
        self.past = past
        self.record = record if record is not None else CacheRecord([None] * len(handle._stage_layers))
        self.persistent = record is not None
        self.inputs = inputs
        self.backend = backend
        self.blocks = (handle.adapter.block_ids(handle.model.config, inputs, visual, past) if visual is not None
                       else None)
        if self.blocks is not None and self.blocks.shape != visual.shape:
            raise ValueError(f"token_type_ids have shape {tuple(self.blocks.shape)} but input_ids "
                             f"{tuple(visual.shape)}; pass one token type per input token")
        self.reducing = False
        self.passthrough = False
        self.started = False
        self.rows: Rows | None = None
        self.length = 0
        self.tail: int | None = None
        self.pending_hidden: torch.Tensor | None = None
        self.stage: int | None = None
        self.layouts: _Layouts | None = None
        self.gathered: dict[int, Any] = {}
        self.extras: dict[str, torch.Tensor] = {}
        self.samples: list[dict[str, Any]] = []
        self.visual_counts: list[int] = []
        self.lengths: list[int] = []
        self.seconds = 0.0
        self.stats = None

    # -- newline embeddings (found by the text model's pre-hook) ---------------------------------
    def drop_from_visual(self, not_reducible: torch.Tensor) -> None:
        """Placeholders that are never reduced (``image_newline`` embeddings): ``[B, T]`` bool."""
        if self.visual is not None:
            self.visual = self.visual & ~not_reducible

    # -- stages --------------------------------------------------------------------------------
    def enter_stage(self, stage: int, layer: int, module, hidden: torch.Tensor, kwargs: dict) -> None:
        """At the first layer of a stage: check the cache, reduce if this layer reduces, record the keys."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if stage == 0 and cache is not None and not self.persistent:
            # the text model made the cache itself (use_cache without one passed in)
            self.record = self.handle._record_of(cache, self.past)
            self.persistent = True
        self._follow_cache(stage, layer, cache)
        if stage == 0:
            self._start(hidden)
        self.stage = stage
        self.gathered = {}
        b, t_cur, _ = hidden.shape
        device = hidden.device
        if self.passthrough:
            # nothing reduced in this cache: the layers see exactly what they would without us
            pos = (torch.arange(t_cur, device=device) + self.past).expand(b, -1)
            self._record(stage, pos, torch.zeros(b, t_cur, device=device),
                         torch.full((b, t_cur), -1, device=device, dtype=torch.long))
            return
        handle, cfg = self.handle, self.config
        reduces = handle._reduces_at(layer)
        rows = self.rows
        if self.reducing and ((reduces and bool(rows.visual.any())) or bool(rows.ghost.any())):
            # transformers reads the past length (hence decode positions) from layer 0's cache, so a
            # reduction at layer 0 keeps every row there: dropped rows become masked ghosts that
            # leave the sequence at the next stage
            with self._timed(device):
                self._reduce_rows(module, hidden, layer, kwargs.get("position_embeddings"), reduce=reduces,
                                  ghost=layer == 0)
            self.record.reduced = True
        rows = self.rows
        if self.reducing:
            self.visual_counts.append(int(rows.visual.sum()))
            self.lengths.append(int(rows.index.shape[1]))
            if stage == len(handle._stage_layers) - 1:
                self._finish_stats()
        live = rows.live
        q_pos = torch.where(live, rows.index + self.past, torch.full_like(rows.index, -1))
        proportional = bool(cfg.proportional_attention)
        logsize = torch.where(live, rows.sizes.log(), torch.zeros_like(rows.sizes)) if proportional \
            else torch.zeros_like(rows.sizes)
        if proportional and bool((logsize != 0).any()):
            self.record.biased = True
        group = self._row_groups(rows)
        self._record(stage, q_pos, logsize, group)
        self.layouts = _Layouts(self.record.stages[stage], q_pos, group)

    def _follow_cache(self, stage: int, layer: int, cache) -> None:
        record = self.record.stages[stage]
        held = record.length if record is not None and self.persistent else 0
        count = cache.get_seq_length(layer) if cache is not None else 0
        if cache is None or count == held:
            return
        if count < held:        # cut back at its end (assisted generation crops rejected tokens)
            self.record.stages[stage] = record.crop(count, layer, self.past)
            return
        raise ValueError(f"the cache of layer {layer} holds {count} entries but the reduction recorded {held}; "
                         "a cache must only be extended by calls of this model while the reduction is applied")

    def _record(self, stage: int, pos, logsize, group) -> None:
        old = self.record.stages[stage] if self.persistent else None
        self.record.stages[stage] = StageRecord(pos, logsize, group) if old is None else old.extend(pos, logsize, group)

    def _row_groups(self, rows: Rows) -> torch.Tensor:
        if self.blocks is None:
            return torch.full_like(rows.index, -1)
        group = self.blocks.gather(1, rows.index)
        return torch.where(rows.live, group, torch.full_like(group, -1))

    @contextlib.contextmanager
    def _timed(self, device: torch.device):
        """Adds the block's wall time (CUDA synchronised) to the reduction step's :attr:`seconds`."""
        _sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.seconds += time.perf_counter() - start

    def _start(self, hidden: torch.Tensor) -> None:
        """At the first stage: decide whether this call reduces, and set up the row tracking."""
        handle = self.handle
        b, t, _ = hidden.shape
        device = hidden.device
        visual = self.visual
        self.started = True
        self.length = t
        self.reducing = visual is not None and visual.shape == (b, t) and bool(visual.any())
        self.passthrough = not self.reducing and not self.record.reduced
        self.rows = Rows.initial(visual if self.reducing else torch.zeros(b, t, dtype=torch.bool, device=device))
        if not self.reducing:
            if self.past == 0 and self.passthrough:     # a new prompt without visual tokens: nothing reduced
                handle.stats = self.stats = empty_stats(b, t, handle._n_layers, device)
            return
        needs = handle._needs
        # the method's inputs (token grid, priorities, vision-tower readings mapped to the prompt)
        # are part of the reduction step's time
        with self._timed(device):
            if "grid" in needs:
                from .vision import token_grid

                self.extras["grid"] = token_grid(handle.model, self.input_ids, self.placeholders, visual, self.inputs)
            if "priority" in needs:
                self.extras["priority"] = handle._priority_extras(visual)
            if "vision" in needs:
                self.extras.update(handle._vision.extras(self.input_ids, self.placeholders, visual))
        self.groups = handle.adapter.image_groups(handle.model.config, self.input_ids, self.placeholders, self.inputs)
        for i in range(b):
            n = int(visual[i].sum())
            self.samples.append(dict(visual_before=n, visual_after=n, owner=torch.arange(n, device=device),
                                     vis_orig=torch.arange(n, device=device)))

    def _reduce_rows(self, module, hidden: torch.Tensor, layer: int, rotary, *, reduce: bool, ghost: bool) -> None:
        """Reduce every sample's visual rows (``reduce=False``: only drop the ghost rows), re-pack
        the batch and update the row tracking. ``ghost``: keep the dropped rows, as ghosts.
        ``rotary``: the layer's (cos, sin) over the call's positions."""
        handle, cfg, rows = self.handle, self.config, self.rows
        b, _, _ = hidden.shape
        device = hidden.device
        reducer = handle._reducer if reduce else None
        needs = handle._needs
        if reducer is not None:
            cos, sin = (_gather_rows(x, rows.index, self.visual.shape[1]) for x in rotary)
            with torch.no_grad():
                normed = module.input_layernorm(hidden)
                q, k, rk = handle.adapter.queries_keys(module, hidden, cos, sin, normed=normed,
                                                       queries=bool(needs & {"queries", "rotated_queries"}))
                rq = handle.adapter.rotate_queries(module, q, cos, sin) if "rotated_queries" in needs else None
        real = rows.live
        if self.pad2d is not None:
            real = real & self.pad2d.gather(1, (rows.index + self.past).clamp(max=self.pad2d.shape[1] - 1))
        track_grad = torch.is_grad_enabled() and hidden.requires_grad
        samples = []
        for i in range(b):
            live_rows = torch.nonzero(rows.live[i]).flatten()         # padding rows stay
            vis = torch.nonzero(rows.visual[i]).flatten()
            if vis.numel() == 0 or reducer is None:
                samples.append(SampleRows(live_rows, hidden[i][live_rows], rows.sizes[i][live_rows],
                                          rows.visual[i][live_rows], torch.zeros_like(live_rows, dtype=torch.bool)))
                continue
            orig = rows.index[i][vis]
            ctx = SampleContext(
                hidden[i], q[i] if q is not None else None, k[i], rk[i], vis, self.groups[i][orig],
                rotated_queries=rq[i] if rq is not None else None, real=real[i], positions=rows.index[i],
                sizes=rows.sizes[i][vis], extras={name: v[i][orig] for name, v in self.extras.items()},
                layer=layer, mean_query=_mean_query_of(handle.adapter, module, normed[i]))
            with torch.no_grad():
                red = reducer(ctx, cfg)
            merged = red.hidden
            if track_grad:
                merged = _members_mean(hidden[i][vis], red.labels, red.keep_index, rows.sizes[i][vis], red.hidden,
                                       cfg.method)
            nonvis = torch.nonzero(rows.live[i] & ~rows.visual[i]).flatten()
            kept = vis[red.keep_index]
            dropped = vis[~torch.isin(vis, kept)] if ghost else vis[:0]
            source = torch.cat([nonvis, kept, dropped])
            new_h = torch.cat([hidden[i][nonvis], merged.to(hidden.dtype), hidden[i][dropped]])
            new_s = torch.cat([rows.sizes[i][nonvis], red.sizes.to(device).float(), rows.sizes[i][dropped]])
            kinds = torch.cat([torch.zeros(nonvis.numel(), dtype=torch.long, device=device),
                               torch.ones(kept.numel(), dtype=torch.long, device=device),
                               torch.full((dropped.numel(),), 2, dtype=torch.long, device=device)])
            order = source.argsort()
            samples.append(SampleRows(source[order], new_h[order], new_s[order], kinds[order] == 1, kinds[order] == 2))
            sample = self.samples[i]
            sample["owner"] = compose_labels(sample["owner"], red.labels.to(device), red.keep_index.to(device))
            sample["vis_orig"] = sample["vis_orig"][red.keep_index]
            sample["visual_after"] = red.num_after
        self.pending_hidden, self.rows, _ = pack(rows, samples, hidden)

    def _finish_stats(self) -> None:
        handle, rows = self.handle, self.rows
        kept = [rows.index[i][rows.valid[i] & ~rows.ghost[i]] for i in range(rows.index.shape[0])]
        handle.stats = self.stats = assemble_stats(self.samples, kept, handle._stage_layers, self.visual_counts,
                                                   self.lengths, int(self.visual.shape[1]), handle._n_layers,
                                                   self.seconds)

    # -- what each layer and each attention call receives -------------------------------------------
    def layer_kwargs(self, layer: int, kind: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The inputs of layer ``layer`` (``None``: the layer runs on its own inputs)."""
        if self.passthrough or not self.started:
            return None
        kwargs = dict(kwargs)
        if self.pending_hidden is None:
            self._follow_tail((args[0] if args else kwargs["hidden_states"]).shape[1], layer)
        identity = not self.reducing
        if not identity:
            kwargs["position_embeddings"] = self._gather(kwargs.get("position_embeddings"))
            for name in self.handle.adapter.row_kwargs:
                if kwargs.get(name) is not None:
                    kwargs[name] = self._gather(kwargs[name])
        kwargs["attention_mask"] = self._padding_mask() if kind in self.handle.adapter.mask_2d_kinds else None
        if self.pending_hidden is not None:
            if args:
                args = (self.pending_hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = self.pending_hidden
            self.pending_hidden = None
        return args, kwargs

    def _follow_tail(self, rows: int, layer: int) -> None:
        """A layer that receives fewer rows than the stage has: the text model kept only the last
        ``rows`` of them (Gemma 4 slices the prefill to its last ``logits_to_keep`` rows before its
        KV-shared layers, and the per-position inputs, unreduced, to the call's last positions)."""
        have = self.rows.index.shape[1] if self.tail is None else self.tail
        if rows == have:
            return
        tail = torch.arange(self.length - rows, self.length, device=self.rows.index.device)
        if rows > have or not (bool(self.rows.live[:, -rows:].all())
                               and bool((self.rows.index[:, -rows:] == tail).all())):
            raise RuntimeError(f"decoder layer {layer} receives the last {rows} of the call's rows, which are not its "
                               "last positions after the reduction; call the model with logits_to_keep=0")
        self.tail = rows

    def _padding_mask(self) -> torch.Tensor:
        """``[B, T']`` 0/1: rows that are tokens (not packing slots or ghosts, not the input's padding)."""
        live, index = self._tail(self.rows.live), self._tail(self.rows.index)
        if self.pad2d is not None:
            live = live & self.pad2d.gather(1, (index + self.past).clamp(max=self.pad2d.shape[1] - 1))
        return live.long()

    def _tail(self, per_row: torch.Tensor) -> torch.Tensor:
        """``[B, T']`` per-row values of the rows the layers now see (the last :attr:`tail` ones)."""
        return per_row if self.tail is None else per_row[:, -self.tail:]

    def _gather(self, value):
        """A per-position tensor of the call (or a tuple of them, e.g. rotary ``(cos, sin)``) at the rows."""
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(self._gather(v) for v in value)
        if self.tail is not None and _sequence_length(value) == self.tail:
            return value        # sliced by the text model to the call's last positions: the tail rows
        key = (id(value), self.tail)
        if key not in self.gathered:
            self.gathered[key] = (value, _gather_rows(value, self._tail(self.rows.index), self.visual.shape[1]))
        return self.gathered[key][1]

    def layout(self, layer: int, keys: int, window: int | None, bidirectional: bool) -> KeyLayout | None:
        """The :class:`KeyLayout` of an attention call of ``layer`` over ``keys`` keys (None: this call
        runs the layer unreduced, the model's own mask applies)."""
        if self.passthrough or not self.started or self.layouts is None:
            return None
        lay = self.layouts
        memo_key = (keys, window, bidirectional, self.tail)
        if memo_key not in lay.memo:
            record = lay.record
            if keys > record.length:
                raise RuntimeError(f"layer {layer} attends over {keys} keys but the reduction recorded {record.length}")
            kv_pos = record.pos[:, record.length - keys:]
            kv_real = None
            if self.pad2d is not None:
                kv_real = self.pad2d.gather(1, kv_pos.clamp(min=0, max=self.pad2d.shape[1] - 1))
            layout = KeyLayout(
                q_pos=self._tail(lay.q_pos), kv_pos=kv_pos, kv_real=kv_real,
                kv_logsize=record.logsize[:, record.length - keys:] if self.record.biased else None,
                q_group=self._tail(lay.q_group) if bidirectional and self.blocks is not None else None,
                kv_group=record.group[:, record.length - keys:] if bidirectional and self.blocks is not None else None,
                window=window)
            lay.memo[memo_key] = (layout, is_plain_causal(layout))
        return lay.memo[memo_key]

    def output_rows(self) -> Rows | None:
        """The rows of the last stage (None when the call ran unreduced)."""
        return self.rows if self.started and not self.passthrough and self.reducing else None


def _sequence_length(value: torch.Tensor) -> int:
    """The sequence length of a per-position input (see :func:`_gather_rows`)."""
    if value.is_floating_point() or value.is_complex():
        return int(value.shape[1]) if value.dim() >= 3 else -1
    return int(value.shape[-1])


def _gather_rows(value: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """A per-position input of the call at the rows ``index [B, T']``: rotary tables ``[B|1, T, ...]``
    (float or complex, sequence in dim 1) or position ids ``[B|1, T]`` / ``[k, B|1, T]`` (integer,
    sequence last), with ``T = length``."""
    b = index.shape[0]
    if value.is_floating_point() or value.is_complex():
        if value.dim() >= 3 and value.shape[1] == length and value.shape[0] in (1, b):
            expanded = value.expand(b, *value.shape[1:])
            idx = index.view(b, -1, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
            return expanded.gather(1, idx)
    elif value.dim() in (2, 3) and value.shape[-1] == length and value.shape[-2] in (1, b):
        lead = tuple(value.shape[:-2])
        return value.expand(*lead, b, length).gather(-1, index.expand(*lead, b, index.shape[1]))
    raise ValueError(f"cannot follow a per-position layer input of shape {tuple(value.shape)} through the reduction "
                     f"(call length {length}); this model family needs its adapter to name it")


def _members_mean(hidden: torch.Tensor, labels: torch.Tensor, keep_index: torch.Tensor, weights: torch.Tensor,
                  expected: torch.Tensor, method: str) -> torch.Tensor:
    """The kept tokens' states as the ``weights``-weighted mean of their members, with gradients.

    The reducer chose the clusters without gradients; this recomputes what it returned from the
    layer's input, so gradients reach everything before the reduction. A reducer whose states
    are not that mean is refused here rather than given wrong gradients."""
    slot = torch.full((labels.numel(),), -1, dtype=torch.long, device=hidden.device)
    slot[keep_index] = torch.arange(keep_index.numel(), device=hidden.device)
    member = labels >= 0
    target = slot[labels[member]]
    w = weights[member].to(torch.float32)
    sums = torch.zeros(keep_index.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, target, hidden[member].float() * w[:, None])
    total = torch.zeros(keep_index.numel(), dtype=torch.float32, device=hidden.device).index_add(0, target, w)
    merged = (sums / total[:, None]).to(hidden.dtype)
    if not torch.allclose(merged.detach().float(), expected.float(), rtol=1e-3, atol=1e-4):
        raise ValueError(f"method {method!r} returns token states that are not the mean of their members, so "
                         "gradients cannot be computed through it; run it under torch.no_grad()")
    return merged


def _mean_query_of(adapter, layer_module, normed: torch.Tensor):
    """``rows -> [H, d_h]``: the mean query of ``layer_module`` over those rows of its normalised input."""
    return lambda rows: adapter.mean_query(layer_module, normed[rows])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
