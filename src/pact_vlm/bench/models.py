"""Model-free benchmark models: random weights at real dimensions, real ``transformers`` classes.

A :class:`SyntheticSpec` describes a LLaVA-OneVision model (``LlavaOnevisionForConditionalGeneration``:
Qwen2 text tower, anyres-max-9 image layout) or, with ``family="qwen3.5"``, a Qwen3.5 model
(``Qwen3_5ForConditionalGeneration``: gated delta net layers between full-attention layers, 2x2
merged 16 px patches, M-RoPE) with real text-tower widths, a chosen depth and a small
vocabulary. :func:`build_synthetic_model` builds it from configs (no download);
:func:`synthetic_inputs` builds prompts with one image of a chosen size.

What feeds the language model: by default the image features are *synthetic* and handed to
``generate()`` as ``mm_encoder_outputs`` (the pre-encoded input ``generate()`` itself builds from
``pixel_values`` before the prefill), laid out by the model's own ``pack_image_features`` (anyres
tiles, unpadding, ``image_newline`` after every row). The vision tower never runs; everything from
the token embedding on (placeholder scatter, every decoder layer, the reduction at layer L,
``lm_head``, ``generate()``'s loop) is the stock code path.

With ``vision_layers=N > 0`` (LLaVA-OneVision only) the model gets a real random-weight
``SiglipVisionModel`` tower of ``N`` layers at SigLIP-so400m widths (hidden 1152, 16 heads, MLP
4304, 14 px patches on 384 px tiles: the tower of LLaVA-OneVision-7B, fewer layers) and the prompts
carry ``pixel_values`` + ``image_sizes`` instead: the same kind of Voronoi scene drawn in pixels
(one colour per prototype plus per-pixel noise of the region's level, clipped to SigLIP's
normalised range [-1, 1]), the base tile and the anyres tiles as LLaVA-OneVision's processor lays
them out. Then the stock vision tower, projector and ``pack_image_features`` run in every
``generate()``, and the methods that read the vision tower (VisionZip) can run.

Why synthetic scenes: random vision weights on random pixels give features without the redundancy
of real images, and DBDPC would find no clusters. A flat region of the pixel scene gives patches
that are nearly equal, so even a random-weight tower gives them nearly equal features (its patch
embedding dominates the small position embedding). Each image is a scene of Voronoi regions, each region drawn from a
small bank of prototypes plus region-specific noise (flat background regions and textured ones), seen
once at low resolution (the base tile) and once at the anyres grid resolution, as LLaVA-OneVision
sees a real image. Qwen3.5 sees the same kind of scene once, one visual token per 32x32 pixels
(16 px patches merged 2x2), row-major, between its vision start / end tokens, with
``image_grid_thw`` and ``mm_token_type_ids`` for M-RoPE as its processor gives them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["SyntheticSpec", "build_synthetic_model", "synthetic_inputs", "visual_token_count"]

PAD_ID = 0
FAMILIES = ("llava-onevision", "qwen3.5")
_QWEN_FIELDS = ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim", "conv_kernel",
                "full_attention_interval")
_VISION_FIELDS = ("vision_layers", "vision_hidden", "vision_heads", "vision_intermediate")
QWEN_MERGE = 2
"""Qwen3.5's spatial merge: 2x2 patches per visual token."""


