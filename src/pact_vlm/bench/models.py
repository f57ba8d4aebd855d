"""Model-free benchmark models: random weights at real dimensions, real ``transformers`` classes.

A :class:`SyntheticSpec` describes a LLaVA-OneVision model (``LlavaOnevisionForConditionalGeneration``:
Qwen2 text tower, anyres-max-9 image layout) with real text-tower widths, a chosen depth and a small
vocabulary. :func:`build_synthetic_model` builds it from configs (no download);
:func:`synthetic_inputs` builds prompts with one image of a chosen size.

What feeds the language model: the image features are *synthetic* and handed to ``generate()`` as
``mm_encoder_outputs`` (the pre-encoded input ``generate()`` itself builds from ``pixel_values``
before the prefill), laid out by the model's own ``pack_image_features`` (anyres tiles, unpadding,
``image_newline`` after every row). The vision tower never runs; everything from the token
embedding on (placeholder scatter, every decoder layer, the reduction at layer L, ``lm_head``,
``generate()``'s loop) is the stock code path.

Why synthetic features: random vision weights give features without the redundancy of real images,
and DBDPC would find no clusters. Each image is a scene of Voronoi regions, each region drawn from a
small bank of prototypes plus region-specific noise (flat background regions and textured ones), seen
once at low resolution (the base tile) and once at the anyres grid resolution, as LLaVA-OneVision
sees a real image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["SyntheticSpec", "build_synthetic_model", "synthetic_inputs", "visual_token_count"]

PAD_ID = 0


@dataclass(frozen=True)
class SyntheticSpec:
    """A random-weight LLaVA-OneVision model and its prompts.

    Attributes:
        hidden, heads, kv_heads, intermediate: text-tower widths (head size = hidden / heads).
        layers: number of decoder layers built.
        vocab: vocabulary size (small: only the last token's logits are computed in generation).
        rope_theta: rotary base (Qwen2-7B: 1e6).
        image_size: ``(height, width)`` of the one image per sample, in pixels; 480x640 gives
            2929 placeholders (729 base + 40x54 grid + 40 newlines) as LLaVA-OneVision does.
        tile, patch: anyres tile side and vision patch side in pixels (LLaVA-OneVision: 384 and 14,
            27x27 features per tile; the grid pinpoints are 1..6 tiles on each side, as in the 7B
            checkpoint). Smaller tiles make small test prompts.
        text_tokens: text tokens per prompt (``text_before`` before the image, the rest after).
        text_before: text tokens before the image (system prompt and chat markup).
        prototypes: size of the bank of region prototypes shared by all images.
        regions: Voronoi regions per image.
        noise: ``(low, high)`` range of the per-region noise level, relative to the prototype scale.
        feature_std: per-dimension scale of the image features.
        seed: seed of the weights and of the image features.
    """

    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    intermediate: int = 18944
    layers: int = 28
    vocab: int = 4096
    rope_theta: float = 1e6
    image_size: tuple[int, int] = (480, 640)
    tile: int = 384
    patch: int = 14
    text_tokens: int = 50
    text_before: int = 14
    prototypes: int = 24
    regions: int = 48
    noise: tuple[float, float] = (0.15, 0.6)
    feature_std: float = 0.05
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # text towers of the LLaVA-OneVision checkpoints (Qwen2-7B / Qwen2-0.5B)
        "llava-onevision-7b": dict(hidden=3584, heads=28, kv_heads=4, intermediate=18944, layers=28, rope_theta=1e6),
        "llava-onevision-0.5b": dict(hidden=896, heads=14, kv_heads=2, intermediate=4864, layers=24,
                                     rope_theta=1e6),
    }

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "intermediate", "layers", "vocab", "prototypes", "regions",
                     "tile", "patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}; "
                             "the head size is hidden / heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.vocab < 8:
            raise ValueError(f"vocab={self.vocab} is too small; use at least 8 (pad + text + image ids)")
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ValueError(f"image_size={self.image_size!r} must be (height, width) in pixels, both >= 1")
        if not 0 <= self.text_before <= self.text_tokens:
            raise ValueError(f"text_before={self.text_before} must lie in [0, text_tokens={self.text_tokens}]")
        if self.text_tokens < 1:
            raise ValueError(f"text_tokens={self.text_tokens} must be >= 1 (the prompt must end in text)")
        if self.tile < self.patch:
            raise ValueError(f"tile={self.tile} must be >= patch={self.patch} (features per tile side = "
                             "tile // patch)")
        lo, hi = self.noise
        if not 0 <= lo <= hi:
            raise ValueError(f"noise={self.noise!r} must be a range (low, high) with 0 <= low <= high")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SyntheticSpec":
        """The text tower of a real checkpoint: ``"llava-onevision-7b"`` or ``"llava-onevision-0.5b"``."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown synthetic model {name!r}; available: {', '.join(sorted(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def image_token_id(self) -> int:
        return self.vocab - 2

    @property
    def video_token_id(self) -> int:
        return self.vocab - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _config(spec: SyntheticSpec):
    import transformers

    text = dict(
        model_type="qwen2", hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        use_sliding_window=False, tie_word_embeddings=False, pad_token_id=PAD_ID,
        bos_token_id=None, eos_token_id=None)
    # the real geometry (384 px tiles, 14 px patches -> 27x27 features per tile); the tower is tiny
    # because it never runs (image features come in pre-encoded)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=spec.tile, patch_size=spec.patch, vision_use_head=False)
    pinpoints = [[spec.tile * i, spec.tile * j] for i in range(1, 7) for j in range(1, 7)]
    return transformers.LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=spec.image_token_id,
        video_token_index=spec.video_token_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


def build_synthetic_model(spec: SyntheticSpec, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A random-weight ``LlavaOnevisionForConditionalGeneration`` for ``spec``, in eval mode.

    Weights follow the class's own initialisation from ``spec.seed``. Generation is greedy and
    never stops early (no end-of-sequence token).
    """
    import transformers

    config = _config(spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = transformers.LlavaOnevisionForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype)
    model.to(device).eval()          # a no-op when the device context already placed every weight
    gc = model.generation_config
    gc.pad_token_id = PAD_ID
    gc.bos_token_id = None
    gc.eos_token_id = None
    gc.do_sample = False
    return model


def _grid_shape(model, image_size) -> tuple[int, int, int]:
    """(tiles high, tiles wide, features per tile side) of one image."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    vc = model.config.vision_config
    nph, npw = get_anyres_image_grid_shape(list(image_size), model.config.image_grid_pinpoints, vc.image_size)
    return nph, npw, vc.image_size // vc.patch_size


def _scene_features(spec: SyntheticSpec, model, sample: int, bank: torch.Tensor) -> torch.Tensor:
    """``[1 + tiles, side * side, D]`` per-tile features of one synthetic image (base tile first)."""
    nph, npw, side = _grid_shape(model, spec.image_size)
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7919 * (sample + 1))
    seeds = torch.rand(spec.regions, 2, generator=g)                        # region centres in [0, 1]^2
    proto = torch.randint(0, bank.shape[0], (spec.regions,), generator=g)    # each region's prototype
    lo, hi = spec.noise
    level = lo + (hi - lo) * torch.rand(spec.regions, generator=g)           # flat ... textured regions
    d = bank.shape[1]

    def features(rows: int, cols: int) -> torch.Tensor:
        y = (torch.arange(rows) + 0.5) / rows
        x = (torch.arange(cols) + 0.5) / cols
        pts = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)
        region = torch.cdist(pts, seeds).argmin(dim=1)
        noise = torch.randn(pts.shape[0], d, generator=g)
        return (bank[proto[region]] + level[region, None] * noise).view(rows, cols, d)

    base = features(side, side).reshape(1, side * side, d)
    grid = features(nph * side, npw * side)                                   # the anyres tiles, seamless
    tiles = grid.view(nph, side, npw, side, d).permute(0, 2, 1, 3, 4).reshape(nph * npw, side * side, d)
    return torch.cat([base, tiles]) * spec.feature_std


