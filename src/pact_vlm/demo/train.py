"""Train the demo VLM from scratch on CPU: ``python -m pact_vlm.demo.train --out DIR``.

``--arch qwen2-vl`` (default) trains the Qwen2-VL demo, ``--arch llava`` the CLIP-tower demo (a
LLaVA-1.5 layout, for the methods that read a CLIP tower's attention), each into its shipped folder
unless ``--out`` is given.

Recipe (what made a tiny VLM read the image on 2 CPU cores):

* answer-only language-model loss (each answer word and its closing ``<|im_end|>``), with
  ``--questions`` questions about each image as a multi-turn chat (more supervision per image
  encoded; the first turn is exactly the evaluation format);
* auxiliary per-token losses, dropped after training: colour and shape of the object under each
  visual token on the LM input embeddings (makes the vision tower + merger useful from the first
  steps), and colour, shape, row and column of each visual token on the output of LM layer
  ``--aux-layer - 1`` (makes the early LM layers write the M-RoPE position into the tokens, which
  the ``where`` questions need).  Their weight falls from 1 to ``--aux-final`` over the second
  half of training;
* every batch padded to one fixed length (``SEQ_LEN``) and bfloat16 autocast: several times
  faster on CPU than variable lengths in float32.

Batch ``k`` holds the training seeds ``[k * batch_size, (k + 1) * batch_size)``, so a run is a
pure function of its arguments, and a resumed run (``--ckpt-dir`` holds ``last.pt``, written
every ``--ckpt-every`` steps) continues exactly where it stopped.  A further stage starts from an
earlier run's weights (``--init-from RUN/last.pt``) with a fresh optimizer and schedule, on
batches from ``--data-offset`` on (past the batches the earlier run saw); by default the one
command runs both stages (``--steps`` then ``--stage2-steps`` with ``--stage2-lr``), each resumable.  At the end the model, tokenizer
and processor are written with ``save_pretrained`` to ``--out``, with ``eval_heldout.json``
(held-out accuracy per question type) and ``training_args.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import shapes
from .model import (
    ARCHS,
    CLIP_MODEL_DIR,
    DEFAULT_MODEL_DIR,
    build_model,
    build_processor,
    evaluate,
    prompt,
)

SEQ_LEN = 84
"""Fixed training sequence length of one question (the longest question + answer is 80 tokens)."""
TURN_LEN = 14
"""Tokens of one further question turn at most (``<|im_start|> user`` ... answer ``<|im_end|>``)."""


@dataclass
class TrainArgs:
    """Training hyper-parameters (all of ``python -m pact_vlm.demo.train --help``)."""

    arch: str = "qwen2-vl"
    out: str = ""
    ckpt_dir: str = ""
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_layer: int = 2
    aux_final: float = 0.1
    ckpt_every: int = 200
    eval_every: int = 500
    eval_n: int = 200
    final_eval_n: int = 1000
    seed: int = 0
    threads: int = 2
    layers: int = 4
    questions: int = 4
    stage2_steps: int = 2500
    stage2_lr: float = 5e-4
    stage2_warmup: int = 50
    init_from: str = ""
    data_offset: int = 0
    resume: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        suffix = "" if self.arch == "qwen2-vl" else "_clip"
        if not self.out:        # the shipped model's folder for this arch
            self.out = str(DEFAULT_MODEL_DIR if self.arch == "qwen2-vl" else CLIP_MODEL_DIR)
        if not self.ckpt_dir:
            self.ckpt_dir = str(Path(tempfile.gettempdir()) / f"pact_vlm_demo{suffix}_ckpt")


class AuxHeads(nn.Module):
    """Linear probes on visual tokens: colour / shape (+ row / column at the middle layer)."""

    def __init__(self, hidden: int):
        super().__init__()
        n_colors, n_shapes = len(shapes.COLORS) + 1, len(shapes.SHAPES) + 1  # +1: background
        self.in_color = nn.Linear(hidden, n_colors)
        self.in_shape = nn.Linear(hidden, n_shapes)
        self.mid_color = nn.Linear(hidden, n_colors)
        self.mid_shape = nn.Linear(hidden, n_shapes)
        self.mid_row = nn.Linear(hidden, shapes.GRID)
        self.mid_col = nn.Linear(hidden, shapes.GRID)


def token_labels(samples: list[shapes.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per visual token colour and shape class (0 = background), each ``[B * GRID * GRID]``."""
    color_index = {c: i + 1 for i, c in enumerate(shapes.COLORS)}
    shape_index = {s: i + 1 for i, s in enumerate(shapes.SHAPES)}
    colors = torch.zeros(len(samples), shapes.GRID, shapes.GRID, dtype=torch.long)
    kinds = torch.zeros_like(colors)
    for b, sample in enumerate(samples):
        mask = torch.from_numpy(sample.object_patch_mask)
        for obj in sample.objects:
            rows = slice(obj.row, obj.row + shapes.SLOT)
            cols = slice(obj.col, obj.col + shapes.SLOT)
            colors[b, rows, cols] = torch.where(mask[rows, cols], color_index[obj.color], 0)
            kinds[b, rows, cols] = torch.where(mask[rows, cols], shape_index[obj.shape], 0)
    return colors.flatten(), kinds.flatten()


