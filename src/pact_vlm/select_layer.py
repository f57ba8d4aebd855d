"""Choosing the reduction layer L from the keys of the visual tokens (the PACT paper, appendix K).

DBDPC clusters visual tokens on their keys, so L must be a layer where keys already tell tokens
apart. On sample inputs, for every decoder layer, this module takes the post-rotary keys of the
visual tokens (heads concatenated, as DBDPC sees them), computes all pairwise cosine distances
and summarises them (mean, median, 10th / 90th percentile, share of pairs within the cut-off d_c).
In the first layers the keys of all visual tokens are nearly alike; the distances then grow and
level off. The suggested L is the earliest layer (not before the adapter's ``min_layer``) whose
statistic reaches ``threshold`` times its largest value over all layers: the earliest layer
whose keys are distinct enough for the cut-off distance to mean the same as later on.

    selection = select_layer(model, processor, [image1, image2])
    selection.suggested, selection.plot("layers.png")
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["LayerKeyStats", "LayerSelection", "key_distance_stats", "pairwise_distance_stats", "select_layer",
           "suggest_layer"]

STATISTICS = ("median", "mean", "p10")


@dataclass
class LayerKeyStats:
    """Pairwise cosine distances between the visual tokens' keys at one layer (averaged over samples).

    Attributes:
        layer: decoder layer index (its input is what a reduction at this layer would see).
        mean, median, p10, p90: statistics of the pairwise distances (each in [0, 2]).
        within_cutoff: share of pairs closer than the cut-off distance.
        tokens: visual tokens used per sample (after sub-sampling), summed over samples.
    """

    layer: int
    mean: float
    median: float
    p10: float
    p90: float
    within_cutoff: float
    tokens: int


@dataclass
class LayerSelection:
    """The per-layer statistics and the suggested reduction layer.

    Attributes:
        layers: one :class:`LayerKeyStats` per decoder layer.
        suggested: the suggested layer L.
        statistic: which statistic the rule reads (``"median"``, ``"mean"`` or ``"p10"``).
        threshold: the rule's fraction of the largest value.
        cutoff: the cut-off distance ``within_cutoff`` refers to.
        min_layer: the earliest layer the model family allows.
    """

    layers: list[LayerKeyStats]
    suggested: int
    statistic: str
    threshold: float
    cutoff: float
    min_layer: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        values = [getattr(s, self.statistic) for s in self.layers]
        top = max(values)
        return (f"earliest layer >= {self.min_layer} whose {self.statistic} key distance "
                f"({values[self.suggested]:.3f}) reaches {self.threshold:.0%} of the largest ({top:.3f})")

    def to_dict(self) -> dict[str, Any]:
        return dict(suggested=self.suggested, statistic=self.statistic, threshold=self.threshold,
                    cutoff=self.cutoff, min_layer=self.min_layer, reason=self.reason,
                    layers=[asdict(s) for s in self.layers], **self.extra)

    def plot(self, path: str, title: str | None = None) -> None:
        """Draw the per-layer curve (matplotlib, ``pip install pact-vlm[plot]``) to a PNG file."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("the layer curve needs matplotlib; install it with `pip install pact-vlm[plot]` "
                              "or leave out --plot") from None
        layers = [s.layer for s in self.layers]
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
        ax.fill_between(layers, [s.p10 for s in self.layers], [s.p90 for s in self.layers], alpha=0.2,
                        color="tab:blue", label="10th-90th percentile")
        ax.plot(layers, [s.median for s in self.layers], "o-", color="tab:blue", label="median")
        ax.plot(layers, [s.mean for s in self.layers], "--", color="tab:orange", label="mean")
        top = max(getattr(s, self.statistic) for s in self.layers)
        ax.axhline(self.threshold * top, color="grey", lw=0.8, ls=":",
                   label=f"{self.threshold:.0%} of the largest {self.statistic}")
        ax.axvline(self.suggested, color="tab:red", lw=1.2, label=f"suggested L = {self.suggested}")
        ax.set_xlabel("decoder layer (input of)")
        ax.set_ylabel("cosine distance between visual keys")
        ax.set_xticks(layers)
        ax.set_title(title or "Visual-token key distances per layer")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def pairwise_distance_stats(keys: torch.Tensor, cutoff: float) -> dict[str, float]:
    """Statistics of the pairwise cosine distances of ``keys`` ``[N, d]`` (pairs i < j, float32)."""
    n = keys.shape[0]
    if n < 2:
        raise ValueError(f"{n} visual token(s): at least 2 are needed to measure distances")
    x = torch.nn.functional.normalize(keys.float(), dim=-1)
    dist = (1.0 - x @ x.T).clamp(min=0.0)
    iu = torch.triu_indices(n, n, offset=1, device=dist.device)
    d = dist[iu[0], iu[1]]
    q = torch.quantile(d, torch.tensor([0.1, 0.5, 0.9], device=d.device))
    return dict(mean=float(d.mean()), median=float(q[1]), p10=float(q[0]), p90=float(q[2]),
                within_cutoff=float((d <= cutoff).float().mean()))


