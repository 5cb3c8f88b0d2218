#!/usr/bin/env python3
"""Model evaluations against error: how many samples each estimator needs for a given map.

For every estimator and budget n it runs the estimator with n samples per image and measures
the error of its map against a reference of the *same* estimator with 20,000 samples (another
seed): 1 − Spearman ρ over the features, and the normalised L2 distance
‖φ − φ_ref‖ / ‖φ_ref‖. Estimators:

- vitxai KernelSHAP on quickshift superpixels (pixel space), plain, paired
  (``paired=True``), paired with leverage sampling (``sampling="leverage"``) and that
  regression-adjusted by a logistic surrogate (``surrogate="logistic"``), and on patch
  tokens with ``removal="drop"``, paired;
- vitxai LIME on superpixels, plain, paired (``paired=True``), paired from orthogonal
  arrays (``sampling="orthogonal"``) and that regression-adjusted (``surrogate="logistic"``),
  and on tokens with ``removal="drop"``;
- both on tokens with ``removal="drop"`` and ``grid=7`` (7 × 7 cells of 2 × 2 patches: 49
  features, about as many as the superpixels), in float32 and in bf16 (the bf16 runs are
  compared with the float32 reference, so their error includes bf16's own), and in
  float32 with every option of the pixel path (paired, orthogonal arrays or leverage
  sampling, the logistic surrogate);
- lime's ``lime_image`` (its own quickshift, same parameters; batch 10, its default);
- captum ``KernelShap`` on our superpixels (``perturbations_per_eval=1``, its default).

Every run is timed (seconds per image, segmentation included where the tool segments), so
the table also says how long each tool takes to reach a given error. ``n_samples="auto"``
runs (default tolerance) report the evaluations they chose, their estimated standard error
and their actual error. Writes a JSON, a markdown table and a plot.

    python benchmarks/convergence.py --images 2 --out benchmarks/results/convergence.json
    # KernelSHAP and LIME at their equal-error counts on images 6-11 (chosen on none of them)
    python benchmarks/convergence.py --first-image 6 --images 6 --budgets 224,250,316,1000 \
        --draws 8 --no-auto --estimators "vitxai KernelSHAP pixel paired leverage logistic,\
    captum KernelShap,vitxai LIME pixel paired orthogonal logistic,lime_image" \
        --out benchmarks/results/convergence-images-6-11.json
    # the held-out images of several runs as one table (same model, budgets and reference)
    python benchmarks/convergence.py --pool benchmarks/results/convergence-images-12-14.json,\
    benchmarks/results/convergence-images-15-17.json,\
    benchmarks/results/convergence-images-18-23.json \
        --out benchmarks/results/convergence-held-out.json
    python benchmarks/convergence.py --quick    # smoke test (< 1 min): the numbers mean nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from vitxai.methods import BatchContext, attribute
from vitxai.methods.perturbation import SegmentationParams, shared_segments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_adapter, load_images, machine_info  # noqa: E402

#: (label, tool, method, vitxai parameters): the estimators compared
ESTIMATORS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("vitxai KernelSHAP pixel", "vitxai", "kernel_shap", {}),
    ("vitxai KernelSHAP pixel paired", "vitxai", "kernel_shap", {"paired": True}),
    ("vitxai KernelSHAP pixel paired leverage", "vitxai", "kernel_shap",
     {"paired": True, "sampling": "leverage"}),
    ("vitxai KernelSHAP pixel paired leverage logistic", "vitxai", "kernel_shap",
     {"paired": True, "sampling": "leverage", "surrogate": "logistic"}),
    ("vitxai KernelSHAP token drop paired", "vitxai", "kernel_shap",
     {"space": "token", "removal": "drop", "paired": True}),
    ("vitxai LIME pixel", "vitxai", "lime", {}),
    ("vitxai LIME pixel paired", "vitxai", "lime", {"paired": True}),
    ("vitxai LIME pixel paired bf16", "vitxai", "lime", {"paired": True, "precision": "bf16"}),
    ("vitxai LIME pixel paired orthogonal", "vitxai", "lime",
     {"paired": True, "sampling": "orthogonal"}),
    ("vitxai LIME pixel paired orthogonal logistic", "vitxai", "lime",
     {"paired": True, "sampling": "orthogonal", "surrogate": "logistic"}),
    ("vitxai LIME pixel paired orthogonal bf16", "vitxai", "lime",
     {"paired": True, "sampling": "orthogonal", "precision": "bf16"}),
    ("vitxai KernelSHAP pixel paired leverage bf16", "vitxai", "kernel_shap",
     {"paired": True, "sampling": "leverage", "precision": "bf16"}),
    ("vitxai LIME token drop", "vitxai", "lime", {"space": "token", "removal": "drop"}),
    ("vitxai KernelSHAP token drop paired grid 7", "vitxai", "kernel_shap",
     {"space": "token", "removal": "drop", "paired": True, "grid": 7}),
    ("vitxai KernelSHAP token drop paired grid 7 bf16", "vitxai", "kernel_shap",
     {"space": "token", "removal": "drop", "paired": True, "grid": 7, "precision": "bf16"}),
    ("vitxai KernelSHAP token drop paired leverage grid 7 bf16", "vitxai", "kernel_shap",
     {"space": "token", "removal": "drop", "paired": True, "sampling": "leverage", "grid": 7,
      "precision": "bf16"}),
    ("vitxai LIME token drop grid 7", "vitxai", "lime",
     {"space": "token", "removal": "drop", "grid": 7}),
    ("vitxai LIME token drop grid 7 bf16", "vitxai", "lime",
     {"space": "token", "removal": "drop", "grid": 7, "precision": "bf16"}),
    ("vitxai LIME token drop paired grid 7 bf16", "vitxai", "lime",
     {"space": "token", "removal": "drop", "paired": True, "grid": 7, "precision": "bf16"}),
    ("vitxai LIME token drop paired orthogonal logistic grid 7", "vitxai", "lime",
     {"space": "token", "removal": "drop", "paired": True, "sampling": "orthogonal",
      "surrogate": "logistic", "grid": 7}),
    ("vitxai KernelSHAP token drop paired leverage logistic grid 7", "vitxai", "kernel_shap",
     {"space": "token", "removal": "drop", "paired": True, "sampling": "leverage",
      "surrogate": "logistic", "grid": 7}),
    ("lime_image", "lime_image", "lime", {}),
    ("captum KernelShap", "captum", "kernel_shap", {}),
)
#: estimators sharing a reference: both KernelSHAP variants on superpixels estimate the same
#: Shapley values (the paired reference is the more accurate one)
REFERENCE_OF = {"vitxai KernelSHAP pixel": "vitxai KernelSHAP pixel paired",
                "vitxai KernelSHAP pixel paired leverage": "vitxai KernelSHAP pixel paired",
                "vitxai KernelSHAP pixel paired leverage logistic":
                    "vitxai KernelSHAP pixel paired",
                "vitxai KernelSHAP pixel paired leverage bf16": "vitxai KernelSHAP pixel paired",
                # paired LIME estimates the same regression (every row is Bernoulli(½))
                "vitxai LIME pixel paired": "vitxai LIME pixel",
                "vitxai LIME pixel paired bf16": "vitxai LIME pixel",
                "vitxai LIME pixel paired orthogonal": "vitxai LIME pixel",
                "vitxai LIME pixel paired orthogonal logistic": "vitxai LIME pixel",
                "vitxai LIME pixel paired orthogonal bf16": "vitxai LIME pixel",
                "vitxai LIME token drop paired grid 7 bf16": "vitxai LIME token drop grid 7",
                "vitxai KernelSHAP token drop paired leverage grid 7 bf16":
                    "vitxai KernelSHAP token drop paired grid 7",
                # bf16 runs against the float32 reference: their error includes bf16's
                "vitxai KernelSHAP token drop paired grid 7 bf16":
                    "vitxai KernelSHAP token drop paired grid 7",
                "vitxai LIME token drop grid 7 bf16": "vitxai LIME token drop grid 7",
                "vitxai LIME token drop paired orthogonal logistic grid 7":
                    "vitxai LIME token drop grid 7",
                "vitxai KernelSHAP token drop paired leverage logistic grid 7":
                    "vitxai KernelSHAP token drop paired grid 7"}
REFERENCE_SEED = 99


def features(result: Any) -> np.ndarray:
    """A vitxai result's per-feature values of its one image, (S,) float64."""
    native = result.native[0].double().flatten()
    return native[torch.isfinite(native)].numpy()


