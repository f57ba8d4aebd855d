"""The lmms-eval plugin: real ``simple_evaluate`` runs on local JSON tasks, offline.

The end-to-end runs use the shipped demo model (trained: its accuracy means something) on a
generation task and a multiple-choice version of the same questions, scored by the installed
lmms-eval's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if os.environ.get("CI"):
    import lmms_eval  # noqa: F401 - CI installs the eval extra: a missing lmms-eval is a failure there
else:
    pytest.importorskip("lmms_eval", reason="optional extra: pip install pact-vlm[eval]")

import vlm_folder
from lmms_eval.api.instance import Instance, unwrap_generation_output

from pact_vlm.config import load_config
from pact_vlm.demo import make_dataset
from pact_vlm.demo.model import DEFAULT_MODEL_DIR
from pact_vlm.eval.lmms import ModelFailure, PactVLM, interleave, rank_device, split_visuals

pytestmark = pytest.mark.usefixtures("one_thread")

N_DOCS = 8
SRC = Path(__file__).resolve().parents[2] / "src"
CHOICES = {"color": ["red", "green", "blue", "yellow", "purple", "orange"],
           "shape": ["circle", "square", "triangle", "cross"],
           "count": ["zero", "one", "two", "three", "four", "five"],
           "exists": ["yes", "no"], "where": ["topleft", "topright", "bottomleft", "bottomright"]}


def _task_yaml(root: Path, name: str, body: str) -> None:
    head = textwrap.dedent(f"""
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / 'data.json'}
          cache_dir: {root / 'hf_cache'}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
    """)
    (root / f"{name}.yaml").write_text(head + textwrap.dedent(body))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Local lmms-eval tasks over shapes images made here: ``pact_shapes_tiny`` (one-word answers,
    exact match) and ``pact_shapes_mc`` (the same questions, every answer of the question's kind a
    choice, accuracy)."""
    root = tmp_path_factory.mktemp("lmms_task")
    rows = []
    for i, sample in enumerate(make_dataset("heldout", N_DOCS)):
        path = root / f"img_{i}.png"
        sample.image.save(path)
        rows.append({"image": str(path), "question": sample.question, "answer": sample.answer,
                     "qtype": sample.qtype})
    (root / "data.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "utils.py").write_text(textwrap.dedent(f"""
        from PIL import Image

        CHOICES = {CHOICES!r}

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc):
            return doc["question"]

        def doc_to_choice(doc):
            return CHOICES[doc["qtype"]]

        def broken_visual(doc):
            return [{{"audio": doc["image"]}}]
    """))
    _task_yaml(root, "pact_shapes_tiny", """
        output_type: generate_until
        generation_kwargs:
          max_new_tokens: 2
          until: ["<|im_end|>"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """)
    _task_yaml(root, "pact_shapes_mc", """
        output_type: multiple_choice
        doc_to_choice: !function utils.doc_to_choice
        target_delimiter: " "
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
    """)
    _task_yaml(root, "pact_shapes_broken", """
        output_type: generate_until
        generation_kwargs:
          max_new_tokens: 2
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """)
    text = (root / "pact_shapes_broken.yaml").read_text().replace("utils.doc_to_visual", "utils.broken_visual")
    (root / "pact_shapes_broken.yaml").write_text(text)
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _evaluate(task_dir, tasks, model_args: str, batch_size):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("ERROR", include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model="pact_vlm", model_args=model_args, tasks=tasks, task_manager=manager,
                           batch_size=batch_size, bootstrap_iters=0, log_samples=True, verbosity="ERROR")


def _answers(results, task="pact_shapes_tiny") -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] for s in results["samples"][task]}


def _losses(results) -> list[float]:
    return [float(pair[0]) for s in results["samples"]["pact_shapes_mc"] for pair in s["filtered_resps"]]


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("pact_vlm") is PactVLM


def test_generation_and_multiple_choice_end_to_end_batches_agree(task_dir, offline):
    """method=pact with no fields: the demo folder's pact_config.json (layer 0; the library default
    layer 4 does not exist in this 4-layer model). Multiple choice is scored by lmms-eval's own
    argmin over what the model returns: the trained model must score high, not inverted."""
    args = f"pretrained={DEFAULT_MODEL_DIR},method=pact,device=cpu,dtype=float32"
    runs = {bs: _evaluate(task_dir, ["pact_shapes_tiny", "pact_shapes_mc"], args, bs) for bs in (1, 4, "auto")}
    one = runs[1]
    gen_acc = one["results"]["pact_shapes_tiny"]["exact_match,none"]
    mc_acc = one["results"]["pact_shapes_mc"]["acc,none"]
    assert gen_acc >= 0.75 and mc_acc >= 0.75, (gen_acc, mc_acc)   # inverted scoring gives ~0
    for bs in (4, "auto"):
        assert _answers(runs[bs]) == _answers(one), bs
        assert runs[bs]["results"]["pact_shapes_mc"]["acc,none"] == mc_acc
        assert _losses(runs[bs]) == pytest.approx(_losses(one), abs=1e-4)
    assert one["config"]["batch_sizes"] == [] and runs["auto"]["config"]["batch_sizes"] == [32, 32]
    tp = one["throughput"]
    n_choices = sum(len(CHOICES[d.qtype]) for d in make_dataset("heldout", N_DOCS))
    prompts = N_DOCS + n_choices
    assert tp["avg_pact_prompts_total"] == prompts
    assert tp["avg_pact_visual_tokens_before_total"] == 64 * prompts   # 128 x 128 images: 64 tokens each
    assert tp["avg_pact_visual_tokens_before_mean_per_prompt"] == 64
    after = tp["avg_pact_visual_tokens_after_total"]
    assert 0 < after < 64 * prompts
    assert tp["avg_pact_reduction_ratio_token_weighted"] == pytest.approx(1 - after / (64 * prompts))
    assert tp["avg_pact_ranks"] == 1


def _lm(model_dir=DEFAULT_MODEL_DIR, **kwargs) -> PactVLM:
    kwargs.setdefault("device", "cpu")
    return PactVLM(pretrained=str(model_dir), **kwargs)


def _requests(lm, samples, kind="generate_until", gen=None, continuation=None):
    lm.task_dict = {"t": {"test": [{"question": s.question} for s in samples]}}
    out = []
    for i, s in enumerate(samples):
        visual = (lambda doc, img=s.image: [img])
        second = dict(gen or {"max_new_tokens": 1}) if kind == "generate_until" else continuation[i]
        out.append(Instance(kind, (s.question, second, visual, i, "t", "test"), 0,
                            {"task": "t", "doc_id": i, "repeats": 1}))
    return out


def test_loglikelihood_is_the_mean_token_loss_lower_for_the_answer(tmp_path):
    """lmms-eval's convention (its llava_hf / llava_onevision wrappers): the mean negative
    log-likelihood of the continuation tokens, so the right answer has the smallest value."""
    lm = _lm(method="none")
    sample = make_dataset("heldout", 1)[0]
    choices = CHOICES[sample.qtype]
    reqs = _requests(lm, [sample] * len(choices), "loglikelihood", continuation=[" " + c for c in choices])
    pairs = [unwrap_generation_output(x)[0] for x in lm.loglikelihood(reqs)]
    losses = [p[0] for p in pairs]
    assert all(isinstance(p[0], float) and isinstance(p[1], bool) for p in pairs)
    assert min(losses) >= 0 and choices[losses.index(min(losses))] == sample.answer
    assert [p[1] for p in pairs] == [c == sample.answer for c in choices]
    # by hand: the prompt, then the answer's tokens; mean of -log p over them
    text, images, _ = lm._messages(sample.question, [("image", sample.image)])
    inputs = lm.processor(text=[text + sample.answer], images=images, return_tensors="pt")
    n = len(lm.tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0, -n - 1:-1]
    target = inputs["input_ids"][0, -n:]
    expected = float(-torch.log_softmax(logits, -1).gather(1, target[:, None]).mean())
    assert losses[choices.index(sample.answer)] == pytest.approx(expected, rel=1e-4)


def test_method_pact_uses_the_model_folders_config():
    lm = _lm(method="pact")
    assert lm.reduction_config == load_config(DEFAULT_MODEL_DIR / "pact_config.json")
    assert "pact_config.json" in lm.config_origin
    assert _lm(method="fastv").reduction_config.method == "fastv"     # another method: its defaults
    with_fields = _lm(method="pact", layer=1)            # fields go on top of the folder's config
    assert with_fields.reduction_config == load_config(DEFAULT_MODEL_DIR / "pact_config.json").replace(layer=1)
    assert "on top" in with_fields.config_origin


def test_cli_generate_uses_the_model_folders_config(tmp_path, capsys):
    from pact_vlm import cli

    path = tmp_path / "shape.png"
    make_dataset("heldout", 1)[0].image.save(path)
    rc = cli.main(["generate", str(DEFAULT_MODEL_DIR), "--image", str(path), "--prompt", "what color is the circle ?",
                   "--device", "cpu", "--max-new-tokens", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["config"] == load_config(DEFAULT_MODEL_DIR / "pact_config.json").to_dict()


def test_auto_batch_halves_on_out_of_memory_and_keeps_the_answers():
    samples = make_dataset("heldout", 5)
    lm = _lm(method="none", batch_size=1)
    expected = lm.generate_until(_requests(lm, samples))
    lm = _lm(method="none", batch_size="auto", max_batch_size=8)
    real, seen = lm.model.generate, []

    def generate(**kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("pretend")
        return real(**kwargs)

    lm.model.generate = generate
    assert lm.generate_until(_requests(lm, samples)) == expected
    assert seen == [5, 4, 2, 2, 1] and lm.batch_sizes["generate_until"] == 2
    for bad in (0, "two", -1):
        with pytest.raises(ModelFailure, match="batch_size"):
            _lm(method="none", batch_size=bad)


def test_requests_are_grouped_by_generation_settings_and_sorted_longest_first():
    samples = make_dataset("heldout", 4)
    lm = _lm(method="none", batch_size=4)
    reqs = _requests(lm, samples)
    reqs[1].arguments = (reqs[1].args[0], {"max_new_tokens": 2}, *reqs[1].args[2:])
    batches = []
    real = lm.model.generate

    def generate(**kwargs):
        batches.append((kwargs["input_ids"].shape[0], kwargs["max_new_tokens"]))
        return real(**kwargs)

    lm.model.generate = generate
    lm.generate_until(reqs)
    assert sorted(batches) == [(1, 2), (3, 1)]
    lengths = [lm._context_length(s.question) for s in samples]
    order = lm._ordered(reqs, lambda r: json.dumps(r.args[1]), lambda r: lm._context_length(r.args[0]))
    assert [lengths[i] for i in order[0]] == sorted((lengths[i] for i in (0, 2, 3)), reverse=True)


def test_generation_options_are_honoured_or_refused():
    samples = make_dataset("heldout", 2)
    lm = _lm(method="none", batch_size=2)
    seen = []
    real = lm.model.generate

    def generate(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    lm.model.generate = generate
    lm.generate_until(_requests(lm, samples, gen={"max_new_tokens": 2, "num_beams": 2, "repetition_penalty": 1.1,
                                                  "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1}))
    got = seen[-1]
    assert (got["num_beams"], got["repetition_penalty"], got["top_k"], got["top_p"], got["temperature"],
            got["do_sample"], got["max_new_tokens"]) == (2, 1.1, 5, 0.9, 0.7, True, 2)
    lm.generate_until(_requests(lm, samples, gen={"temperature": 0, "do_sample": True}))
    assert seen[-1]["do_sample"] is False       # temperature 0: greedy (lmms-eval's convention)
    with pytest.raises(ModelFailure, match="typical_p"):
        lm.generate_until(_requests(lm, samples, gen={"typical_p": 0.5}))
    with pytest.raises(ModelFailure, match="num_return_sequences"):
        lm.generate_until(_requests(lm, samples, gen={"num_return_sequences": 2}))


def test_numbered_placeholders_and_interleaved_images():
    assert interleave("compare <image 2> with <image 1> ?", 2) == [
        ("text", "compare"), ("image", 1), ("text", "with"), ("image", 0), ("text", "?")]
    assert interleave("<image>\nwhat is it ?", 2) == [("image", 1), ("image", 0), ("text", "what is it ?")]
    assert interleave("what ?", 2) == [("image", 0), ("image", 1), ("text", "what ?")]
    with pytest.raises(ValueError, match="image 3"):
        interleave("<image 3> ?", 2)
    lm = _lm(method="none")
    a, b = (s.image for s in make_dataset("heldout", 2))
    text, images, _ = lm._messages("is there <image 2> a red circle <image 1> ?", [("image", a), ("image", b)])
    assert images == [b, a]
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.index("is there") < text.index("<|image_pad|>") < text.index("a red circle")


def test_videos_go_to_the_processor_or_are_refused(tmp_path):
    frames = [s.image for s in make_dataset("heldout", 3)]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    kinds = [k for k, _ in split_visuals([frames[0], frames, str(clip), str(gif)])]
    assert kinds == ["image", "video", "video", "video"]
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        split_visuals([str(tmp_path / "missing.mp4")])
    lm = _lm(method="none", max_num_frames=4)
    with pytest.raises(ValueError, match="takes no video"):
        lm._messages("what ?", [("video", str(clip))])

    class VideoProcessor:                      # records what a processor with a video slot receives
        video_processor = object()
        chat_template = None
        image_token, video_token = "<I>", "<V>"

        def __call__(self, **kwargs):
            self.kwargs = kwargs
            raise RuntimeError("recorded")

    lm.processor = VideoProcessor()
    prompt = lm._messages("what happens ?", [("video", str(clip)), ("image", frames[0])])
    assert prompt[0] == "<V><I>\nwhat happens ?"
    with pytest.raises(RuntimeError, match="recorded"):
        lm._batch_inputs([prompt])
    assert lm.processor.kwargs["videos"] == [str(clip)] and lm.processor.kwargs["images"] == [frames[0]]
    assert lm.processor.kwargs["videos_kwargs"] == {"num_frames": 4, "do_sample_frames": True}


def test_processor_settings_change_the_visual_tokens():
    sample = make_dataset("heldout", 1)[0]
    counts = {}
    for name, args in {"own": {}, "max": {"max_pixels": 64 * 64},
                       "min": {"min_pixels": 256 * 256, "max_pixels": 256 * 256}}.items():
        lm = _lm(method="none", **args)
        lm.generate_until(_requests(lm, [sample]))
        counts[name] = lm.tally.visual_before
    # 128 px images: 8 x 8 merged patches; at most 64 x 64 px: 4 x 4; at least 256 x 256 px: 16 x 16
    assert counts == {"own": 64, "max": 16, "min": 256}
    with pytest.raises(ModelFailure, match="max_pixels"):
        _lm(method="none", max_pixels="lots")


def test_system_prompt_goes_first(tmp_path):
    lm = _lm(method="none", system_prompt="answer in one word")
    text, _, _ = lm._messages("what ?", [])
    assert text.startswith("<|im_start|>system\nanswer in one word<|im_end|>")
    path = tmp_path / "system.txt"
    path.write_text("yes or no\n")
    assert _lm(method="none", system_prompt=str(path)).system_prompt == "yes or no"


def test_generate_until_multi_round():
    samples = make_dataset("heldout", 2)
    lm = _lm(method="none")
    lm.task_dict = {"t": {"test": [{"q": s.question, "img": s.image} for s in samples]}}
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["img"]], doc["q"], False, previous_output, {"round": round_idx}

    reqs = [Instance("generate_until_multi_round", (s.question, {"max_new_tokens": 1}, lambda d: [d["img"]],
                                                    doc_to_text, i, "t", "test"), 0,
                    {"task": "t", "doc_id": i, "repeats": 1}) for i, s in enumerate(samples)]
    out = lm.generate_until_multi_round(reqs)
    single = lm.generate_until(_requests(lm, samples))
    assert out == [[a, a] for a in single]
    assert calls[0] == (1, [single[0]], None) and calls[1] == (2, [single[0]] * 2, {"round": 1})


def test_rank_device_and_summary_over_ranks(monkeypatch):
    assert rank_device(None, 1, 0) is None and rank_device("cpu", 2, 1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device(None, 2, 1) == "cuda:1" and rank_device("cuda", 4, 3) == "cuda:3"
    with pytest.raises(ValueError, match="every rank on one GPU"):
        rank_device("cuda:0", 2, 1)
    monkeypatch.undo()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    lm = _lm(method="pact")
    assert (lm.rank, lm.world_size, lm.device.type) == (1, 2, "cpu")
    samples = make_dataset("heldout", 2)
    reqs = _requests(lm, samples)
    reqs[1].metadata = dict(reqs[1].metadata, __padding_only__=True)   # lmms-eval's rank padding copy
    lm.generate_until(reqs)
    assert lm.tally.prompts == 1 and lm.tally.visual_before == 64


@pytest.mark.slow  # two processes, each importing lmms-eval: about 90 s on 2 shared cores
def test_torchrun_two_processes_summary_over_both_ranks(task_dir, tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU: lmms-eval splits the documents, the summary counts both."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           "-m", "lmms_eval", "--model", "pact_vlm", "--model_args",
           f"pretrained={DEFAULT_MODEL_DIR},method=pact,device=cpu,dtype=float32", "--tasks", "pact_shapes_tiny",
           "--include_path", str(task_dir), "--batch_size", "2", "--verbosity", "INFO"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if "pact_vlm reduction summary:" in ln]
    assert len(lines) == 1, out[-3000:]        # logged once, by rank 0
    summary, _ = json.JSONDecoder().raw_decode(lines[0].split("pact_vlm reduction summary:", 1)[1].strip())
    assert summary["pact_ranks"] == 2 and summary["pact_prompts_total"] == N_DOCS
    assert summary["pact_visual_tokens_before_total"] == 64 * N_DOCS
    ranks = {ln.split("pact_vlm rank ")[1].split(":")[0] for ln in out.splitlines() if "pact_vlm rank " in ln}
    assert ranks == {"0", "1"}


def test_a_model_error_fails_the_run(task_dir, tmp_path, offline):
    """lmms-eval's CLI turns an exception into an ERROR line and exit status 0; ours exits 1."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "pact_vlm", "--model_args",
           f"pretrained={DEFAULT_MODEL_DIR},method=pact,device=cpu", "--tasks", "pact_shapes_broken",
           "--include_path", str(task_dir), "--batch_size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "pact_vlm failed while generating" in proc.stderr and "dict" in proc.stderr
    # on_error=raise: lmms-eval's own handling
    with pytest.raises(ValueError, match="dict"):
        _evaluate(task_dir, ["pact_shapes_broken"], f"pretrained={DEFAULT_MODEL_DIR},method=none,device=cpu,"
                                                    "on_error=raise", 1)
    with pytest.raises(ModelFailure, match="layer"):
        _lm(method="pact", layer=9)


def test_bad_model_args_name_the_fix(tmp_path):
    model_dir = vlm_folder.save_demo_architecture(tmp_path / "m")
    with pytest.raises(ModelFailure, match="unknown key"):
        _lm(model_dir, method="pact", cuttoff=0.3)
    with pytest.raises(ModelFailure, match="unknown method"):
        _lm(model_dir, method="nope")
    with pytest.raises(ValueError, match="on_error"):
        _lm(model_dir, method="none", on_error="ignore")
