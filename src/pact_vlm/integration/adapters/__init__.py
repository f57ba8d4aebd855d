"""Per-architecture knowledge, as data: one :class:`Adapter` per family, keyed by ``model_type``.

An adapter says where the text decoder layers are, which token ids are visual, which visual
placeholders are ``image_newline`` embeddings (never reduced), the earliest layer a reduction may
start at, how the attention module computes its queries and keys, and (``geometry``) which image
region each visual token stands for.

One module per architecture family registers its adapters: ``llava`` (LLaVA-1.5), ``llava_next``
(LLaVA-NeXT, LLaVA-OneVision), ``qwen_vl`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V), ``internvl``, ``gemma``
(Gemma 3), ``mistral3`` (Mistral 3), ``idefics3`` (Idefics3, SmolVLM),
``qwen3_5`` (Qwen3.5, hybrid linear / full attention), Gemma 4 (in ``gemma``: KV-shared layers,
per-layer inputs); Llama 4 (``llama4``) is refused with its reasons.
"""

from __future__ import annotations

import inspect
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
        attention_path: attribute of a decoder layer holding its softmax attention module.
        supported_kinds: the layer types (``config.layer_types``) the integration can run after a
            reduction; a model with other types from the reduction layer on is refused.
        bidirectional_kinds: layer types in which the tokens of one image attend to each other
            in both directions (Gemma 3); the blocks come from :attr:`blocks`.
        blocks: ``blocks(config, inputs, placeholders, past) -> [B, T] long or None``: the
            bidirectional block (image) of each position of the call, ``-1`` for none, from the inner
            model's inputs (``past``: the length the cache held before the call; None: the model has
            no such blocks in this call).
        row_kwargs: per-position inputs of the decoder layers (besides the rotary tables) that
            follow the kept rows, by parameter name (inputs passed by position after the hidden
            states count by their name, e.g. Gemma 4's ``per_layer_input``).
        mask_2d_kinds: layer types that take a 2-D 0/1 padding mask instead of an attention mask.
        groups: ``groups(config, input_ids, placeholders, inputs) -> [B, T] long``: the image / video each
            placeholder belongs to (``group="image"`` reduces each on its own; ``inputs``: the
            inner model's tensor inputs, e.g. ``image_sizes``), or None for "each contiguous run
            of placeholders is one image" (families whose images are split by text markers, e.g.
            rows or tiles, name their own).
        recurrent_kinds: layer types with a recurrent state instead of softmax attention and a KV
            cache (Qwen3.5's gated delta net): the reduced rows pass through them (their 2-D padding
            mask from :attr:`mask_2d_kinds`), but a reduction is never scored at one, so a
            reduction layer of such a type, and a progressive reduction over them, are refused.
        query_gate: ``q_proj`` outputs each head's query followed by an output gate (Qwen3.5): the
            queries are the first half of each head's output.
        refused: why the family is not supported (``apply()``, ``viz`` and ``select-layer`` refuse
            it with this reason), or None.
        min_layer_reason: what layers before :attr:`min_layer` have that forbids a reduction there
            (completes "layers 0..L-1 ...", named in the refusal).
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
    attention_path: str = "self_attn"
    supported_kinds: tuple[str, ...] = ("full_attention", "sliding_attention")
    bidirectional_kinds: tuple[str, ...] = ()
    blocks: Callable[[object, dict, torch.Tensor, int], torch.Tensor | None] | None = None
    row_kwargs: tuple[str, ...] = ("position_ids",)
    mask_2d_kinds: tuple[str, ...] = ()
    groups: Callable[[object, torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None
    recurrent_kinds: tuple[str, ...] = ()
    query_gate: bool = False
    min_layer_reason: str = "receive deepstack visual features"
    refused: str | None = None

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

    def inner(self, model) -> torch.nn.Module:
        """The module that receives ``input_ids`` and the visual inputs."""
        return _attr_path(model, self.inner_model)

    # -- which tokens are reducible --------------------------------------------------------------
    def placeholders(self, config, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: every visual placeholder position (``image_newline`` ones included)."""
        ids = torch.tensor(self.visual_token_ids(config), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def placeholder_runs(self, config, input_ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """Contiguous runs of visual placeholders in ``input_ids`` ``[T]``: ``(start, length, token_id)``
        (one image or video each; ``image_newline`` placeholders are inside their image's run)."""
        ids = set(self.visual_token_ids(config))
        runs, row = [], input_ids.tolist()
        i = 0
        while i < len(row):
            if row[i] in ids:
                j = i
                while j < len(row) and row[j] == row[i]:
                    j += 1
                runs.append((i, j - i, row[i]))
                i = j
            else:
                i += 1
        return runs

    def fixed_placeholders(self, model, inputs_embeds: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: placeholders that are never reduced, found from the text model's input
        embeddings (``image_newline`` embeddings share the image token id in LLaVA-NeXT / OneVision)."""
        newline = self.newline(model)
        if newline is None:
            return torch.zeros_like(placeholders)
        return placeholders & (inputs_embeds == newline.to(inputs_embeds.dtype)).all(dim=-1)

    def reducible(self, model, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` bool: the visual tokens a reduction may touch. For families with
        ``image_newline`` embeddings, ``inputs_embeds`` (the text model's input) tells them apart;
        without it a ValueError names the fix."""
        placeholders = self.placeholders(model.config, input_ids)
        if self.newline_param is None:
            return placeholders
        if inputs_embeds is None:
            raise ValueError(f"{self.name}: image_newline placeholders share the image token id; pass the text "
                             "model's inputs_embeds to tell them apart")
        return placeholders & ~self.fixed_placeholders(model, inputs_embeds, placeholders)

    def image_groups(self, config, input_ids: torch.Tensor, placeholders: torch.Tensor, inputs: dict | None = None
                     ) -> torch.Tensor:
        """``[B, T]`` long: index of the image / video of each placeholder (any value elsewhere)."""
        if self.groups is not None:
            return self.groups(config, input_ids, placeholders, inputs or {})
        starts = placeholders & ~torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
        return (starts.long().cumsum(dim=1) - 1).clamp(min=0)

    def placeholders_per_image(self, config, input_ids: torch.Tensor, inputs: dict | None = None) -> list[int]:
        """Placeholders (``image_newline`` ones included) of each image of one prompt ``input_ids [T]``,
        in order, as :meth:`image_groups` splits them (video placeholders left out)."""
        image_id = getattr(config, "image_token_id", None)
        placeholders = self.placeholders(config, input_ids[None])
        if image_id is not None:
            placeholders &= input_ids[None] == int(image_id)
        groups = self.image_groups(config, input_ids[None], placeholders, inputs)[0][placeholders[0]]
        if groups.numel() == 0:
            return []
        change = torch.ones_like(groups, dtype=torch.bool)
        change[1:] = groups[1:] != groups[:-1]
        starts = torch.nonzero(change).flatten().tolist() + [groups.numel()]
        return [b - a for a, b in zip(starts[:-1], starts[1:])]

    def block_ids(self, config, inputs: dict, placeholders: torch.Tensor, past: int = 0) -> torch.Tensor | None:
        return None if self.blocks is None else self.blocks(config, inputs, placeholders, past)

    # -- per-layer policy -------------------------------------------------------------------------
    def layer_kind(self, model, index: int) -> str:
        """The type of decoder layer ``index`` (``config.layer_types``; ``"full_attention"`` without it)."""
        kinds = getattr(model.config.get_text_config(), "layer_types", None)
        return kinds[index] if kinds else "full_attention"

    def attention(self, layer) -> torch.nn.Module | None:
        """The softmax attention module of a decoder layer (None: the layer has none)."""
        return getattr(layer, self.attention_path, None)

    def computes_keys(self, layer) -> bool:
        """Whether a decoder layer projects its own keys (False: no softmax attention, or Gemma 4's
        KV-shared layers, which reuse an earlier layer's keys and values)."""
        attn = self.attention(layer)
        return attn is not None and getattr(attn, "k_proj", None) is not None

    def check_layers(self, model, first: int, progressive: bool = False) -> None:
        """Refuse, naming the reason, a model whose layers from ``first`` on this adapter cannot run
        reduced (``progressive``: every one of them reduces)."""
        layers = self.layers(model)
        for i in range(first, len(layers)):
            kind = self.layer_kind(model, i)
            if kind not in self.supported_kinds:
                raise ValueError(f"{self.name}: decoder layer {i} is a {kind!r} layer, which the reduction does not "
                                 f"support (supported after the reduction layer: {', '.join(self.supported_kinds)})")
            if kind in self.recurrent_kinds:
                if i == first or progressive:
                    softmax = [j for j in range(self.min_layer(model.config), len(layers))
                               if self.layer_kind(model, j) not in self.recurrent_kinds]
                    raise ValueError(f"{self.name}: decoder layer {i} is a {kind!r} layer (a recurrent state, no "
                                     "softmax attention): a reduction is scored with a layer's attention queries and "
                                     "keys, so it cannot reduce there" + (" (a progressive reduction reduces at every "
                                     "layer; use progressive=False)" if progressive and i != first else
                                     f"; choose a layer of another type: one of {softmax[:8]}"))
                continue
            if self.attention(layers[i]) is None:
                raise ValueError(f"{self.name}: decoder layer {i} has no attention module at "
                                 f"'{self.attention_path}'")
            if (i == first or progressive) and not self.computes_keys(layers[i]):
                raise ValueError(f"{self.name}: decoder layer {i} computes no keys of its own (it reuses an earlier "
                                 "layer's), so a reduction cannot be scored there; choose an earlier layer")

    # -- queries and keys of a layer's attention ----------------------------------------------
    def _queries(self, attn, normed: torch.Tensor) -> torch.Tensor:
        """``[..., H, d_h]`` queries before any norm, from ``normed [..., D]``."""
        q = attn.q_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim * (2 if self.query_gate else 1))
        return q[..., :attn.head_dim] if self.query_gate else q

    def queries_keys(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, queries: bool = True,
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
        q = self._queries(attn, normed) if queries else None
        k = attn.k_proj(normed).view(b, t, -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:      # Qwen3: per-head RMSNorm before rotary
            q = attn.q_norm(q) if q is not None else None
            k = attn.k_norm(k)
        rotated = _rotate(attn, k.transpose(1, 2), cos, sin, key=True).transpose(1, 2)
        return q, k, rotated

    @staticmethod
    def rotate_queries(layer, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, d_h]`` queries after the layer's own rotary function."""
        return _rotate(layer.self_attn, q.transpose(1, 2), cos, sin, key=False).transpose(1, 2)

    def mean_query(self, layer, normed: torch.Tensor) -> torch.Tensor:
        """EUTI's ``Q_global``: the mean of layer ``layer``'s queries before rotary over the rows
        ``normed [N, D]`` of its normalised input (``input_layernorm`` applied), as ``[H, d_h]``
        float32.

        ``q_proj`` is affine, so the mean query is ``q_proj`` of the mean normalised input: one
        row through the projection instead of ``N``. A per-head query norm (Qwen3) is not affine;
        there every row's query is computed and averaged.
        """
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(self._queries(attn, normed))
            return q.float().mean(dim=0)
        mean = normed.mean(dim=0, keepdim=True, dtype=torch.float32).to(normed.dtype)
        return self._queries(attn, mean)[0].float()


def _rotate(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, key: bool) -> torch.Tensor:
    """``x [B, H, T, d]`` after the rotary function of ``attn``'s modeling module: most take
    ``(q, k, cos, sin)`` and return both; Gemma 4's takes one tensor ``(x, cos, sin)``."""
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if next(iter(inspect.signature(rotate).parameters)) == "x":
        return rotate(x, cos, sin)
    return rotate(x, x, cos, sin)[1 if key else 0]


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def supported_models() -> list[str]:
    """Names of the supported ``transformers`` classes."""
    return sorted({c for a in ADAPTERS.values() if a.refused is None for c in a.classes})


def get_adapter(model) -> Adapter:
    """The adapter for ``model``, or a ValueError listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(f"model type {model_type!r} ({type(model).__name__}) is not supported; "
                         f"supported classes: {', '.join(supported_models())}")
    if adapter.refused is not None:
        raise ValueError(f"{adapter.name} ({type(model).__name__}) is not supported: {adapter.refused}")
    try:
        adapter.layers(model)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no decoder layers at "
                         f"'{adapter.language_model}.layers'; pass the *ForConditionalGeneration model "
                         f"(supported: {', '.join(supported_models())})") from None
    return adapter


# the family modules register their adapters on import
from . import gemma, idefics3, internvl, llama4, llava, llava_next, mistral3, qwen3_5, qwen_vl  # noqa: E402,F401
