"""Attention of the reduced layers: which keys each query sees, and proportional attention, per backend.

After a reduction the rows of a layer are no longer the positions ``0..T-1``: each row (and each
cached key) carries its *original* position, padding / packing slots carry ``-1``, and a merged
token weighs ``log(size)`` more as a key (proportional attention). :class:`KeyLayout` describes
that for one layer call; the rules of visibility are the model's own, on original positions:
causal (``kv_pos <= q_pos``), a sliding window (``q_pos - kv_pos < window``), and bidirectional
blocks (tokens of one image see each other, Gemma 3).

Every backend gets the same result; what enters the kernel differs:

* ``sdpa``: the log-size bias as one extra head dimension, ``q' = [q, 1]``,
  ``k' = [k, log(size) / scale]`` (both zero-padded to a multiple of 8, ``v`` alike, the output
  sliced back), so ``q'·k'·scale = q·k·scale + log(size)`` exactly; causal by ``is_causal`` when the
  rows are all tokens in position order (an unpadded prefill or a decode step), so SDPA may pick
  its flash kernel; a boolean mask only where visibility is not plain causal (padding, packing
  slots, a sliding window that cuts, image blocks, a chunk after a cache).
* ``eager``: the bias added to the scores it computes anyway (no mask tensor), softcapping first.
* ``flex_attention``: the bias in ``score_mod``, visibility in a block mask.
* ``flash_attention_2`` / ``_3``: the extra head dimension, causal (bottom-right) in the kernel,
  padding by the varlen kernel; a sliding window on original positions or image blocks cannot be
  expressed there and are refused.

:func:`route` is registered in transformers' ``AttentionInterface``; the attention modules of the
layers from the first reduction layer on call it (see :class:`RoutedConfig`), and it sends calls
without a reduction to the model's own backend unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["KeyLayout", "visible", "is_plain_causal", "attend", "RoutedConfig", "route", "ROUTE_NAME",
           "SUPPORTED_BACKENDS", "check_backend"]

ROUTE_NAME = "pact_vlm"
SUPPORTED_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_HEAD_MULTIPLE = 8      # fused kernels want head dims in multiples of 8
_FLASH_MAX_HEAD = 256


@dataclass
class KeyLayout:
    """What the queries and keys of one layer call are, in original positions.

    Attributes:
        q_pos: ``[B, q]`` long, original position of each query row; ``-1``: not a token
            (a packing slot, or a row dropped at layer 0 that stays masked).
        kv_pos: ``[B, K]`` long, original position of each key; ``-1``: not a token.
        kv_real: ``[B, K]`` bool, False for keys at padding positions of the 2-D attention mask, or None.
        kv_logsize: ``[B, K]`` float, ``log(size)`` of each key (0 = not merged), or None: no bias.
        q_group / kv_group: ``[B, q]`` / ``[B, K]`` long, the bidirectional block (image) of each
            row, ``-1`` for none; None when the layer has no such blocks.
        window: sliding window in positions (a key is visible iff ``q_pos - kv_pos < window``), or None.
    """

    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    kv_real: torch.Tensor | None = None
    kv_logsize: torch.Tensor | None = None
    q_group: torch.Tensor | None = None
    kv_group: torch.Tensor | None = None
    window: int | None = None
    memo: dict = field(default_factory=dict, compare=False, repr=False)   # per-layout derived tensors


def visible(layout: KeyLayout) -> torch.Tensor:
    """``[B, q, K]`` bool: which keys each query attends to.

    Query rows that are no token (and would see nothing) see every key instead, so no row of the
    softmax is empty (their outputs are never used). Computed once per layout."""
    if "visible" not in layout.memo:
        layout.memo["visible"] = _visible(layout)
    return layout.memo["visible"]


def _visible(layout: KeyLayout) -> torch.Tensor:
    q = layout.q_pos.unsqueeze(2)
    kv = layout.kv_pos.unsqueeze(1)
    key_ok = (layout.kv_pos >= 0) if layout.kv_real is None else (layout.kv_pos >= 0) & layout.kv_real
    allowed = kv <= q
    if layout.q_group is not None:
        same = (layout.q_group.unsqueeze(2) == layout.kv_group.unsqueeze(1)) & (layout.q_group.unsqueeze(2) >= 0)
        allowed = allowed | same
    if layout.window is not None:
        allowed = allowed & (q - kv < layout.window)
    allowed = allowed & key_ok.unsqueeze(1) & (q >= 0)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def is_plain_causal(layout: KeyLayout) -> bool:
    """True when visibility is exactly "each query row sees the keys up to its own index, counted
    from the end" (bottom-right causal) with every row and key a token: an unpadded prefill (the
    rows of the call are all the keys), a decode step, or a chunk whose keys are all visible.
    Then no mask is needed."""
    q, k = layout.q_pos.shape[1], layout.kv_pos.shape[1]
    if q > k or bool((layout.q_pos < 0).any()) or bool((layout.kv_pos < 0).any()):
        return False
    if layout.kv_real is not None and not bool(layout.kv_real.all()):
        return False
    if layout.q_group is not None and bool((layout.q_group >= 0).any()):
        return False
    # the last q keys must be the query rows themselves, every earlier key before them all
    if not torch.equal(layout.kv_pos[:, k - q:], layout.q_pos):
        return False
    if q > 1 and not bool((layout.q_pos[:, 1:] > layout.q_pos[:, :-1]).all()):
        return False
    if layout.window is not None:
        span = layout.q_pos[:, -1] - layout.kv_pos[:, 0]
        if bool((span >= layout.window).any()):
            return False
    return True


def _padded_dim(d: int) -> int:
    return -(-(d + 1) // _HEAD_MULTIPLE) * _HEAD_MULTIPLE


def with_bias_column(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, logsize: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q' = [q, 1, 0..]``, ``k' = [k, logsize / scaling, 0..]``, ``v' = [v, 0..]`` (head dim
    padded to a multiple of 8), so that ``scaling * q'·k' = scaling * q·k + logsize``.

    Args:
        query: ``[B, H, q, d]``; key, value: ``[B, H_kv, K, d]``; logsize: ``[B, K]``.
    """
    d = query.shape[-1]
    extra = _padded_dim(d) - d
    q_col = query.new_zeros(*query.shape[:-1], extra)
    q_col[..., 0] = 1.0
    k_col = key.new_zeros(*key.shape[:-1], extra)
    k_col[..., 0] = (logsize.to(torch.float32) / scaling).to(key.dtype).unsqueeze(1)
    return (torch.cat([query, q_col], dim=-1), torch.cat([key, k_col], dim=-1),
            F.pad(value, (0, extra)))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa(query, key, value, layout: KeyLayout, scaling: float, dropout: float, plain: bool):
    d = query.shape[-1]
    if layout.kv_logsize is not None:
        query, key, value = with_bias_column(query, key, value, layout.kv_logsize, scaling)
    n_rep = query.shape[1] // key.shape[1]
    if plain:
        mask, causal = None, query.shape[2] > 1 and query.shape[2] == key.shape[2]
        if query.shape[2] > 1 and not causal:       # a chunk after a cache: bottom-right causal
            mask = visible(layout).unsqueeze(1)
    else:
        mask, causal = visible(layout).unsqueeze(1), False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                         scale=scaling, enable_gqa=n_rep > 1)
    return out[..., :d].transpose(1, 2).contiguous(), None