def visual_token_count(model, spec: SyntheticSpec) -> tuple[int, int]:
    """(placeholders, of which ``image_newline``) of one image of ``spec.image_size``."""
    nph, npw, side = _grid_shape(model, spec.image_size)
    feats = torch.zeros(1 + nph * npw, side * side, 1)
    with_newlines = _pack(model, feats, spec, newline=torch.zeros(1)).shape[0]
    without = _pack(model, feats, spec, newline=None).shape[0]
    return with_newlines, with_newlines - without


def _pack(model, tile_features: torch.Tensor, spec: SyntheticSpec, newline: torch.Tensor | None = None
          ) -> torch.Tensor:
    """The model's own anyres layout of one image: ``[tiles, side*side, D]`` -> ``[placeholders, D]``."""
    packed, _ = model.model.pack_image_features(
        [tile_features], torch.tensor([list(spec.image_size)]), image_newline=newline,
        vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0]


def synthetic_inputs(model, spec: SyntheticSpec, *, batch: int = 1) -> dict[str, Any]:
    """Keyword arguments for ``model.generate(**inputs)``: ``batch`` prompts, one image each.

    Each prompt is ``text_before`` text tokens, the image placeholders, then the rest of the text.
    Every sample has its own scene (so samples keep different numbers of tokens after reduction);
    all have the same image size, hence the same length (no padding).

    Returns:
        ``input_ids [B, T]``, ``attention_mask [B, T]`` and ``mm_encoder_outputs`` (the packed
        image features, ``[placeholders, D]`` per image, in the model's dtype and device).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    param = next(model.parameters())
    gbank = torch.Generator().manual_seed(spec.seed * 1_000_003 + 1)
    bank = torch.randn(spec.prototypes, spec.hidden, generator=gbank)
    images = []
    with torch.no_grad():
        for b in range(batch):
            tiles = _scene_features(spec, model, b, bank)
            images.append(_pack(model, tiles.to(param.device, param.dtype), spec, newline=model.model.image_newline))
    n_visual = images[0].shape[0]
    gtext = torch.Generator().manual_seed(spec.seed * 1_000_003 + 2)
    text_hi = spec.image_token_id              # text ids in [1, image id)
    ids = []
    for _ in range(batch):
        text = torch.randint(1, text_hi, (spec.text_tokens,), generator=gtext)
        ids.append(torch.cat([text[: spec.text_before], torch.full((n_visual,), spec.image_token_id),
                              text[spec.text_before:]]))
    input_ids = torch.stack(ids).to(param.device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=images)},
    }


def describe(spec: SyntheticSpec, model) -> str:
    """One line: widths, depth and prompt layout."""
    n, newlines = visual_token_count(model, spec)
    return (f"random-weight LlavaOnevisionForConditionalGeneration: {spec.layers} layers, hidden {spec.hidden}, "
            f"{spec.heads}/{spec.kv_heads} heads, MLP {spec.intermediate}, vocab {spec.vocab}; "
            f"image {spec.image_size[0]}x{spec.image_size[1]} -> {n} placeholders ({n - newlines} visual + "
            f"{newlines} newlines), {spec.text_tokens} text tokens")

