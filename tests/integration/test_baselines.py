"""The comparison methods behind ``pact_vlm.apply``: ratio, cached decoding, and the rule they follow."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

import pact_vlm
import tiny_models as tm
from pact_vlm.algorithms import baselines as bl
from pact_vlm.algorithms.dbdpc import dbdpc
from pact_vlm.algorithms.euti import euti_scores, split_by_importance
from pact_vlm.config import CONFIG_REGISTRY, ReductionConfig
from pact_vlm.integration import get_adapter

LAYER = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch, impl="sdpa"):
        if (arch, impl) not in cache:
            cache[arch, impl] = tm.build_tiny(arch, impl, seed=0)
        return cache[arch, impl]
    return get


# name -> (config, expected visual_after for N visual tokens, or None when the count is data-dependent)
METHODS = {
    "fastv": (pact_vlm.FastVConfig(layer=LAYER, keep_ratio=0.4), lambda n: math.ceil(0.4 * n)),
    "fastv_all": (pact_vlm.FastVConfig(layer=LAYER, keep_ratio=0.4, queries="all"), lambda n: math.ceil(0.4 * n)),
    "vtw": (pact_vlm.VTWConfig(layer=LAYER, equivalent_layer=1), lambda n: 0),
    "tome": (pact_vlm.ToMeConfig(layer=1, r=3, equivalent_layer=1), lambda n: n - 3 * 3),
    "euti": (pact_vlm.EUTIConfig(layer=LAYER, prune_ratio=0.4), lambda n: n - math.floor(0.4 * n)),
    "dbdpc": (pact_vlm.DBDPCConfig(layer=LAYER, cutoff=0.4), None),
    "random": (pact_vlm.RandomConfig(layer=LAYER, keep_ratio=0.3, seed=1), lambda n: math.ceil(0.3 * n)),
    "pooling": (pact_vlm.PoolingConfig(layer=LAYER, stride=2), None),
    "single": (pact_vlm.AgglomerativeConfig(layer=LAYER, keep_ratio=0.3, linkage="single"), lambda n: math.ceil(0.3 * n)),
    "average": (pact_vlm.AgglomerativeConfig(layer=LAYER, keep_ratio=0.3, linkage="average"), lambda n: math.ceil(0.3 * n)),
    "complete": (pact_vlm.AgglomerativeConfig(layer=LAYER, keep_ratio=0.3, linkage="complete"), lambda n: math.ceil(0.3 * n)),
    "kmeans": (pact_vlm.KMeansConfig(layer=LAYER, keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "dpc": (pact_vlm.DPCConfig(layer=LAYER, keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "dbscan": (pact_vlm.DBSCANConfig(layer=LAYER, eps=0.3, min_samples=3), None),
    "priority": (pact_vlm.KeepPriorityConfig(layer=LAYER, keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "prumerge": (pact_vlm.PruMergeConfig(keep_ratio=0.3), None),      # per view: exact per image on LLaVA-1.5
    "prumerge_iqr": (pact_vlm.PruMergeConfig(), None),
    "hired": (pact_vlm.HiREDConfig(keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "visionzip": (pact_vlm.VisionZipConfig(keep_ratio=0.3, contextual_share=0.25), lambda n: math.ceil(0.3 * n)),
    "divprune": (pact_vlm.DivPruneConfig(keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "dart": (pact_vlm.DARTConfig(layer=LAYER, keep_ratio=0.3), lambda n: math.ceil(0.3 * n)),
    "dart_keys": (pact_vlm.DARTConfig(layer=LAYER, keep_ratio=0.3, similarity="keys", group="image"),
                  lambda n: math.ceil(0.3 * n)),
}
LAYER_METHODS = [m for m in METHODS if not m.startswith(("prumerge", "hired", "visionzip"))]
VISION_METHODS = ["prumerge", "prumerge_iqr", "hired", "visionzip"]


def _visual_mask(model, arch, inputs):
    """[B, T] reducible visual positions (image_newline placeholders excluded)."""
    adapter = get_adapter(model)
    visual = torch.isin(inputs["input_ids"], torch.tensor(adapter.visual_token_ids(model.config)))
    if adapter.newline(model) is not None:
        kinds = tm.image_token_kinds(model, arch, inputs)
        visual &= torch.tensor([[k != "newline" for k in row] for row in kinds])
    return visual


def _apply(model, arch, inputs, cfg):
    handle = pact_vlm.apply(model, cfg)
    if isinstance(cfg, pact_vlm.KeepPriorityConfig):
        # a priority that prefers every third token, then the rest by position
        visual = _visual_mask(model, arch, inputs)
        handle.set_priority([((torch.arange(int(v.sum())) % 3 == 0).float() * 100 - torch.arange(int(v.sum())))
                             for v in visual])
    return handle


def _generate(model, inputs, n=4, **kw):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kw)


def _extend(inputs, new_ids):
    ext = dict(inputs)
    b, k = new_ids.shape
    ext["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
    ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(b, k, dtype=torch.long)], dim=1)
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in inputs:
            ext[name] = torch.cat([inputs[name], torch.zeros(b, k, dtype=torch.long)], dim=1)
    return ext


# -- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(CONFIG_REGISTRY))
def test_every_config_round_trips_through_json(method, tmp_path):
    cls = CONFIG_REGISTRY[method]
    cfg = cls()
    path = tmp_path / "c.json"
    cfg.save(path)
    assert pact_vlm.load_config(path) == cfg and ReductionConfig.from_json(cfg.to_json()) == cfg
    assert cls.__doc__ and ("Paper" in cls.__doc__ or "paper" in cls.__doc__)
    assert cls.budget_param in cls.budget_search
    assert cls.budget_param in {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls, kwargs, match", [
    (pact_vlm.FastVConfig, dict(keep_ratio=1.5), r"keep_ratio=1.5 is outside \[0.0, 1.0\]"),
    (pact_vlm.FastVConfig, dict(queries="first"), "queries='first'"),
    (pact_vlm.FastVConfig, dict(layer=-1), "layer=-1"),
    (pact_vlm.VTWConfig, dict(equivalent_layer=2.5), "equivalent_layer=2.5"),
    (pact_vlm.ToMeConfig, dict(r=-1), r"r=-1 is outside >= 0"),
    (pact_vlm.ToMeConfig, dict(r=2.0), "r=2.0 must be an integer"),
    (pact_vlm.PruMergeConfig, dict(keep_ratio=0.0), r"keep_ratio=0.0 is outside \(0.0, 1.0\]"),
    (pact_vlm.PruMergeConfig, dict(neighbors=-3), "neighbors=-3"),
    (pact_vlm.HiREDConfig, dict(alpha=2), r"alpha=2 is outside \[0.0, 1.0\]"),
    (pact_vlm.EUTIConfig, dict(prune_ratio=1.0), "prune_ratio=1.0"),
    (pact_vlm.DBDPCConfig, dict(cutoff=3.0), "cutoff=3.0"),
    (pact_vlm.RandomConfig, dict(seed=-1), "seed=-1"),
    (pact_vlm.PoolingConfig, dict(stride=0), "stride=0"),
    (pact_vlm.AgglomerativeConfig, dict(linkage="ward"), "linkage='ward'"),
    (pact_vlm.KMeansConfig, dict(max_iter=0), "max_iter=0"),
    (pact_vlm.DPCConfig, dict(dc=0.0), "dc=0.0"),
    (pact_vlm.DBSCANConfig, dict(noise="ignore"), "noise='ignore'"),
    (pact_vlm.DBSCANConfig, dict(min_samples=0), "min_samples=0"),
    (pact_vlm.KeepPriorityConfig, dict(group="batch"), "group='batch'"),
    (pact_vlm.DivPruneConfig, dict(keep_ratio=-0.1), r"keep_ratio=-0.1 is outside \[0.0, 1.0\]"),
    (pact_vlm.DivPruneConfig, dict(group="batch"), "group='batch'"),
    (pact_vlm.DARTConfig, dict(image_pivots=0), r"image_pivots=0 is outside >= 1; the reference uses 4"),
    (pact_vlm.DARTConfig, dict(text_pivots=1.5), "text_pivots=1.5 must be an integer"),
    (pact_vlm.DARTConfig, dict(similarity="queries"), "similarity='queries'"),
])
def test_validation_names_value_and_range(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# -- ratio -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [m for m, (_, want) in METHODS.items() if want is not None])
def test_reduces_to_the_requested_ratio(models, method):
    cfg, want = METHODS[method]
    archs = ["llava"] if method in VISION_METHODS else ["llava", "qwen2_vl"]
    for arch in archs:
        model = models(arch)
        inputs = tm.make_inputs(model, arch, batch=2, image_sizes=[(32, 48), (48, 48)] if arch == "qwen2_vl" else None)
        with torch.no_grad(), _apply(model, arch, inputs, cfg) as handle:
            model(**inputs)
        stats = handle.stats
        for sample in stats.per_sample:
            assert abs(sample["visual_after"] - want(sample["visual_before"])) <= 1, (arch, sample)
            assert sample["visual_after"] == int((sample["labels"] == torch.arange(sample["visual_before"])).sum())
        assert stats.visual_before == sum(s["visual_before"] for s in stats.per_sample) > 0


def test_data_dependent_methods_reduce_and_report_it(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    for method in ("dbdpc", "pooling", "dbscan", "prumerge", "prumerge_iqr"):
        with torch.no_grad(), _apply(model, "llava", inputs, METHODS[method][0]) as handle:
            model(**inputs)
        stats = handle.stats
        assert 0 < stats.visual_after < stats.visual_before == 25, method
        kept = stats.per_sample[0]["labels"]
        assert int((kept == torch.arange(25)).sum()) == stats.visual_after


# -- cached generate == no-cache recompute ---------------------------------------------------------

def _replay_config(cfg, stats):
    """A KeepPriority config + priority that keeps exactly the tokens a pruning method kept."""
    labels = stats.per_sample[0]["labels"]
    kept = (labels == torch.arange(labels.numel())).float()
    return pact_vlm.KeepPriorityConfig(layer=cfg.layer, keep_ratio=float(kept.sum()) / labels.numel()), [kept]


# every method on LLaVA-1.5; the language-model methods also with M-RoPE (Qwen2-VL) and the
# vision-tower ones and most others with anyres + newlines (LLaVA-NeXT). Agglomerative linkages
# stay on LLaVA-1.5: on the other tiny models their keys hold exact distance ties (equal relative
# offsets between rotated copies of one vector), which float noise of a longer sequence breaks
# differently, so the recompute may legitimately cluster differently.
_CACHE_CASES = ([(m, "llava", "sdpa") for m in METHODS]
                + [(m, "qwen2_vl", "sdpa") for m in ("fastv", "vtw", "tome", "euti", "dbdpc", "random", "pooling",
                                                      "kmeans", "dpc", "dbscan", "priority")]
                + [(m, "llava_next", "sdpa") for m in ("fastv", "vtw", "tome", "euti", "dbdpc", "random", "pooling",
                                                        "kmeans", "dpc", "dbscan", "prumerge", "hired",
                                                        "visionzip")]
                + [("visionzip", "llava_onevision", "sdpa")]
                + [(m, "llava", "eager") for m in ("tome", "hired", "vtw")]
                # the methods that apply to every family, on each of the others
                + [(m, arch, "sdpa") for m in ("divprune", "dart") for arch in tm.ARCHS if arch != "llava"])
_ARCH_OVERRIDES = {("dbscan", "qwen2_vl"): dict(eps=0.5),      # eps 0.3 merges nothing there
                   ("divprune", "qwen3_vl"): dict(layer=2),    # layers 0-1 take deepstack features
                   ("divprune", "qwen3_vl_moe"): dict(layer=2),
                   ("divprune", "qwen3_5"): dict(layer=2),     # layers 0-1 hold the first full-attention layer
                   ("divprune", "qwen3_5_moe"): dict(layer=2)}


@pytest.mark.parametrize("method, arch, impl", _CACHE_CASES)
def test_cached_generate_equals_no_cache_recompute(models, arch, method, impl):
    cfg = METHODS[method][0].replace(**_ARCH_OVERRIDES.get((method, arch), {}))
    model = models(arch, impl)
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad():
        with _apply(model, arch, inputs, cfg) as handle:
            out = _generate(model, inputs)
            stats = handle.stats
            generated = out.sequences[:, inputs["input_ids"].shape[1]:]
            if isinstance(cfg, (pact_vlm.FastVConfig, pact_vlm.DARTConfig)):
                # FastV ranks by the attention of the prompt's queries, DART takes pivots from the
                # text after the image: a longer prompt ranks differently, so the recompute replays
                # the kept set (same layer, same machinery)
                handle.remove()
                replay, priority = _replay_config(cfg, stats)
                handle = pact_vlm.apply(model, replay)
                handle.set_priority(priority)
            steps = [model(**_extend(inputs, generated[:, :s]), use_cache=False).logits[:, -1].float()
                     for s in range(generated.shape[1])]
            handle.remove()
    assert stats.visual_after < stats.visual_before
    for step, (cached, full) in enumerate(zip(out.logits, steps)):
        assert (cached.float() - full).abs().max() < 1e-4, f"step {step}"
        assert torch.equal(cached.argmax(-1), full.argmax(-1))


# -- the rule each method follows ------------------------------------------------------------------

def _expected(method, cfg, hidden, q, k, rq, rk, vidx):
    """The Reduction the method's rule gives on hand-computed inputs (pure functions only)."""
    vh, vk = hidden[vidx], rk[vidx]
    n = vidx.numel()
    if method.startswith("fastv"):
        positions = torch.arange(hidden.shape[0])
        scores = bl.attention_received(rq, rk, positions, mode=cfg.queries)
        return bl.fastv_reduce(vh, scores[vidx], cfg.keep_ratio)
    if method == "vtw":
        return bl.vtw_reduce(vh)
    if method == "euti":
        last = int(vidx[-1]) + 1
        mask = torch.zeros(last, dtype=torch.bool)
        mask[vidx] = True
        kept, _ = split_by_importance(euti_scores(hidden[:last], k[:last], q[:last], visual_mask=mask), cfg.prune_ratio)
        return bl.prune(vh, kept)
    if method == "dbdpc":
        return bl.merge_by_labels(vh, dbdpc(vk.reshape(n, -1), cfg.cutoff).labels)
    if method == "random":
        return bl.random_reduce(vh, cfg.keep_ratio, cfg.seed)
    if method in ("single", "average", "complete"):
        return bl.agglomerative_reduce(vh, vk, cfg.keep_ratio, cfg.linkage)
    if method == "kmeans":
        return bl.kmeans_reduce(vh, vk, cfg.keep_ratio, seed=cfg.seed)
    if method == "dpc":
        return bl.dpc_reduce(vh, vk, cfg.keep_ratio, cfg.dc)
    if method == "dbscan":
        return bl.dbscan_reduce(vh, vk, cfg.eps, cfg.min_samples, cfg.noise)
    if method == "tome":
        return bl.tome_reduce(vh, vk.reshape(n, -1), torch.ones(n), cfg.r)
    if method.startswith("dart"):
        flat = rk.reshape(rk.shape[0], -1)
        norms = flat.abs().sum(-1)
        text = torch.arange(hidden.shape[0]) > vidx[-1]               # the question after the image
        rows = torch.nonzero(text).flatten()
        pivots = rows[bl.top_k(norms[rows], min(cfg.text_pivots, rows.numel()))]
        feats = hidden if cfg.similarity == "hidden" else flat
        return bl.dart_reduce(vh, feats[vidx], norms[vidx], math.ceil(cfg.keep_ratio * n), cfg.image_pivots,
                              feats[pivots])
    raise AssertionError(method)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["fastv", "fastv_all", "vtw", "euti", "dbdpc", "random", "single", "average",
                                    "complete", "kmeans", "dpc", "dbscan", "tome", "dart", "dart_keys"])
