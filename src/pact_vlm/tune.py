"""Finding a PACT config from unlabelled prompts: the one that keeps a model's answers at a target reduction.

PACT has three knobs whose good values depend on the model: the layer L, the pruned fraction λ
(``prune_ratio``) and the cut-off d_c. :func:`tune` fixes the reduction a user wants, searches λ
(and L, if asked) with d_c matched to that reduction by :func:`pact_vlm.match_budget`, and keeps
the candidate whose next-token distribution stays closest to the unreduced model's on the user's
own inputs. No labels are needed: the objective is fidelity to the unreduced model.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .config import ReductionConfig
from .methods.pact import PACTConfig

__all__ = ["DEFAULT_PRUNE_RATIOS", "TuneResult", "measure_fidelity", "tune"]

DEFAULT_PRUNE_RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.45)
"""λ grid of :func:`tune`: from DBDPC alone (λ = 0, the paper's ablation) up to the paper's values
(0.2 for Qwen2-VL-7B, 0.45 for LLaVA-OneVision-7B)."""

OBJECTIVES = ("agreement", "kl")

_TABLE_KEYS = ("layer", "prune_ratio", "cutoff", "ratio", "kl", "agreement", "work_fraction")


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        config: the chosen :class:`PACTConfig` (ready for ``apply()`` / ``save()``).
        ratio: its token-weighted reduction ratio on the calibration inputs.
        kl: mean KL(unreduced || reduced) of the next-token distribution (nats), over the
            calibration samples (and the teacher-forced positions, with ``new_tokens``).
        agreement: share of calibration samples (x positions) whose top-1 next token equals the
            unreduced model's.
        table: every candidate tried, one dict each: ``layer``, ``prune_ratio``, ``cutoff``,
            ``ratio``, ``kl``, ``agreement``, ``work_fraction`` (analytical share of the prefill
            work left, see :func:`pact_vlm.bench.limits.work_fraction`) and ``chosen``; a
            candidate that cannot reach the target carries ``error`` instead of the numbers.
        target_ratio, objective, samples, new_tokens: the search's settings; ``samples`` is the
            number of calibration samples (rows of all input batches).
    """

    config: PACTConfig
    ratio: float
    kl: float
    agreement: float
    table: list[dict[str, Any]]
    target_ratio: float
    objective: str
    samples: int
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the config as its ``to_dict()``)."""
        return {"config": self.config.to_dict(), "ratio": self.ratio, "kl": self.kl, "agreement": self.agreement,
                "target_ratio": self.target_ratio, "objective": self.objective, "samples": self.samples,
                "new_tokens": self.new_tokens, "table": [dict(row) for row in self.table]}

    def format_table(self) -> str:
        """The candidates as a plain-text table, the chosen one marked."""
        lines = [f"{'layer':>5} {'prune_ratio':>11} {'cutoff':>9} {'ratio':>7} {'kl':>9} {'agreement':>9} "
                 f"{'work':>6}"]
        for row in self.table:
            head = f"{row['layer']:>5} {row['prune_ratio']:>11.3g}"
            if "error" in row:
                lines.append(f"{head}   n/a: {row['error'].split(';')[0]}")
                continue
            mark = "  <- chosen" if row.get("chosen") else ""
            lines.append(f"{head} {row['cutoff']:>9.4f} {row['ratio']:>7.3f} {row['kl']:>9.5f} "
                         f"{row['agreement']:>9.3f} {row['work_fraction']:>6.3f}{mark}")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of fidelity (agreement and KL) against the measured reduction ratio, one point per
        candidate, labelled with its λ (and L when several layers were tried); the chosen one ringed.
        Needs matplotlib (``pip install 'pact-vlm[plot]'``)."""
        try:
            import matplotlib
        except ImportError:
            raise ImportError("the trade-off plot needs matplotlib: pip install 'pact-vlm[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.table if "error" not in r]
        layers = sorted({r["layer"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        for ax, key, label in ((axes[0], "agreement", "top-1 agreement with the unreduced model"),
                               (axes[1], "kl", "mean KL(unreduced || reduced), nats")):
            for i, layer in enumerate(layers):
                pts = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["prune_ratio"])
                ax.plot([r["ratio"] for r in pts], [r[key] for r in pts], "o", color=f"C{i}",
                        label=f"layer {layer} (work left {min(r['work_fraction'] for r in pts):.2f}-"
                              f"{max(r['work_fraction'] for r in pts):.2f})")
                for r in pts:
                    ax.annotate(f"λ={r['prune_ratio']:g}", (r["ratio"], r[key]), fontsize=7,
                                textcoords="offset points", xytext=(4, 3))
            chosen = [r for r in rows if r.get("chosen")]
            if chosen:
                ax.plot([chosen[0]["ratio"]], [chosen[0][key]], "o", ms=14, mfc="none", mec="black", label="chosen")
            ax.axvline(self.target_ratio, color="grey", ls="--", lw=1, label=f"target {self.target_ratio:g}")
            ax.set_xlabel("visual-token reduction ratio (measured on the calibration inputs)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(title or f"pact_vlm.tune: {self.samples} calibration samples, objective {self.objective}")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _check_fraction(name: str, value, lo_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not ((0.0 < value) if lo_open else (0.0 <= value)) or not value < 1.0:
        span = "(0, 1)" if lo_open else "[0, 1)"
        raise ValueError(f"{name}={value!r} must be a fraction in {span} (e.g. 0.7 to remove 70% of the visual "
                         "tokens)" if name == "target_ratio" else f"{name}={value!r} must lie in {span}")
    return float(value)


def _calibration_list(calibration, name: str = "calibration") -> list[dict[str, Any]]:
    if isinstance(calibration, dict):
        raise ValueError(f"{name} must be an iterable of input dicts (model(**x) each), not one dict; "
                         "wrap it in a list: [inputs]")
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"{name} must be an iterable of input dicts as a processor returns them, got "
                         f"{type(calibration).__name__}")
    items = list(calibration)
    if not items:
        raise ValueError(f"{name} is empty; pass a few input dicts (processor outputs) with images, "
                         "e.g. 16-64 prompts like the ones the model will see")
    for i, item in enumerate(items):
        if not hasattr(item, "keys") or "input_ids" not in item:
            raise ValueError(f"{name}[{i}] is a {type(item).__name__} without 'input_ids'; each item must be "
                             "a processor output dict passed as model(**item)")
    return [dict(item) for item in items]


def _layers(layer, base: PACTConfig, n_layers: int) -> list[int]:
    candidates = [base.layer] if layer is None else [layer] if isinstance(layer, int) and not isinstance(
        layer, bool) else list(layer) if isinstance(layer, Sequence) and not isinstance(layer, str) else None
    if not candidates or any(isinstance(v, bool) or not isinstance(v, int) for v in candidates):
        raise ValueError(f"layer={layer!r} must be None (the base config's layer), a decoder layer index or a "
                         "non-empty list of them, e.g. layer=[1, 2, 4]")
    for v in candidates:
        if not 0 <= v < n_layers:
            where = "the base config's layer" if layer is None else "layer"
            raise ValueError(f"{where} {v} is not a decoder layer of this model (0..{n_layers - 1}); pass "
                             "layer=N (e.g. the layer `pact-vlm select-layer` suggests)")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"layer={layer!r} repeats a value; give each candidate layer once")
    return candidates


def _prune_grid(prune_ratios) -> list[float]:
    if isinstance(prune_ratios, (str, bytes)) or not isinstance(prune_ratios, Iterable):
        raise ValueError(f"prune_ratios={prune_ratios!r} must be a list of fractions in [0, 1), e.g. (0, 0.2, 0.45)")
    grid = [_check_fraction("prune_ratios entry", v, lo_open=False) for v in prune_ratios]
    if not grid:
        raise ValueError("prune_ratios is empty; give at least one λ, e.g. (0, 0.2, 0.45)")
    if len(set(grid)) != len(grid):
        raise ValueError(f"prune_ratios={list(prune_ratios)!r} repeats a value; give each λ once")
    return grid


def _last_positions(item: dict[str, Any]) -> torch.Tensor:
    """Index of each sample's last real token (right padding aware)."""
    ids = item["input_ids"]
    mask = item.get("attention_mask")
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def _extend(item: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """``item`` with ``tokens`` [B, k] appended (teacher forcing after a left-padded / unpadded prompt)."""
    out = dict(item)
    out["input_ids"] = torch.cat([item["input_ids"], tokens], dim=1)
    for key, fill in (("attention_mask", torch.ones_like), ("mm_token_type_ids", torch.zeros_like),
                      ("token_type_ids", torch.zeros_like)):
        if item.get(key) is not None:
            out[key] = torch.cat([item[key], fill(tokens, dtype=item[key].dtype)], dim=1)
    return out


def _log_probs(model, item: dict[str, Any], new_tokens: int) -> torch.Tensor:
    """Log-softmax of the next-token logits: [B, new_tokens + 1, V] float32."""
    if new_tokens == 0:
        mask = item.get("attention_mask")
        if mask is None or bool(mask[:, -1].all()):
            logits = model(**item, use_cache=False, logits_to_keep=1).logits[:, -1:]
        else:
            logits = model(**item, use_cache=False).logits
            logits = logits[torch.arange(logits.shape[0]), _last_positions(item)][:, None]
    else:
        logits = model(**item, use_cache=False, logits_to_keep=new_tokens + 1).logits
    return torch.log_softmax(logits.float(), dim=-1)


def _reference(model, items, new_tokens: int):
    """The unreduced model's log-probabilities per item, and the items the candidates see."""
    refs, seen = [], []
    for i, item in enumerate(items):
        if new_tokens:
            mask = item.get("attention_mask")
            if mask is not None and not bool(mask[:, -1].all()):
                raise ValueError(f"calibration[{i}] is right-padded; new_tokens > 0 appends the unreduced model's "
                                 "greedy tokens after each prompt, so pad on the left "
                                 "(processor.tokenizer.padding_side = 'left')")
            grown = item
            for _ in range(new_tokens):   # the unreduced greedy continuation, one full pass per token
                step = model(**grown, use_cache=False, logits_to_keep=1).logits[:, -1]
                grown = _extend(grown, step.argmax(-1, keepdim=True))
            item = grown
        seen.append(item)
        refs.append(_log_probs(model, item, new_tokens))
    return refs, seen


def _real_lengths(item: dict[str, Any]) -> list[int]:
    mask = item.get("attention_mask")
    if mask is None:
        return [int(item["input_ids"].shape[1])] * int(item["input_ids"].shape[0])
    return [int(v) for v in mask.sum(dim=1)]


def _evaluate(model, config: PACTConfig, items, refs, new_tokens: int, dims) -> dict[str, float]:
    """Ratio, KL, agreement and analytical work fraction of ``config`` on the calibration items."""
    from .bench.limits import work_fraction
    from .budget import ratio_terms
    from .integration.handle import apply

    removed = visual = 0.0
    kl_sum = agree = positions = 0.0
    fulls, reduced = [], []
    with apply(model, config) as handle:
        for item, ref in zip(items, refs):
            logp = _log_probs(model, item, new_tokens)
            stats = handle.stats
            r, v = ratio_terms(stats, config.budget_layer)
            removed, visual = removed + r, visual + v
            kl_sum += float((ref.exp() * (ref - logp)).sum(-1).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            positions += ref.shape[0] * ref.shape[1]
            for full, sample in zip(_real_lengths(item), stats.per_sample):
                fulls.append(full)
                reduced.append(full - (sample["visual_before"] - sample["visual_after"]))
    work = work_fraction(dims, fulls, reduced, config.layer, logits_tokens=new_tokens + 1)["fraction"]
    return {"ratio": removed / visual if visual else 0.0, "kl": kl_sum / positions, "agreement": agree / positions,
            "work_fraction": work}


@torch.no_grad()
def measure_fidelity(model, config: ReductionConfig, inputs, new_tokens: int = 0) -> dict[str, float]:
    """How close ``config`` keeps the model to its unreduced self on ``inputs`` (e.g. held-out prompts).

    The measures of :func:`tune`'s table, for any layer method's config: ``ratio`` (token-weighted
    reduction ratio), ``kl`` (mean KL(unreduced || reduced) of the next-token distribution),
    ``agreement`` (share of samples whose top-1 next token is the unreduced model's) and
    ``work_fraction`` (analytical share of the prefill work left). Costs ``2 + new_tokens`` full
    forward passes per input.

    Args:
        model: a supported VLM without a reduction applied, in eval mode.
        config: the config to check.
        inputs: an iterable of input dicts (``model(**x)`` each).
        new_tokens: also compare the first ``new_tokens`` greedy positions (teacher-forced).
    """
    from .bench.limits import TextDims

    if not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a pact_vlm config such as PACTConfig(...), got {type(config).__name__}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens={new_tokens!r} must be an integer >= 0 (0: the next token only)")
    items = _calibration_list(inputs, "inputs")
    refs, seen = _reference(model, items, new_tokens)
    return _evaluate(model, config, seen, refs, new_tokens, TextDims.from_config(model.config))


@torch.no_grad()
def tune(model, calibration, target_ratio: float = 0.7, layer: int | Sequence[int] | None = None, *,
         prune_ratios: Iterable[float] = DEFAULT_PRUNE_RATIOS, base: PACTConfig | None = None,
         objective: str = "agreement", new_tokens: int = 0, tol: float = 0.005, max_iter: int = 30,
         progress: bool = True) -> TuneResult:
    """The PACT config that keeps a model's next-token answers closest to the unreduced model's at a target reduction.

    For every candidate layer L and every λ in ``prune_ratios``, the cut-off d_c is matched to
    ``target_ratio`` on the calibration inputs with :func:`pact_vlm.match_budget`; the candidate
    is then run on every calibration input and compared with the unreduced model: KL(unreduced ||
    reduced) of the next-token distribution at each prompt's last position (and, with
    ``new_tokens``, at the next positions, teacher-forced with the unreduced model's greedy tokens)
    and top-1 agreement. The best candidate by ``objective`` wins. No labels are read. Everything is
    deterministic: no sampling, the same inputs give the same table.

    Cost, with N calibration inputs (dicts; each may be a batch), C = ``len(layers) *
    len(prune_ratios)`` candidates and k = ``new_tokens``:

    * full forward passes: ``N * (1 + k + C)`` (the unreduced reference, its greedy continuation,
      one pass per candidate);
    * plus, per candidate, :func:`match_budget`'s ratio passes: at most ``N * (2 + max_iter)``
      (usually ``N * 6``-``N * 10``), each stopped after layer L, so each costs about
      ``(L + 1) / num_layers`` of a full pass plus the reduction step.

    Args:
        model: a supported VLM without a reduction applied, in eval mode.
        calibration: an iterable of input dicts as a processor returns them (each passed as
            ``model(**x)``), with images or videos; a handful to a few dozen prompts like the
            ones the model will serve. Nothing beyond the inputs (no labels).
        target_ratio: the fraction of visual tokens to remove, in (0, 1).
        layer: the reduction layer L: ``None`` keeps ``base``'s layer; an int fixes it; a list
            tries each (the table's ``work_fraction`` shows what each layer saves).
        prune_ratios: the λ grid (default :data:`DEFAULT_PRUNE_RATIOS`: 0, 0.1, 0.2, 0.3, 0.45).
        base: the config whose other fields (alpha, density, euti_context, ...) every candidate
            keeps; default the config that travels with the model (:func:`pact_vlm.model_config`)
            when that is a PACT config, else ``PACTConfig()``.
        objective: ``"agreement"`` (highest top-1 agreement, ties broken by the lower KL) or
            ``"kl"`` (lowest KL, ties broken by the higher agreement).
        new_tokens: also compare the first ``new_tokens`` generated positions (needs left-padded
            or unpadded inputs).
        tol, max_iter: passed to :func:`match_budget` (ratio tolerance, bisection steps).
        progress: show a tqdm progress bar over the candidates.

    Returns:
        A :class:`TuneResult` (``.config``, ``.ratio``, ``.kl``, ``.agreement``, ``.table``).

    Raises:
        ValueError: empty or malformed calibration, ``target_ratio`` outside (0, 1), a layer the
            model does not have, a bad grid or objective, no visual tokens in the inputs, or no
            candidate that reaches the target (the table of reachable ranges is in the message).
    """
    from tqdm.auto import tqdm

    from .bench.limits import TextDims
    from .budget import match_budget
    from .integration.adapters import get_adapter
    from .presets import model_config

    target_ratio = _check_fraction("target_ratio", target_ratio)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {', '.join(map(repr, OBJECTIVES))}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens={new_tokens!r} must be an integer >= 0 (0: the next token only)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 0.5:
        raise ValueError(f"tol={tol!r} must be a number in [0, 0.5), e.g. 0.01")
    grid = _prune_grid(prune_ratios)
    items = _calibration_list(calibration)
    if base is None:
        travelled, _ = model_config(model)
        base = travelled if isinstance(travelled, PACTConfig) else PACTConfig()
    elif not isinstance(base, PACTConfig):
        raise TypeError(f"base must be a PACTConfig, got {type(base).__name__}; tune searches PACT's λ and d_c")
    if isinstance(base, ReductionConfig):
        base = base.replace()            # an unfrozen copy
    n_layers = len(get_adapter(model).layers(model))
    layers = _layers(layer, base, n_layers)
    if getattr(model, "_pact_vlm_handle", None) is not None:
        raise ValueError("a reduction is already applied to this model; call handle.remove() before tune()")
    if model.training:
        raise ValueError("the model is in training mode (dropout changes every pass); call model.eval() first")
    dims = TextDims.from_config(model.config)
    samples = sum(int(item["input_ids"].shape[0]) for item in items)

    refs, seen = _reference(model, items, new_tokens)
    table: list[dict[str, Any]] = []
    bar = tqdm(total=len(layers) * len(grid), desc="tune", disable=not progress)
    try:
        for L in layers:
            for lam in grid:
                bar.set_postfix_str(f"layer {L}, λ={lam:g}")
                row: dict[str, Any] = {"layer": L, "prune_ratio": lam}
                try:
                    matched = match_budget(model, base.replace(layer=L, prune_ratio=lam), items, target_ratio,
                                           tol=tol, max_iter=max_iter)
                except ValueError as err:
                    if "no visual tokens" in str(err):
                        raise
                    row["error"] = str(err)
                else:
                    row["cutoff"] = matched.cutoff
                    row |= _evaluate(model, matched, seen, refs, new_tokens, dims)
                    row["config"] = matched
                table.append(row)
                bar.update()
    finally:
        bar.close()

    scored = [r for r in table if "error" not in r]
    if not scored:
        reasons = "; ".join(f"layer {r['layer']}, λ={r['prune_ratio']:g}: {r['error'].split(';')[0]}" for r in table)
        raise ValueError(f"no candidate reaches target_ratio={target_ratio} on these inputs ({reasons}); "
                         "choose a reachable target or other candidates")

    def key(r):
        fit = abs(r["ratio"] - target_ratio) > max(2 * tol, 0.02)      # a candidate that missed the target loses
        if objective == "agreement":
            return (fit, -r["agreement"], r["kl"], r["work_fraction"])
        return (fit, r["kl"], -r["agreement"], r["work_fraction"])

    best = min(scored, key=key)            # min keeps the first of equals: the grid's order decides ties
    for r in table:
        r["chosen"] = r is best
    config = best["config"]
    for r in table:
        r.pop("config", None)
    table = [{k: r[k] for k in (*_TABLE_KEYS, "error", "chosen") if k in r} for r in table]
    return TuneResult(config=config, ratio=best["ratio"], kl=best["kl"], agreement=best["agreement"], table=table,
                      target_ratio=target_ratio, objective=objective, samples=samples, new_tokens=new_tokens)
