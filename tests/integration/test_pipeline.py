"""``transformers.pipeline("image-text-to-text")`` on an apply()'d model gives generate()'s text."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

import pact_vlm
import vlm_folder
from pact_vlm.demo import make_dataset
from pact_vlm.integration.loading import build_inputs, load_vlm

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_vlm(vlm_folder.save_demo_architecture(tmp_path_factory.mktemp("vlm")), device="cpu")


def _generate_text(model, processor, image, question):
    inputs = build_inputs(processor, question, [image])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("config", [pact_vlm.PACTConfig(layer=2, prune_ratio=0.3, cutoff=0.3),
                                    pact_vlm.PACTConfig(layer=1, prune_ratio=0.6, cutoff=0.5)])
def test_pipeline_matches_generate_after_apply(loaded, config):
    model, processor = loaded
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    samples = make_dataset("heldout", 2)
    with pact_vlm.apply(model, config) as handle:
        for sample in samples:
            messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                     {"type": "text", "text": sample.question}]}]
            out = pipe(text=messages, max_new_tokens=NEW_TOKENS, return_full_text=False,
                       generate_kwargs=dict(do_sample=False, min_new_tokens=NEW_TOKENS))
            pipe_stats = handle.stats
            assert pipe_stats.visual_after < pipe_stats.visual_before == 64   # the pipeline's call was reduced
            expected = _generate_text(model, processor, sample.image, sample.question)
            assert handle.stats.visual_after == pipe_stats.visual_after
            assert out[0]["generated_text"].strip() == expected.strip()
    assert not any(m._forward_pre_hooks for m in model.modules())
