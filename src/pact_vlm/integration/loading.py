"""Loading a supported VLM + its processor from a hub id or a local folder, and building prompts.

Used by the command line, the lmms-eval plugin and the pictures; the library itself works on any
model object the user loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .adapters import ADAPTERS, supported_models

__all__ = ["load_vlm", "load_processor", "build_inputs", "prompt_text", "resolve_dtype", "default_device"]

# Processor classes that live in this package (AutoProcessor does not know them).
_OWN_PROCESSORS = {"Qwen2VLImageOnlyProcessor": "pact_vlm.demo.model"}
_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | torch.dtype):
    """``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype) -> what from_pretrained takes."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def _looks_like_path(name: str) -> bool:
    # a hub id is "name" or "owner/name"
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_source(name: str | os.PathLike) -> str:
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name!r} has no config.json; pass a folder written by "
                                    "save_pretrained() or a hub id such as 'llava-hf/llava-onevision-qwen2-7b-ov-hf'")
        return str(path)
    if path.exists() or _looks_like_path(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist; pass an existing folder written by "
                                "save_pretrained() or a hub id")
    return name


def _model_type(source: str, local_files_only: bool) -> tuple[str, str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except OSError as err:
        raise FileNotFoundError(f"cannot load the config of {source!r} ({_first_line(err)}); check the hub id, "
                                "or download the model and pass its folder") from None
    except ValueError as err:
        raise ValueError(f"{source!r} has a config transformers cannot read ({_first_line(err)})") from None
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    return config.model_type, archs[0]


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def load_vlm(source: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: str | None = None,
             attn_implementation: str = "sdpa", local_files_only: bool = False):
    """Load a supported VLM and its processor.

    Args:
        source: a hub id (``"Qwen/Qwen2-VL-7B-Instruct"``) or a local folder written by ``save_pretrained``.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: a GPU when there is one.
        attn_implementation: one of ``integration.attention.SUPPORTED_BACKENDS`` (``"sdpa"``, ``"eager"``,
            ``"flex_attention"``, ``"flash_attention_2"``, ``"flash_attention_3"``).
        local_files_only: never contact the hub.

    Returns:
        ``(model, processor)``: the model in eval mode on ``device``.

    Raises:
        FileNotFoundError: the folder or hub id cannot be found.
        ValueError: the model is not a supported VLM (it has no visual tokens PACT can reduce).
    """
    from transformers import AutoModelForImageTextToText

    source = _check_source(source)
    model_type, arch = _model_type(source, local_files_only)
    if model_type not in ADAPTERS:
        raise ValueError(f"{source!r} is a {arch} (model_type {model_type!r}), which has no visual tokens "
                         f"pact-vlm can reduce; supported classes: {', '.join(supported_models())}")
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
        local_files_only=local_files_only)
    model.to(device or default_device()).eval()
    return model, load_processor(source, local_files_only=local_files_only)


def load_processor(source: str | os.PathLike, *, local_files_only: bool = False):
    """The multimodal processor of ``source``.

    ``AutoProcessor`` first; when it only finds a tokenizer (a processor class it does not know,
    such as the demo model's ``Qwen2VLImageOnlyProcessor``) or fails, the class named in the
    folder's ``processor_config.json`` is used.
    """
    from transformers import AutoProcessor

    source = str(source)
    error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except Exception as err:  # noqa: BLE001 - fall back to the class the folder names
        error = err
    cls = _named_processor_class(source)
    if cls is None:
        reason = f" ({_first_line(error)})" if error is not None else ""
        raise ValueError(f"no image processor found for {source!r}{reason}; save the model's processor with "
                         "processor.save_pretrained(folder) next to the weights")
    return cls.from_pretrained(source, local_files_only=local_files_only)


def _named_processor_class(source: str):
    config_path = Path(source) / "processor_config.json"
    if not config_path.is_file():
        return None
    name = json.loads(config_path.read_text()).get("processor_class")
    if not name:
        return None
    if name in _OWN_PROCESSORS:
        import importlib

        return getattr(importlib.import_module(_OWN_PROCESSORS[name]), name)
    import transformers

    return getattr(transformers, name, None)


def prompt_text(processor, prompt: str, n_images: int = 1, n_videos: int = 0) -> str:
    """The text of one user turn with ``n_images`` images and ``n_videos`` videos before ``prompt``,
    then the assistant turn: the processor's chat template when it has one, else its
    ``image_token`` / ``video_token`` placeholders in front of the prompt."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
        content.append({"type": "text", "text": prompt})
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    tags = getattr(processor, "image_token", "<image>") * n_images
    tags += getattr(processor, "video_token", "<video>") * n_videos
    return f"{tags}\n{prompt}" if tags else prompt


def build_inputs(processor, prompt: str, images: Sequence[Any] = (), videos: Sequence[Any] = (),
                 device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs for one user turn: the images / videos, then ``prompt``, then the assistant turn.

    Uses the processor's chat template when it has one, else ``processor.image_token`` /
    ``video_token`` placeholders in front of the prompt.
    """
    images, videos = list(images), list(videos)
    if videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{type(processor).__name__} takes no video; pass images instead")
    text = prompt_text(processor, prompt, len(images), len(videos))
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    inputs = processor(**kwargs)
    if device is not None:
        inputs = inputs.to(device)
    return inputs