def test_kept_tokens_follow_the_rule_on_hand_computed_keys(models, arch, method):
    cfg = METHODS[method][0]
    if method == "tome":                    # one merging layer (the last), checked by hand
        cfg = pact_vlm.ToMeConfig(layer=3, r=5, equivalent_layer=3)
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    hidden, _, q, k, rq, rk = tm.layer_input_by_hand(model, inputs, cfg.layer)
    vidx = torch.nonzero(_visual_mask(model, arch, inputs)[0]).flatten()
    want = _expected(method, cfg, hidden, q, k, rq, rk, vidx)
    got_hidden = {}
    layer = get_adapter(model).layers(model)[cfg.layer]
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        spy = layer.register_forward_pre_hook(   # registered after apply: sees the reduced input
            lambda m, a, kw: got_hidden.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True)
        model(**inputs)
        spy.remove()
    sample = handle.stats.per_sample[0]
    assert torch.equal(sample["labels"], want.labels)
    kept_positions = sample["kept_positions"]
    assert torch.equal(kept_positions[torch.isin(kept_positions, vidx)], vidx[want.keep_index])
    reduced_visual = got_hidden["h"][0][torch.isin(kept_positions, vidx)]
    torch.testing.assert_close(reduced_visual, want.hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_divprune_keeps_the_max_min_selection_of_the_visual_embeddings(models, arch):
    """On every family: the kept tokens are the greedy max-min set of the language model's input
    (families whose first layers may not be reduced, Qwen3-VL's deepstack layers, Qwen3.5's first
    full-attention layer: of the first allowed layer's input; layer 0 is refused)."""
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    cfg = pact_vlm.DivPruneConfig(keep_ratio=0.3)
    first = get_adapter(model).min_layer(model.config)
    if first > 0:
        with pytest.raises(ValueError, match=f"layer=0 is too early for .*use layer >= {first}"):
            pact_vlm.apply(model, cfg)
        cfg = cfg.replace(layer=first)
    layer = get_adapter(model).layers(model)[cfg.layer]
    seen = {}
    spy = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]),
                                          with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    spy.remove()
    vidx = torch.nonzero(_visual_mask(model, arch, inputs)[0]).flatten()
    want = vidx[bl.max_min_select(seen["h"][0][vidx], math.ceil(0.3 * vidx.numel()))]
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs)
    kept = handle.stats.per_sample[0]["kept_positions"]
    assert torch.equal(kept[torch.isin(kept, vidx)], want)
    assert handle.stats.reduction_layers == [cfg.layer]