@dataclass(frozen=True)
class SyntheticSpec:
    """A random-weight LLaVA-OneVision (or Qwen3.5) model and its prompts.

    Attributes:
        family: ``"llava-onevision"`` (default) or ``"qwen3.5"``.
        hidden, heads, kv_heads, intermediate: text-tower widths (head size = hidden / heads).
        layers: number of decoder layers built.
        vocab: vocabulary size (small: only the last token's logits are computed in generation).
        rope_theta: rotary base (Qwen2-7B: 1e6).
        image_size: ``(height, width)`` of the one image per sample, in pixels; 480x640 gives
            2929 placeholders (729 base + 40x54 grid + 40 newlines) as LLaVA-OneVision does.
        tile, patch: anyres tile side and vision patch side in pixels (LLaVA-OneVision: 384 and 14,
            27x27 features per tile; the grid pinpoints are 1..6 tiles on each side, as in the 7B
            checkpoint). Smaller tiles make small test prompts. Qwen3.5: ``patch`` 16, merged 2x2
            (one visual token per 32x32 px, so ``image_size`` must be multiples of ``2 * patch``);
            ``tile`` is not used.
        text_tokens: text tokens per prompt (``text_before`` before the image, the rest after).
        text_before: text tokens before the image (system prompt and chat markup).
        prototypes: size of the bank of region prototypes shared by all images.
        regions: Voronoi regions per image.
        noise: ``(low, high)`` range of the per-region noise level, relative to the prototype scale.
        feature_std: per-dimension scale of the image features.
        seed: seed of the weights and of the image features.
        linear_key_heads, linear_value_heads, linear_key_dim, linear_value_dim, conv_kernel,
        full_attention_interval: Qwen3.5 only: the gated delta net layers' key / value heads and
            head sizes, their causal convolution's kernel, and every how many layers one is full
            attention (the others linear attention); defaults: ``Qwen3_5TextConfig``'s.
        vision_layers: LLaVA-OneVision only: ``0`` (default) feeds pre-encoded synthetic features
            (the vision tower never runs); ``N >= 1`` builds a ``SiglipVisionModel`` tower of ``N``
            layers of the widths below (on ``tile`` px views of ``patch`` px patches) and feeds
            ``pixel_values``.
        vision_hidden, vision_heads, vision_intermediate: that tower's widths (defaults: SigLIP
            so400m, LLaVA-OneVision's tower: 1152, 16 heads, MLP 4304); unused when ``vision_layers``
            is 0.
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
    family: str = "llava-onevision"
    linear_key_heads: int = 16
    linear_value_heads: int = 32
    linear_key_dim: int = 128
    linear_value_dim: int = 128
    conv_kernel: int = 4
    full_attention_interval: int = 4
    vision_layers: int = 0
    vision_hidden: int = 1152
    vision_heads: int = 16
    vision_intermediate: int = 4304

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # text towers of the LLaVA-OneVision checkpoints (Qwen2-7B / Qwen2-0.5B)
        "llava-onevision-7b": dict(hidden=3584, heads=28, kv_heads=4, intermediate=18944, layers=28, rope_theta=1e6),
        "llava-onevision-0.5b": dict(hidden=896, heads=14, kv_heads=2, intermediate=4864, layers=24,
                                     rope_theta=1e6),
        # transformers 5.24's Qwen3_5TextConfig / Qwen3_5VisionConfig defaults (not a named checkpoint):
        # hidden 4096, 16 query / 4 KV heads of 256, MLP 12288, 32 layers, every 4th full attention,
        # gated delta nets with 16 key / 32 value heads of 128 and a kernel-4 convolution; rotary base
        # 1e4 on a quarter of each head; 16 px patches merged 2x2
        "qwen3.5": dict(family="qwen3.5", hidden=4096, heads=16, kv_heads=4, intermediate=12288, layers=32,
                        rope_theta=1e4, patch=16, linear_key_heads=16, linear_value_heads=32, linear_key_dim=128,
                        linear_value_dim=128, conv_kernel=4, full_attention_interval=4),
    }

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.is_qwen:
            self._check_positive(_QWEN_FIELDS)
            if self.linear_value_heads % self.linear_key_heads:
                raise ValueError(f"linear_value_heads={self.linear_value_heads} is not a multiple of "
                                 f"linear_key_heads={self.linear_key_heads}")
            side = QWEN_MERGE * self.patch
            if self.image_size[0] % side or self.image_size[1] % side:
                h, w = self.image_size
                fix = f"{max(side, round(h / side) * side)}x{max(side, round(w / side) * side)}"
                raise ValueError(f"image_size={h}x{w} is not a multiple of {side} px on each side (Qwen3.5: "
                                 f"{self.patch} px patches merged {QWEN_MERGE}x{QWEN_MERGE}); use e.g. {fix}")
        self._check_positive(("hidden", "heads", "kv_heads", "intermediate", "layers", "vocab", "prototypes",
                              "regions", "tile", "patch"))
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
        if isinstance(self.vision_layers, bool) or not isinstance(self.vision_layers, int) or self.vision_layers < 0:
            raise ValueError(f"vision_layers={self.vision_layers!r} must be an integer >= 0 (0: pre-encoded image "
                             "features, the vision tower never runs; N: a SigLIP tower of N layers runs on pixels)")
        if self.vision_layers:
            if self.is_qwen:
                raise ValueError(f"vision_layers={self.vision_layers}: a running vision tower is built for the "
                                 "LLaVA-OneVision synthetic model only; use vision_layers=0 with family='qwen3.5'")
            self._check_positive(("vision_hidden", "vision_heads", "vision_intermediate"))
            if self.vision_hidden % self.vision_heads:
                raise ValueError(f"vision_hidden={self.vision_hidden} is not a multiple of vision_heads="
                                 f"{self.vision_heads}; the vision head size is vision_hidden / vision_heads")

    def _check_positive(self, names) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SyntheticSpec":
        """The text tower of a real checkpoint, ``"llava-onevision-7b"`` or ``"llava-onevision-0.5b"``,
        or ``"qwen3.5"`` (the widths of transformers' ``Qwen3_5TextConfig`` defaults)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown synthetic model {name!r}; available: {', '.join(sorted(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_qwen(self) -> bool:
        return self.family == "qwen3.5"

    @property
    def image_token_id(self) -> int:
        return self.vocab - 2

    @property
    def video_token_id(self) -> int:
        return self.vocab - 1

    @property
    def vision_start_id(self) -> int:
        return self.vocab - 4

    @property
    def vision_end_id(self) -> int:
        return self.vocab - 3

    @property
    def layer_types(self) -> list[str] | None:
        """Qwen3.5: each decoder layer's type (as ``Qwen3_5TextConfig`` lays them out); else ``None``."""
        if not self.is_qwen:
            return None
        k = self.full_attention_interval
        return ["linear_attention" if (i + 1) % k else "full_attention" for i in range(self.layers)]

    def visual_grid(self) -> tuple[int, int]:
        """Qwen3.5: (rows, columns) of visual tokens of one image."""
        side = QWEN_MERGE * self.patch
        return self.image_size[0] // side, self.image_size[1] // side

    def text_dims(self):
        """The text tower's :class:`~pact_vlm.bench.limits.TextDims` (from the spec alone, nothing built)."""
        from .limits import TextDims

        dims = dict(hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                    intermediate=self.intermediate, layers=self.layers, vocab=self.vocab)
        if self.is_qwen:
            dims.update(layer_types=tuple(self.layer_types), query_gate=True,
                        linear_key_heads=self.linear_key_heads, linear_value_heads=self.linear_value_heads,
                        linear_key_dim=self.linear_key_dim, linear_value_dim=self.linear_value_dim,
                        conv_kernel=self.conv_kernel)
        return TextDims(**dims)

    def vision_widths(self) -> tuple[int, int, int, int]:
        """LLaVA-OneVision: (hidden, heads, intermediate, layers) of the vision tower built: the spec's
        with ``vision_layers``, else the tiny tower that never runs (32, 2, 64, 1)."""
        if self.vision_layers:
            return self.vision_hidden, self.vision_heads, self.vision_intermediate, self.vision_layers
        return 32, 2, 64, 1

    def vision_views(self) -> int:
        """LLaVA-OneVision: the vision tower's views of one image (the base tile + the anyres tiles)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        nph, npw = get_anyres_image_grid_shape(list(self.image_size), self.grid_pinpoints(), self.tile)
        return 1 + nph * npw

    def grid_pinpoints(self) -> list[list[int]]:
        """LLaVA-OneVision: the anyres grid resolutions (1..6 tiles on each side, as in the 7B checkpoint)."""
        return [[self.tile * i, self.tile * j] for i in range(1, 7) for j in range(1, 7)]

    def extra_params(self) -> int:
        """Parameters outside the text tower (from the spec alone, nothing built): LLaVA-OneVision's
        vision tower (``SiglipVisionModel``: patch and position embeddings, its layers, the final
        norm), projector (two linear layers) and ``image_newline``; Qwen3.5's vision model."""
        d = self.hidden
        if self.is_qwen:
            # the tiny vision model of _qwen_config (depth 1, hidden 32, MLP 64, 16 px patches x 2 frames,
            # 64 position embeddings, 2x2 patch merger to the text width)
            h, f, merged = 32, 64, 32 * QWEN_MERGE ** 2
            patch = 3 * 2 * self.patch * self.patch * h + h
            block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
            merger = 2 * h + (merged * merged + merged) + (merged * d + d)
            return patch + 64 * h + block + merger
        h, _, f, layers = self.vision_widths()
        side = self.tile // self.patch
        embeddings = 3 * self.patch * self.patch * h + h + side * side * h
        block = 2 * 2 * h + 4 * (h * h + h) + (h * f + f) + (f * h + h)
        projector = (h * d + d) + (d * d + d)
        return embeddings + layers * block + 2 * h + projector + d

    def vision_activation_bytes(self, batch: int, itemsize: int) -> int:
        """The largest transient tensors of the vision encoder in one call (0 when it never runs): per
        view of ``P`` patches the hidden states kept for every layer (``output_hidden_states``), one
        layer's MLP and queries / keys / values, the ``[heads, P, P]`` attention scores in float32
        twice (the layer's own and a reading of them, VisionZip's), and the projector's output."""
        if self.is_qwen or not self.vision_layers:
            return 0
        h, heads, f, layers = self.vision_widths()
        views, p = batch * self.vision_views(), (self.tile // self.patch) ** 2
        per_patch = (layers + 1) * h + 2 * f + 4 * h + 2 * self.hidden
        return int(views * p * per_patch * itemsize + 2 * views * heads * p * p * 4)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.is_qwen:              # a LLaVA-OneVision spec reads as before the Qwen3.5 fields existed
            for name in ("family", *_QWEN_FIELDS):
                out.pop(name)
        if not self.vision_layers:        # ... and, without a running tower, as before the vision fields
            for name in _VISION_FIELDS:
                out.pop(name)
        return out


def _qwen_config(spec: SyntheticSpec):
    import transformers

    rotary = spec.head_dim // 4 // 2                   # frequencies on a quarter of each head
    section = [rotary - 2 * (rotary // 3) - (rotary % 3 > 0), -(-rotary // 3), rotary // 3]   # 32 -> 11, 11, 10
    text = dict(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        vocab_size=spec.vocab, layer_types=spec.layer_types, linear_conv_kernel_dim=spec.conv_kernel,
        linear_key_head_dim=spec.linear_key_dim, linear_value_head_dim=spec.linear_value_dim,
        linear_num_key_heads=spec.linear_key_heads, linear_num_value_heads=spec.linear_value_heads,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "partial_rotary_factor": 0.25,
                         "mrope_section": section, "mrope_interleaved": True},
        pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
    # the real geometry (16 px patches, 2x2 merge); the tower is tiny because it never runs
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=spec.patch,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=2, out_hidden_size=spec.hidden,
                  num_position_embeddings=64)
    return transformers.Qwen3_5Config(
        text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
        video_token_id=spec.video_token_id, vision_start_token_id=spec.vision_start_id,
        vision_end_token_id=spec.vision_end_id, tie_word_embeddings=False)


def _config(spec: SyntheticSpec):
    import transformers

    if spec.is_qwen:
        return _qwen_config(spec)

    text = dict(
        model_type="qwen2", hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        use_sliding_window=False, tie_word_embeddings=False, pad_token_id=PAD_ID,
        bos_token_id=None, eos_token_id=None)
    # the real geometry (384 px tiles, 14 px patches -> 27x27 features per tile); without
    # vision_layers the tower is tiny because it never runs (image features come in pre-encoded)
    hidden, heads, intermediate, layers = spec.vision_widths()
    vision = dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, image_size=spec.tile, patch_size=spec.patch,
                  vision_use_head=False)
    return transformers.LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=spec.image_token_id,
        video_token_index=spec.video_token_id, image_grid_pinpoints=spec.grid_pinpoints(), vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


def build_synthetic_model(spec: SyntheticSpec, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A random-weight ``LlavaOnevisionForConditionalGeneration`` (``Qwen3_5ForConditionalGeneration``
    for a Qwen3.5 spec) for ``spec``, in eval mode.

    Weights follow the class's own initialisation from ``spec.seed``. Generation is greedy and
    never stops early (no end-of-sequence token).
    """
    import transformers

    config = _config(spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        cls = (transformers.Qwen3_5ForConditionalGeneration if spec.is_qwen
               else transformers.LlavaOnevisionForConditionalGeneration)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
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


def _scene(spec: SyntheticSpec, sample: int, bank: torch.Tensor):
    """``features(rows, cols) -> [rows, cols, D]``: one synthetic image's scene seen on a grid
    (successive calls draw fresh noise from the image's own generator)."""
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
        # nearest region centre, in chunks (a pixel scene of 6x6 tiles has 5.3M points)
        region = torch.cat([torch.cdist(chunk, seeds).argmin(dim=1) for chunk in pts.split(1 << 16)])
        noise = torch.randn(pts.shape[0], d, generator=g)
        return (bank[proto[region]] + level[region, None] * noise).view(rows, cols, d)

    return features


def _scene_features(spec: SyntheticSpec, model, sample: int, bank: torch.Tensor) -> torch.Tensor:
    """``[1 + tiles, side * side, D]`` per-tile features of one synthetic image (base tile first)."""
    nph, npw, side = _grid_shape(model, spec.image_size)
    features, d = _scene(spec, sample, bank), bank.shape[1]
    base = features(side, side).reshape(1, side * side, d)
    grid = features(nph * side, npw * side)                                   # the anyres tiles, seamless
    tiles = grid.view(nph, side, npw, side, d).permute(0, 2, 1, 3, 4).reshape(nph * npw, side * side, d)
    return torch.cat([base, tiles]) * spec.feature_std


def _scene_pixels(spec: SyntheticSpec, model, sample: int, bank: torch.Tensor) -> torch.Tensor:
    """``[1 + tiles, 3, tile, tile]`` pixel views of one synthetic image (base tile first, then the
    anyres tiles row by row, as LLaVA-OneVision's processor lays them out): the scene of
    :func:`_scene` drawn in pixels, each region its prototype's colour (``bank``: ``[prototypes, 3]``
    in [-0.8, 0.8]) plus per-pixel noise of half its level, clipped to [-1, 1] (SigLIP's
    normalised pixel range)."""
    nph, npw, _ = _grid_shape(model, spec.image_size)
    tile = spec.tile
    pixels = _scene(spec, sample, 2 * bank)                     # (2 colour + level noise) / 2
    base = pixels(tile, tile).permute(2, 0, 1)[None]
    grid = pixels(nph * tile, npw * tile)                                     # the anyres tiles, seamless
    tiles = grid.view(nph, tile, npw, tile, 3).permute(0, 2, 4, 1, 3).reshape(nph * npw, 3, tile, tile)
    return (torch.cat([base, tiles]) / 2).clamp(-1.0, 1.0)


def visual_token_count(model, spec: SyntheticSpec) -> tuple[int, int]:
    """(placeholders, of which ``image_newline``) of one image of ``spec.image_size``."""
    if spec.is_qwen:
        rows, cols = spec.visual_grid()
        return rows * cols, 0
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
        image features, ``[placeholders, D]`` per image, in the model's dtype and device); with
        ``spec.vision_layers`` instead ``pixel_values [B, 1 + tiles, 3, tile, tile]`` and
        ``image_sizes [B, 2]`` (the vision tower runs in ``generate()``).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    param = next(model.parameters())
    if spec.vision_layers:                    # LLaVA-OneVision only (the spec refuses it for Qwen3.5)
        built_layers = len(model.model.vision_tower.encoder.layers)
        if built_layers != spec.vision_layers:
            raise ValueError(f"the model's vision tower has {built_layers} layers but spec.vision_layers="
                             f"{spec.vision_layers}; build the model from this spec (build_synthetic_model)")
        return _pixel_inputs(model, spec, param, batch)
    gbank = torch.Generator().manual_seed(spec.seed * 1_000_003 + 1)
    bank = torch.randn(spec.prototypes, spec.hidden, generator=gbank)
    if spec.is_qwen:
        return _qwen_inputs(spec, param, bank, batch)
    images = []
    with torch.no_grad():
        for b in range(batch):
            tiles = _scene_features(spec, model, b, bank)
            images.append(_pack(model, tiles.to(param.device, param.dtype), spec, newline=model.model.image_newline))
    n_visual = images[0].shape[0]
    return {**_prompt_ids(spec, n_visual, batch, param.device),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=images)}}


def _pixel_inputs(model, spec: SyntheticSpec, param: torch.Tensor, batch: int) -> dict[str, Any]:
    """LLaVA-OneVision prompts with pixels: the vision tower, projector and packing run in the model."""
    gbank = torch.Generator().manual_seed(spec.seed * 1_000_003 + 3)
    bank = (torch.rand(spec.prototypes, 3, generator=gbank) * 2 - 1) * 0.8      # one colour per prototype
    pixels = torch.stack([_scene_pixels(spec, model, b, bank) for b in range(batch)])
    n_visual, _ = visual_token_count(model, spec)
    return {**_prompt_ids(spec, n_visual, batch, param.device),
            "pixel_values": pixels.to(param.device, param.dtype),
            "image_sizes": torch.tensor([list(spec.image_size)] * batch, device=param.device)}


def _prompt_ids(spec: SyntheticSpec, n_visual: int, batch: int, device) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask``: ``text_before`` text tokens, the image placeholders, the rest."""
    gtext = torch.Generator().manual_seed(spec.seed * 1_000_003 + 2)
    text_hi = spec.image_token_id              # text ids in [1, image id)
    ids = []
    for _ in range(batch):
        text = torch.randint(1, text_hi, (spec.text_tokens,), generator=gtext)
        ids.append(torch.cat([text[: spec.text_before], torch.full((n_visual,), spec.image_token_id),
                              text[spec.text_before:]]))
    input_ids = torch.stack(ids).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _qwen_inputs(spec: SyntheticSpec, param: torch.Tensor, bank: torch.Tensor, batch: int) -> dict[str, Any]:
    """Qwen3.5 prompts: text, vision start, the image's visual tokens (row-major), vision end, text."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    rows, cols = spec.visual_grid()
    n_visual = rows * cols
    images = [(_scene(spec, b, bank)(rows, cols).reshape(n_visual, -1) * spec.feature_std).to(param.device, param.dtype)
              for b in range(batch)]
    gtext = torch.Generator().manual_seed(spec.seed * 1_000_003 + 2)
    ids, types = [], []
    for _ in range(batch):
        # text ids below the vision start / end, image and video ids
        text = torch.randint(1, spec.vision_start_id, (spec.text_tokens,), generator=gtext)
        ids.append(torch.cat([text[: spec.text_before], torch.tensor([spec.vision_start_id]),
                              torch.full((n_visual,), spec.image_token_id), torch.tensor([spec.vision_end_id]),
                              text[spec.text_before:]]))
        types.append(torch.cat([torch.zeros(spec.text_before + 1, dtype=torch.long),
                                torch.ones(n_visual, dtype=torch.long),
                                torch.zeros(spec.text_tokens - spec.text_before + 1, dtype=torch.long)]))
    input_ids = torch.stack(ids).to(param.device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.stack(types).to(param.device),
        "image_grid_thw": torch.tensor([[1, rows * QWEN_MERGE, cols * QWEN_MERGE]] * batch, device=param.device),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=images)},
    }


