"""Per-architecture knowledge, as data: one :class:`Adapter` per family, keyed by ``model_type``.

An adapter says where the text decoder layers are, which token ids are visual, which visual
placeholders are ``image_newline`` embeddings (never reduced), the earliest layer a reduction may
start at, how the attention module computes its queries and keys, and (``geometry``) which image
region each visual token stands for.

One module per architecture family registers its adapters: ``llava`` (LLaVA-1.5), ``llava_next``
(LLaVA-NeXT, LLaVA-OneVision), ``qwen_vl`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), ``internvl``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .geometry import ImageLayout, TokenBoxes

__all__ = ["Adapter", "ADAPTERS", "ImageLayout", "TokenBoxes", "get_adapter", "supported_models",
           "register_adapter"]


def _attr_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@dataclass(frozen=True)
class Adapter:
    """What the integration needs to know about one architecture family.

    Attributes:
        name: human name (shown in errors and the README table).
        model_types: the ``config.model_type`` values it serves.
        classes: the ``transformers`` class names it was written and tested for.
        inner_model: attribute path from the top model to the model that receives ``input_ids``.
        language_model: attribute path from the top model to the text decoder.
        token_id_attrs: config attributes holding the image / video placeholder token ids.
        newline_param: attribute path to the ``image_newline`` parameter whose embeddings share the
            image token id and must never be reduced, or ``None``.
        min_layer: earliest layer index a reduction may start at, from the config (e.g. past Qwen3-VL's
            deepstack layers).
        geometry: ``geometry(config, layout: ImageLayout) -> TokenBoxes``, the image region of each
            reducible visual token of one image (see :mod:`.geometry`), or ``None``.
    """

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    token_id_attrs: tuple[str, ...]
    inner_model: str = "model"
    language_model: str = "model.language_model"
    newline_param: str | None = None
    min_layer: Callable[[object], int] = field(default=lambda config: 0)
    geometry: Callable[[object, ImageLayout], TokenBoxes] | None = None

    # -- lookups -------------------------------------------------------------------------------
    def text_model(self, model) -> torch.nn.Module:
        return _attr_path(model, self.language_model)

    def layers(self, model) -> torch.nn.ModuleList:
        return self.text_model(model).layers

    def visual_token_ids(self, config) -> list[int]:
        ids = []
        for attr in self.token_id_attrs:
            value = getattr(config, attr, None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{self.name}: the model config has none of {self.token_id_attrs}; "
                             "cannot tell which tokens are visual")
        return ids

    def newline(self, model) -> torch.Tensor | None:
        return None if self.newline_param is None else _attr_path(model, self.newline_param)

    # -- queries and keys of a layer's attention ----------------------------------------------
    @staticmethod
    def queries_keys(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, queries: bool = True,
                     normed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Recompute layer ``layer``'s attention queries and keys from its input.

        Args:
            hidden: ``[B, T, D]`` the layer's input.
            cos, sin: the rotary tables the layer receives (``[B or 1, T, d_h]``).
            queries: compute every token's query (``False``: return ``None`` in its place; EUTI
                needs only the mean query, see :meth:`mean_query`).
            normed: ``layer.input_layernorm(hidden)`` when the caller has it already.

        Returns:
            ``(queries [B, T, H, d_h] or None, keys [B, T, H_kv, d_h], rotated_keys [B, T, H_kv, d_h])``;
            queries and keys before rotary, as EUTI uses them.
        """
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden) if normed is None else normed
        b, t, _ = hidden.shape
        head_dim = attn.head_dim
        q = attn.q_proj(normed).view(b, t, -1, head_dim) if queries else None
        k = attn.k_proj(normed).view(b, t, -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:      # Qwen3: per-head RMSNorm before rotary
            q = attn.q_norm(q) if q is not None else None
            k = attn.k_norm(k)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        k_t = k.transpose(1, 2)
        rotated = rotate(k_t, k_t, cos, sin)[1].transpose(1, 2)
        return q, k, rotated

    @staticmethod
    def mean_query(layer, normed: torch.Tensor) -> torch.Tensor:
        """EUTI's ``Q_global``: the mean of layer ``layer``'s queries before rotary over the rows
        ``normed [N, D]`` of its normalised input (``input_layernorm`` applied), as ``[H, d_h]``
        float32.

        ``q_proj`` is affine, so the mean query is ``q_proj`` of the mean normalised input: one
        row through the projection instead of ``N``. A per-head query norm (Qwen3) is not affine;
        there every row's query is computed and averaged.
        """
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(attn.q_proj(normed).view(normed.shape[0], -1, attn.head_dim))
            return q.float().mean(dim=0)
        mean = normed.mean(dim=0, keepdim=True, dtype=torch.float32).to(normed.dtype)
        return attn.q_proj(mean).view(-1, attn.head_dim).float()


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def supported_models() -> list[str]:
    """Names of the supported ``transformers`` classes."""
    return sorted({c for a in ADAPTERS.values() for c in a.classes})


def get_adapter(model) -> Adapter:
    """The adapter for ``model``, or a ValueError listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(f"model type {model_type!r} ({type(model).__name__}) is not supported; "
                         f"supported classes: {', '.join(supported_models())}")
    try:
        adapter.layers(model)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no decoder layers at "
                         f"'{adapter.language_model}.layers'; pass the *ForConditionalGeneration model "
                         f"(supported: {', '.join(supported_models())})") from None
    return adapter


# the family modules register their adapters on import
from . import internvl, llava, llava_next, qwen_vl  # noqa: E402,F401