def vitxai_run(adapter: Any, image: torch.Tensor, target: int, method: str,
               params: dict[str, Any], n: int | str, seed: int, index: int
               ) -> tuple[np.ndarray, float, dict[str, Any]]:
    ctx = BatchContext.for_batch(1, seed=seed, image_ids=[index])
    params = dict(params)
    adapter.set_precision(params.pop("precision", "fp32"))
    try:
        start = time.perf_counter()
        r = attribute(method, adapter, image, target, context=ctx, n_samples=n, **params)
        seconds = time.perf_counter() - start
    finally:
        adapter.set_precision("fp32")
    extra = {"evaluations": int(r.cost.forward)}
    if r.standard_error is not None:
        extra["standard_error"] = float(r.standard_error[0])
    return features(r), seconds, extra


def lime_image_run(adapter: Any, image: torch.Tensor, target: int, n: int, seed: int,
                   batch_size: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    from lime import lime_image

    lime_image.tqdm = lambda rows, **_kw: rows  # silence its per-row progress bar

    def classifier(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            return adapter.logits(x.to(adapter.device)).float().softmax(1).cpu().numpy()

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    start = time.perf_counter()
    e = explainer.explain_instance(image[0].permute(1, 2, 0).double().cpu().numpy(),
                                   classifier, labels=(target,), top_labels=None,
                                   hide_color=adapter.mean.reshape(3).float().cpu().numpy(),
                                   num_samples=n, batch_size=batch_size, random_seed=0)
    seconds = time.perf_counter() - start
    values = np.zeros(int(e.segments.max()) + 1)
    for k, v in e.local_exp[target]:
        values[k] = v
    return values, seconds, {"evaluations": n}


def captum_run(adapter: Any, image: torch.Tensor, target: int, segments: torch.Tensor,
               n: int, seed: int, ppe: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    from captum.attr import KernelShap

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return adapter.logits(x).float().softmax(1)

    torch.manual_seed(seed)  # captum draws from the global generator
    start = time.perf_counter()
    attr = KernelShap(probabilities).attribute(
        image, baselines=adapter.mean.reshape(1, 3, 1, 1), target=target,
        feature_mask=segments[None, None].to(image.device), n_samples=n,
        perturbations_per_eval=ppe)
    seconds = time.perf_counter() - start
    flat, seg = attr[0, 0].flatten().double().cpu(), segments.flatten()
    first = torch.zeros(int(seg.max()) + 1, dtype=torch.long).scatter_(
        0, seg.flip(0), torch.arange(len(seg)).flip(0))  # one pixel of each segment
    return flat[first].numpy(), seconds, {"evaluations": n}


def errors(phi: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    rho = spearmanr(phi, ref).statistic
    return {"one_minus_spearman": float(1 - rho) if np.isfinite(rho) else float("nan"),
            "normalised_l2": float(np.linalg.norm(phi - ref) / np.linalg.norm(ref))}


def crossing(budgets: list[int], errs: list[float], target: float) -> float | None:
    """Evaluations at which a curve first reaches ``target`` error (log-log interpolation
    between budgets; the first budget when it starts below; None when it never does)."""
    if errs[0] <= target:
        return float(budgets[0])
    for n0, e0, n1, e1 in zip(budgets, errs, budgets[1:], errs[1:], strict=False):
        if e1 <= target:
            t = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled",
                   help="'bundled' (trained, small: fits the 10-minute budget on 2 cores) or a "
                        "timm name (random weights)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--first-image", type=int, default=0,
                   help="index of the first benchmark image (e.g. 6: images that no design "
                        "or count was chosen on)")
    p.add_argument("--budgets", default="50,100,250,500,1000,2000")
    p.add_argument("--reference", type=int, default=20000, help="samples of each reference")
    p.add_argument("--estimators", default="",
                   help="comma-separated labels to run (default all)")
    p.add_argument("--no-auto", action="store_true", help="skip the n_samples='auto' runs")
    p.add_argument("--auto-only", action="store_true",
                   help="only the n_samples='auto' runs; with --merge they replace the "
                        "estimators' earlier auto rows and keep their fixed-budget rows")
    p.add_argument("--draws", type=int, default=1,
                   help="independent draws (seeds 0..K−1) per image and budget; the table "
                        "averages over images and draws")
    p.add_argument("--merge", action="store_true",
                   help="keep --out's rows of the estimators not run now (same machine and "
                        "settings: references are recomputed from their fixed seed)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    p.add_argument("--out", default="benchmarks/results/convergence.json")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the summary, table and plot of --out from its rows")
    p.add_argument("--pool", default="",
                   help="comma-separated result files of the same model, budgets and "
                        "reference on different images: write their rows as one table to "
                        "--out (nothing is run)")
    args = p.parse_args(argv)
    path = Path(args.out)
    if args.pool:
        try:
            pooled = pool([Path(f) for f in args.pool.split(",")])
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--pool: {e}")
        write(pooled, path)
        return 0
    if args.render:
        out = json.loads(path.read_text(encoding="utf-8"))
        out["summary"] = summarise(out["rows"], out["budgets"], estimators_in(out["rows"]))
        write(out, path)
        return 0
    budgets = [int(b) for b in args.budgets.split(",")]
    reference, n = args.reference, args.images
    if args.quick:
        budgets, reference, n = [20, 40], 200, 1
    wanted = {e.strip() for e in args.estimators.split(",") if e.strip()}
    estimators = [e for e in ESTIMATORS if not wanted or e[0] in wanted]
    adapter, model_note = load_adapter(args.model, pretrained=False)
    first = args.first_image
    images = load_images(adapter, first + n)[first:]
    targets = adapter.predict(images).argmax(1).cpu()
    segments = [shared_segments(BatchContext.for_batch(1), images[i:i + 1],
                                SegmentationParams())[0] for i in range(n)]
    print(f"model: {model_note}; {n} images; budgets {budgets}; reference {reference}")

    def run(label: str, i: int, budget: int | str, seed: int
            ) -> tuple[np.ndarray, float, dict[str, Any]]:
        _, tool, method, params = next(e for e in ESTIMATORS if e[0] == label)
        x, t = images[i:i + 1], int(targets[i])
        big = budget == reference or budget == "auto"
        if tool == "vitxai":
            return vitxai_run(adapter, x, t, method, params, budget, seed, first + i)
        if tool == "lime_image":  # its default batch of 10, timed; 64 for the references
            return lime_image_run(adapter, x, t, int(budget), seed, 64 if big else 10)
        return captum_run(adapter, x, t, segments[i], int(budget), seed, 64 if big else 1)

    refs: dict[tuple[str, int], np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for label, *_ in estimators:
        ref_label = REFERENCE_OF.get(label, label)
        for i in range(n):
            if (ref_label, i) not in refs:
                start = time.perf_counter()
                refs[ref_label, i] = run(ref_label, i, reference, REFERENCE_SEED)[0]
                seconds = time.perf_counter() - start
                print(f"  reference {ref_label} image {first + i}: {seconds:.1f} s", flush=True)
            auto = [] if args.no_auto or not label.startswith("vitxai") else ["auto"]
            for draw, budget in itertools.product(
                    range(args.draws), auto if args.auto_only else budgets + auto):
                phi, seconds, extra = run(label, i, budget, draw)
                rows.append({"estimator": label, "image": first + i, "budget": budget,
                             "draw": draw, "seconds": seconds, **extra,
                             **errors(phi, refs[ref_label, i]), "features": len(phi)})
                print(f"  {label:<38} image {first + i} draw {draw} n={budget!s:>5}: "
                      f"1-ρ {rows[-1]['one_minus_spearman']:.4f}  "
                      f"L2 {rows[-1]['normalised_l2']:.4f}  {seconds:.2f} s", flush=True)
    labels = [e[0] for e in estimators]
    command = [" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])]
    machines = [machine_info()]  # one per command: merged rows may come from other machines
    if args.merge and path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        rows = [r for r in before["rows"] if r["estimator"] not in labels
                or (args.auto_only and r["budget"] != "auto")] + rows
        labels = estimators_in(rows)
        command = before.get("commands", [before.get("command")]) + command
        machines = before.get("machines", [before["machine"]]) + machines
    table = summarise(rows, budgets, labels)
    out = {"machine": machines[-1], "machines": machines, "model": model_note, "images": n,
           "first_image": first,
           "budgets": budgets,
           "reference_samples": reference, "reference_seed": REFERENCE_SEED,
           "quick": args.quick, "targets": targets.tolist(), "rows": rows, "summary": table,
           "commands": command}
    write(out, path)
    return 0


def estimators_in(rows: list[dict[str, Any]]) -> list[str]:
    """The labels of the estimators that have rows, in :data:`ESTIMATORS` order."""
    present = {r["estimator"] for r in rows}
    return [e[0] for e in ESTIMATORS if e[0] in present]


def pool(paths: list[Path]) -> dict[str, Any]:
    """The rows of several runs on disjoint images as one result (same model, budgets and
    reference, or a one-line ValueError); estimators missing from a run are summarised over
    the images they ran on."""
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    for key in ("model", "budgets", "reference_samples", "reference_seed"):
        if len({json.dumps(r[key]) for r in runs}) > 1:
            raise ValueError(f"cannot pool {', '.join(map(str, paths))}: their {key} differ")
    images = [r["first_image"] + i for r in runs for i in range(r["images"])]
    if len(set(images)) < len(images):
        raise ValueError(f"cannot pool {', '.join(map(str, paths))}: they share images")
    rows = [row for r in runs for row in r["rows"]]
    return {**runs[0], "images": len(images), "first_image": None, "image_indices": images,
            "machines": [m for r in runs for m in r.get("machines", [r["machine"]])],
            "targets": [t for r in runs for t in r["targets"]], "rows": rows,
            "summary": summarise(rows, runs[0]["budgets"], estimators_in(rows)),
            "commands": [c for r in runs for c in r.get("commands", [])],
            "pooled_from": [p.name for p in paths]}


def write(out: dict[str, Any], path: Path) -> None:
    """The JSON, its markdown table (.md) and plot (.png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = render(out["summary"], out["budgets"])
    path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    plot(out["summary"], out["budgets"], path.with_suffix(".png"))
    print("\n" + markdown + f"\nresults: {path} (+ .md, .png)")


def summarise(rows: list[dict[str, Any]], budgets: list[int], labels: list[str]
              ) -> dict[str, Any]:
    """Per estimator: mean error and seconds per budget over images; the auto runs; and the
    evaluations and seconds each vitxai estimator needs to match the references at 1000."""
    def mean(values: list[float]) -> float:
        v = [x for x in values if x is not None and math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    out: dict[str, Any] = {"curves": {}, "auto": {}, "equal_error": []}
    for label in labels:
        mine = [r for r in rows if r["estimator"] == label]
        out["curves"][label] = {
            str(b): {k: mean([r[k] for r in mine if r["budget"] == b])
                     for k in ("one_minus_spearman", "normalised_l2", "seconds")}
            for b in budgets}
        auto = [r for r in mine if r["budget"] == "auto"]
        if auto:
            out["auto"][label] = {k: mean([r.get(k) for r in auto])
                                  for k in ("evaluations", "standard_error", "seconds",
                                            "one_minus_spearman", "normalised_l2")}
    for ref, ours in (("lime_image", [e[0] for e in ESTIMATORS if e[2] == "lime"
                                      and e[1] == "vitxai"]),
                      ("captum KernelShap", [e[0] for e in ESTIMATORS if e[2] == "kernel_shap"
                                             and e[1] == "vitxai"])):
        if ref not in out["curves"] or "1000" not in out["curves"][ref]:
            continue
        # L2 only: ranks of the many near-zero background features are noise even at 20,000
        # samples, so 1 − ρ stays high and is not monotone in n (it is in the curves)
        for metric in ("normalised_l2",):
            target = out["curves"][ref]["1000"][metric]
            for label in ours:
                if label not in out["curves"]:
                    continue
                curve = out["curves"][label]
                errs = [curve[str(b)][metric] for b in budgets]
                need = crossing(budgets, errs, target)
                seconds = (None if need is None else
                           float(np.interp(need, budgets,
                                           [curve[str(b)]["seconds"] for b in budgets])))
                row = {"reference": ref, "reference_seconds_at_1000":
                       out["curves"][ref]["1000"]["seconds"], "metric": metric,
                       "reference_error_at_1000": target, "estimator": label,
                       "evaluations_needed": need, "seconds_needed": seconds,
                       # already below at the first budget: need is an upper bound
                       "at_most": errs[0] <= target}
                if need is not None:
                    row["speedup"] = row["reference_seconds_at_1000"] / row["seconds_needed"]
                out["equal_error"].append(row)
    return out


def render(table: dict[str, Any], budgets: list[int]) -> str:
    lines = ["Normalised L2 error (1 − Spearman ρ) against a 20,000-sample reference of the "
             "same estimator, mean over images (and draws where a row has several); seconds "
             "per image below. Rank errors stay high: most features are near-zero background "
             "whose ranks are noise.", "",
             "| estimator | " + " | ".join(f"n={b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for label, curve in table["curves"].items():
        cells = [f"{curve[str(b)]['normalised_l2']:.3f} ({curve[str(b)]['one_minus_spearman']:.3f})"
                 for b in budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| estimator | " + " | ".join(f"s at n={b}" for b in budgets) + " |",
              "|---|" + "---:|" * len(budgets)]
    for label, curve in table["curves"].items():
        lines.append(f"| {label} | " + " | ".join(f"{curve[str(b)]['seconds']:.2f}"
                                                  for b in budgets) + " |")
    if table["auto"]:
        lines += ["", "`n_samples=\"auto\"` (default tolerance):", "",
                  "| estimator | evaluations | est. SE ratio | L2 error | 1 − ρ | s/image |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, a in table["auto"].items():
            lines.append(f"| {label} | {a['evaluations']:.0f} | {a['standard_error']:.3f} | "
                         f"{a['normalised_l2']:.3f} | {a['one_minus_spearman']:.3f} | "
                         f"{a['seconds']:.2f} |")
    if table["equal_error"]:
        lines += ["", "Equal error: evaluations (and seconds) each vitxai estimator needs to "
                  "match the reference's normalised L2 error at 1000 samples with its default "
                  "batching (interpolated between budgets; ≤: already below it at the "
                  "first budget). The evaluations are the result; "
                  "the seconds are the bundled model's, one image at a time, on a shared "
                  "machine (rows run at different times saw different load): time speed-ups "
                  "side by side with benchmarks/bench.py --equal-error.", "",
                  "| reference | its error | its s/image | vitxai estimator | "
                  "evaluations | s/image | speed-up |", "|---|---:|---:|---|---:|---:|---:|"]
        for r in table["equal_error"]:
            need = ("> max" if r["evaluations_needed"] is None else
                    f"{'≤ ' if r.get('at_most') else ''}{r['evaluations_needed']:.0f}")
            sec = "–" if r["seconds_needed"] is None else f"{r['seconds_needed']:.2f}"
            up = f"{r['speedup']:.1f}×" if "speedup" in r else "–"
            lines.append(f"| {r['reference']} | "
                         f"{r['reference_error_at_1000']:.3f} | "
                         f"{r['reference_seconds_at_1000']:.2f} | {r['estimator']} | {need} | "
                         f"{sec} | {up} |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "normalised_l2", "normalised L2 error"),
                             (axes[1], "one_minus_spearman", "1 − Spearman ρ")):
        for label, curve in table["curves"].items():
            ax.plot(budgets, [curve[str(b)][metric] for b in budgets], marker="o",
                    label=label, linestyle="-" if label.startswith("vitxai") else "--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model evaluations per image")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("error against a 20,000-sample reference of the same estimator")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