def describe(spec: SyntheticSpec, model) -> str:
    """One line: the class, widths, depth (and layer types) and prompt layout."""
    n, newlines = visual_token_count(model, spec)
    if spec.is_qwen:
        kinds = spec.layer_types
        n_linear = kinds.count("linear_attention")
        return (f"random-weight {type(model).__name__}: {spec.layers} layers ({n_linear} linear-attention "
                f"(gated delta net) + {spec.layers - n_linear} full-attention, one in "
                f"{spec.full_attention_interval}), hidden {spec.hidden}, {spec.heads}/{spec.kv_heads} heads of "
                f"{spec.head_dim} (gated q_proj), MLP {spec.intermediate}, linear attention {spec.linear_key_heads} "
                f"key / {spec.linear_value_heads} value heads of {spec.linear_key_dim}/{spec.linear_value_dim}, "
                f"conv kernel {spec.conv_kernel}, vocab {spec.vocab}; image {spec.image_size[0]}x{spec.image_size[1]} "
                f"-> {n} visual tokens ({spec.visual_grid()[0]}x{spec.visual_grid()[1]}, + vision start / end), "
                f"{spec.text_tokens} text tokens")
    text = (f"random-weight LlavaOnevisionForConditionalGeneration: {spec.layers} layers, hidden {spec.hidden}, "
            f"{spec.heads}/{spec.kv_heads} heads, MLP {spec.intermediate}, vocab {spec.vocab}; "
            f"image {spec.image_size[0]}x{spec.image_size[1]} -> {n} placeholders ({n - newlines} visual + "
            f"{newlines} newlines), {spec.text_tokens} text tokens")
    if not spec.vision_layers:
        return text
    side = spec.tile // spec.patch
    return (f"{text}; pixels through a random-weight SiglipVisionModel tower of {spec.vision_layers} layers, hidden "
            f"{spec.vision_hidden}, {spec.vision_heads} heads, MLP {spec.vision_intermediate}, {spec.vision_views()} "
            f"views of {spec.tile} px ({side}x{side} patches of {spec.patch} px) per image")