def collate(samples: list[shapes.Sample], processor, questions: int = 1) -> dict[str, torch.Tensor]:
    """Processor inputs padded to a fixed length, with ``labels`` on every answer and its ``<|im_end|>``.

    The first turn is the sample's own question (the evaluation format); ``questions - 1`` more
    turns ask about the same image (``shapes.more_questions``).
    """
    texts = []
    for s in samples:
        text = prompt(processor, s.question) + s.answer + "<|im_end|>"
        for question, answer, _ in shapes.more_questions(s, questions - 1):
            text += f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
        texts.append(text)
    seq_len = SEQ_LEN + TURN_LEN * (questions - 1)
    batch = processor(
        images=[s.image for s in samples],
        text=texts,
        padding="max_length",
        max_length=seq_len,
        truncation=False,
        return_tensors="pt",
    )
    if batch["input_ids"].shape[1] != seq_len:
        raise ValueError(f"a sample is longer than {seq_len} tokens; raise SEQ_LEN / TURN_LEN to fit it.")
    ids = batch["input_ids"]
    after_assistant = torch.zeros_like(ids, dtype=torch.bool)
    after_assistant[:, 1:] = ids[:, :-1] == processor.tokenizer.convert_tokens_to_ids("assistant")
    labels = torch.full_like(ids, -100)
    labels[after_assistant] = ids[after_assistant]                       # the answer word
    closing = torch.zeros_like(after_assistant)
    closing[:, 1:] = after_assistant[:, :-1]
    labels[closing] = ids[closing]                                       # its <|im_end|>
    batch["labels"] = labels
    return dict(batch)


def aux_weight(step: int, args: TrainArgs) -> float:
    half = args.steps // 2
    if step < half:
        return 1.0
    return 1.0 + (args.aux_final - 1.0) * (step - half) / max(1, args.steps - half)


def learning_rate(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(model, heads: AuxHeads, batch: dict, colors, kinds, args: TrainArgs, step: int) -> dict[str, float]:
    """One forward/backward; returns the loss terms and the batch answer accuracy."""
    labels = batch.pop("labels")
    image_mask = batch["input_ids"] == model.config.image_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, output_hidden_states=True, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = labels[:, 1:]
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    n_tokens = shapes.GRID * shapes.GRID
    rows = torch.arange(n_tokens).div(shapes.GRID, rounding_mode="floor").repeat(len(labels))
    cols = torch.arange(n_tokens).remainder(shapes.GRID).repeat(len(labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = out.hidden_states[0][image_mask]
        middle = out.hidden_states[args.aux_layer][image_mask]
        aux_logits = {
            "in_color": heads.in_color(first),
            "in_shape": heads.in_shape(first),
            "mid_color": heads.mid_color(middle),
            "mid_shape": heads.mid_shape(middle),
            "mid_row": heads.mid_row(middle),
            "mid_col": heads.mid_col(middle),
        }
    aux_targets = {"color": colors, "shape": kinds, "row": rows, "col": cols}
    aux_loss = sum(F.cross_entropy(v.float(), aux_targets[k.split("_")[1]]) for k, v in aux_logits.items()) / 3.0
    weight = aux_weight(step, args)
    loss = lm_loss + weight * aux_loss
    loss.backward()

    answer_pos = (labels[:, 1:] != -100).float().argmax(1)  # first labelled target = the answer word
    batch_rows = torch.arange(len(labels))
    pred = logits[batch_rows, answer_pos].argmax(-1)
    acc = (pred == targets[batch_rows, answer_pos]).float().mean().item()
    return {"loss": loss.item(), "lm": lm_loss.item(), "aux": aux_loss.item(), "acc": acc}


def _patch_embedding(model) -> nn.Module:
    """The module that embeds pixel patches (Qwen2-VL's ``PatchEmbed``, CLIP's ``patch_embedding`` conv)."""
    if hasattr(model.model, "visual"):
        return model.model.visual.patch_embed
    return model.model.vision_tower.embeddings.patch_embedding


def _patch_embed_as_linear(model) -> None:
    """Run the vision patch embedding as a matmul while training (same result, faster on CPU).

    Qwen2-VL's ``PatchEmbed.proj`` is a ``Conv3d`` and CLIP's ``patch_embedding`` a ``Conv2d``, each
    with its kernel equal to its stride, i.e. one linear map per patch; CPU convolution backward is
    slow for it.  The override is an instance attribute and is deleted (``_restore_patch_embed``)
    before saving, so the saved model is stock.
    """
    embed = _patch_embedding(model)
    if isinstance(embed, nn.Conv2d):           # CLIP: [B, 3, H, W] -> [B, C, H / p, W / p]
        p = embed.kernel_size[0]

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            b, c, h, w = pixels.shape
            patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
            out = F.linear(patches.to(embed.weight.dtype), embed.weight.flatten(1), embed.bias)
            return out.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)
    else:

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            weight = embed.proj.weight
            return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1))

    embed.forward = forward


