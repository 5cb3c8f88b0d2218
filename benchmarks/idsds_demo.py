#!/usr/bin/env python3
"""IDSDS on the bundled benchmark, offline, in about 7 minutes on 2 CPU cores.

IDSDS (Hesse, Schaub-Meyer & Roth 2024, "Benchmarking the Attribution Quality of Vision
Models", NeurIPS Datasets & Benchmarks) is single deletion on a model fine-tuned so that a
deleted grid cell is in-domain. This script runs, each step a ``vitxai`` command that resumes
when rerun:

1. ``vitxai finetune-deletion`` of the bundled ViT on generated synthetic images (the paper's
   schedule, 30 epochs with StepLR every 10, on 384 images per epoch in batches of 32, under
   a time budget);
2. ``vitxai compare`` of the six seed methods on 32 images of the benchmark (LIME and
   KernelSHAP with 200 samples), maps saved;
3. ``vitxai evaluate --idsds``: plain single deletion of the saved maps, and IDSDS with every
   method recomputed on the fine-tuned model;

then measures how in-domain a deleted cell is before and after fine-tuning (accuracy and
target-logit drop for cells on and off the object, every cell of the 256 validation images)
and writes everything to ``benchmarks/idsds_synthetic.json``:

    python benchmarks/idsds_demo.py [--work runs/idsds-demo] [--out benchmarks/idsds_synthetic.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vitxai.cli import main as vitxai
from vitxai.data.synthetic import SyntheticBenchmark
from vitxai.finetune import load_finetuned
from vitxai.metrics.faithfulness import baseline_images
from vitxai.models.bundled import load_bundled_model
from vitxai.stats import bootstrap_ci
from vitxai.store import read_rows
from vitxai.train import _cpu_name, _load_average

FINETUNE = ["--n-images", "384", "--batch-size", "32", "--val-size", "256",
            "--time-budget", "150"]
COMPARE = ["--n-images", "32", "--param", "lime.n_samples=200", "--param",
           "kernel_shap.n_samples=200", "--save-attr-maps"]


@torch.inference_mode()
def deletion_diagnostics(adapter, images: torch.Tensor, labels: torch.Tensor,
                         masks: torch.Tensor, grid: int = 4) -> dict[str, float]:
    """Every cell of every image set to the zeros baseline: accuracy and mean target-logit
    drop, for cells that touch the object (information removed) and cells that do not (only
    the domain shift is left)."""
    base = baseline_images(adapter, images, "mean")
    clean = adapter.predict(images)
    y0 = clean.gather(1, labels[:, None])[:, 0]
    c = images.shape[-1] // grid
    out: dict[str, list[float]] = {"on_acc": [], "off_acc": [], "on_drop": [], "off_drop": []}
    for k in range(grid * grid):
        r, q = divmod(k, grid)
        cell = (slice(None), slice(None), slice(r * c, (r + 1) * c), slice(q * c, (q + 1) * c))
        x = images.clone()
        x[cell] = base[cell]
        logits = adapter.predict(x)
        drop = y0 - logits.gather(1, labels[:, None])[:, 0]
        hit = (logits.argmax(1) == labels).float()
        on = masks[:, r * c:(r + 1) * c, q * c:(q + 1) * c].flatten(1).any(1)
        for side, sel in (("on", on), ("off", ~on)):
            out[f"{side}_acc"] += hit[sel].tolist()
            out[f"{side}_drop"] += drop[sel].tolist()
    return {"clean_accuracy": float((clean.argmax(1) == labels).float().mean()),
            **{k: round(float(np.mean(v)), 4) for k, v in out.items()},
            "cells_on_object": len(out["on_acc"]), "cells_off_object": len(out["off_acc"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/idsds-demo", help="fine-tune and run folders")
    p.add_argument("--out", default=str(Path(__file__).parent / "idsds_synthetic.json"))
    args = p.parse_args()
    work = Path(args.work)
    tuned, run = work / "finetune", work / "run"
    commands = [["finetune-deletion", *FINETUNE, "--out", str(tuned), "--no-progress"],
                ["compare", *COMPARE, "--out", str(run), "--no-progress"],
                ["evaluate", str(run), "--idsds", "--checkpoint", str(tuned), "--no-progress"]]
    load_start = _load_average()
    seconds = {}
    for argv in commands:
        start = time.perf_counter()
        if vitxai(argv) != 0:
            raise SystemExit(f"vitxai {' '.join(argv)} failed")
        seconds[argv[0]] = round(time.perf_counter() - start, 1)

    card = json.loads((tuned / "finetuned.json").read_text())
    base = load_bundled_model()
    finetuned, _ = load_finetuned(base, tuned)
    val = SyntheticBenchmark(size=card["data"]["validation"]["n_images"],
                             seed=card["data"]["validation"]["seed"])
    samples = [val.load(i) for i in range(len(val))]
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples])
    masks = torch.stack([s.mask for s in samples])
    diagnostics = {name: deletion_diagnostics(a, images, labels, masks)
                   for name, a in (("before", base), ("after", finetuned))}

    rows = read_rows(run, "per_image_evaluation.csv", ("index", "method"))
    methods = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry = {}
        for score in ("idsds", "single_deletion"):
            v = np.array([r[score] for r in mine], float)
            mean, lo, hi = bootstrap_ci(v, seed=0)
            entry[score] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
                            "undefined": int(np.isnan(v).sum())}
        diff = np.array([r["idsds"] - r["single_deletion"] for r in mine], float)
        mean, lo, hi = bootstrap_ci(diff, seed=0)
        entry["idsds_minus_single_deletion"] = {"mean": round(mean, 4),
                                                "ci95": [round(lo, 4), round(hi, 4)]}
        entry["images"] = len(mine)
        methods[name] = entry

    result = {
        "what": "IDSDS vs single deletion on the bundled ViT and the synthetic benchmark "
                "(benchmarks/idsds_demo.py)",
        "commands": ["vitxai " + " ".join(a) for a in commands],
        "seconds": seconds,
        "finetune": {k: card[k] for k in ("grid", "baseline", "optimizer", "epochs",
                                          "accuracy", "time")},
        "deletion_diagnostics": {
            "what": "every cell of the 256 validation images set to the zeros baseline; "
                    "accuracy and mean target-logit drop for cells on / off the object",
            **diagnostics},
        "methods": methods,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_at_start": load_start, "load_average_at_end": _load_average()},
        "versions": card["versions"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"seconds": seconds, "deletion_diagnostics": diagnostics,
                      "methods": methods}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
