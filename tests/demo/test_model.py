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


@pytest.fixture(scope="module")
def clip_processor():
    return demo_model.build_processor("llava")


def test_clip_demo_prompt_has_one_token_per_patch(clip_processor):
    sample = shapes.make_sample(0)
    batch = clip_processor(images=[sample.image], text=[demo_model.prompt(clip_processor, sample.question)],
                           return_tensors="pt")
    image_id = clip_processor.tokenizer.convert_tokens_to_ids("<image>")
    # 8 x 8 patches of 16 px, CLS dropped by the "default" strategy: the Qwen2-VL demo's 64 cells
    assert int((batch["input_ids"] == image_id).sum()) == shapes.GRID * shapes.GRID
    assert batch["pixel_values"].shape == (1, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert clip_processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    # no resize or crop: the pixels are the image's, normalised
    mean = torch.tensor(clip_processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(clip_processor.image_processor.image_std).view(3, 1, 1)
    raw = torch.tensor(__import__("numpy").array(sample.image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(batch["pixel_values"][0], (raw - mean) / std, atol=1e-5, rtol=1e-5)


def test_clip_demo_saves_and_loads_without_torchvision(clip_processor, tmp_path):
    torch.manual_seed(0)
    model = demo_model.build_model("llava", clip_processor.tokenizer, num_hidden_layers=2, hidden_size=64,
                                   intermediate_size=128).eval()
    model.save_pretrained(tmp_path)
    clip_processor.save_pretrained(tmp_path)
    loaded, processor = demo_model.load_demo_model(tmp_path)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert loaded.config.vision_config.model_type == "clip_vision_model"
    sample = shapes.make_sample(3)
    text = demo_model.prompt(processor, sample.question)
    a = clip_processor(images=[sample.image], text=[text], return_tensors="pt")
    b = processor(images=[sample.image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**a).logits)


def test_load_demo_model_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="No demo model"):
        demo_model.load_demo_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="'llama' model, not a demo model"):
        demo_model.load_demo_model(tmp_path)
    with pytest.raises(ValueError, match="demo arch 'clip' is not one of"):
        demo_model.build_processor("clip")


@pytest.mark.parametrize("arch", demo_model.ARCHS)
def test_patch_embedding_as_a_matmul_is_the_convolution(arch):
    from pact_vlm.demo import train

    processor = demo_model.build_processor(arch)
    model = demo_model.build_model(arch, processor.tokenizer, num_hidden_layers=1, hidden_size=64,
                                   intermediate_size=128)
    sample = shapes.make_sample(4)
    pixels = processor(images=[sample.image], text=[demo_model.prompt(processor, sample.question)],
                       return_tensors="pt")["pixel_values"]
    embed = train._patch_embedding(model)
    with torch.no_grad():
        want = embed(pixels)
        train._patch_embed_as_linear(model)
        got = embed(pixels)
        train._restore_patch_embed(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "forward" not in embed.__dict__


def test_clip_demo_trains_and_refuses_another_arch_checkpoint(tmp_path):
    from pact_vlm.demo import train

    args = train.TrainArgs(arch="llava", steps=2, stage2_steps=0, batch_size=4, layers=1, aux_layer=1, questions=1, warmup=1,
                           out=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"), eval_every=0, final_eval_n=4,
                           ckpt_every=1)
    result = train.train(args)
    assert set(result) >= {"all", "n"} and result["n"] == 4
    model, _ = demo_model.load_demo_model(tmp_path / "out")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert len(model.model.language_model.layers) == 1
    with pytest.raises(ValueError, match="made with arch='llava'"):
        train.train(train.TrainArgs(arch="qwen2-vl", steps=2, stage2_steps=0, batch_size=4, layers=1, aux_layer=1,
                                    out=str(tmp_path / "q"), ckpt_dir=str(tmp_path / "ckpt")))
    with pytest.raises(ValueError, match="arch='clip' is not one of"):
        train.TrainArgs(arch="clip")


@pytest.mark.skipif(not (demo_model.CLIP_MODEL_DIR / "model.safetensors").is_file(),
                    reason="CLIP demo model not trained (python -m pact_vlm.demo.train --arch llava)")
def test_shipped_clip_model_accuracy():
    import json

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = demo_model.load_demo_model(demo_model.CLIP_MODEL_DIR)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    result = demo_model.evaluate(model, processor, n=200)
    recorded = json.loads((demo_model.CLIP_MODEL_DIR / "eval_heldout.json").read_text())
    assert result["all"] >= recorded["all"] - 0.06, (result, recorded)     # 200 of the recorded 1000 questions
