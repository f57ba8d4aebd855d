"""The lmms-eval plugin: a real ``simple_evaluate`` run on a local JSON task, offline."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

if os.environ.get("CI"):
    import lmms_eval  # noqa: F401 - CI installs the eval extra: a missing lmms-eval is a failure there
else:
    pytest.importorskip("lmms_eval", reason="optional extra: pip install pact-vlm[eval]")

import vlm_folder
from pact_vlm.demo import make_dataset

N_DOCS = 4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lmms-eval task: JSON rows of (image path, question, answer) over shapes images made here."""
    root = tmp_path_factory.mktemp("lmms_task")
    rows = []
    for i, sample in enumerate(make_dataset("heldout", N_DOCS)):
        path = root / f"img_{i}.png"
        sample.image.save(path)
        rows.append({"image": str(path), "question": sample.question, "answer": sample.answer})
    (root / "data.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc):
            return doc["question"]
    """))
    (root / "pact_shapes_tiny.yaml").write_text(textwrap.dedent(f"""
        task: pact_shapes_tiny
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'data.json'}
          cache_dir: {root / 'hf_cache'}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 2
          until: ["<|im_end|>"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """))
    return root


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from pact_vlm.eval.lmms import PactVLM

    assert get_model("pact_vlm") is PactVLM


def test_simple_evaluate_reports_reduction(task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model_dir, _ = vlm_folder.shipped_or_random(tmp_path / "model")
    manager = TaskManager("ERROR", include_path=str(task_dir), include_defaults=False)
    results = simple_evaluate(
        model="pact_vlm",
        model_args=f"pretrained={model_dir},method=pact,layer=2,prune_ratio=0.3,cutoff=0.3,device=cpu,dtype=float32",
        tasks=["pact_shapes_tiny"], task_manager=manager, batch_size=1, bootstrap_iters=0,
        log_samples=True, verbosity="ERROR")
    scores = results["results"]["pact_shapes_tiny"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    # answers were generated (one per doc) by our model
    assert len(results["samples"]["pact_shapes_tiny"]) == N_DOCS
    tp = results["throughput"]
    before, after = tp["avg_visual_tokens_before"], tp["avg_visual_tokens_after"]
    assert before == 64 * N_DOCS            # 128 x 128 shapes images -> 8 x 8 merged patches each
    assert 0 < after < before
    assert tp["avg_reduction_ratio"] == pytest.approx(1 - after / before)
    assert tp["avg_prompts"] == N_DOCS


def test_bad_model_args_name_the_fix(tmp_path):
    from pact_vlm.eval.lmms import PactVLM

    model_dir = vlm_folder.save_demo_architecture(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown key"):
        PactVLM(pretrained=str(model_dir), method="pact", cuttoff=0.3, device="cpu")
    with pytest.raises(ValueError, match="unknown method"):
        PactVLM(pretrained=str(model_dir), method="nope", device="cpu")


def test_loglikelihood_agrees_with_greedy_generation(tmp_path):
    from lmms_eval.api.instance import Instance

    from pact_vlm.eval.lmms import PactVLM

    model_dir = vlm_folder.save_demo_architecture(tmp_path / "m")
    lm = PactVLM(pretrained=str(model_dir), method="pact", layer=2, prune_ratio=0.3, cutoff=0.3, device="cpu")
    sample = make_dataset("heldout", 1)[0]
    lm.task_dict = {"t": {"test": [{"question": sample.question}]}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    visual = lambda doc: [sample.image]  # noqa: E731
    gen = Instance("generate_until", (sample.question, {"max_new_tokens": 1}, visual, 0, "t", "test"), 0, meta)
    word = lm.generate_until([gen])[0]
    assert word and lm.tally.visual_after < lm.tally.visual_before == 64
    other = next(w for w in ("red", "blue", "circle", "yes") if w != word)
    reqs = [Instance("loglikelihood", (sample.question, w, visual, 0, "t", "test"), 0, meta) for w in (word, other)]
    (lp_word, greedy_word), (lp_other, greedy_other) = lm.loglikelihood(reqs)
    assert greedy_word and not greedy_other and lp_word > lp_other
    assert lm.tally.prompts == 3 and lm.reduction_summary()["reduction_ratio"] == pytest.approx(
        1 - lm.tally.visual_after / lm.tally.visual_before)


def test_method_pact_without_fields_takes_the_model_folder_config(tmp_path):
    from loguru import logger

    import pact_vlm
    from pact_vlm.eval.lmms import PactVLM

    model_dir = vlm_folder.save_demo_architecture(tmp_path / "m")
    saved = pact_vlm.PACTConfig(layer=1, prune_ratio=0.1, cutoff=0.2)
    saved.save(model_dir / "pact_config.json")
    lines = []
    sink = logger.add(lines.append, level="INFO")
    try:
        lm = PactVLM(pretrained=str(model_dir), method="pact", device="cpu")
        assert lm.reduction_config == saved and lm._handle.config == saved
        assert any(f"pact config from model folder config {model_dir / 'pact_config.json'}" in ln for ln in lines)
        # fields go on top of the folder's config
        lm = PactVLM(pretrained=str(model_dir), method="pact", cutoff=0.3, device="cpu")
        assert lm.reduction_config == saved.replace(cutoff=0.3)
    finally:
        logger.remove(sink)
    # another method: that method's defaults, not the folder's PACT config
    lm = PactVLM(pretrained=str(model_dir), method="fastv", layer=2, device="cpu")
    assert lm.reduction_config == pact_vlm.FastVConfig(layer=2)