def _eager(query, key, value, layout: KeyLayout, scaling: float, dropout: float, plain: bool,
           softcap: float | None, training: bool):
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if layout.kv_logsize is not None:
        scores = scores + layout.kv_logsize.to(scores.dtype)[:, None, None, :]
    q, k = query.shape[2], key.shape[2]
    if plain:
        if q > 1:
            hidden = torch.ones(q, k, dtype=torch.bool, device=query.device).triu(diagonal=k - q + 1)
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    else:
        scores = scores.masked_fill(~visible(layout).unsqueeze(1), torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _flex(query, key, value, layout: KeyLayout, scaling: float, softcap: float | None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, q, _ = query.shape
    k = key.shape[2]
    logsize = None if layout.kv_logsize is None else layout.kv_logsize.to(torch.float32)
    allowed = visible(layout)

    def score_mod(score, b_idx, h_idx, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if logsize is not None:
            score = score + logsize[b_idx, kv_idx]
        return score

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        return allowed[b_idx, q_idx, kv_idx]

    cuda = query.device.type == "cuda"
    if cuda:        # the block mask lets the fused kernel skip hidden blocks; made once per layout
        if "block_mask" not in layout.memo:
            layout.memo["block_mask"] = create_block_mask(mask_mod, b, None, q, k, device=query.device)
        block_mask = layout.memo["block_mask"]
    else:           # the reference implementation computes every score anyway: mask them in score_mod
        block_mask = None
        biased = score_mod

        def score_mod(score, b_idx, h_idx, q_idx, kv_idx):
            return torch.where(allowed[b_idx, q_idx, kv_idx], biased(score, b_idx, h_idx, q_idx, kv_idx),
                               -float("inf"))
    enable_gqa = h != key.shape[1]
    if enable_gqa and h & (h - 1):       # the fused kernel wants a power-of-two head count for GQA
        key, value = _repeat_kv(key, h // key.shape[1]), _repeat_kv(value, h // value.shape[1])
        enable_gqa = False
    if cuda:
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        out = compile_friendly_flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                              enable_gqa=enable_gqa, scale=scaling, training=False)
    else:
        # without torch.compile flex runs its reference implementation; on the CPU that is what
        # we want for correctness, and its warning about it would repeat on every layer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                 enable_gqa=enable_gqa, scale=scaling)
    if isinstance(out, tuple):
        out = out[0]
    return out.transpose(1, 2).contiguous(), None


def _flash(query, key, value, layout: KeyLayout, scaling: float, dropout: float, plain: bool, backend: str,
           softcap: float | None):
    if layout.window is not None and not plain and bool(_window_cuts(layout)):
        raise ValueError(f"{backend}: this layer's sliding window counts original positions, which the kernel's "
                         "token window cannot express after a reduction; load the model with "
                         "attn_implementation='sdpa' or 'flex_attention'")
    if layout.q_group is not None and bool((layout.q_group >= 0).any()):
        raise ValueError(f"{backend} cannot keep the bidirectional attention inside an image; load the model with "
                         "attn_implementation='sdpa' or 'flex_attention'")
    module = importlib.import_module(_FLASH_PACKAGES[backend])
    d = query.shape[-1]
    if layout.kv_logsize is not None:
        if _padded_dim(d) > _FLASH_MAX_HEAD:
            raise ValueError(f"{backend}: head dim {d} leaves no room for the proportional-attention column "
                             f"(kernels take at most {_FLASH_MAX_HEAD}); use attn_implementation='sdpa' or "
                             "'flex_attention', or proportional_attention=False")
        query, key, value = with_bias_column(query, key, value, layout.kv_logsize, scaling)
    q_bshd, k_bshd, v_bshd = (x.transpose(1, 2) for x in (query, key, value))
    extra = {} if softcap is None else {"softcap": softcap}
    if dropout:
        extra["dropout_p"] = dropout
    b, q = layout.q_pos.shape
    if plain:
        out = module.flash_attn_func(q_bshd, k_bshd, v_bshd, softmax_scale=scaling, causal=q > 1, **extra)
    else:
        key_ok = layout.kv_pos >= 0 if layout.kv_real is None else (layout.kv_pos >= 0) & layout.kv_real
        # the query rows are the last keys (the rows of this call); padding rows attend to nothing
        q_ok = key_ok[:, key_ok.shape[1] - q:] & (layout.q_pos >= 0)
        q_idx, k_idx = torch.nonzero(q_ok.flatten()).flatten(), torch.nonzero(key_ok.flatten()).flatten()
        q_len, k_len = q_ok.sum(1, dtype=torch.int32), key_ok.sum(1, dtype=torch.int32)
        cu_q = F.pad(q_len.cumsum(0, dtype=torch.int32), (1, 0))
        cu_k = F.pad(k_len.cumsum(0, dtype=torch.int32), (1, 0))
        flat = (lambda x: x.reshape(-1, *x.shape[2:]))
        packed = module.flash_attn_varlen_func(
            flat(q_bshd)[q_idx], flat(k_bshd)[k_idx], flat(v_bshd)[k_idx], cu_q, cu_k, int(q_len.max()),
            int(k_len.max()), softmax_scale=scaling, causal=True, **extra)
        if isinstance(packed, tuple):
            packed = packed[0]
        out = packed.new_zeros(b * q, *packed.shape[1:])
        out[q_idx] = packed
        out = out.view(b, q, *packed.shape[1:])
    if isinstance(out, tuple):
        out = out[0]
    return out[..., :d].contiguous(), None


def _window_cuts(layout: KeyLayout) -> torch.Tensor:
    span = layout.q_pos.unsqueeze(2) - layout.kv_pos.unsqueeze(1)
    causal = (span >= 0) & (layout.kv_pos >= 0).unsqueeze(1) & (layout.q_pos >= 0).unsqueeze(2)
    return (causal & (span >= layout.window)).any()


def attend(backend: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: KeyLayout, *,
           scaling: float, dropout: float = 0.0, softcap: float | None = None, training: bool = False,
           plain: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one layer call over a reduced sequence.

    Args:
        backend: one of :data:`SUPPORTED_BACKENDS`.
        query: ``[B, H, q, d]`` after rotary; key, value: ``[B, H_kv, K, d]`` (the cache's, if any).
        layout: the rows' and keys' original positions, padding, sizes, blocks and window.
        scaling: the logit scale; softcap: logit soft-capping (applied before the bias), or None.
        plain: :func:`is_plain_causal` of ``layout`` when the caller has it already.

    Returns:
        ``(output [B, q, H, d], weights [B, H, q, K] or None)``, as transformers' attention functions.
    """
    if plain is None:
        plain = is_plain_causal(layout)
    if backend == "sdpa":
        if softcap is not None and layout.kv_logsize is not None:
            raise ValueError("sdpa has no logit soft-capping; with proportional attention use "
                             "attn_implementation='eager' or 'flex_attention' for this model")
        return _sdpa(query, key, value, layout, scaling, dropout, plain)
    if backend == "eager":
        return _eager(query, key, value, layout, scaling, dropout, plain, softcap, training)
    if backend == "flex_attention":
        if dropout:
            raise ValueError("flex_attention does not support dropout; call model.eval()")
        return _flex(query, key, value, layout, scaling, softcap)
    if backend in _FLASH_PACKAGES:
        return _flash(query, key, value, layout, scaling, dropout, plain, backend, softcap)
    raise ValueError(f"attention implementation {backend!r} is not supported after a reduction; "
                     f"supported: {', '.join(SUPPORTED_BACKENDS)}")


def check_backend(backend: str | None) -> None:
    """Raise a ValueError naming the fix if ``backend`` cannot run the reduced layers here."""
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"attention implementation {backend!r} is not supported with a reduction; load the "
                         f"model with attn_implementation= one of {', '.join(SUPPORTED_BACKENDS)} "
                         "(or model.set_attn_implementation(...))")
    package = _FLASH_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"attention implementation {backend!r} needs the {package!r} package, which is not "
                         f"installed; install it (pip install {package.replace('_interface', '').replace('_', '-')}) "
                         "or load the model with attn_implementation='sdpa' or 'flex_attention'")


# -- routing the stock attention modules -------------------------------------------------------------

class RoutedConfig:
    """Stands in for an attention module's ``config`` while a reduction is applied: every read and
    write goes to the model's real config, except ``_attn_implementation``, which names
    :data:`ROUTE_NAME`, so the stock module calls :func:`route`. ``route`` then reads the real
    backend at every call (a backend switched after ``apply()`` is followed)."""

    __slots__ = ("_pact_real", "_pact_handler", "_pact_layer")

    def __init__(self, real, handler: Callable, layer: int):
        object.__setattr__(self, "_pact_real", real)
        object.__setattr__(self, "_pact_handler", handler)
        object.__setattr__(self, "_pact_layer", layer)

    def __getattr__(self, name: str) -> Any:
        if name == "_attn_implementation":
            return ROUTE_NAME
        return getattr(object.__getattribute__(self, "_pact_real"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_pact_real"), name, value)

    def __repr__(self) -> str:
        return f"RoutedConfig({self._pact_real!r})"


def model_backend(module, real_config) -> Callable:
    """The attention function the module would call without the reduction."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = real_config._attn_implementation
    own_eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if own_eager is None and impl == "eager":
        raise ValueError(f"{type(module).__name__}'s module defines no eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, own_eager)


def route(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as :data:`ROUTE_NAME` (see :class:`RoutedConfig`)."""
    config = module.config
    if not isinstance(config, RoutedConfig):
        raise RuntimeError(f"{type(module).__name__} calls the pact_vlm attention route without a routed config")
    handler, real = config._pact_handler, config._pact_real
    return handler(module, config._pact_layer, real, query, key, value, attention_mask, **kwargs)


def register_route() -> None:
    """Register :func:`route` in transformers' attention interface (idempotent)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ROUTE_NAME, route)