def test_dart_keeps_the_key_norm_pivots_and_needs_no_attention_map(models):
    model = models("llava", "eager")
    inputs = tm.make_inputs(model, "llava")
    _, _, _, _, _, rk = tm.layer_input_by_hand(model, inputs, LAYER)
    vidx = torch.nonzero(_visual_mask(model, "llava", inputs)[0]).flatten()
    norms = rk.reshape(rk.shape[0], -1).abs().sum(-1)[vidx]
    cfg = pact_vlm.DARTConfig(layer=LAYER, keep_ratio=0.2, image_pivots=3)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs)
    kept = handle.stats.per_sample[0]["kept_positions"]
    kept_visual = kept[torch.isin(kept, vidx)]
    assert kept_visual.numel() == 5
    assert set(vidx[bl.top_k(norms, 3)].tolist()) <= set(kept_visual.tolist())


@pytest.mark.parametrize("queries", ["last", "all"])
def test_fastv_ranks_by_the_models_own_attention_map(models, queries):
    """Independent of our q / k code: the eager model's attention weights at layer L."""
    eager = models("llava", "eager")
    inputs = tm.make_inputs(eager, "llava")
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[LAYER][0].mean(0)     # [T, T]
    scores = attn[-1] if queries == "last" else attn.mean(0)
    vidx = torch.nonzero(_visual_mask(eager, "llava", inputs)[0]).flatten()
    want = vidx[bl.top_k(scores[vidx], 10)]
    cfg = pact_vlm.FastVConfig(layer=LAYER, keep_ratio=0.4, queries=queries)
    sdpa = models("llava")
    with torch.no_grad(), pact_vlm.apply(sdpa, cfg) as handle:
        sdpa(**inputs)
    kept = handle.stats.per_sample[0]["kept_positions"]
    assert torch.equal(kept[torch.isin(kept, vidx)], want)


