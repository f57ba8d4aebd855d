"""PACT inside vLLM (``pact_vlm.vllm``) on tiny random-weight Qwen2-VL / Qwen2.5-VL, on vLLM's CPU build.

Runs in the vLLM test environment (``.ci/vllm/setup-venv``, ``.ci/vllm/run``); the main suite has
no vLLM and skips this file. One ``LLM`` per architecture is shared by the module's tests.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the engine in this process: errors surface here
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import pact_vlm  # noqa: E402
from pact_vlm.algorithms.budget_pact import budget_keep_count  # noqa: E402
from vllm_folder import ARCHS, MERGE, PLUGIN_ARCH, image, prompt, save_tiny  # noqa: E402

KEEP = 0.3
MAX_TOKENS = 12
# float32 on both sides: vLLM's first-step log-probabilities then agree with the Hugging Face path's to
# about 0.01 (bfloat16: 0.06), while a kept token placed at its image's start instead of its center's
# position moves them by 0.05 to 0.12, so atol=0.03 tells the two apart
LLM_ARGS = dict(max_model_len=512, enforce_eager=True, dtype="float32", limit_mm_per_prompt={"image": 3, "video": 0})
# (height, width) of the images of each test prompt: wide, tall (h > w: positions of tall grids), square
SINGLE = [[(64, 96)]]
SEVERAL = [[(96, 64), (64, 96)]]
BATCH = [[(64, 96)], [(128, 128)], [(96, 64), (64, 64)]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module", params=ARCHS)
def served(request, folders):
    """``(arch, folder, LLM with the plugin at keep_ratio=KEEP)``, one per architecture."""
    arch = request.param
    llm = vllm.LLM(model=str(folders[arch]), hf_overrides={"architectures": [PLUGIN_ARCH[arch]],
                                                           "pact": {"keep_ratio": KEEP}}, **LLM_ARGS)
    yield arch, folders[arch], llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def hf_models(folders):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def get(arch):
        if arch not in cache:
            path = folders[arch]
            cache[arch] = (AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
                           AutoProcessor.from_pretrained(path))
        return cache[arch]
    return get


def _images(sizes, seed):
    return [image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]


def _requests(prompts):
    return [{"prompt": prompt(len(sizes)), "multi_modal_data": {"image": _images(sizes, 10 * i)}}
            for i, sizes in enumerate(prompts)]


def _hf_run(model, processor, sizes, seed, reduce: bool):
    """HF greedy tokens, first-step log-probabilities, prompt length and per-image visual token counts."""
    inputs = processor(text=[prompt(len(sizes))], images=_images(sizes, seed), return_tensors="pt")
    kwargs = dict(max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    if reduce:
        with pact_vlm.apply(model, pact_vlm.PACTBudgetConfig(keep_ratio=KEEP)):
            out = model.generate(**inputs, **kwargs)
    else:
        out = model.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    counts = [int(g.prod()) // (MERGE * MERGE) for g in inputs["image_grid_thw"]]
    return out.sequences[0, length:].tolist(), out.scores[0][0].float().log_softmax(-1), length, counts


def _generate(llm, prompts):
    params = vllm.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    return llm.generate(_requests(prompts), params, use_tqdm=False)


def _check_against_hf(served, hf_models, prompts):
    arch, _, llm = served
    model, processor = hf_models(arch)
    outputs = _generate(llm, prompts)
    assert len(outputs) == len(prompts)
    for i, (sizes, out) in enumerate(zip(prompts, outputs)):
        tokens, logprobs, length, counts = _hf_run(model, processor, sizes, 10 * i, reduce=True)
        # the prompt reaching the language model lost exactly each image's tokens beyond its budget
        assert len(out.prompt_token_ids) == length - sum(n - budget_keep_count(n, KEEP) for n in counts)
        assert list(out.outputs[0].token_ids) == tokens, f"prompt {i} ({sizes})"
        first = out.outputs[0].logprobs[0]
        got = torch.tensor([first[t].logprob for t in first])
        want = logprobs[list(first)]
        assert torch.allclose(got, want, atol=0.03), (got, want)
    return outputs


def test_single_image_matches_hf_budget_path(served, hf_models):
    _check_against_hf(served, hf_models, SINGLE)


def test_reduction_changes_the_output_of_the_plain_model(served, hf_models):
    # what the comparison above is worth: the plain model's first-step distribution differs clearly
    arch, _, llm = served
    model, processor = hf_models(arch)
    out = _generate(llm, SINGLE)[0]
    _, plain, _, _ = _hf_run(model, processor, SINGLE[0], 0, reduce=False)
    first = out.outputs[0].logprobs[0]
    got = torch.tensor([first[t].logprob for t in first])
    assert (got - plain[list(first)]).abs().max() > 0.3


def test_several_images_in_one_prompt(served, hf_models):
    _check_against_hf(served, hf_models, SEVERAL)


def test_batch_of_prompts(served, hf_models):
    _check_against_hf(served, hf_models, BATCH)


def test_bad_config_refused_at_load(folders):
    with pytest.raises(Exception, match=r"keep_ratio=1\.5"):
        vllm.LLM(model=str(folders["qwen2_vl"]), hf_overrides={"architectures": [PLUGIN_ARCH["qwen2_vl"]],
                                                               "pact": {"keep_ratio": 1.5}}, **LLM_ARGS)
    gc.collect()


def test_register_is_idempotent():
    from vllm import ModelRegistry

    from pact_vlm.vllm import ARCHITECTURES, register

    register()
    register()
    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())


def test_import_pact_vlm_does_not_import_vllm():
    code = "import sys, pact_vlm, pact_vlm.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
