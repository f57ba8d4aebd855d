"""lmms-eval plugin (optional extra: ``pip install pact-vlm[eval]``).

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so
after installing ``pact-vlm`` the model name ``pact_vlm`` is known to lmms-eval without touching
its sources::

    lmms-eval --model pact_vlm \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,config=pact.json \\
        --tasks mme --batch_size 1

or from Python::

    from lmms_eval.evaluator import simple_evaluate
    results = simple_evaluate(model="pact_vlm", model_args="pretrained=DIR,method=pact", tasks=[...])
    results["throughput"]["avg_pact_reduction_ratio_token_weighted"]

The wrapper (:class:`pact_vlm.eval.lmms.PactVLM`) loads any supported VLM, applies the method of
a config file (``config=FILE``), of ``method=NAME`` plus that config's fields as further model
arguments, or (no fields) the model's own config, and reports, gathered over every rank, the
token-weighted reduction ratio (1 - sum of visual tokens after / sum before, over every prompt),
the totals and per-prompt means of visual tokens, and the time spent in the model and reducing.
"""

from __future__ import annotations

__all__ = ["MODEL_NAME", "manifests"]

MODEL_NAME = "pact_vlm"


def manifests():
    """The entry-point payload lmms-eval reads: one ``ModelManifest`` for :data:`MODEL_NAME`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path="pact_vlm.eval.lmms.PactVLM")]