def test_tome_merges_r_tokens_per_layer_and_reports_the_layer_average(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    cfg = pact_vlm.ToMeConfig(layer=1, r=4, equivalent_layer=1)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        model(**inputs)
    stats = handle.stats
    assert stats.visual_per_layer == [25, 21, 17, 13]
    assert stats.reduction_layers == [1, 2, 3]
    assert stats.layer_averaged_ratio == pytest.approx(1 - (25 + 21 + 17 + 13) / 100)
    # the budget at layer 1 is the single-layer ratio with the same average over layers 1..3
    assert stats.equivalent_ratio(1) == pytest.approx(1 - (21 + 17 + 13) / 75)
    labels = stats.per_sample[0]["labels"]
    kept = torch.nonzero(labels == torch.arange(25)).flatten()
    assert kept.numel() == 13 and bool(torch.isin(labels, kept).all())


def test_vtw_withdraws_every_visual_token(models):
    model = models("llava_next")
    inputs = tm.make_inputs(model, "llava_next")
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.VTWConfig(layer=3, equivalent_layer=1)) as handle:
        model(**inputs)
    stats = handle.stats
    t = inputs["input_ids"].shape[1]
    n = stats.visual_before
    kinds = tm.image_token_kinds(model, "llava_next", inputs)[0]
    newlines = [i for i, kd in enumerate(kinds) if kd == "newline"]
    assert stats.visual_after == 0 and stats.seq_lengths == [t, t, t, t - n]
    assert stats.per_sample[0]["kept_positions"].tolist() == [i for i in range(t) if kinds[i] not in ("base", "tile")]
    assert set(newlines) <= set(stats.per_sample[0]["kept_positions"].tolist())
    assert stats.equivalent_ratio(1) == pytest.approx((4 - 3) / (4 - 1))


