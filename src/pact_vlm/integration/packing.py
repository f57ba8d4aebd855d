"""Re-packing a batch after a reduction, and composing the labels of successive reductions (pure torch).

Between two reduction layers every sample of the batch is a list of *rows*: each row is a token
of the call (text, a kept or merged visual token) or a slot with no token. :class:`Rows` tracks,
per row, which original position of the call it stands for; :func:`pack` lays the samples' new
rows out again as one left-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rows", "SampleRows", "pack", "compose_labels", "final_labels"]


@dataclass
class Rows:
    """The rows of a batch between two reduction layers, each ``[B, T']``.

    Attributes:
        index: position within the call (0 = the call's first token) that each row stands for.
        valid: False for packing slots (left padding added by :func:`pack`).
        sizes: how many original tokens each row stands for (1 unless merged).
        visual: rows that are (reduced) reducible visual tokens.
        ghost: rows dropped at layer 0 that stay in layer 0 (masked): transformers reads the
            length of the cache, hence the decode positions, from layer 0.
    """

    index: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor
    visual: torch.Tensor
    ghost: torch.Tensor

    @classmethod
    def initial(cls, visual: torch.Tensor) -> "Rows":
        """Every position of the call is its own row. ``visual``: ``[B, T]`` reducible visual tokens."""
        b, t = visual.shape
        device = visual.device
        return cls(index=torch.arange(t, device=device).expand(b, -1), valid=torch.ones(b, t, dtype=torch.bool, device=device),
                   sizes=torch.ones(b, t, device=device), visual=visual.clone(),
                   ghost=torch.zeros(b, t, dtype=torch.bool, device=device))

    @property
    def live(self) -> torch.Tensor:
        """``[B, T']`` rows that are tokens attending and attended to (not slots, not ghosts)."""
        return self.valid & ~self.ghost


@dataclass
class SampleRows:
    """One sample's rows after a reduction, in row order.

    Attributes:
        source: ``[n]`` long, the row (of the previous :class:`Rows`) each new row comes from.
        hidden: ``[n, D]`` the new rows' hidden states.
        sizes: ``[n]`` float. visual / ghost: ``[n]`` bool, as in :class:`Rows`.
    """

    source: torch.Tensor
    hidden: torch.Tensor
    sizes: torch.Tensor
    visual: torch.Tensor
    ghost: torch.Tensor


def pack(rows: Rows, samples: list[SampleRows], template: torch.Tensor) -> tuple[torch.Tensor, Rows, torch.Tensor]:
    """Lay the samples' rows out as one batch, left-padded to the longest.

    Args:
        rows: the previous rows of the batch.
        samples: per sample, its new rows.
        template: ``[B, T', D]`` the previous hidden states (dtype and device of the result).

    Returns:
        ``(hidden [B, T'', D], rows, local [B, T''])``: ``local`` is the previous row each new row
        comes from (0 for packing slots), to gather any per-row tensor (rotary tables, position ids).
    """
    b = len(samples)
    device = template.device
    length = max(s.source.numel() for s in samples)
    local = torch.zeros(b, length, dtype=torch.long, device=device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=device)
    sizes = torch.ones(b, length, device=device)
    visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    ghost = torch.zeros(b, length, dtype=torch.bool, device=device)
    parts = []
    for i, s in enumerate(samples):
        n = s.source.numel()
        local[i, length - n:] = s.source
        valid[i, length - n:] = True
        sizes[i, length - n:] = s.sizes
        visual[i, length - n:] = s.visual
        ghost[i, length - n:] = s.ghost
        pad = template.new_zeros(length - n, template.shape[-1])
        parts.append(torch.cat([pad, s.hidden.to(template.dtype)]))
    # stacking keeps the autograd graph of the rows (gradients flow through merged states)
    hidden = torch.stack(parts)
    new = Rows(index=rows.index.gather(1, local), valid=valid, sizes=sizes, visual=visual, ghost=ghost)
    return hidden, new, local


def compose_labels(owner: torch.Tensor, labels: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """Follow the original visual tokens through one more reduction.

    Args:
        owner: ``[N0]`` for each original visual token, the current visual token that represents
            it (an index into the ``N`` current ones), ``-1`` if dropped.
        labels: ``[N]`` the reduction's labels (the current token each current token joined, -1 dropped).
        keep_index: ``[K]`` ascending current tokens that stay.

    Returns:
        ``[N0]`` for each original visual token, the index (into the ``K`` kept) of its representative, or -1.
    """
    slot = torch.full((labels.numel(),), -1, dtype=torch.long, device=labels.device)
    slot[keep_index] = torch.arange(keep_index.numel(), device=labels.device)
    rep = torch.where(owner >= 0, labels[owner.clamp(min=0)], owner)
    return torch.where(rep >= 0, slot[rep.clamp(min=0)], rep)


def final_labels(owner: torch.Tensor, kept_original: torch.Tensor) -> torch.Tensor:
    """``[N0]``: for each original visual token, the original visual index of its representative (-1 dropped).

    Args:
        owner: ``[N0]`` index into the kept tokens (see :func:`compose_labels`), -1 dropped.
        kept_original: ``[K]`` original visual index of each kept token.
    """
    padded = torch.cat([kept_original, owner.new_full((1,), -1)])      # owner -1 reads the -1
    return padded[owner]
