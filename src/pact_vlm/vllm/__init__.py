"""PACT inside vLLM: out-of-tree model classes that reduce each image's embeddings before the language model.

Use it by naming one of the classes as the model's architecture::

    from vllm import LLM
    llm = LLM(model="Qwen/Qwen2-VL-2B-Instruct",
              hf_overrides={"architectures": ["PactQwen2VLForConditionalGeneration"],
                            "pact": {"keep_ratio": 0.3}})

The classes are registered with vLLM's ``ModelRegistry`` by :func:`register`, which vLLM calls in
every process through the ``vllm.general_plugins`` entry point of this package (installed with
pact-vlm; nothing to call by hand). Importing :mod:`pact_vlm` never imports vLLM; this package
imports it only inside :func:`register` and the model modules.

The reduction is :mod:`pact_vlm.algorithms.budget_pact` (method ``"pact_budget"``), the same code
as ``pact_vlm.apply(model, PACTBudgetConfig(...))`` on stock transformers; see
:mod:`pact_vlm.vllm.qwen` for how it enters vLLM and :mod:`pact_vlm.vllm.config` for the config.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "register"]

ARCHITECTURES: dict[str, str] = {
    "PactQwen2VLForConditionalGeneration": "pact_vlm.vllm.qwen:PactQwen2VLForConditionalGeneration",
    "PactQwen2_5_VLForConditionalGeneration": "pact_vlm.vllm.qwen:PactQwen2_5_VLForConditionalGeneration",
}
"""Architecture name -> ``"module:Class"`` of every model class this plugin adds."""


def register() -> None:
    """Register the PACT model classes with vLLM (the ``vllm.general_plugins`` entry point).

    vLLM calls it in every process it starts, so it is idempotent: an architecture already
    registered is left as it is. The classes are registered lazily (``"module:Class"``), so
    nothing heavier than vLLM's registry is imported until a PACT architecture is chosen.
    """
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
