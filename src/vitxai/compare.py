"""The comparison: run methods over a dataset, binarise every map alike, measure agreement.

:func:`compare` streams the dataset batch by batch: one prediction pass, every method on the
same batch (sharing segmentation and the attention pass through one
:class:`~vitxai.methods.BatchContext`), the unified masks, and per-image rows appended to the
run directory after each batch. Nothing accumulates in memory beyond a batch; aggregates are
computed from the written rows at the end, so a resumed run gives the same tables.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from vitxai import __version__
from vitxai.data.datasets import Batch, ImageDataset, select_indices
from vitxai.engines import Engine, EngineSettings, start_engine
from vitxai.masks import MaskParams
from vitxai.methods.base import get_method, params_record, stable_seed
from vitxai.metrics.agreement import mask_vs_truth, overlap_matrices
from vitxai.metrics.localization import mass_inside, pointing_game
from vitxai.metrics.scores import MASK_PAIR_SCORES, TRUTH_SCORES
from vitxai.models.adapter import ModelAdapter
from vitxai.report.figures import agreement_heatmap, sample_figure
from vitxai.runner import SEED_METHODS, BatchRun, resolve_methods, run_batches
from vitxai.store import MANIFEST, METHOD_ROWS, PAIR_ROWS, RunStore, read_rows, run_identity

#: the columns of per_image_pairs.csv and of the truth scores (see vitxai.metrics.scores)
PAIR_METRICS = tuple(MASK_PAIR_SCORES)
TRUTH_METRICS = tuple(TRUTH_SCORES)
#: classes listed per image in the rows (column ``top5``, most probable first)
TOP_K = 5


def _classes(value: Any) -> list[int]:
    """The classes of a ``top5`` cell ("3 1 7 0 2"; a single class is read back as an int)."""
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        return []  # rows written before the column existed (NaN)
    return [int(c) for c in value.split()]


def prediction_summary(rows: Sequence[Mapping[str, Any]], num_classes: int | None
                       ) -> dict[str, Any]:
    """What the model did on a run's images, from its per-image rows (one image may have a
    row per method; each image counts once).

    Returns:
        ``n_images``; ``n_labelled`` (images with a label); ``top1_accuracy`` and
        ``top5_accuracy`` over the labelled images (None without labels, or, for top-5, for
        rows written before the ``top5`` column); ``mean_target_probability``;
        ``num_classes``; and ``mismatch``: None, or one sentence saying that the predictions
        look like chance (mean target probability at most 2/num_classes, or, with labels,
        top-1 accuracy at most twice chance), i.e. the model name, its weights or the
        preprocessing may be wrong.
    """
    images: dict[Any, Mapping[str, Any]] = {}
    for r in rows:
        images.setdefault(r["index"], r)
    labelled = [r for r in images.values()
                if isinstance(r.get("label"), int) and r["label"] >= 0]
    probs = np.array([float(r["target_probability"]) for r in images.values()], dtype=float)
    probs = probs[np.isfinite(probs)]
    top1 = (float(np.mean([r["label"] == r["prediction"] for r in labelled]))
            if labelled else None)
    with_top5 = [r for r in labelled if _classes(r.get("top5"))]
    top5 = (float(np.mean([r["label"] in _classes(r["top5"]) for r in with_top5]))
            if with_top5 else None)
    mean_p = float(probs.mean()) if probs.size else None
    summary: dict[str, Any] = {
        "n_images": len(images), "n_labelled": len(labelled), "top1_accuracy": top1,
        "top5_accuracy": top5, "mean_target_probability": mean_p,
        "num_classes": num_classes or None, "mismatch": None,
    }
    if not num_classes or num_classes < 2:
        return summary
    chance = 1.0 / num_classes
    if mean_p is not None and mean_p <= 2 * chance:
        why = (f"the mean probability of the explained class is {mean_p:.3g}, near chance "
               f"(1/{num_classes})")
    elif top1 is not None and top1 <= 2 * chance:
        why = (f"top-1 accuracy is {top1:.1%} over {len(labelled)} labelled images, near "
               f"chance ({chance:.1%})")
    else:
        return summary
    labels = ", or the labels may not be the model's classes" if labelled else ""
    summary["mismatch"] = (f"{why}: the model name, its weights (checkpoint) or the "
                           f"preprocessing may be wrong{labels}")
    return summary


@dataclass
class CompareSettings:
    """What a comparison runs.

    Attributes:
        methods: registry names (aliases accepted), in the order they run.
        method_params: per-method parameter overrides, e.g. {"lime": {"n_samples": 500}}.
        mask: the unified mask parameters, applied to every method alike.
        target: "label" explains the dataset label where known (else the prediction, as for
            unlabelled folders); "prediction" always explains the predicted class.
        batch_size: images per batch (results do not depend on it).
        seed: every random draw derives from it and the image index.
        sample_size: number of images drawn (seeded) from the dataset; None = all.
        idx_sample_img: dataset index of the image shown in the sample figure (added to the
            selection if it was not drawn); None = the first selected image.
        save_attr_maps: write signed maps, native maps and masks (safetensors).
        measure_memory: record each method's peak memory per batch, which resets the
            process's peak-memory statistics (Linux ``/proc/self/clear_refs``, or CUDA's)
            before every method; turn it off when the caller watches those statistics.
    """

    methods: Sequence[str] = SEED_METHODS
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    mask: MaskParams = field(default_factory=MaskParams)
    target: Literal["label", "prediction"] = "label"
    batch_size: int = 8
    seed: int = 0
    sample_size: int | None = None
    idx_sample_img: int | None = None
    save_attr_maps: bool = False
    measure_memory: bool = True


def _versions() -> dict[str, str]:
    import matplotlib
    import scipy
    import skimage
    import timm

    return {
        "vitxai": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
        "scikit-image": skimage.__version__, "matplotlib": matplotlib.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


def run_config(adapter: ModelAdapter, dataset: ImageDataset, settings: CompareSettings,
               params: Mapping[str, Any], indices: Sequence[int],
               notes: Sequence[str] = (), source: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """The JSON record of a run; its fingerprint covers everything that changes results.

    ``source`` records how to rebuild the model and dataset
    (:meth:`vitxai.source.RunSource.record`), which evaluation uses to reload the images of
    a run.
    """
    model = {"name": adapter.name, "is_vit": adapter.is_vit,
             "data_config": getattr(adapter, "data_config", {}),
             "device": str(adapter.device), "dtype": str(adapter.dtype)}
    if getattr(adapter, "precision", "fp32") != "fp32":  # absent for fp32: old runs resume
        model["precision"] = adapter.precision
    if adapter.is_vit:
        model |= {"depth": adapter.depth, "num_prefix_tokens": adapter.num_prefix_tokens,
                  "grid_size": list(adapter.grid_size), "patch_size": list(adapter.patch_size)}
    result = {
        "model": model,
        "dataset": dataset.describe(),
        "methods": {k: params_record(v.params) for k, v in params.items()},
        "mask": dataclasses.asdict(settings.mask),
        "target": settings.target,
        "seed": settings.seed,
        "sample_size": settings.sample_size,
        "idx_sample_img": settings.idx_sample_img,
        "save_attr_maps": settings.save_attr_maps,
        "n_images": len(indices),
        "source": dict(source or {}),
    }
    variants = {label: r.method for label, r in params.items() if label != r.method}
    if variants:  # recorded only when there are some, so that other runs keep fingerprints
        result["variants"] = variants
    result["fingerprint"] = fingerprint(result)
    result["batch_size"] = settings.batch_size
    result["notes"] = list(notes)
    result["versions"] = _versions()
    result["command"] = " ".join(sys.argv)
    return result


#: config keys that do not change results, left out of the fingerprint
UNFINGERPRINTED = ("fingerprint", "batch_size", "notes", "versions", "command", "engine")


def fingerprint(record: Mapping[str, Any]) -> str:
    """Hex digest of everything in a run's record that changes its results."""
    kept = {k: v for k, v in record.items() if k not in UNFINGERPRINTED}
    return f"{stable_seed(json.dumps(kept, sort_keys=True, default=str)):x}"