@pytest.mark.parametrize("arch, grid", [("llava", (5, 5)), ("qwen2_vl", (4, 6))])
def test_pooling_windows_follow_the_image_grid(models, arch, grid):
    model = models(arch)
    inputs = tm.make_inputs(model, arch, image_sizes=[(32, 48)] if arch == "qwen2_vl" else None)
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PoolingConfig(layer=LAYER, stride=2)) as handle:
        model(**inputs)
    rows, cols = grid
    labels = handle.stats.per_sample[0]["labels"]
    want = torch.tensor([(r // 2 * 2) * cols + (c // 2 * 2) for r in range(rows) for c in range(cols)])
    assert torch.equal(labels, want)


def test_pooling_on_anyres_keeps_base_and_tile_grids_apart(models):
    model = models("llava_next")
    inputs = tm.make_inputs(model, "llava_next", image_sizes=[(64, 64)])     # base 4x4 + tiles 8x8
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PoolingConfig(layer=LAYER, stride=4)) as handle:
        model(**inputs)
    labels = handle.stats.per_sample[0]["labels"]
    assert labels[:16].tolist() == [0] * 16                      # the base view is one window
    tiles = labels[16:] - 16
    want = [(r // 4 * 4) * 8 + (c // 4 * 4) for r in range(8) for c in range(8)]
    assert tiles.tolist() == want


def test_keep_priority_is_an_oracle_and_an_anti_oracle(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    vidx = torch.nonzero(_visual_mask(model, "llava", inputs)[0]).flatten()
    relevant = torch.zeros(25)
    relevant[[3, 7, 11, 19]] = 1.0
    cfg = pact_vlm.KeepPriorityConfig(layer=LAYER, keep_ratio=0.2)          # 5 tokens
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        handle.set_priority(relevant[None])
        model(**inputs)
        oracle = handle.stats.per_sample[0]["kept_positions"]
        handle.set_priority([-relevant])
        model(**inputs)
        anti = handle.stats.per_sample[0]["kept_positions"]
    assert oracle[torch.isin(oracle, vidx)].tolist() == vidx[[0, 3, 7, 11, 19]].tolist()   # ties: earlier
    assert anti[torch.isin(anti, vidx)].tolist() == vidx[[0, 1, 2, 4, 5]].tolist()


def test_keep_priority_errors(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.KeepPriorityConfig(layer=LAYER)) as handle:
        with pytest.raises(ValueError, match="set_priority"):
            model(**inputs)
        handle.set_priority([torch.ones(24)])
        with pytest.raises(ValueError, match="25 reducible visual tokens but its priority has 24"):
            model(**inputs)
        with pytest.raises(ValueError, match=r"\[batch, visual tokens\]"):
            handle.set_priority(torch.ones(25))
    with pact_vlm.apply(model, pact_vlm.FastVConfig(layer=LAYER)) as handle:
        with pytest.raises(ValueError, match="set_priority\\(\\) is for KeepPriorityConfig"):
            handle.set_priority([torch.ones(25)])


# -- PruMerge / HiRED ------------------------------------------------------------------------------

def _cls_attention_by_hand(model, inputs, layer_index, heads=None):
    """Per image [V, P] CLS attention of vision layer ``layer_index``, from the tower's own modules."""
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[layer_index]
        x = layer.layer_norm1(states[layer_index])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    if heads is None:
        return (q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)[:, 0, 1:], k[:, 1:]
    v, t, c = q.shape
    qh, kh = q.view(v, t, heads, -1).transpose(1, 2), k.view(v, t, heads, -1).transpose(1, 2)
    return (qh[:, :, :1] @ kh.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)[:, :, 0, 1:].sum(1), None


def _reduced_run_with_first_layer_input(model, cfg, inputs):
    """One forward with ``cfg`` applied (and removed after): the handle and ``{"h": layer 0's input}``."""
    got = {}
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        spy = model.model.language_model.layers[0].register_forward_pre_hook(
            lambda m, a, kw: got.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True)
        model(**inputs)
        spy.remove()
    return handle, got


def test_prumerge_keeps_cls_outliers_and_feeds_merged_clip_features(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    cfg = pact_vlm.PruMergeConfig(keep_ratio=0.2, neighbors=4)
    # LLaVA-1.5 tiny: 2 CLIP layers, feature layer -2 -> hidden_states[1] -> read layer 1's q / k
    attn, keys = _cls_attention_by_hand(model, inputs, 1)
    keep = bl.top_k(attn[0], 5)
    with torch.no_grad():
        feats = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1][:, 1:]
        merged = bl.prumerge_merge(feats[0], keys[0], attn[0], keep, 4)
        want_hidden = model.model.multi_modal_projector(merged[None])[0]
    vidx = torch.nonzero(_visual_mask(model, "llava", inputs)[0]).flatten()
    handle, got = _reduced_run_with_first_layer_input(model, cfg, inputs)
    sample = handle.stats.per_sample[0]
    assert sample["labels"][sample["labels"] >= 0].tolist() == keep.tolist()
    assert handle.stats.reduction_layers == [0] and handle.stats.visual_per_layer == [5, 5, 5, 5]
    # layer 0 keeps masked rows (see hooks); the kept rows carry the projected merged features
    torch.testing.assert_close(got["h"][0][vidx[keep]], want_hidden, atol=1e-5, rtol=1e-5)


def test_prumerge_on_the_tower_output_reads_the_last_layer():
    # vision_feature_layer=-1 (the CLIP demo): no layer takes the features as input; the last one
    # (the reference code's layer 23 of 24) gives the attention, the features are its output
    model = tm.build_tiny("llava", "sdpa", seed=0)
    model.config.vision_feature_layer = -1
    inputs = tm.make_inputs(model, "llava", seed=1)
    attn, _ = _cls_attention_by_hand(model, inputs, 1)
    keep = bl.top_k(attn[0], 5)
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PruMergeConfig(keep_ratio=0.2, neighbors=0)) as handle:
        model(**inputs)
    labels = handle.stats.per_sample[0]["labels"]
    assert labels[labels >= 0].tolist() == keep.tolist()


def test_prumerge_adaptive_selection_is_the_iqr_rule(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava", seed=2)
    attn, _ = _cls_attention_by_hand(model, inputs, 1)
    want = bl.top_k(attn[0], max(1, bl.iqr_outliers(attn[0])))
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.PruMergeConfig()) as handle:
        model(**inputs)
    labels = handle.stats.per_sample[0]["labels"]
    assert labels[labels >= 0].unique().tolist() == want.tolist()


def test_hired_takes_the_most_cls_attended_tokens(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava", n_images=2)
    final, _ = _cls_attention_by_hand(model, inputs, 0, heads=2)     # feature layer -2 -> output of layer 0
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.HiREDConfig(keep_ratio=0.3)) as handle:
        model(**inputs)
    labels = handle.stats.per_sample[0]["labels"]
    kept = torch.nonzero(labels == torch.arange(labels.numel())).flatten()
    want = torch.cat([bl.top_k(final[0], 8), 25 + bl.top_k(final[1], 8)])     # one budget per image
    assert kept.tolist() == want.tolist()


def test_hired_on_anyres_shares_the_budget_between_views_and_keeps_newlines(models):
    model = models("llava_next")
    inputs = tm.make_inputs(model, "llava_next", image_sizes=[(64, 64)])
    kinds = tm.image_token_kinds(model, "llava_next", inputs)[0]
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.HiREDConfig(keep_ratio=0.25, alpha=0.5)) as handle:
        model(**inputs)
    stats = handle.stats
    kept = set(stats.per_sample[0]["kept_positions"].tolist())
    base = [i for i, k in enumerate(kinds) if k == "base"]
    assert stats.visual_before == 80 and stats.visual_after == 20
    assert len(kept & set(base)) == 10                            # alpha * budget for the full image
    assert {i for i, k in enumerate(kinds) if k == "newline"} <= kept


@pytest.mark.parametrize("cfg", [pact_vlm.PruMergeConfig(), pact_vlm.HiREDConfig(), pact_vlm.VisionZipConfig()])
def test_vision_methods_refuse_towers_without_cls(models, cfg):
    # Qwen's patch merger and InternVL's pixel shuffle: patches are not the language model's tokens
    archs = ("qwen2_vl", "internvl") if isinstance(cfg, pact_vlm.VisionZipConfig) else (
        "qwen2_vl", "llava_onevision", "internvl")
    for arch in archs:
        with pytest.raises(ValueError, match="supports LLaVA-1.5 and LLaVA-NeXT.*use DivPruneConfig"):
            pact_vlm.apply(models(arch), cfg)
    model = tm.build_tiny("llava")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        pact_vlm.apply(model, cfg)


def test_visionzip_on_siglip_refuses_a_cls_strategy_and_videos_and_resampled_grids(models):
    model = tm.build_tiny("llava_onevision", seed=0)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        pact_vlm.apply(model, pact_vlm.VisionZipConfig())
    model = models("llava_onevision")
    cfg = pact_vlm.VisionZipConfig(keep_ratio=0.3)
    inputs = tm.make_inputs(model, "llava_onevision", video=True)
    with torch.no_grad(), pact_vlm.apply(model, cfg):
        with pytest.raises(ValueError, match="video frames are pooled after the projector"):
            model(**inputs)
    assert "get_video_features" not in vars(model.model)          # removed with the handle
    # anyres_max_1: a 2x2 tile grid is downscaled after the tower, placeholders are not patches
    model = tm.build_tiny("llava_onevision", seed=0)
    model.config.vision_aspect_ratio = "anyres_max_1"
    inputs = tm.make_inputs(model, "llava_onevision", image_sizes=[(64, 64)])
    with torch.no_grad():
        model(**inputs)                                          # the model itself runs
        with pact_vlm.apply(model, cfg), pytest.raises(ValueError, match="resamples the tile grid.*anyres_max_1"):
            model(**inputs)


def test_visionzip_on_siglip_keeps_the_most_attended_patches_by_mean_attention_received(models):
    """LLaVA-OneVision (SigLIP, no CLS): per view the dominant tokens by the attention they receive
    averaged over all queries of the selected layer, the contextual ones merged by key similarity."""
    model = models("llava_onevision")
    inputs = tm.make_inputs(model, "llava_onevision", image_sizes=[(32, 32)])     # 1x1 grid: base + 1 tile
    kinds = tm.image_token_kinds(model, "llava_onevision", inputs)[0]
    cfg = pact_vlm.VisionZipConfig(keep_ratio=0.5, contextual_share=0.25)         # 8 of 16: 6 dominant + 2
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    with torch.no_grad():
        states = tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states
        layer = layers[-1]                                   # feature layer -1: the last layer's output
        x = layer.layer_norm1(states[-2])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    heads = layer.self_attn.num_heads
    v, p, c = q.shape
    qh, kh = q.view(v, p, heads, -1).transpose(1, 2), k.view(v, p, heads, -1).transpose(1, 2)
    attn = (qh @ kh.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1).mean(dim=2).sum(dim=1)    # [V, P]
    metric = k.view(v, p, heads, -1).mean(2)
    labels = bl.visionzip_labels(attn[0], metric[0], 6, 2)             # the base view
    red = bl.merge_by_labels(states[-1][0], labels)
    with torch.no_grad():
        want = model.model.multi_modal_projector(red.hidden[None])[0]
    handle, got = _reduced_run_with_first_layer_input(model, cfg, inputs)
    base = torch.tensor([i for i, kind in enumerate(kinds) if kind == "base"])     # sequence positions
    kept = set(handle.stats.per_sample[0]["kept_positions"].tolist())
    assert {int(i) for i in base[red.keep_index]} == kept & set(base.tolist())
    assert len(kept & set(base.tolist())) == 8
    torch.testing.assert_close(got["h"][0][base[red.keep_index]], want, atol=1e-5, rtol=1e-5)
    # several images in one prompt: one view each (no anyres), the budget per image
    inputs = tm.make_inputs(model, "llava_onevision", n_images=2)
    assert inputs["batch_num_images"].tolist() == [2]
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.VisionZipConfig(keep_ratio=0.3)) as handle:
        model(**inputs)
    assert handle.stats.visual_before == 32 and handle.stats.visual_after == 2 * math.ceil(0.3 * 16)


@pytest.mark.parametrize("arch, cfg", [("llava_next", pact_vlm.PruMergeConfig(keep_ratio=0.5)),
                                       ("llava_next", pact_vlm.VisionZipConfig(keep_ratio=0.5)),
                                       ("llava_onevision", pact_vlm.VisionZipConfig(keep_ratio=0.5))])
def test_prumerge_remove_is_exact(models, arch, cfg):
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad():
        ref = model(**inputs).logits
    forwards = [m.forward for m in model.modules()]
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    with torch.no_grad():
        with pact_vlm.apply(model, cfg) as handle:
            reduced = model(**inputs).logits
        after = model(**inputs).logits
    assert handle.stats.visual_after < handle.stats.visual_before
    assert not torch.equal(reduced, ref) and torch.equal(after, ref)
    assert "pack_image_features" not in vars(model.model) and "get_video_features" not in vars(model.model)
    assert [m.forward for m in model.modules()] == forwards
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()] == hooks


def test_vision_readings_mapped_to_the_prompt_count_in_the_reduction_time(models, monkeypatch):
    # the per-placeholder mapping of the tower's readings is part of the method's work
    from pact_vlm.integration.vision import VisionTap

    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    extras = VisionTap.extras

    def slow(self, *args):
        time.sleep(0.2)
        return extras(self, *args)

    monkeypatch.setattr(VisionTap, "extras", slow)
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.VisionZipConfig(keep_ratio=0.3)) as handle:
        model(**inputs)
    assert handle.stats.seconds >= 0.2