def key_distance_stats(model, inputs_list: Sequence[dict], *, cutoff: float = 0.21, max_tokens: int = 1024,
                       seed: int = 0, progress: bool = True) -> list[LayerKeyStats]:
    """Per-layer statistics of the visual tokens' key distances, averaged over the samples.

    Args:
        model: a supported VLM (not modified; hooks are removed afterwards).
        inputs_list: processor outputs, one prompt (batch of 1) each.
        cutoff: the DBDPC cut-off distance ``within_cutoff`` counts against.
        max_tokens: at most this many visual tokens per sample (a seeded random subset) enter the
            ``N x N`` distance matrix.
        seed: the sub-sampling seed.
        progress: show a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    from .integration.adapters import get_adapter

    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens!r} must be at least 2")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 <= cutoff < float("inf"):
        raise ValueError(f"cutoff={cutoff!r} must be a cosine distance >= 0 (the paper uses 0.1-0.21)")
    if not inputs_list:
        raise ValueError("no sample inputs; pass at least one image")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    per_layer: list[list[dict[str, float]]] = [[] for _ in layers]
    counts = [0] * len(layers)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}

    def on_text(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            visual = state["visual"][None]
            state["visual"] = (visual & ~adapter.fixed_placeholders(model, embeds[:1], visual))[0]

    def on_layer(index):
        def hook(module, args, kwargs):
            if not adapter.computes_keys(module):     # a recurrent layer (Qwen3.5's linear attention) or a
                return                                # KV-shared one (Gemma 4): no keys of its own
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            if state.get("rows") is None:      # first layer of this sample: fix the token subset
                rows = torch.nonzero(state["visual"]).flatten()
                if rows.numel() < 2:
                    raise ValueError("the prompt has fewer than 2 reducible visual tokens; pass an image the "
                                     "processor turns into several visual tokens")
                if rows.numel() > max_tokens:
                    rows = rows[torch.randperm(rows.numel(), generator=gen)[:max_tokens].sort().values]
                state["rows"] = rows
            rows = state["rows"]
            with torch.no_grad():
                _, _, rotated = adapter.queries_keys(module, hidden[:1], cos[:1], sin[:1])
            keys = rotated[0, rows.to(hidden.device)].flatten(1)
            per_layer[index].append(pairwise_distance_stats(keys, cutoff))
            counts[index] += int(rows.numel())
        return hook

    handles = [adapter.text_model(model).register_forward_pre_hook(on_text, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(on_layer(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for inputs in tqdm(inputs_list, desc="key distances", unit="sample", disable=not progress):
            ids = inputs["input_ids"]
            if ids.shape[0] != 1:
                raise ValueError(f"each sample must be one prompt (batch 1), got a batch of {ids.shape[0]}")
            visual = adapter.placeholders(model.config, ids)[0]
            n = int(visual.sum())
            if n < 2:
                raise ValueError("a sample prompt holds fewer than 2 visual tokens; pass images with the prompt")
            state["visual"], state["rows"] = visual, None
            with torch.no_grad():
                model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    names = next(samples[0] for samples in per_layer if samples)
    for i, samples in enumerate(per_layer):
        if not samples:             # no keys in this layer: NaN, never suggested
            out.append(LayerKeyStats(layer=i, tokens=0, **{k: math.nan for k in names}))
            continue
        avg = {k: sum(s[k] for s in samples) / len(samples) for k in samples[0]}
        out.append(LayerKeyStats(layer=i, tokens=counts[i], **avg))
    return out


def suggest_layer(values: Sequence[float], threshold: float, min_layer: int = 0) -> int:
    """The earliest layer ``>= min_layer`` whose value reaches ``threshold`` x the largest value from ``min_layer`` on."""
    if not 0 <= min_layer < len(values):
        raise ValueError(f"min_layer={min_layer} is outside the {len(values)} layers")
    candidates = [i for i in range(min_layer, len(values)) if not math.isnan(values[i])]   # NaN: a layer without keys
    if not candidates:
        raise ValueError(f"no layer from {min_layer} on has attention keys to measure")
    top = max(values[i] for i in candidates)
    return next(i for i in candidates if values[i] >= threshold * top)


def _can_reduce_at(adapter, model, layer: int) -> bool:
    try:
        adapter.check_layers(model, layer)
    except ValueError:
        return False
    return True


def select_layer(model, processor, images: Sequence[Any], prompt: str = "Describe the image.", *,
                 statistic: str = "median", threshold: float = 0.9, cutoff: float = 0.21,
                 max_tokens: int = 1024, seed: int = 0, progress: bool = True) -> LayerSelection:
    """Suggest the reduction layer L for ``model`` from sample images (appendix K of the paper).

    Args:
        model, processor: a supported VLM and its processor.
        images: sample images (PIL images); each is run with ``prompt`` on its own.
        statistic: ``"median"`` (default), ``"mean"`` or ``"p10"`` of the pairwise key distances.
        threshold: in (0, 1]; the suggested L is the earliest layer whose statistic reaches
            ``threshold`` x its largest value over the layers.
        cutoff: the DBDPC cut-off reported alongside (share of pairs within it).
        max_tokens, seed, progress: see :func:`key_distance_stats`.
    """
    from .integration.adapters import get_adapter
    from .integration.loading import build_inputs

    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not one of {', '.join(STATISTICS)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in (0, 1]; e.g. 0.9 = 90% of the largest distance")
    if not images:
        raise ValueError("no sample images; pass at least one image")
    device = next(model.parameters()).device
    inputs_list = [build_inputs(processor, prompt, [img], device=device) for img in images]
    stats = key_distance_stats(model, inputs_list, cutoff=cutoff, max_tokens=max_tokens, seed=seed,
                               progress=progress)
    adapter = get_adapter(model)
    min_layer = adapter.min_layer(model.config)
    # a layer the reduction cannot start at (Gemma 4: at or after a layer whose keys later layers
    # reuse) is measured but never suggested
    values = [getattr(s, statistic) if _can_reduce_at(adapter, model, s.layer) else math.nan for s in stats]
    suggested = suggest_layer(values, threshold, min_layer)
    return LayerSelection(layers=stats, suggested=suggested, statistic=statistic, threshold=threshold,
                          cutoff=cutoff, min_layer=min_layer, extra=dict(samples=len(images)))