def renamed_run(out: str | Path, current: str) -> tuple[str, ...]:
    """The fingerprint recorded by the run in ``out`` when it is this run (fingerprint
    ``current``) recorded with deprecated parameter names (docs/conventions.md): translated
    to today's names, its record has the current fingerprint, so it resumes. Else empty."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return ()
    try:
        record = json.loads(path.read_text())
        variants = record.get("variants") or {}
        record["methods"] = {
            name: get_method(variants.get(name, name)).current_names(params, warn=False)
            for name, params in record["methods"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return ()  # damaged or foreign: the store says so
    old = record.get("fingerprint")
    return (old,) if old != current and fingerprint(record) == current else ()


def _truth_scores(prefix: str, maps: torch.Tensor, masks: np.ndarray, truth: torch.Tensor | None,
                  i: int) -> dict[str, float]:
    """The :data:`TRUTH_METRICS` of image ``i``, as columns ``PREFIX_NAME``."""
    if truth is None:
        return {}
    t = truth[i].numpy()
    overlap = mask_vs_truth(masks[i], t)
    m = maps[i].numpy()
    return {f"{prefix}_{k}": v for k, v in overlap.items()} | {
        f"{prefix}_pointing": pointing_game(m, t),
        f"{prefix}_mass_inside": mass_inside(m, t),
    }


def _batch_rows(run: BatchRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    batch, names, results, masks = run.batch, run.names, run.results, run.masks
    predictions, probs, targets = run.predictions, run.probs, run.targets
    method_rows, pair_rows = [], []
    b = len(batch)
    top = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)  # (values, classes), descending
    estimated = any(results[n].standard_error is not None for n in names)
    for i in range(b):
        label = int(batch.labels[i])
        base = {
            "index": batch.indices[i], "path": batch.paths[i], "label": label,
            "prediction": int(predictions[i]), "target": int(targets[i]),
            "correct": (float(label == int(predictions[i])) if label >= 0 else float("nan")),
            "target_probability": float(probs[i, targets[i]]),
            "top5": " ".join(str(int(c)) for c in top[1][i]),
            "top5_probability": " ".join(f"{float(p):.4g}" for p in top[0][i]),
        }
        for name in names:
            r = results[name]
            row = base | {
                "method": name,
                "mask_fraction": float(masks[name][i].mean()),
                "forward_passes": r.cost.forward, "backward_passes": r.cost.backward,
                "seconds_per_image": r.cost.seconds / b, "shared_pass": r.cost.shared,
                "peak_memory_mb": (float("nan") if r.cost.peak_memory_mb is None
                                   else r.cost.peak_memory_mb),
            }
            if estimated:  # a method chose its own sample count: every row gets the columns
                se, used = r.standard_error, r.evaluations
                row |= {"standard_error": float("nan") if se is None else float(se[i]),
                        "evaluations": r.cost.forward if used is None else int(used[i])}
            row |= _truth_scores("truth", r.maps, masks[name], batch.masks, i)
            row |= _truth_scores("other", r.maps, masks[name], batch.other_masks, i)
            method_rows.append(row)
        overlap = overlap_matrices(np.stack([masks[n][i] for n in names]))
        for a, name_a in enumerate(names):
            for c, name_b in enumerate(names):
                if a != c:
                    pair_rows.append({
                        "index": batch.indices[i], "method_a": name_a, "method_b": name_b,
                        **{k: float(overlap[k][a, c]) for k in PAIR_METRICS},
                    })
    return method_rows, pair_rows


def _maps_record(batch: Batch, results: Mapping[str, Any], masks: Mapping[str, np.ndarray]
                 ) -> dict[str, torch.Tensor]:
    first = next(iter(results.values()))
    record = {"index": torch.tensor(batch.indices, dtype=torch.long),
              "target": first.targets.long().clone()}
    for name, r in results.items():
        record[f"{name}.map"] = r.maps.float().clone()
        if r.native_kind != "pixel":  # pixel methods: native is the map itself
            record[f"{name}.native"] = r.native.float().clone()
        record[f"{name}.mask"] = torch.from_numpy(masks[name]).to(torch.uint8)
        if r.channels is not None:
            record[f"{name}.channels"] = r.channels.half()
        if r.segments is not None:
            record[f"{name}.segments"] = r.segments.to(torch.int32)
    return record


def aggregate(root: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """Means over images from the rows a run wrote, for all images and correct ones only.

    Undefined values (NaN) are excluded from each mean, and every mean comes with the number
    of images it covers.
    """
    rows = read_rows(root, METHOD_ROWS, ("index", "method"))
    pairs = read_rows(root, PAIR_ROWS, ("index", "method_a", "method_b"))
    correct = {r["index"] for r in rows if r.get("correct") == 1}
    n = len(names)
    out: dict[str, Any] = {"methods": list(names), "subsets": {}}
    for subset, keep in (("all", None), ("correct", correct)):
        sub_rows = [r for r in rows if keep is None or r["index"] in keep]
        sub_pairs = [p for p in pairs if keep is None or p["index"] in keep]
        per_method: dict[str, Any] = {}
        numeric = [k for k in (sub_rows[0] if sub_rows else {})
                   if k not in ("index", "path", "method", "label", "prediction", "target",
                                "top5", "top5_probability")
                   and isinstance(sub_rows[0][k], int | float)]
        for name in names:
            mine = [r for r in sub_rows if r["method"] == name]
            per_method[name] = {}
            for k in numeric:
                values = np.array([float(r[k]) for r in mine], dtype=float)
                ok = np.isfinite(values)
                per_method[name][k] = {"mean": float(values[ok].mean()) if ok.any() else None,
                                       "n": int(ok.sum())}
        matrices = {}
        for metric in PAIR_METRICS:
            total, count = np.zeros((n, n)), np.zeros((n, n), dtype=int)
            for p in sub_pairs:
                v = p[metric]
                if isinstance(v, float) and np.isfinite(v) or isinstance(v, int):
                    a, c = names.index(p["method_a"]), names.index(p["method_b"])
                    total[a, c] += v
                    count[a, c] += 1
            mean = np.divide(total, count, out=np.full((n, n), np.nan), where=count > 0)
            # a mask agrees with itself wherever it is non-empty (and is undefined elsewhere)
            for a, name in enumerate(names):
                count[a, a] = sum(1 for r in sub_rows
                                  if r["method"] == name and r["mask_fraction"] > 0)
                mean[a, a] = 1.0 if count[a, a] else np.nan
            matrices[metric] = {"mean": mean.tolist(), "n": count.tolist()}
        out["subsets"][subset] = {
            "n_images": len({r["index"] for r in sub_rows}),
            "per_method": per_method, "pairwise": matrices,
        }
    return out


def write_figures(store: RunStore, aggregates: Mapping[str, Any], names: Sequence[str]) -> None:
    """The three agreement heatmaps (PNG and SVG) over all images."""
    sub = aggregates["subsets"]["all"]
    for metric, score in MASK_PAIR_SCORES.items():
        m = sub["pairwise"][metric]
        mean = np.array(m["mean"], dtype=float)
        agreement_heatmap(mean, names,
                          f"Binary masks: {score.label} (n={sub['n_images']} images)",
                          store.figures / f"{metric}_heatmap", counts=np.array(m["n"]),
                          row_label="A" if metric == "coverage" else "",
                          col_label="B" if metric == "coverage" else "")


def _sample_plot(store: RunStore, run: BatchRun, i: int, class_names: Mapping[int, str]
                 ) -> None:
    batch, names, results, masks = run.batch, run.names, run.results, run.masks
    targets, predictions = run.targets, run.predictions
    index = batch.indices[i]

    def cname(c: int) -> str:
        return class_names.get(c, str(c)) if c >= 0 else "unknown"

    title = (f"image {index}: label {cname(int(batch.labels[i]))}, predicted "
             f"{cname(int(predictions[i]))}, explained {cname(int(targets[i]))}")
    sample_figure(
        batch.images[i].permute(1, 2, 0).clamp(0, 1).numpy(),
        {n: results[n].maps[i].numpy() for n in names},
        {n: masks[n][i] for n in names}, title,
        store.figures / f"sample_{index}.png",
        truth=None if batch.masks is None else batch.masks[i].numpy(),
    )


def compare(adapter: ModelAdapter, dataset: ImageDataset, out: str | Path,
            settings: CompareSettings | None = None, *, progress: bool = True,
            overwrite: bool = False, notes: Sequence[str] = (),
            source: Mapping[str, Any] | None = None,
            engine: EngineSettings | None = None) -> dict[str, Any]:
    """Run the comparison and write the run directory ``out`` (see :mod:`vitxai.store`).

    Reruns with the same settings resume: images already done are not recomputed. With
    ``engine=EngineSettings("ray", ...)`` the batches are computed by Ray workers rebuilt
    from ``source`` and committed here (:mod:`vitxai.engines`); the results are the same.

    Returns:
        The aggregates also written to ``out/aggregates.json``.
    """
    s = settings or CompareSettings()
    params = resolve_methods(adapter, s.methods, s.method_params)
    names = list(params)
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    indices = select_indices(len(dataset), s.sample_size, s.seed)
    sample_index: int | None = indices[0] if s.idx_sample_img is None else s.idx_sample_img
    if not 0 <= sample_index < len(dataset):
        raise ValueError(
            f"idx_sample_img={sample_index} is outside the dataset [0, {len(dataset)})"
        )
    if sample_index not in indices:
        indices = sorted([*indices, sample_index])
    config = run_config(adapter, dataset, s, params, indices, notes, source)
    renamed = () if overwrite else renamed_run(out, config["fingerprint"])
    workers = start_engine(engine, source, s, dataset)
    config["engine"] = workers.record() if workers is not None else {"name": "local"}
    try:
        with RunStore(out, config, overwrite=overwrite, same_run=renamed) as store:
            _run_batches(adapter, dataset, store, s, params, indices, sample_index, progress,
                         workers)
            aggregates = _finish(store, adapter, dataset, names, config)
    finally:
        if workers is not None:
            workers.close()
    return aggregates


def _finish(store: RunStore, adapter: ModelAdapter, dataset: ImageDataset,
            names: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """Aggregates, figures and the completion mark of a run whose batches are all in."""
    if not store.manifest["done"]:
        raise ValueError(
            f"no readable images in {dataset.describe().get('root', dataset.name)}: "
            f"{len(store.manifest['skipped'])} skipped, see {store.root / MANIFEST}")
    aggregates = aggregate(store.root, names)
    aggregates["run"] = run_identity(config, store.manifest)
    aggregates["skipped"] = store.manifest["skipped"]
    aggregates["seconds"] = store.manifest["seconds"]
    aggregates["predictions"] = prediction_summary(
        read_rows(store.root, METHOD_ROWS, ("index", "method")), adapter.num_classes or None)
    store.write_json("aggregates.json", aggregates)
    write_figures(store, aggregates, names)
    store.complete()
    return aggregates


@dataclass
class BatchPayload:
    """What one computed batch commits: everything the driver of a distributed run needs
    from a worker (:mod:`vitxai.engines`), and what the local loop hands to
    :func:`commit_batch`.

    Attributes:
        indices: dataset indices computed; skipped: (index, path, reason) of unreadable ones.
        method_rows, pair_rows: the batch's CSV rows.
        maps: the map file's tensors (``save_attr_maps``), else None.
        seconds: wall time of the batch.
        sample: the batch's :class:`~vitxai.runner.BatchRun` when it holds the sample image
            (for the sample figure), else None.
    """

    indices: list[int]
    skipped: list[tuple[int, str, str]]
    method_rows: list[dict[str, Any]]
    pair_rows: list[dict[str, Any]]
    maps: dict[str, torch.Tensor] | None
    seconds: float
    sample: BatchRun | None = None


def compute_batch(batch: Batch, run: BatchRun | None, s: CompareSettings,
                  sample_index: int | None) -> BatchPayload:
    """The payload of one batch run by :func:`~vitxai.runner.run_batch` (None: every image
    of the batch was unreadable)."""
    if run is None:
        return BatchPayload([], list(batch.skipped), [], [], None, 0.0)
    method_rows, pair_rows = _batch_rows(run)
    maps = _maps_record(batch, run.results, run.masks) if s.save_attr_maps else None
    return BatchPayload(list(batch.indices), list(batch.skipped), method_rows, pair_rows,
                        maps, time.perf_counter() - run.started,
                        run if sample_index in batch.indices else None)


def commit_batch(store: RunStore, payload: BatchPayload, class_names: Mapping[int, str],
                 sample_index: int | None) -> None:
    """Write one payload into the run directory through the journal (maps file, sample
    figure, rows, manifest)."""
    maps_file = (store.save_maps(payload.indices[0], payload.maps)
                 if payload.maps is not None else None)
    if payload.sample is not None and sample_index in payload.indices:
        _sample_plot(store, payload.sample, payload.sample.batch.indices.index(sample_index),
                     class_names)
    store.finish_batch(payload.method_rows, payload.pair_rows, payload.indices,
                       payload.skipped, payload.seconds, maps_file)


def _run_batches(adapter: ModelAdapter, dataset: ImageDataset, store: RunStore,
                 s: CompareSettings, params: Mapping[str, Any], indices: Sequence[int],
                 sample_index: int | None, progress: bool,
                 engine: Engine | None = None) -> None:
    """Compute and commit every batch the run directory does not hold yet, here or on the
    ``engine``'s workers (whose payloads are committed here, in batch order)."""
    done = store.done_indices()
    todo = [i for i in indices if i not in done]
    if todo:
        store.require_columns(METHOD_ROWS, ("top5", "top5_probability"))
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), unit="img",
               desc="compare", disable=not progress, dynamic_ncols=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        payloads = (engine.payloads(todo, sample_index) if engine is not None
                    else _local_payloads(adapter, dataset, todo, params, s, sample_index))
        for payload in payloads:
            if sample_index in {i for i, _, _ in payload.skipped}:
                warnings.warn(f"sample image {sample_index} is unreadable; the sample figure "
                              "shows the next readable image instead", stacklevel=3)
                sample_index = None
            if sample_index is None and payload.indices and payload.sample is not None:
                sample_index = payload.indices[0]
            commit_batch(store, payload, dataset.class_names, sample_index)
            bar.update(len(payload.indices) + len(payload.skipped))
    bar.close()


def _local_payloads(adapter: ModelAdapter, dataset: ImageDataset, todo: Sequence[int],
                    params: Mapping[str, Any], s: CompareSettings, sample_index: int | None
                    ) -> Iterator[BatchPayload]:
    """The payloads of this process, batch by batch (decoding overlaps the model work)."""
    next_readable = sample_index
    for batch, run in run_batches(adapter, dataset, todo, params, batch_size=s.batch_size,
                                  seed=s.seed, target=s.target, mask=s.mask,
                                  measure_memory=s.measure_memory):
        if next_readable in {i for i, _, _ in batch.skipped}:
            next_readable = None  # the sample figure moves to the next readable image
        if next_readable is None and len(batch):
            next_readable = batch.indices[0]
        yield compute_batch(batch, run, s, next_readable)
