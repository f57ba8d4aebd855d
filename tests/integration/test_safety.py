"""State and safety: threads sharing an applied model, configs edited after apply(), several conversations."""

from __future__ import annotations

import threading

import pytest
import torch

import pact_vlm
import tiny_models as tm

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def _cfg(**kw):
    return pact_vlm.PACTConfig(**{**dict(layer=2, prune_ratio=0.3, cutoff=0.3), **kw})


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3", "qwen3_5"])
def test_two_threads_on_one_applied_model_both_get_their_own_answers(arch):
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    jobs = {"a": tm.make_inputs(model, arch, seed=1), "b": tm.make_inputs(model, arch, batch=2, seed=2, text_len=11)}
    with torch.no_grad(), pact_vlm.apply(model, _cfg()) as handle:
        want = {}
        for name, inputs in jobs.items():
            out = model.generate(**inputs, **GEN)
            want[name] = (out.sequences, torch.stack(out.logits), handle.stats.visual_after)
        got, errors = {name: [] for name in jobs}, []
        barrier = threading.Barrier(len(jobs))

        def worker(name):
            try:
                barrier.wait()
                for _ in range(6):
                    out = model.generate(**jobs[name], **GEN)
                    got[name].append((out.sequences, torch.stack(out.logits), handle.stats.visual_after))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for name, runs in got.items():
        assert len(runs) == 6
        for sequences, logits, visual_after in runs:
            assert torch.equal(sequences, want[name][0])
            assert (logits - want[name][1]).abs().max() < 1e-5
            assert visual_after == want[name][2]          # each thread reads its own stats


def test_editing_the_config_after_apply_has_no_effect_or_raises():
    torch.manual_seed(0)
    model = tm.build_tiny("llava", "sdpa")
    inputs = tm.make_inputs(model, "llava")
    cfg = _cfg()
    with torch.no_grad():
        with pact_vlm.apply(model, cfg) as handle:
            want = model(**inputs).logits
            cfg.layer, cfg.cutoff = 3, 1.5          # the caller's object: no effect on this reduction
            got = model(**inputs).logits
            assert handle.stats.reduction_layers == [2] and handle.config.layer == 2
            with pytest.raises(AttributeError, match=r"in use by an applied reduction .*config.replace\(cutoff=0.5\)"):
                handle.config.cutoff = 0.5
            assert handle.config.replace(cutoff=0.5).cutoff == 0.5     # a copy, free to change
        assert torch.equal(got, want)
        cfg.cutoff = -1.0                            # an unvalidated edit is caught when applied again
        with pytest.raises(ValueError, match=r"cutoff=-1.0 is outside \[0.0, 2.0\]"):
            pact_vlm.apply(model, cfg)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3", *tm.GEMMA4, "mistral3", "idefics3", "qwen3_5"])
def test_any_earlier_conversation_can_be_continued(arch):
    """A, then B, then A again: A's second turn equals A's second turn without B in between."""
    torch.manual_seed(0)
    model = tm.build_tiny(arch, "sdpa")
    a, b = tm.make_inputs(model, arch, seed=1), tm.make_inputs(model, arch, seed=2, text_len=10)

    def follow_up(first, inputs):
        ids = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)
        turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in inputs:
            turn["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"],
                                                                (0, ids.shape[1] - inputs["input_ids"].shape[1]))
        return turn

    with torch.no_grad(), pact_vlm.apply(model, _cfg()):
        first_a = model.generate(**a, **GEN)
        alone = model.generate(**follow_up(first_a, a), **{tm.CACHE_KWARG: first_a.past_key_values}, **GEN)
        first_a = model.generate(**a, **GEN)
        first_b = model.generate(**b, **GEN)
        again = model.generate(**follow_up(first_a, a), **{tm.CACHE_KWARG: first_a.past_key_values}, **GEN)
        model.generate(**follow_up(first_b, b), **{tm.CACHE_KWARG: first_b.past_key_values}, **GEN)
    assert torch.equal(again.sequences, alone.sequences)
    assert (torch.stack(again.logits) - torch.stack(alone.logits)).abs().max() < 1e-5
