"""PACT inside vLLM (``pact_vlm.vllm``) on tiny random-weight Qwen2-VL / Qwen2.5-VL, on vLLM's CPU build.

Runs in the vLLM test environment (``.ci/vllm/setup-venv``, ``.ci/vllm/run``); the main suite has
no vLLM and skips this file. One ``LLM`` per architecture is shared by the module's tests.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the engine in this process: errors surface here
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import pact_vlm  # noqa: E402
from pact_vlm.algorithms.budget_pact import budget_keep_count  # noqa: E402
from pact_vlm.vllm.config import config_from_override, resolve_config  # noqa: E402
from pact_vlm.vllm.embeddings import append_positions, grid_offsets, mrope_positions, split_positions  # noqa: E402
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


def test_folder_config_of_another_method_refused(folders, tmp_path):
    pact_vlm.PACTConfig(layer=0).save(tmp_path / "pact_config.json")
    with pytest.raises(ValueError, match="pact_budget"):
        resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path)))


def test_folder_config_is_read(tmp_path):
    pact_vlm.PACTBudgetConfig(keep_ratio=0.5, alpha=2.0).save(tmp_path / "pact_config.json")
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path)))
    assert (cfg.keep_ratio, cfg.alpha) == (0.5, 2.0) and "pact_config.json" in origin
    # hf_overrides come first
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(pact={"keep_ratio": 0.2}), model=str(tmp_path)))
    assert cfg.keep_ratio == 0.2 and origin == "hf_overrides 'pact'"
    cfg, origin = resolve_config(SimpleNamespace(hf_config=SimpleNamespace(), model=str(tmp_path / "none")))
    assert cfg == pact_vlm.PACTBudgetConfig() and origin == "library defaults"


@pytest.mark.parametrize("raw, message", [
    ({"keep_ratio": 0.0}, "keep_ratio=0.0"),
    ({"keep_ratio": 0.3, "proportional_attention": True}, "proportional_attention=True cannot run in vLLM"),
    ({"keep_ratio": 0.3, "cutoff": 0.2}, "unknown key"),
    ({"method": "pact", "layer": 0}, "pact_budget"),
    (0.3, "must be a dict"),
])
def test_bad_override_messages(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_override(raw)


def test_register_is_idempotent():
    from vllm import ModelRegistry

    from pact_vlm.vllm import ARCHITECTURES, register

    register()
    register()
    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())


def test_import_pact_vlm_does_not_import_vllm():
    code = "import sys, pact_vlm, pact_vlm.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_position_channels_round_trip():
    emb = torch.randn(5, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([[0, 0, 0], [0, 3, 255], [0, 256, 1], [7, 300, 4000], [0, 65535, 2]])
    back, got = split_positions(append_positions(emb, offsets), 8)
    assert torch.equal(back, emb) and torch.equal(got, offsets)
    assert split_positions(emb, 8)[1] is None


def test_mrope_positions_keep_text_and_decode_positions():
    # prompt: 3 text, an image of 2x3 tokens (reduced to 2 placeholders), 4 text
    full, full_delta = mrope_positions(13, [(3, 6, 1, 2, 3, 1.0, False)])
    reduced, delta = mrope_positions(9, [(3, 2, 1, 2, 3, 1.0, True)])
    grid = grid_offsets(1, 2, 3)
    assert torch.equal(full[:, 3:9].T, grid + 3)                   # vLLM's own layout when not reduced
    assert torch.equal(reduced[:, 3:5], torch.full((3, 2), 3))      # placeholders at the image's start
    assert torch.equal(reduced[:, :3], full[:, :3]) and torch.equal(reduced[:, 5:], full[:, 9:])
    assert 9 + delta == 13 + full_delta                            # the first decoded token's position
    tall, _ = mrope_positions(8, [(0, 6, 1, 3, 2, 1.0, False)])
    assert int(tall[0, 6]) == 3                                    # text after a tall grid: its height
