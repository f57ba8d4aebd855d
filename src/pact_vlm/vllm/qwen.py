"""``PactQwen2VLForConditionalGeneration`` and ``PactQwen2_5_VLForConditionalGeneration``: vLLM's Qwen2-VL
and Qwen2.5-VL with each image reduced by PACT (budget form) between the vision encoder and the
language model.

How it enters vLLM (0.32):

* the multimodal processor (``_get_prompt_updates``) gives an image of ``N`` visual tokens
  ``budget_keep_count(N, keep_ratio)`` placeholders: a function of the grid and the keep ratio only,
  the same rule as the Hugging Face path, fixed before the encoder runs;
* ``_process_image_input`` reduces each image's embeddings with
  :func:`pact_vlm.algorithms.budget_pact.budget_pact_reduce` (keys and EUTI's mean query from the
  first decoder layer's ``input_layernorm`` / ``q_proj`` / ``k_proj``, as on the Hugging Face path)
  and appends each kept token's M-RoPE offset within its image (its center's ``t, h, w``) as extra
  channels, the layout of vLLM's EVS for video;
* ``get_mrope_input_positions`` lays out the prompt's positions with the image's full grid reserved
  (text after an image and decoded tokens keep the positions they have without the reduction) and
  every placeholder at the image's start; ``embed_input_ids`` splits the offsets off the
  embeddings and ``forward`` adds them to the image tokens' positions, so each kept token sits at
  its center's position. (vLLM's own hook for this, ``SupportsMultiModalPruning.recompute_mrope_positions``,
  is called by its model runner only while ``video_pruning_rate > 0``, i.e. when EVS prunes videos;
  the forward does the same rewrite for images without it.)

Videos pass through unreduced. Tensor parallelism: the vision encoder's output is replicated on
every rank; each rank gathers the first layer's key and query heads from all ranks and runs the
same deterministic reduction on the same inputs, so all ranks keep the same tokens (tested with one
rank). Pipeline parallelism is refused (a later stage receives positions without the embeddings'
offsets). Proportional attention cannot run (vLLM's attention kernels take no per-key bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..algorithms.budget_pact import budget_keep_count
from .config import resolve_config
from .embeddings import append_positions, grid_offsets, mrope_positions, reduce_image, split_positions

__all__ = ["PactQwen2VLForConditionalGeneration", "PactQwen2_5_VLForConditionalGeneration"]

logger = init_logger("vllm.plugins.pact_vlm")   # under "vllm": shown with vLLM's own log lines


# -- processor: the budgeted placeholder count ---------------------------------------------------------

class _PactPromptUpdates:
    """``_get_prompt_updates`` with ``budget_keep_count(N, keep_ratio)`` placeholders per image."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs
                            ) -> Sequence[PromptUpdate]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        cfg = self.__dict__.get("_pact_config")
        if cfg is None:                   # once per processor (a folder / hub file is read at most once)
            cfg = self._pact_config = resolve_config(self.info.ctx.model_config)[0]
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        token = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]

        def image_placeholders(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [token] * budget_keep_count(int(grid.prod()) // (merge * merge), cfg.keep_ratio)

        return [PromptReplacement(modality="image", target=[token], replacement=image_placeholders)
                if u.modality == "image" else u for u in updates]


class PactQwen2VLMultiModalProcessor(_PactPromptUpdates, Qwen2VLMultiModalProcessor):
    pass


class PactQwen2_5_VLMultiModalProcessor(_PactPromptUpdates, Qwen2_5_VLMultiModalProcessor):
    pass


# -- model: the reduction, the positions ----------------------------------------------------------------

class _PactQwenMixin:
    """What both Qwen classes add to vLLM's (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        self.pact_config, self.pact_config_origin = resolve_config(vllm_config.model_config)
        parallel = vllm_config.parallel_config
        if getattr(parallel, "pipeline_parallel_size", 1) > 1:
            raise ValueError(f"{type(self).__name__} does not support pipeline_parallel_size="
                             f"{parallel.pipeline_parallel_size} (a later stage cannot place PACT's kept tokens); "
                             "use tensor parallelism (tensor_parallel_size) instead")
        mm = vllm_config.model_config.multimodal_config
        if mm is not None and mm.is_multimodal_pruning_enabled():
            raise ValueError(f"{type(self).__name__} cannot run with video_pruning_rate="
                             f"{mm.video_pruning_rate} (vLLM's EVS); leave video_pruning_rate unset")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._pact_pending: tuple[torch.Tensor, torch.Tensor] | None = None
        logger.info("PACT budget reduction before the language model: %s (%s)",
                    self.pact_config.to_dict(), self.pact_config_origin)

    # the image embeddings: reduce, then carry each kept token's M-RoPE offset ------------------------
    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        merge = self.visual.spatial_merge_size
        out = []
        for emb, (t, h, w) in zip(embeds, image_input["image_grid_thw"].tolist()):
            with torch.no_grad():
                merged, keep_index = reduce_image(emb, self._pact_layer_keys, self.pact_config)
            offsets = grid_offsets(int(t), int(h) // merge, int(w) // merge)[keep_index.cpu()]
            out.append(append_positions(merged, offsets))
        return tuple(out)

    def _pact_layer_keys(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first decoder layer's keys before rotary ``[N, H_kv, d_h]`` and EUTI's mean query ``[H, d_h]``
        (float32) over one image's embeddings, computed as the Hugging Face integration does (RMSNorm
        in float32, the projections as ``F.linear`` over the q / k rows of the packed weight), with all
        heads gathered from the tensor-parallel ranks."""
        layer = self.language_model.model.layers[0]
        attn, norm = layer.self_attn, layer.input_layernorm
        x = embeds.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        normed = norm.weight * x.to(embeds.dtype)
        mean = normed.mean(dim=0, keepdim=True, dtype=torch.float32).to(normed.dtype)
        q = self._pact_project(attn, mean, "q")
        k = self._pact_project(attn, normed, "k")
        tp = get_tensor_model_parallel_world_size()
        if tp > 1:
            q = tensor_model_parallel_all_gather(q.contiguous(), dim=-1)
            k = tensor_model_parallel_all_gather(k.contiguous(), dim=-1)
            replicas = tp * attn.num_kv_heads // attn.total_num_kv_heads   # ranks holding the same kv head
            if replicas > 1:
                k = k.view(k.shape[0], tp, -1)[:, ::replicas].reshape(k.shape[0], -1)
        return k.view(k.shape[0], -1, attn.head_dim), q.view(-1, attn.head_dim).float()

    @staticmethod
    def _pact_project(attn, x: torch.Tensor, which: str) -> torch.Tensor:
        lo, hi = (0, attn.q_size) if which == "q" else (attn.q_size, attn.q_size + attn.kv_size)
        proj = attn.qkv_proj
        weight, bias = getattr(proj, "weight", None), getattr(proj, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() \
                and tuple(weight.shape) == (attn.q_size + 2 * attn.kv_size, x.shape[-1]):
            return F.linear(x, weight[lo:hi], bias[lo:hi] if bias is not None else None)
        return proj(x)[0][..., lo:hi]          # quantised or repacked weights: the layer's own kernel

    def get_encoder_cudagraph_config(self):
        # the encoder CUDA graph path skips _process_image_input: images run eagerly
        config = super().get_encoder_cudagraph_config()
        config.modalities = [m for m in config.modalities if m != "image"]
        return config

    # positions ---------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items = [(offset, f.mm_position.length, t, h, w, t_factor, f.modality == "image")
                 for f, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features))]
        return mrope_positions(len(input_tokens), items)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        self._pact_pending = None
        if multimodal_embeddings is not None and len(multimodal_embeddings):
            width = self.config.get_text_config().hidden_size
            clean, offsets, carried = [], [], False
            for emb in multimodal_embeddings:
                e, off = split_positions(emb, width)
                carried |= off is not None
                clean.append(e)
                offsets.append(off if off is not None else torch.zeros(emb.shape[0], 3, dtype=torch.long,
                                                                        device=emb.device))
            if carried:
                self._pact_pending = (is_multimodal, torch.cat(offsets))
            multimodal_embeddings = clean
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._pact_pending = self._pact_pending, None
        if pending is not None and positions.dim() == 2:
            mask, offsets = pending
            rows = torch.nonzero(mask.to(positions.device)).flatten()
            if rows.numel() != offsets.shape[0]:
                raise RuntimeError(f"{rows.numel()} multimodal positions in this step but {offsets.shape[0]} "
                                   "multimodal embeddings")
            positions = positions.clone()
            positions[:, rows] += offsets.to(positions.device, positions.dtype).T
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(PactQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PactQwen2VLForConditionalGeneration(_PactQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's ``Qwen2VLForConditionalGeneration`` with PACT (budget form) on every image."""


@MULTIMODAL_REGISTRY.register_processor(PactQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PactQwen2_5_VLForConditionalGeneration(_PactQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration`` with PACT (budget form) on every image."""
