"""VisionZip: dominant tokens by the attention they receive in the vision tower, the rest merged into contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..algorithms import baselines as bl
from ..algorithms.merge import Reduction
from ..config import ReductionConfig, register_config, check_range, check_keep_ratio
from .base import SampleContext, register_reducer


@register_config
@dataclass
class VisionZipConfig(ReductionConfig):
    """VisionZip: keep the tokens the vision tower attends to most, merge the rest by key similarity.

    Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025 (training-free setting).

    Before the language model, per view of the vision tower (an image, or an anyres tile) of ``P``
    patches: in the vision layer whose output is the selected feature layer (the reference's layer
    -2), the attention the patches receive picks the dominant tokens: the CLS token's attention on
    a CLIP tower (per-head softmax, summed over heads), and on a tower without a CLS token (SigLIP)
    the attention each patch receives averaged over all queries of its view (per-head softmax,
    summed over heads; :func:`pact_vlm.algorithms.baselines.mean_attention_received`); of the rest,
    uniformly spaced targets gather the others by cosine similarity of that layer's keys
    (averaged over heads) and become the mean of their group: the contextual tokens
    (:func:`pact_vlm.algorithms.baselines.visionzip_labels`). The merge happens on the vision
    features, before the projector, as in the reference. The budget ``B = ceil(keep_ratio * P)``
    per view splits into ``round(contextual_share * B)`` contextual tokens and the rest dominant.

    For towers whose patches are the language model's visual tokens one-to-one: CLIP with a CLS
    token and the ``"default"`` feature strategy (LLaVA-1.5, LLaVA-NeXT) and SigLIP with the
    ``"full"`` strategy (LLaVA-OneVision images; its videos are pooled after the projector and are
    refused when passed, as is an image whose tile grid the model downscales, ``vision_aspect_ratio``).
    Towers that merge patches before the language model (Qwen's 2x2 patch merger, InternVL's and
    Idefics3's pixel shuffle, Gemma 3's pooling, Pixtral's patch merger) are refused when applied
    (:class:`DivPruneConfig` reduces before the language model on every family without reading
    attention).

    Departures: without a CLS token the averaged attention received stands in for the CLS
    attention (the reference code is written for CLIP); the CLS token itself is not passed on (the model's feature strategy drops it; the
    reference adds it to the dominant tokens); dominant and contextual tokens keep their spatial
    order and their own position ids (a contextual token the target's), where the reference puts
    the contextual tokens after the dominant ones; the vision layer follows the model's
    ``vision_feature_layer`` (the reference fixes -2); on LLaVA-NeXT each tile is one view and
    ``image_newline`` tokens are kept; the per-view budget counts a tile's patches before the model
    crops the padding (unpadding), so an image keeps at most ``ceil(keep_ratio * P)`` per view. In
    ``handle.stats`` the merged-away tokens count as removed (their content is in their target's
    features).

    Args:
        keep_ratio: fraction of each view's tokens kept (dominant + contextual; the paper's 64, 128
            and 192 of 576 are 0.111, 0.222, 0.333).
        contextual_share: the contextual tokens' share of the budget (the paper: 10 of 64, 20 of 128,
            30 of 192).
    """

    method: ClassVar[str] = "visionzip"
    budget_param: ClassVar[str] = "keep_ratio"
    budget_search: ClassVar[dict] = {"keep_ratio": (0.0, 1.0, -1)}
    layer: ClassVar[int] = 0

    keep_ratio: float = 192 / 576
    contextual_share: float = 10 / 64

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        check_range("contextual_share", self.contextual_share, 0.0, 1.0,
                    fix="the contextual tokens' share of the budget; the paper uses 10 / 64 = 0.156")


@register_reducer(VisionZipConfig, needs=("vision",))
def _reduce_visionzip(ctx: SampleContext, cfg: VisionZipConfig) -> Reduction:
    # dominant tokens and contextual merges were made on the vision features (see integration.vision)
    keep = torch.nonzero(ctx.extras["keep"]).flatten()
    return bl.prune(ctx.hidden[ctx.visual_index], keep)
