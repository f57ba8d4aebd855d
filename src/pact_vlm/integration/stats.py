"""``ReductionStats``: what the last reducing call did, and how it is assembled from a call's records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .packing import final_labels

__all__ = ["ReductionStats", "assemble_stats", "empty_stats"]


@dataclass
class ReductionStats:
    """The last call that reduced visual tokens (usually the prefill).

    Attributes:
        visual_before / visual_after: visual tokens before and after (after the last reduction
            layer), summed over the batch.
        per_sample: one dict per sample (``visual_before``, ``visual_after``, ``kept_positions``
            (original positions still present after the last reduction layer), ``labels`` (for
            each visual token, the index of the visual token that represents it, -1 if dropped)).
        seq_lengths: the sequence length each decoder layer saw.
        visual_per_layer: the visual tokens each decoder layer saw, summed over the batch.
        reduction_layers: the decoder layers whose input was reduced (one for most methods,
            several for progressive ones such as ToMe).
        seconds: wall time of the reduction step(s) (CUDA synchronised).
    """

    visual_before: int = 0
    visual_after: int = 0
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    seq_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    visual_per_layer: list[int] = field(default_factory=list)
    reduction_layers: list[int] = field(default_factory=list)

    @property
    def reduction_ratio(self) -> float:
        """Fraction of visual tokens removed after the last reduction (0 when there were none)."""
        return 1.0 - self.visual_after / self.visual_before if self.visual_before else 0.0

    @property
    def layer_averaged_ratio(self) -> float:
        """1 - (visual tokens averaged over all decoder layers) / visual_before: the fraction of
        visual-token work removed (0 when there were no visual tokens)."""
        if not self.visual_before or not self.visual_per_layer:
            return 0.0
        return 1.0 - sum(self.visual_per_layer) / (len(self.visual_per_layer) * self.visual_before)

    def equivalent_ratio(self, layer: int) -> float:
        """The reduction ratio a method reducing once, at the input of ``layer``, would need to
        remove the same layer-averaged visual-token work (the PACT reference code's budget of
        progressive methods). Equals :attr:`reduction_ratio` for a method that reduces at ``layer``.
        """
        n = len(self.visual_per_layer)
        if not 0 <= layer < n:
            raise ValueError(f"layer={layer} is not a decoder layer of this model (0..{n - 1})")
        return self.layer_averaged_ratio * n / (n - layer)

    def __repr__(self) -> str:
        return (f"ReductionStats(visual {self.visual_before} -> {self.visual_after}, "
                f"reduction_ratio={self.reduction_ratio:.3f}, seconds={self.seconds:.4f})")


def empty_stats(batch: int, length: int, n_layers: int, device) -> ReductionStats:
    """The stats of a new prompt without visual tokens: nothing reduced."""
    return ReductionStats(
        per_sample=[dict(visual_before=0, visual_after=0, labels=None,
                         kept_positions=torch.arange(length, device=device)) for _ in range(batch)],
        seq_lengths=[length] * n_layers, visual_per_layer=[0] * n_layers)


def assemble_stats(samples: list[dict[str, Any]], kept_positions: list[torch.Tensor], stage_layers: list[int],
                   visual_counts: list[int], lengths: list[int], length: int, n_layers: int,
                   seconds: float) -> ReductionStats:
    """Statistics of a call from what each stage recorded.

    Args:
        samples: per sample ``visual_before``, ``visual_after``, ``owner`` and ``vis_orig`` (see
            :func:`~pact_vlm.integration.packing.final_labels`).
        kept_positions: per sample, the call positions of its rows after the last stage.
        stage_layers: the layers where the sequence changes; visual_counts / lengths: the visual
            tokens (summed over the batch) and the row count from each stage on.
        length: the call's sequence length; n_layers: decoder layers; seconds: the reduction step's time.
    """
    before = sum(s["visual_before"] for s in samples)
    visual_per_layer, seq_lengths = [], []
    for layer in range(n_layers):
        done = [s for s, start in enumerate(stage_layers) if start <= layer]
        visual_per_layer.append(visual_counts[done[-1]] if done else before)
        seq_lengths.append(lengths[done[-1]] if done else length)
    per_sample = []
    for s, kept in zip(samples, kept_positions):
        labels = final_labels(s["owner"], s["vis_orig"]) if s["visual_before"] else None
        per_sample.append(dict(visual_before=s["visual_before"], visual_after=s["visual_after"] if s["visual_before"] else 0,
                               labels=labels, kept_positions=kept))
    reduced_at = [start for s, start in enumerate(stage_layers)
                  if (visual_counts[s - 1] if s else before) != visual_counts[s]]
    return ReductionStats(visual_before=before, visual_after=sum(s["visual_after"] for s in per_sample),
                          per_sample=per_sample, seq_lengths=seq_lengths, seconds=seconds,
                          visual_per_layer=visual_per_layer, reduction_layers=reduced_at or stage_layers[:1])
