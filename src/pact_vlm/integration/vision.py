"""Vision-side knowledge the comparison methods need, per architecture.

* :class:`VisionTap`: hooks on the vision tower that read the attention of its layers (the CLS
  attention of a CLIP tower, LLaVA-1.5 / LLaVA-NeXT, for PruMerge, HiRED and VisionZip; the mean
  attention received in LLaVA-OneVision's SigLIP tower, for VisionZip), merge PruMerge's and
  VisionZip's kept features before the projector, and map per-patch values to the language model's
  placeholder positions.
* :func:`token_grid`: the ``(view, row, col)`` of every visual token (spatial pooling).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from ..algorithms import baselines as bl
from ..config import ReductionConfig
from ..methods import HiREDConfig, PruMergeConfig, VisionZipConfig

__all__ = ["VisionTap", "token_grid", "check_grid_support"]

_CLS_MODELS = ("llava", "llava_next")
_MEAN_ATTENTION_MODELS = ("llava_onevision",)     # VisionZip only: no CLS token, patches 1:1 with LM tokens
_GRID_MODELS = ("llava", "internvl", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _encoder_layers(tower) -> torch.nn.ModuleList:
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")


class _PerThread:
    """An attribute of :class:`VisionTap` that each thread sees on its own (default from ``make``)."""

    def __init__(self, make):
        self.make = make

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, tap, owner=None):
        if tap is None:
            return self
        local = tap._local
        if not hasattr(local, self.name):
            setattr(local, self.name, self.make())
        return getattr(local, self.name)

    def __set__(self, tap, value):
        setattr(tap._local, self.name, value)


class VisionTap:
    """Attention in the vision tower, for PruMerge / HiRED / VisionZip.

    Per call with pixels: forward hooks on the ``q_proj`` / ``k_proj`` of the vision layers the
    method reads record their outputs ``[V, 1 + P, C]`` (V views: images or anyres tiles; ``[V, P, C]``
    on LLaVA-OneVision's SigLIP tower, which has no CLS token); for
    PruMerge and VisionZip a pre-hook on the projector replaces the kept tokens' features with the
    merged ones;
    :meth:`extras` then maps the per-patch results to the placeholder positions of the prompt.

    Raises:
        ValueError: the model is not LLaVA-1.5 / LLaVA-NeXT with a CLIP tower, a CLS token and the
            ``"default"`` feature strategy (one integer feature layer), or, for VisionZip, not that or
            LLaVA-OneVision with a SigLIP tower and the ``"full"`` strategy. A tower whose patches do
            not map one-to-one to the language model's tokens (Qwen's 2x2 patch merger, InternVL's and
            Idefics3's pixel shuffle, Gemma 3's pooling, Pixtral's patch merger) is refused.
    """

    captured = _PerThread(dict)          # (layer, "q_proj" / "k_proj") -> [V, 1 + P, C]
    image_sizes = _PerThread(lambda: None)
    views = _PerThread(lambda: None)           # tower passes per image, as pack_image_features split them
    pack_kwargs = _PerThread(dict)
    view_keep = _PerThread(lambda: None)

    def __init__(self, model, config: ReductionConfig):
        mc = model.config
        name = type(config).__name__
        mean_attention = isinstance(config, VisionZipConfig) and mc.model_type in _MEAN_ATTENTION_MODELS
        if mc.model_type not in _CLS_MODELS and not mean_attention:
            also = (" and, with the mean attention received, LLaVA-OneVision (model_type 'llava_onevision')"
                    if isinstance(config, VisionZipConfig) else "")
            raise ValueError(f"{name} reads the CLS attention of a CLIP vision tower and supports LLaVA-1.5 and "
                             f"LLaVA-NeXT (model_type 'llava', 'llava_next'){also}; {type(model).__name__} "
                             f"(model_type {mc.model_type!r}) has neither a CLS token nor vision patches that map "
                             "one-to-one to the language model's visual tokens; use DivPruneConfig (before the "
                             "language model, no attention needed) or a method that works in the language model "
                             "(e.g. PACTConfig, FastVConfig, DARTConfig)")
        vision_type = getattr(mc.vision_config, "model_type", None)
        want_type, want_strategy = (("siglip_vision_model", "full") if mean_attention
                                    else ("clip_vision_model", "default"))
        if vision_type != want_type:
            what = "no CLS token: the mean attention received" if mean_attention else "with a CLS token"
            raise ValueError(f"{name} on {mc.model_type!r} needs a {want_type!r} vision tower ({what}); this "
                             f"model's vision tower is {vision_type!r}")
        strategy = getattr(mc, "vision_feature_select_strategy", None)
        if strategy != want_strategy:
            why = "every patch passed on" if mean_attention else "CLS token dropped after the tower"
            raise ValueError(f"{name} needs vision_feature_select_strategy={want_strategy!r} ({why}); this model "
                             f"uses {strategy!r}")
        self.cls = 0 if mean_attention else 1      # rows before the patches in the tower's sequence
        feature_layer = getattr(mc, "vision_feature_layer", None)
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise ValueError(f"{name} needs one integer vision_feature_layer; this model uses {feature_layer!r}")
        self.model = model
        self.config = config
        self.tower = model.model.vision_tower
        self.layers = _encoder_layers(self.tower)
        n = len(self.layers)
        select = feature_layer % (n + 1)           # index into hidden_states (0 = embeddings)
        if select == 0:
            raise ValueError(f"vision_feature_layer={feature_layer} selects the patch embeddings; {name} needs "
                             "the output of a transformer layer")
        self.heads = self.layers[0].self_attn.num_heads
        if isinstance(config, PruMergeConfig):
            # the layer whose input is the selected features (reference: layer 23 for -2 of 24)
            self.read = {"merge": min(select, n - 1)}
        elif isinstance(config, HiREDConfig):
            # reference: layer 0 for the budget, layer 22 (output = hidden_states[-2]) for the selection
            self.read = {"initial": 0, "final": select - 1}
        elif isinstance(config, VisionZipConfig):
            # reference: attention and keys of layer -2, the one whose output is the selected features
            self.read = {"zip": select - 1}
        else:
            raise ValueError(f"{name} does not read the vision tower")
        self.image_token_id = int(mc.image_token_id)
        # the readings of one call live in the calling thread (two threads may share the model)
        self._local = threading.local()

    # -- hooks ----------------------------------------------------------------------------------
    # The vision tower may run before the language model's call (generate() encodes the images
    # first and passes ``mm_encoder_outputs``) or inside it: every run of the tower overwrites the
    # readings, and the first reduction layer consumes them.
    def attach(self) -> list:
        """Register the hooks; returns objects with ``.remove()``."""
        hooks = []
        for idx in sorted(set(self.read.values())):
            attn = self.layers[idx].self_attn
            for proj in ("q_proj", "k_proj"):
                hooks.append(getattr(attn, proj).register_forward_hook(self._capture(idx, proj)))
        if isinstance(self.config, (PruMergeConfig, VisionZipConfig)):
            hooks.append(self.model.model.multi_modal_projector.register_forward_pre_hook(self._merge))
        if self.model.config.model_type in ("llava_next", "llava_onevision"):
            hooks.append(_record_image_sizes(self.model.model, self))
        if self.model.config.model_type == "llava_onevision":
            hooks.append(_refuse_videos(self.model.model, type(self.config).__name__))
        return hooks

    def _capture(self, idx: int, proj: str):
        def hook(module, args, output):
            self.captured[idx, proj] = output.detach()
        return hook

    def _attention(self, which: str, heads: int | None) -> torch.Tensor:
        idx = self.read[which]
        if (idx, "q_proj") not in self.captured:
            raise RuntimeError(f"the vision tower did not run in this call; {type(self.config).__name__} needs "
                               "pixel_values in the same call as the prompt")
        q, k = self.captured[idx, "q_proj"], self.captured[idx, "k_proj"]
        if self.cls == 0:
            return bl.mean_attention_received(q, k, heads)
        return bl.cls_attention(q, k, heads)

    def _merge(self, module, args):
        if not args:
            return None
        features = args[0]                                        # [V, P, C] CLS already dropped
        if isinstance(self.config, VisionZipConfig):
            return (self._zip(features),) + tuple(args[1:])
        cfg: PruMergeConfig = self.config
        attn = self._attention("merge", None)                     # [V, P]
        keys = self.captured[self.read["merge"], "k_proj"][:, 1:]
        if attn.shape != features.shape[:2]:
            raise ValueError(f"PruMerge: CLS attention covers {tuple(attn.shape)} patches but the projector "
                             f"receives {tuple(features.shape[:2])}")
        new = features.clone()
        keep = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        for v in range(features.shape[0]):
            idx = bl.prumerge_select(attn[v], cfg.keep_ratio, cfg.plus)
            new[v, idx] = bl.prumerge_merge(features[v], keys[v], attn[v], idx, cfg.neighbors)
            keep[v, idx] = True
        self.view_keep = keep
        return (new,) + tuple(args[1:])

    def _zip(self, features: torch.Tensor) -> torch.Tensor:
        """VisionZip per view: dominant tokens as they are, each contextual target replaced by the
        mean of its group; records which tokens stay."""
        cfg: VisionZipConfig = self.config
        attn = self._attention("zip", self.heads)                 # [V, P], per-head softmax summed
        keys = self.captured[self.read["zip"], "k_proj"][:, self.cls:]    # [V, P, C]
        v_total, p = attn.shape
        if (v_total, p) != tuple(features.shape[:2]):
            raise ValueError(f"VisionZip: the tower's attention covers {tuple(attn.shape)} patches but the projector "
                             f"receives {tuple(features.shape[:2])}")
        metric = keys.reshape(v_total, p, self.heads, -1).mean(dim=2)     # keys averaged over heads
        new = features.clone()
        keep = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        for v in range(v_total):
            red = bl.visionzip_reduce(features[v], attn[v], metric[v], cfg.keep_ratio, cfg.contextual_share)
            new[v, red.keep_index] = red.hidden
            keep[v, red.keep_index] = True
        self.view_keep = keep
        return new

    # -- per-placeholder values -------------------------------------------------------------------
    def _num_views(self, total: int) -> list[int]:
        """Views (tower passes) per image, in order (``total`` views in all), as the model packed them."""
        mc = self.model.config
        if mc.model_type == "llava":
            return [1] * total
        if self.views is None:
            raise RuntimeError(f"the image sizes of this call were not recorded ({type(self.model).__name__}'s "
                               "pack_image_features did not run)")
        if sum(self.views) != total:
            raise ValueError(f"the model packed {sum(self.views)} views but the vision tower saw {total}")
        return self.views

    def _to_placeholders(self, per_view: torch.Tensor) -> torch.Tensor:
        """``[V, P, C]`` per-patch values -> ``[n_placeholders, C]`` in prompt order (NaN = newline).

        Packs them as the model packs its features, with each patch's index alongside; refuses an
        image whose packing resamples the patches (LLaVA-OneVision downscales a large tile grid,
        ``vision_aspect_ratio``), where a placeholder is no longer one patch."""
        mc = self.model.config
        if mc.model_type == "llava":
            return per_view.reshape(-1, per_view.shape[-1])
        v, p, c = per_view.shape
        index = torch.arange(v * p, dtype=torch.float32, device=per_view.device).view(v, p, 1)
        both = torch.cat([per_view.float(), index], dim=-1)
        parts = list(torch.split(both, self._num_views(v), dim=0))
        newline = torch.full((c + 1,), math.nan, dtype=both.dtype, device=both.device)
        if mc.model_type == "llava_onevision":
            aspect = self.pack_kwargs.get("vision_aspect_ratio", mc.vision_aspect_ratio)
            packed, _ = _ORIGINAL_PACK(self.model.model, parts, self.image_sizes, image_newline=newline,
                                       vision_aspect_ratio=aspect)
        else:
            aspect = None
            packed, _ = _ORIGINAL_PACK(self.model.model, parts, self.image_sizes,
                                       vision_feature_select_strategy="default", image_newline=newline)
        flat = torch.cat(list(packed), dim=0)
        idx = flat[:, -1]
        real = idx[~idx.isnan()]
        if not (torch.equal(real, real.round()) and real.unique().numel() == real.numel()):
            sizes = [tuple(int(x) for x in s) for s in self.image_sizes.tolist()]
            raise ValueError(f"{type(self.config).__name__}: {type(self.model).__name__} resamples the tile grid of an "
                             f"image after the vision tower (image sizes {sizes}, vision_aspect_ratio {aspect!r}), so "
                             "its placeholders are no longer one patch each and the reduction cannot be placed; "
                             "use smaller images (fewer anyres tiles) or DivPruneConfig")
        return flat[:, :-1].to(per_view.dtype)

    def extras(self, input_ids: torch.Tensor, placeholders: torch.Tensor, visual: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Per position ``[B, T, ...]`` values the reducer reads (only visual positions are read).

        Consumes this call's readings of the vision tower."""
        try:
            return self._extras(input_ids)
        finally:
            self.captured, self.view_keep = {}, None

    def _extras(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.config, (PruMergeConfig, VisionZipConfig)):
            if self.view_keep is None:
                raise RuntimeError(f"the projector did not run for this call; {type(self.config).__name__} needs "
                                   "pixel_values")
            flat = self._to_placeholders(self.view_keep.float()[..., None])
            return {"keep": self._scatter(flat, input_ids)[..., 0] > 0.5}
        final = self._attention("final", self.heads)                # [V, P]
        initial = self._attention("initial", self.heads)
        v_total, p = final.shape
        views = self._num_views(v_total)
        side = math.isqrt(p)
        max_tiles = max(max(views) - 1, 1)
        image_of = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views)).to(final.device)
        view_local = torch.cat([torch.arange(n) for n in views]).to(final.device)
        weights = torch.zeros(v_total, max_tiles, device=final.device)
        start = 0
        for i, n in enumerate(views):
            if n > 1:
                from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

                mc = self.model.config
                rows, cols = get_anyres_image_grid_shape(tuple(self.image_sizes[i].tolist()),
                                                         mc.image_grid_pinpoints, mc.vision_config.image_size)
                w = bl.tile_weights(initial[start].view(side, side), self.config.alpha, (rows, cols))
                weights[start:start + n, : w.numel()] = w.to(weights.device)
            start += n
        per_view = torch.cat([
            image_of[:, None, None].float().expand(-1, p, 1),
            view_local[:, None, None].float().expand(-1, p, 1),
            final[..., None],
            weights[:, None, :].expand(-1, p, -1)], dim=-1)
        flat = self._scatter(self._to_placeholders(per_view), input_ids)
        return {"image": flat[..., 0].nan_to_num(-1).long(), "view": flat[..., 1].nan_to_num(-1).long(),
                "final_attention": flat[..., 2].nan_to_num(0.0), "tile_weights": flat[..., 3:].nan_to_num(0.0)}

    def _scatter(self, flat: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        where = input_ids == self.image_token_id
        count = int(where.sum())
        if count != flat.shape[0]:
            raise ValueError(f"the prompt has {count} image placeholders but the vision tower produced "
                             f"{flat.shape[0]} image features; check the processor's output")
        out = torch.full((*input_ids.shape, flat.shape[-1]), math.nan, dtype=flat.dtype, device=flat.device)
        out[where.to(flat.device)] = flat
        return out


def _original_pack(inner, *args, **kwargs):
    return type(inner).pack_image_features(inner, *args, **kwargs)


_ORIGINAL_PACK = _original_pack


class _InstanceOverride:
    """An instance attribute over one of the inner model's methods; ``remove()`` deletes it, which
    restores the class method exactly."""

    def __init__(self, inner, attr: str, fn):
        if attr in vars(inner):
            raise ValueError(f"{attr} of this model is already wrapped (another pact_vlm handle?)")
        self.inner, self.attr, self.wrapper = inner, attr, fn
        setattr(inner, attr, fn)

    def remove(self) -> None:
        if vars(self.inner).get(self.attr) is self.wrapper:
            delattr(self.inner, self.attr)


def _record_image_sizes(inner, tap: VisionTap) -> _InstanceOverride:
    """Records the ``image_sizes``, the views per image and the keyword arguments LLaVA-NeXT's /
    OneVision's ``get_image_features`` packs with (generate() does not pass them to the model's
    forward)."""
    def pack_image_features(image_features, image_sizes, *args, **kwargs):
        tap.image_sizes = image_sizes
        tap.views = [int(f.shape[0]) for f in image_features]
        tap.pack_kwargs = dict(kwargs)
        return _original_pack(inner, image_features, image_sizes, *args, **kwargs)

    return _InstanceOverride(inner, "pack_image_features", pack_image_features)


def _refuse_videos(inner, name: str) -> _InstanceOverride:
    """LLaVA-OneVision pools video frames after the projector, so a frame's features are not its
    patches: a method that merges on the vision features refuses a video."""
    def get_video_features(*args, **kwargs):
        raise ValueError(f"{name} reduces images only on {type(inner).__name__}: its video frames are pooled "
                         "after the projector, so their features are not one patch each; pass the video "
                         "without this reduction, or use DivPruneConfig or a method in the language model")

    return _InstanceOverride(inner, "get_video_features", get_video_features)


# -- grids for pooling ----------------------------------------------------------------------------

def check_grid_support(model) -> None:
    """Raise a ValueError if :func:`token_grid` cannot lay out this model's visual tokens."""
    mc = model.config
    if mc.model_type not in _GRID_MODELS:
        raise ValueError(f"spatial pooling does not know the visual token layout of model_type {mc.model_type!r}; "
                         f"supported: {', '.join(_GRID_MODELS)}")
    if mc.model_type in ("llava", "internvl"):
        n = getattr(mc, "image_seq_length", None)
        if not isinstance(n, int) or math.isqrt(n) ** 2 != n:
            raise ValueError(f"spatial pooling needs a square token grid per image (image_seq_length), got {n!r}; "
                             "use vision_feature_select_strategy='default' (no CLS token among the visual tokens)")


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of the runs of True in a 1-D bool mask."""
    idx = torch.nonzero(mask).flatten().tolist()
    runs = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def token_grid(model, input_ids: torch.Tensor, placeholders: torch.Tensor, visual: torch.Tensor,
               inputs: dict[str, Any]) -> torch.Tensor:
    """``[B, T, 3]`` long ``(view, row, col)`` of every reducible visual token (``-1`` elsewhere).

    A view is one grid: an image (LLaVA-1.5), a tile (InternVL), a base view or the tile grid of
    an anyres image (LLaVA-NeXT / OneVision), a frame (videos, Qwen's temporal patches). View ids
    are unique within the batch.

    Args:
        input_ids: ``[B, T]``; placeholders: ``[B, T]`` every visual placeholder (newlines too);
        visual: ``[B, T]`` the reducible ones; inputs: the inner model's tensor kwargs.
    """
    check_grid_support(model)
    mc = model.config
    b, t = input_ids.shape
    grid = torch.full((b, t, 3), -1, dtype=torch.long)
    ids = input_ids.cpu()
    vis = visual.cpu()
    view = 0
    if mc.model_type in ("llava", "internvl"):
        n = mc.image_seq_length
        side = math.isqrt(n)
        pos = torch.nonzero(vis)                        # row-major: images in order
        k = torch.arange(pos.shape[0])
        within = k % n
        grid[pos[:, 0], pos[:, 1]] = torch.stack([k // n, within // side, within % side], dim=1)
        return grid.to(input_ids.device)
    if mc.model_type.startswith("qwen"):
        # M-RoPE positions (t, h, w) of the language model: a frame is a run of visual tokens
        # with one t; rows and columns are h and w relative to the frame's first token
        rope = inputs.get("rope_position_ids")
        if rope is None:
            raise ValueError("spatial pooling needs the M-RoPE position ids of Qwen models; none were passed "
                             "to the language model in this call")
        rope = rope.cpu()
        for i in range(b):
            for start, end in _runs(vis[i]):
                tt, hh, ww = (rope[d, i, start:end] for d in range(3))
                for t_val in torch.unique(tt).tolist():
                    sel = torch.nonzero(tt == t_val).flatten()
                    pos = sel + start
                    grid[i, pos] = torch.stack([torch.full_like(sel, view), hh[sel] - hh[sel].min(),
                                                ww[sel] - ww[sel].min()], dim=1)
                    view += 1
        return grid.to(input_ids.device)
    # LLaVA-NeXT / OneVision: per run of placeholders, the base view (side x side), then the tile
    # grid row by row (each row ends with a newline); OneVision videos: frames of f x f
    side = mc.vision_config.image_size // mc.vision_config.patch_size
    video_id = getattr(mc, "video_token_id", None)
    for i in range(b):
        for start, end in _runs(placeholders[i].cpu()):
            rows = torch.arange(start, end)
            reducible = rows[vis[i, start:end]]
            if video_id is not None and int(ids[i, start]) == video_id:
                f = math.ceil(side / 2)
                k = torch.arange(reducible.numel())
                grid[i, reducible] = torch.stack([view + k // (f * f), (k % (f * f)) // f, k % f], dim=1)
                view += int(math.ceil(reducible.numel() / (f * f)))
                continue
            base = reducible[: side * side]
            k = torch.arange(base.numel())
            grid[i, base] = torch.stack([torch.full_like(k, view), k // side, k % side], dim=1)
            view += 1
            rest = rows[side * side:]
            r = c = 0
            any_tile = False
            for pos in rest.tolist():
                if bool(vis[i, pos]):
                    grid[i, pos] = torch.tensor([view, r, c])
                    c += 1
                    any_tile = True
                else:                                   # a newline ends the row
                    r, c = r + 1, 0
            view += int(any_tile)
    return grid.to(input_ids.device)