def test_visionzip_keeps_dominant_tokens_and_feeds_merged_contextual_features(models):
    model = models("llava")
    inputs = tm.make_inputs(model, "llava")
    cfg = pact_vlm.VisionZipConfig(keep_ratio=0.4, contextual_share=0.3)       # 10 of 25: 7 dominant + 3
    # LLaVA-1.5 tiny: 2 CLIP layers, feature layer -2 -> hidden_states[1] = output of layer 0
    attn, _ = _cls_attention_by_hand(model, inputs, 0, heads=2)
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[0]
        keys = layer.self_attn.k_proj(layer.layer_norm1(states[0]))[0, 1:]     # [25, C]
        metric = keys.view(25, 2, -1).mean(1)
        feats = states[1][0, 1:]
    labels = bl.visionzip_labels(attn[0], metric, 7, 3)
    dominant = bl.top_k(attn[0], 7)
    assert torch.equal(labels[dominant], dominant) and int((labels >= 0).sum()) == 25
    red = bl.merge_by_labels(feats, labels)
    with torch.no_grad():
        want_hidden = model.model.multi_modal_projector(red.hidden[None])[0]
    vidx = torch.nonzero(_visual_mask(model, "llava", inputs)[0]).flatten()
    handle, got = _reduced_run_with_first_layer_input(model, cfg, inputs)
    sample = handle.stats.per_sample[0]
    kept = sample["labels"][sample["labels"] >= 0]
    assert kept.tolist() == red.keep_index.tolist() and handle.stats.visual_after == 10
    assert handle.stats.reduction_layers == [0]
    torch.testing.assert_close(got["h"][0][vidx[red.keep_index]], want_hidden, atol=1e-5, rtol=1e-5)


