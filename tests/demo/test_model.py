"""Tests of the demo VLM plumbing (offline tokenizer, torchvision-free processor) and of the shipped model."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

from pact_vlm.demo import model as demo_model  # noqa: E402
from pact_vlm.demo import shapes  # noqa: E402
from pact_vlm.demo.model import DEFAULT_MODEL_DIR  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    return demo_model.build_processor()


def test_prompt_tokenizes_to_64_image_tokens(processor):
    sample = shapes.make_sample(0)
    text = demo_model.prompt(processor, sample.question)
    batch = processor(images=[sample.image], text=[text], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((batch["input_ids"] == image_id).sum()) == shapes.GRID * shapes.GRID
    assert batch["pixel_values"].shape == (256, 3 * 2 * 8 * 8)
    assert processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    # image tokens are flagged for M-RoPE
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_id)


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = demo_model.Qwen2VLImageOnlyProcessor.from_pretrained(tmp_path)
    sample = shapes.make_sample(1)
    text = demo_model.prompt(loaded, sample.question)
    a = processor(images=[sample.image], text=[text], return_tensors="pt")
    b = loaded(images=[sample.image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert not hasattr(loaded, "video_processor")


def test_untrained_model_generates(processor):
    torch.manual_seed(0)
    config = demo_model.build_config(processor.tokenizer, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    model = demo_model.Qwen2VLForConditionalGeneration(config).eval()
    sample = shapes.make_sample(2)
    out = demo_model.answer(model, processor, sample.image, sample.question)
    assert isinstance(out, str)


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not trained (python -m pact_vlm.demo.train)"
)
def test_shipped_model_accuracy():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    model, processor = demo_model.load_demo_model()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    result = demo_model.evaluate(model, processor, n=200)
    assert result["all"] >= 0.90, result
    assert time.time() - start < 60


def test_training_batch_labels_every_answer(processor):
    from pact_vlm.demo import train

    samples = [shapes.make_sample(seed) for seed in range(4)]
    batch = train.collate(samples, processor, questions=3)
    assert batch["input_ids"].shape[1] == train.SEQ_LEN + 2 * train.TURN_LEN
    tokens = processor.tokenizer.convert_ids_to_tokens
    for i, sample in enumerate(samples):
        labelled = tokens(batch["input_ids"][i][batch["labels"][i] != -100].tolist())
        answers = [sample.answer] + [a for _, a, _ in shapes.more_questions(sample, 2)]
        assert labelled == [w for a in answers for w in (a, "<|im_end|>")]