def _restore_patch_embed(model) -> None:
    _patch_embedding(model).__dict__.pop("forward", None)


def _save_checkpoint(path: Path, model, heads, optimizer, step: int, args: TrainArgs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": asdict(args),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args: TrainArgs) -> dict[str, float]:
    """Run (or resume) both stages of training and save the model; returns the held-out accuracies.

    Stage 1 runs ``steps`` steps from scratch; stage 2 (``stage2_steps`` > 0) starts from stage 1's
    weights with a fresh optimizer, peak learning rate ``stage2_lr`` and new batches.
    """
    from tqdm.auto import tqdm

    stages = [dataclasses.replace(args, stage2_steps=0)]
    if args.stage2_steps:
        stages.append(dataclasses.replace(
            args, steps=args.stage2_steps, lr=args.stage2_lr, warmup=args.stage2_warmup, stage2_steps=0,
            init_from=str(Path(args.ckpt_dir) / "last.pt"), data_offset=args.data_offset + args.steps,
            ckpt_dir=str(Path(args.ckpt_dir) / "stage2")))
    for stage in stages:
        model, processor = _train_stage(stage)

    model.eval()
    _restore_patch_embed(model)
    result = evaluate(model, processor, n=args.final_eval_n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "eval_heldout.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "training_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    tqdm.write("final held-out " + json.dumps(result))
    return result


def _train_stage(args: TrainArgs):
    """One stage: from scratch, from ``init_from``, or resumed from ``ckpt_dir/last.pt``."""
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = build_processor(args.arch)
    model = build_model(args.arch, processor.tokenizer, num_hidden_layers=args.layers)
    if args.questions < 1:
        raise ValueError(f"questions={args.questions} must be >= 1 (questions asked about each image).")
    if not 0 <= args.aux_layer <= args.layers:
        raise ValueError(f"aux_layer={args.aux_layer} must lie in [0, layers={args.layers}].")
    heads = AuxHeads(model.config.text_config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    ckpt = Path(args.ckpt_dir) / "last.pt"
    start = 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        made = {key: state["args"].get(key, "qwen2-vl" if key == "arch" else None) for key in ("arch", "steps", "batch_size")}
        if made != {key: getattr(args, key) for key in made}:
            raise ValueError(
                f"checkpoint {ckpt} was made with " + ", ".join(f"{k}={v!r}" for k, v in made.items())
                + "; rerun with those, pass another --ckpt-dir, or pass --no-resume."
            )
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    elif args.init_from:      # a further stage: weights of an earlier run, fresh optimizer and schedule
        if not Path(args.init_from).is_file():
            raise FileNotFoundError(f"init_from={args.init_from!r} does not exist; pass the last.pt of an earlier run.")
        state = torch.load(args.init_from, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])

    model.train()
    _patch_embed_as_linear(model)
    train_seeds = shapes.split_seeds("train")
    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="demo VLM", mininterval=5.0)
    t0 = time.time()
    for step in progress:
        batch_index = args.data_offset + step
        seeds = train_seeds[batch_index * args.batch_size : (batch_index + 1) * args.batch_size]
        samples = [shapes.make_sample(seed) for seed in seeds]
        batch = collate(samples, processor, args.questions)
        colors, kinds = token_labels(samples)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        stats = train_step(model, heads, batch, colors, kinds, args, step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.set_postfix(lm=f"{stats['lm']:.3f}", aux=f"{stats['aux']:.3f}", acc=f"{stats['acc']:.2f}")
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps:
            _save_checkpoint(ckpt, model, heads, optimizer, done, args)
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            model.eval()
            result = evaluate(model, processor, n=args.eval_n)
            model.train()
            progress.write(
                f"step {done} ({time.time() - t0:.0f}s) held-out "
                + " ".join(f"{k}={v:.3f}" for k, v in result.items() if k != "n")
            )

    progress.close()
    return model, processor


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see ``--help``)."""
    defaults = TrainArgs()
    parser = argparse.ArgumentParser(prog="python -m pact_vlm.demo.train", description=__doc__.split("\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name == "arch":
            parser.add_argument(flag, choices=ARCHS, default=value,
                                help="qwen2-vl: the default demo VLM; llava: the CLIP-tower demo (LLaVA-1.5 layout)")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    train(TrainArgs(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