def test_visionzip_on_anyres_budgets_each_view_and_keeps_newlines(models):
    model = models("llava_next")
    inputs = tm.make_inputs(model, "llava_next", image_sizes=[(64, 64)])
    kinds = tm.image_token_kinds(model, "llava_next", inputs)[0]
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.VisionZipConfig(keep_ratio=0.25)) as handle:
        model(**inputs)
    kept = set(handle.stats.per_sample[0]["kept_positions"].tolist())
    base = [i for i, k in enumerate(kinds) if k == "base"]
    assert len(kept & set(base)) == 4                            # ceil(0.25 * 16) of the base view
    assert {i for i, k in enumerate(kinds) if k == "newline"} <= kept


def test_layer_budget_errors(models):
    model = models("llava")
    with pytest.raises(ValueError, match="equivalent_layer=4 but the model has 4 decoder layers"):
        pact_vlm.apply(model, pact_vlm.ToMeConfig(layer=1))
    with pytest.raises(ValueError, match="layer=5 but the model has 4"):
        pact_vlm.apply(model, pact_vlm.VTWConfig(layer=5, equivalent_layer=1))


@pytest.mark.parametrize("arch, cfg", [
    ("qwen2_vl", pact_vlm.ToMeConfig(layer=0, r=2, equivalent_layer=1)),     # progressive, from layer 0, M-RoPE
    ("llava", pact_vlm.HiREDConfig(keep_ratio=0.3)),                          # before the language model
])
def test_multi_turn_text_follow_up(models, arch, cfg):
    """A second generate() continuing from the returned cache equals recomputing everything."""
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    with torch.no_grad(), pact_vlm.apply(model, cfg) as handle:
        first = _generate(model, inputs, n=3)
        follow = torch.randint(tm.TEXT_LO, tm.TEXT_HI, (1, 3), generator=torch.Generator().manual_seed(5))
        turn2 = _extend(inputs, torch.cat([first.sequences[:, inputs["input_ids"].shape[1]:], follow], dim=1))
        text_only = {k: v for k, v in turn2.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        second = _generate(model, text_only, n=3, **{tm.CACHE_KWARG: first.past_key_values})
        generated = second.sequences[:, turn2["input_ids"].shape[1]:]
        steps = [model(**_extend(turn2, generated[:, :s]), use_cache=False).logits[:, -1].float()
                 for s in range(generated.shape[1])]
    assert handle.stats.visual_after < handle.stats.visual_before
    for cached, full in zip(second.logits, steps):
        assert (cached.float() - full).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llava", "llava_onevision"])
def test_a_reduction_at_layer_0_answers_as_the_kept_tokens_alone(models, arch):
    """Layer 0 keeps the dropped rows as masked ghosts (decode positions come from its cache); the
    answer must still be that of the language model run on the kept rows only, at their positions."""
    model = models(arch)
    inputs = tm.make_inputs(model, arch)
    got = {}
    spy = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: got.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)                                     # unreduced: layer 0's full input
    finally:
        spy.remove()
    with torch.no_grad(), pact_vlm.apply(model, pact_vlm.DivPruneConfig(layer=0, keep_ratio=0.3)) as handle:
        reduced = model(**inputs).logits[0, -1]
    visual = _visual_mask(model, arch, inputs)[0]
    kept_visual = set(handle.stats.per_sample[0]["kept_positions"].tolist())
    rows = torch.tensor([i for i in range(visual.numel()) if not visual[i] or i in kept_visual])
    assert handle.stats.visual_after < handle.stats.visual_before and rows.numel() < visual.numel()
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=got["h"][:, rows], position_ids=rows[None])
        alone = model.lm_head(out.last_hidden_state[:, -1])[0]
    torch.testing.assert_close(reduced, alone, atol=1e-5, rtol=1e-4)
