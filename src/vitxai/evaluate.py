"""Score the maps a comparison saved: faithfulness, localization, agreement, complexity, sanity.

:func:`evaluate` reads ``maps/*.safetensors`` of a run directory (written with
``save_attr_maps``), reloads the same images, and computes per image and per method:

- faithfulness: deletion AUC (lower is better) and insertion AUC (higher is better) with the
  most relevant units first (Petsiuk et al. 2018), and single deletion on a 4×4 grid (Spearman
  between cell sums and logit drops; Hesse et al. 2024);
- optionally IDSDS (Hesse et al. 2024): single deletion on a model fine-tuned with cell
  deletions (:mod:`vitxai.finetune`), with the maps recomputed on it, for the ground-truth
  labels; and incremental deletion (same paper) of the saved maps;
- localization, where the dataset has truth masks: pointing game, relevance mass, relevance
  rank accuracy, and on the two-object split the class-discrimination score;
- complexity: Gini sparseness and entropy (descriptive, no better direction);
- agreement beyond masks between every pair of methods, on the patch grid (Krishna et al.
  2022): feature, rank, sign and signed-rank agreement at top-k, rank correlation, pairwise rank
  agreement;
- optionally sanity (cascading model randomisation, Adebayo et al. 2018) and GAE (Vukadin
  et al. 2024), which recompute maps.

Statistics: every per-image score is kept (``per_image_evaluation.csv``); tables give means
with bootstrap 95 % intervals and a ranking whose ties are methods not separated by a
Holm-corrected Wilcoxon test. Undefined scores (NaN, e.g. Spearman of a constant map) are left
out of each mean and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitxai.data.datasets import ImageDataset
from vitxai.engines import EngineSettings
from vitxai.metrics.faithfulness import check_grid
from vitxai.metrics.scores import EVALUATION_PAIR_SCORES, EVALUATION_SCORES
from vitxai.models.adapter import ModelAdapter
from vitxai.store import (
    EVALUATION,
    EVALUATION_ROWS,
    METHOD_ROWS,
    RunLock,
    finished_run,
    read_maps,
    read_rows,
    run_identity,
    write_csv,
    write_json,
)

#: per (image, method) scores and per-pair agreement scores (see vitxai.metrics.scores)
SCORES = EVALUATION_SCORES
PAIR_SCORES = tuple(EVALUATION_PAIR_SCORES)
ALL_GROUPS = ("faithfulness", "localization", "complexity", "agreement", "sanity", "gae",
              "idsds", "incremental_deletion")


@dataclass
class EvaluateSettings:
    """What :func:`evaluate` computes.

    Attributes:
        groups: any of :data:`ALL_GROUPS`; "sanity", "gae" and "idsds" recompute maps and,
            like "incremental_deletion", are off by default.
        steps: deletion/insertion steps.
        space: what deletion/insertion removes: "token" (the ViT patch grid, default; pixels
            for other models) or "pixel".
        baseline: what deleted units become, named as every baseline (docs/conventions.md):
            "mean" (the model's mean colour, default), "blur", "image_mean",
            "uniform_normalized", ...; see :func:`vitxai.metrics.faithfulness.baseline_images`.
        topk: share of patches in the top-k of the rank-agreement metrics, in (0, 1].
        batch_size: images per model call.
        images_per_step: images evaluated together.
        sanity_images: images used by the randomisation test.
        seed: for baselines and the randomisation.
        allow_missing: skip images whose map file is missing or unreadable (listed in the
            results and the report) instead of refusing the run.
        grid: cells per side of single deletion and IDSDS (4: 56-px cells at 224 px).
        transform: "raw", "abs" or "relu", applied to a map after its channel sum by single
            deletion, IDSDS and incremental deletion (Hesse et al. 2024).
        idsds_checkpoint: group "idsds": a ``vitxai finetune-deletion`` output (its folder or
            ``finetuned.safetensors``) of the run's model, fine-tuned with ``grid`` and
            ``baseline`` (one of "mean", "uniform_normalized", "blur": IDSDS's zeros, uniform,
            blur).
        id_steps, id_order, id_baseline, id_update_attribution: group
            "incremental_deletion": steps (32), "ascending" (least relevant pixels first) or
            "descending", the baseline (None = ``baseline``), and whether the maps are
            recomputed after every step (as the run computed them, on the run's model).
    """

    groups: Sequence[str] = ("faithfulness", "localization", "complexity", "agreement")
    steps: int = 20
    space: str = "token"
    baseline: str = "mean"
    topk: float = 0.1
    batch_size: int = 64
    images_per_step: int = 4
    sanity_images: int = 4
    gae_images: int | None = None
    gae_steps: int = 10
    gae_legacy: bool = False
    seed: int = 0
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    allow_missing: bool = False
    grid: int = 4
    transform: str = "raw"
    idsds_checkpoint: str | None = None
    id_steps: int = 32
    id_order: str = "ascending"
    id_baseline: str | None = None
    id_update_attribution: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(ALL_GROUPS)
        if unknown:
            raise ValueError(f"unknown evaluation groups {sorted(unknown)}; valid: "
                             f"{', '.join(ALL_GROUPS)}")
        if not 0 < self.topk <= 1:
            raise ValueError(f"parameter topk={self.topk} is out of range (0, 1]")
        if self.transform not in ("raw", "abs", "relu"):
            raise ValueError(f"transform={self.transform!r} must be 'raw', 'abs' or 'relu'")
        if self.gae_images is not None and (self.gae_images < 4 or self.gae_images % 4):
            raise ValueError(f"gae_images={self.gae_images} must be a positive multiple of 4 "
                             "(GAE tiles groups of four images into mosaics)")
        if self.gae_steps < 2:
            raise ValueError(f"gae_steps={self.gae_steps} must be ≥ 2")
        if self.id_order not in ("ascending", "descending"):
            raise ValueError(f"id_order={self.id_order!r} must be 'ascending' or 'descending'")
        if ("idsds" in self.groups) != (self.idsds_checkpoint is not None):
            raise ValueError("IDSDS needs a fine-tuned checkpoint (`vitxai finetune-deletion`), "
                             "and a checkpoint is only used by IDSDS: give both or neither")


def _patch_scores(maps: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) → (B, gh·gw) sums over patches (the features of the agreement metrics)."""
    pooled = F.avg_pool2d(maps[:, None].double(), patch, stride=patch) * (patch[0] * patch[1])
    return pooled.flatten(1)


def _image_scores(adapter: ModelAdapter, images: torch.Tensor, maps: torch.Tensor,
                  targets: torch.Tensor, s: EvaluateSettings, truth: torch.Tensor | None,
                  other: torch.Tensor | None, image_ids: Sequence[int],
                  reattribute: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> dict[str, np.ndarray]:
    from vitxai.metrics import complexity, faithfulness, localization

    out: dict[str, np.ndarray] = {}
    b = images.shape[0]
    if "faithfulness" in s.groups:
        space = s.space if adapter.is_vit or s.space != "token" else "pixel"
        kw = {"steps": s.steps, "space": space, "baseline": s.baseline,
              "batch_size": s.batch_size, "seed": s.seed, "image_ids": image_ids}
        for mode in ("deletion", "insertion"):
            curves, fractions = faithfulness.perturbation_curve(
                adapter, images, maps, targets, mode=mode, order="morf", **kw)
            out[f"{mode}_auc"] = faithfulness.auc(curves, fractions).double().numpy()
            out[f"{mode}_curve"] = curves.double().numpy()
        out["single_deletion"] = faithfulness.single_deletion(
            adapter, images, maps, targets, grid=s.grid, baseline=s.baseline,
            transform=s.transform, batch_size=s.batch_size, seed=s.seed,
            image_ids=image_ids).double().numpy()
    if "incremental_deletion" in s.groups:
        out[f"incremental_deletion_{s.id_order}"] = faithfulness.incremental_deletion(
            adapter, images, maps, targets, steps=s.id_steps, order=s.id_order,
            baseline=s.id_baseline or s.baseline, transform=s.transform,
            reattribute=reattribute, batch_size=s.batch_size, seed=s.seed,
            image_ids=image_ids).double().numpy()
    if "localization" in s.groups and truth is not None:
        m, t = maps.numpy(), truth.numpy()
        out["pointing_game"] = np.array([localization.pointing_game(m[i], t[i])
                                         for i in range(b)])
        out["relevance_mass"] = np.array([localization.mass_inside(m[i], t[i])
                                          for i in range(b)])
        out["rank_accuracy"] = np.array([localization.rank_accuracy(m[i], t[i])
                                         for i in range(b)])
        if other is not None:
            o = other.numpy()
            out["class_discrimination"] = np.array([
                localization.class_discrimination(m[i], t[i], o[i]) for i in range(b)])
    if "complexity" in s.groups:
        out["gini"] = complexity.sparseness_gini(maps).double().numpy()
        out["entropy"] = complexity.entropy(maps).double().numpy()
    return out


def _summary_tables(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    from vitxai.stats import bootstrap_ci, ranking

    tables: dict[str, Any] = {}
    header = ["rank", "method", "mean", "95 % CI", "n", "tied with"]
    for score, spec in SCORES.items():
        label, better = spec.label, spec.higher_is_better
        values = {n: np.array([r[score] for r in rows if r["method"] == n and score in r],
                              dtype=float) for n in names}
        if not any(v.size for v in values.values()):
            continue
        if better is None:
            body = []
            for n in names:
                mean, lo, hi = bootstrap_ci(values[n], seed=0)
                body.append(["", n, f"{mean:.4f}", f"[{lo:.4f}, {hi:.4f}]",
                             str(int(np.isfinite(values[n]).sum())), ""])
        else:
            body = [[str(r.rank) if r.rank is not None else "n/a", r.method, f"{r.mean:.4f}",
                     f"[{r.ci_low:.4f}, {r.ci_high:.4f}]",
                     str(int(np.isfinite(values[r.method]).sum())), ", ".join(r.tied_with)]
                    for r in ranking(values, higher_is_better=better, seed=0)]
        direction = {True: "higher is better", False: "lower is better",
                     None: "descriptive"}[better]
        tables[f"Evaluation: {label}"] = {
            "text": f"{direction}; mean over images with bootstrap 95 % interval; methods "
                    "sharing a rank are not separated by a Holm-corrected Wilcoxon test "
                    "(α = 0.05).",
            "header": header, "rows": body}
    return tables


def evaluate(run_dir: str | Path, adapter: ModelAdapter, dataset: ImageDataset,
             settings: EvaluateSettings | None = None, *, progress: bool = True,
             engine: EngineSettings | None = None) -> dict[str, Any]:
    """Evaluate a run's saved maps and write ``evaluation.json`` and
    ``per_image_evaluation.csv`` into the run directory (see the module docstring).

    Only a finished run is evaluated, under the run directory's lock. Every committed map
    file must be readable unless ``settings.allow_missing``; the results record the run's
    fingerprint and image count, so a report never mixes them with another run.
    ``engine=EngineSettings("ray", ...)`` computes IDSDS, the costliest group (every map
    recomputed on the fine-tuned model), on Ray workers.
    """
    with RunLock(run_dir):
        return _evaluate(Path(run_dir), adapter, dataset, settings or EvaluateSettings(),
                         progress, engine)


def _evaluate(root: Path, adapter: ModelAdapter, dataset: ImageDataset, s: EvaluateSettings,
              progress: bool, engine: EngineSettings | None = None) -> dict[str, Any]:
    from vitxai.metrics.rank_agreement import agreement_table

    config, manifest = finished_run(root)
    names = list(config["methods"])
    saved, missing = read_maps(root, allow_missing=s.allow_missing)
    indices = saved["index"].tolist()
    targets_all = saved["target"]
    if {"faithfulness", "idsds"} & set(s.groups):
        check_grid(s.grid, adapter.input_size)
    # refuse a wrong checkpoint or a run without labels before any work
    idsds = _idsds_setup(root, adapter, indices, s) if "idsds" in s.groups else None
    reattribute = _reattribution(adapter, names, config) if (
        "incremental_deletion" in s.groups and s.id_update_attribution) else None
    rows: list[dict[str, Any]] = []
    pair_values: dict[tuple[str, str], dict[str, list]] = {}
    curves: dict[str, list] = {n: [] for n in names}
    k_features = None
    bar = tqdm(total=len(indices), unit="img", desc="evaluate", disable=not progress)
    for start in range(0, len(indices), s.images_per_step):
        sel = slice(start, start + s.images_per_step)
        samples = [dataset.load(i) for i in indices[sel]]
        images = torch.stack([x.image for x in samples]).to(adapter.device, adapter.dtype)
        truth = (torch.stack([x.mask for x in samples])
                 if all(x.mask is not None for x in samples) else None)
        other = (torch.stack([x.other_mask for x in samples])
                 if all(x.other_mask is not None for x in samples) else None)
        targets = targets_all[sel]
        patch_maps = {}
        for name in names:
            maps = saved[f"{name}.map"][sel].to(adapter.dtype)
            scores = _image_scores(adapter, images, maps.to(adapter.device), targets, s,
                                   truth, other, indices[sel],
                                   reattribute(name, targets, indices[sel])
                                   if reattribute else None)
            for i, index in enumerate(indices[sel]):
                rows.append({"index": index, "method": name, **{
                    k: float(v[i]) for k, v in scores.items() if not k.endswith("_curve")}})
            if "deletion_curve" in scores:
                curves[name].append(np.stack([scores["deletion_curve"],
                                              scores["insertion_curve"]], axis=1))
            if adapter.is_vit:
                patch_maps[name] = _patch_scores(maps.cpu(), adapter.patch_size)
        if "agreement" in s.groups and len(patch_maps) > 1:
            d = next(iter(patch_maps.values())).shape[1]
            k_features = max(1, round(s.topk * d))
            table = agreement_table(patch_maps, k_features)
            for pair, metrics in table.items():
                slot = pair_values.setdefault(pair, {m: [] for m in PAIR_SCORES})
                for m in PAIR_SCORES:
                    slot[m].extend(np.asarray(metrics[m], dtype=float).tolist())
        bar.update(len(samples))
    bar.close()
    extra = _recomputing_groups(root, adapter, dataset, indices, targets_all, names, config, s)
    if idsds is not None:
        extra["per_image"].update(_idsds_scores(idsds[0], dataset, indices, idsds[2], names,
                                                config, s, progress, engine))
    for r in rows:
        for key, per_index in extra.get("per_image", {}).items():
            method, score = key
            if r["method"] == method and r["index"] in per_index:
                r[score] = per_index[r["index"]]
    tables = _summary_tables(rows, names)
    if "localization" in s.groups and not dataset.has_masks:
        tables["Evaluation: localization"] = {
            "text": f"Skipped: dataset {dataset.name!r} has no ground-truth masks.",
            "header": [], "rows": []}
    tables.update(extra.get("tables", {}))
    if idsds is not None:
        tables.update(_idsds_table(rows, names, idsds[1], config, s))
    if pair_values:
        header = ["A", "B", *PAIR_SCORES]
        body = [[a, b, *[f"{np.nanmean(v[m]):.3f}" if np.isfinite(v[m]).any() else "n/a"
                         for m in PAIR_SCORES]]
                for (a, b), v in pair_values.items() if a < b]
        tables["Agreement beyond masks (patches)"] = {
            "text": f"Krishna et al. 2022 on the patch grid, top-k = {k_features} patches, "
                    "means over images. Sign metrics are degenerate for non-negative methods.",
            "header": header, "rows": body}
    figure = _curve_figure(root, curves)
    if figure is not None:
        tables["Evaluation: deletion and insertion curves"] = {
            "text": "Mean target probability as the most relevant units are deleted (left) or "
                    "inserted (right).", "header": [], "rows": [],
            "figures": [str(figure.relative_to(root))]}
    if missing:
        tables["Images skipped: missing map files"] = {
            "text": f"{sum(len(m['indices'] or ()) for m in missing)} images were not evaluated "
                    "because their maps could not be read (allow_missing).",
            "header": ["file", "reason", "images"],
            "rows": [[str(m["file"]), m["reason"], " ".join(map(str, m["indices"] or ["?"]))]
                     for m in missing]}
    result = {"run": run_identity(config, manifest),
              "settings": {k: v for k, v in s.__dict__.items()}, "tables": tables,
              "n_images": len(indices), "missing_maps": missing}
    # evaluation.json goes first and comes back last: a kill in between leaves no results
    # rather than results that do not match their rows
    (root / EVALUATION).unlink(missing_ok=True)
    write_csv(root / EVALUATION_ROWS, _uniform(rows))
    write_json(root / EVALUATION, result)
    return result


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return [{k: r.get(k, float("nan")) for k in keys} for r in rows]


def _curve_figure(root: Path, curves: dict[str, list]) -> Path | None:
    """The mean deletion and insertion curves (``figures/faithfulness_curves.png``)."""
    if not any(curves.values()):
        return None
    from vitxai.report.figures import curves_figure

    return curves_figure({name: np.concatenate(parts) for name, parts in curves.items() if parts},
                         root / "figures" / "faithfulness_curves.png")


def _recomputing_groups(root: Path, adapter: ModelAdapter, dataset: ImageDataset,
                        indices: list[int], targets: torch.Tensor, names: Sequence[str],
                        config: dict[str, Any], s: EvaluateSettings) -> dict[str, Any]:
    """Sanity and GAE: they need fresh maps, so they run on a few images only.

    ``targets`` (N,) are the saved targets aligned with ``indices``. Sanity uses the first
    ``s.sanity_images`` images; GAE draws ``s.gae_images // 4`` (default: sanity_images // 4)
    groups of four at random (seed ``s.seed``) with classes (the targets) different within a
    group where the data allows, as its contrastiveness is 1 for any map when a mosaic shows
    one class only (:func:`_gae_tables`).
    """
    from vitxai.runner import recorded_methods

    out: dict[str, Any] = {"tables": {}, "per_image": {}}
    n = min(s.sanity_images, len(indices))
    n_gae = min(s.gae_images if s.gae_images is not None else s.sanity_images, len(indices))
    if max(n, n_gae) == 0:
        return out

    def load(chosen: Sequence[int]) -> torch.Tensor:
        return torch.stack([dataset.load(i).image for i in chosen]).to(adapter.device,
                                                                       adapter.dtype)

    params = recorded_methods(adapter, config)
    if "sanity" in s.groups and n:
        from vitxai.metrics.sanity import model_randomisation

        images, t = load(indices[:n]), targets[:n]
        body = []
        for name in names:
            sims = model_randomisation(adapter, params[name].method, images, t,
                                       mode="cascading", seed=s.seed,
                                       method_params=params[name].params)
            last = list(sims)[-1]
            body.append([name, f"{float(torch.nanmean(sims[list(sims)[0]])):.3f}",
                         f"{float(torch.nanmean(sims[last])):.3f}", str(n)])
        out["tables"]["Sanity: cascading model randomisation"] = {
            "text": "Spearman similarity between maps of the trained model and of the model "
                    "with its top layer randomised (first column) and with every layer "
                    "randomised (second column). A map that explains the model should change: "
                    "low similarity is good (Adebayo et al. 2018).",
            "header": ["method", "head randomised", "all randomised", "images"],
            "rows": body}
    if "gae" in s.groups and n_gae >= 4:
        out["tables"].update(_gae_tables(root, adapter, dataset, indices, targets, names,
                                         params, n_gae, s))
    return out


def _gae_tables(root: Path, adapter: ModelAdapter, dataset: ImageDataset, indices: list[int],
                targets: torch.Tensor, names: Sequence[str], params: dict[str, Any],
                n_images: int, s: EvaluateSettings) -> dict[str, Any]:
    """GAE (Vukadin et al. 2024) as a tool: the summary per method, the components of every
    positive, and the best and worst explained positives (``figures/gae_extremes.png``)."""
    from vitxai.methods import attribute
    from vitxai.metrics.gae import gae, mosaic_groups
    from vitxai.report.figures import gae_extremes_figure

    components = ("faithfulness", "robustness", "local_consistency", "contrastiveness", "gae")
    groups = mosaic_groups(targets.tolist(), n_images // 4, s.seed)
    chosen = [indices[k] for members in groups for k in members]
    images = torch.stack([dataset.load(i).image for i in chosen]).to(adapter.device,
                                                                     adapter.dtype)
    summary, per_positive, maps, scores = [], [], {}, {}
    for name in names:
        def relevance(x, tt, name=name):
            return attribute(params[name], adapter, x, tt).maps
        result = gae(adapter, relevance, images, steps=s.gae_steps, seed=s.seed,
                     legacy=s.gae_legacy, batch_size=s.batch_size)
        summary.append([name] + [f"{float(result[k].double().mean()):.3f}"
                                 for k in components])
        for g, pos in enumerate(result["positive"].tolist()):
            per_positive.append([name, str(chosen[pos]), str(int(result["target"][g])),
                                 " ".join(str(chosen[i]) for i in result["mosaic"][g].tolist()),
                                 *[f"{float(result[k][g]):.3f}" for k in components]])
        maps[name] = result["relevance"].double().numpy()
        scores[name] = result["gae"].double().numpy()
    positives = result["positive"].tolist()
    shown = images[positives].permute(0, 2, 3, 1).clamp(0, 1).float().cpu().numpy()
    (root / "figures").mkdir(exist_ok=True)
    figure = gae_extremes_figure(shown, maps, scores, root / "figures" / "gae_extremes.png")
    schedule = "legacy (the reference's strided mosaics and MoRF schedule)" if s.gae_legacy \
        else "fixed (mosaics of each group, MoRF fractions t/T)"
    text = (f"{n_images} images in groups of four drawn at random (seed {s.seed}), classes "
            f"different within a group where the data allows; {s.gae_steps} masking steps, "
            f"schedule {schedule}; every component in its range (GAE, LC, C in [0, 1]; F and "
            "Rob in [−1, 1]).")
    return {
        "GAE (Vukadin et al. 2024)": {
            "text": text, "header": ["method", "F", "Rob", "LC", "C", "GAE"],
            "rows": summary, "figures": [str(figure.relative_to(root))]},
        "GAE: every positive": {
            "text": "One row per group: the positive (dataset index), the class explained, the "
                    "four images of its mosaic, and its components.",
            "header": ["method", "positive", "class", "mosaic", "F", "Rob", "LC", "C",
                       "GAE"],
            "rows": per_positive},
    }


def _reattribution(adapter: ModelAdapter, names: Sequence[str], config: dict[str, Any]
                   ) -> Callable[[str, torch.Tensor, Sequence[int]],
                                 Callable[[torch.Tensor], torch.Tensor]]:
    """``make(method, targets, image_ids)`` → ``maps(images)``: the method recomputed with
    the run's parameters and seed, for incremental deletion with attribution updates."""
    from vitxai.methods import BatchContext, attribute
    from vitxai.runner import recorded_methods

    params = recorded_methods(adapter, config)
    seed = config.get("seed", 0)

    def make(name: str, targets: torch.Tensor, ids: Sequence[int]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
        def maps(images: torch.Tensor) -> torch.Tensor:
            ctx = BatchContext.for_batch(len(ids), seed, ids, planned=[name])
            return attribute(params[name], adapter, images, targets, context=ctx).maps
        return maps
    return make


def _idsds_setup(root: Path, adapter: ModelAdapter, indices: list[int], s: EvaluateSettings
                 ) -> tuple[ModelAdapter, dict[str, Any], dict[int, int]]:
    """(fine-tuned adapter, its card, ground-truth label per image) for IDSDS; one-line
    errors for a checkpoint of another model, grid or baseline, and for unlabelled images."""
    from vitxai.finetune import load_finetuned

    tuned, card = load_finetuned(adapter, s.idsds_checkpoint)
    if (card["grid"], card["baseline"]["vitxai"]) != (s.grid, s.baseline):
        raise ValueError(
            f"checkpoint {s.idsds_checkpoint} was fine-tuned deleting cells of a "
            f"{card['grid']}×{card['grid']} grid with baseline {card['baseline']['idsds']!r}; "
            f"IDSDS deletes the same cells: evaluate with grid={card['grid']} and "
            f"baseline={card['baseline']['idsds']!r}")
    labels = {int(r["index"]): int(r["label"])
              for r in read_rows(root, METHOD_ROWS, ("index", "method"))
              if isinstance(r.get("label"), int)}
    unlabelled = [i for i in indices if labels.get(i, -1) < 0]
    if unlabelled:
        raise ValueError(f"IDSDS explains the ground-truth label, but {len(unlabelled)} of the "
                         f"run's {len(indices)} images have none (first: {unlabelled[:5]}); "
                         "run the comparison on labelled images (labels=FILE.csv)")
    return tuned, card, labels


@dataclass
class _IdsdsState:
    """What an IDSDS chunk needs: the fine-tuned model, the data, the run's methods."""

    tuned: ModelAdapter
    dataset: ImageDataset
    params: dict[str, Any]
    labels: dict[int, int]
    seed: int
    settings: EvaluateSettings


def _idsds_worker(config: dict[str, Any], labels: dict[int, int], s: EvaluateSettings, *,
                  gpu: bool) -> _IdsdsState:
    """A Ray worker's IDSDS state, rebuilt from the run's recorded source and the checkpoint."""
    from vitxai.finetune import load_finetuned
    from vitxai.runner import recorded_methods
    from vitxai.source import RunSource

    source = RunSource.from_config(config)
    if gpu:
        source = RunSource.from_values({**source.record(), "device": "cuda"})
    adapter, dataset, _ = source.load()
    tuned, _ = load_finetuned(adapter, s.idsds_checkpoint)
    return _IdsdsState(tuned, dataset, recorded_methods(tuned, config), labels,
                       config.get("seed", 0), s)


def _idsds_chunk(state: _IdsdsState, chosen: list[int]) -> dict[str, list[float]]:
    """IDSDS ρ per method for the images ``chosen``: every method recomputed on the
    fine-tuned model with the run's parameters and seed (the same random draws as the run's
    maps), for the ground-truth labels, then single deletion on that model."""
    from vitxai.methods import BatchContext, attribute
    from vitxai.metrics.faithfulness import single_deletion

    s, tuned = state.settings, state.tuned
    images = torch.stack([state.dataset.load(i).image for i in chosen]).to(tuned.device,
                                                                           tuned.dtype)
    targets = torch.tensor([state.labels[i] for i in chosen])
    ctx = BatchContext.for_batch(len(chosen), state.seed, chosen,
                                 planned=[r.method for r in state.params.values()])
    out = {}
    for name, method in state.params.items():
        maps = attribute(method, tuned, images, targets, context=ctx).maps
        out[name] = single_deletion(tuned, images, maps.to(tuned.device), targets,
                                    grid=s.grid, baseline=s.baseline, transform=s.transform,
                                    batch_size=s.batch_size, seed=s.seed,
                                    image_ids=chosen).tolist()
    return out


def _idsds_scores(tuned: ModelAdapter, dataset: ImageDataset, indices: list[int],
                  labels: dict[int, int], names: Sequence[str], config: dict[str, Any],
                  s: EvaluateSettings, progress: bool, engine: EngineSettings | None = None
                  ) -> dict[tuple[str, str], dict[int, float]]:
    """IDSDS per (method, "idsds") and image (Hesse et al. 2024), in chunks of
    ``s.images_per_step`` images, here or on the ``engine``'s Ray workers (which rebuild the
    model from the run's source; the results are the same)."""
    from vitxai.engines import RayPool
    from vitxai.runner import recorded_methods

    chunks = [indices[k:k + s.images_per_step] for k in range(0, len(indices),
                                                                s.images_per_step)]
    pool = None
    if engine is not None and engine.name == "ray":
        pool = RayPool(engine, _idsds_worker, (config, labels, s))
        results = pool.map(_idsds_chunk, chunks)
    else:
        state = _IdsdsState(tuned, dataset, recorded_methods(tuned, config), labels,
                            config.get("seed", 0), s)
        results = (_idsds_chunk(state, c) for c in chunks)
    out: dict[tuple[str, str], dict[int, float]] = {(name, "idsds"): {} for name in names}
    bar = tqdm(total=len(indices), unit="img", desc="IDSDS on the fine-tuned model",
               disable=not progress)
    try:
        for chosen, rho in zip(chunks, results, strict=True):
            for name in names:
                out[(name, "idsds")].update(zip(chosen, rho[name], strict=True))
            bar.update(len(chosen))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return out


def _idsds_table(rows: list[dict[str, Any]], names: Sequence[str], card: dict[str, Any],
                 config: dict[str, Any], s: EvaluateSettings) -> dict[str, Any]:
    """IDSDS next to single deletion on the unmodified model, with the images each leaves
    out as undefined (a constant map or constant drops)."""
    from vitxai.stats import bootstrap_ci

    def cell(values: np.ndarray) -> list[str]:
        mean, lo, hi = bootstrap_ci(values, seed=0)
        return [f"{mean:.4f}", f"[{lo:.4f}, {hi:.4f}]", str(int(np.isnan(values).sum()))]

    body = []
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        body.append([name, *cell(np.array([r.get("idsds", np.nan) for r in mine], float)),
                     *cell(np.array([r.get("single_deletion", np.nan) for r in mine], float)),
                     str(len(mine))])
    before, after = card["accuracy"]["before"], card["accuracy"]["after"]
    return {"IDSDS (Hesse et al. 2024) and single deletion": {
        "text": f"Spearman ρ per image between the map summed over each cell of a "
                f"{s.grid}×{s.grid} grid ({s.transform} after the channel sum) and the "
                f"pre-softmax logit drop when that cell alone is set to baseline "
                f"{card['baseline']['idsds']!r}; means with bootstrap 95 % intervals, images "
                "with an undefined ρ (constant map or drops) left out and counted. IDSDS: "
                f"maps recomputed on the fine-tuned model {s.idsds_checkpoint} (base "
                f"{card['base_model']['model']}, {card['epochs']['done']} epochs, best at "
                f"epoch {card['epochs']['best']}; deleted-cell accuracy "
                f"{before['deleted_accuracy']:.3f} → {after['deleted_accuracy']:.3f}, clean "
                f"{before['clean_accuracy']:.3f} → {after['clean_accuracy']:.3f}), for the "
                "ground-truth labels. Single deletion: the run's saved maps on the unmodified "
                f"model, for the run's targets ({config.get('target', 'label')}).",
        "header": ["method", "IDSDS ρ", "95 % CI", "undefined", "single deletion ρ",
                   "95 % CI", "undefined", "images"],
        "rows": body}}
