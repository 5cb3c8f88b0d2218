"""Linear probes on frozen trunks, offline: accuracy and truth scores of the seed methods.

Trains a probe with each read-out on the bundled ViT's frozen trunk (synthetic benchmark, 500
training images of data seed 1), compares their accuracy with the shipped head on 300 fresh
images, and runs the six seed methods through the shipped head and each probe on the
comparison's default images (``vitxai compare``), recording the truth scores. Then the same for
one self-supervised timm architecture at small size (DINOv2 ViT-S/14 with 4 registers at 224
px, 16×16 grid; random weights, as the hub is offline here; LIME and KernelSHAP at 300 samples
to fit the budget).

    python benchmarks/probes_synthetic.py            # ~15 min on 2 CPU cores
    → benchmarks/results/probes_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from vitxai.cli import main as vitxai
from vitxai.data.synthetic import SyntheticBenchmark
from vitxai.models.bundled import load_bundled_model
from vitxai.models.probe import READOUTS

SEED_METHODS = ("lime", "kernel_shap", "integrated_gradients", "gradient_shap",
                "attention_rollout", "chefer2021a")
TRUTH = ("truth_iou", "truth_pointing", "truth_mass_inside")


def run(*argv: str) -> None:
    code = vitxai([str(a) for a in argv])
    if code:
        raise SystemExit(f"vitxai {' '.join(map(str, argv))} exited {code}")


def truth_scores(run_dir: Path) -> dict[str, dict[str, float]]:
    agg = json.loads((run_dir / "aggregates.json").read_text())["subsets"]["all"]["per_method"]
    return {m: {k: round(agg[m][k]["mean"], 3) for k in (*TRUTH, "correct")}
            for m in agg}


@torch.inference_mode()
def test_accuracy(probe: Path | None, n: int = 300, seed: int = 7) -> float:
    adapter = load_bundled_model(probe=probe)
    data = SyntheticBenchmark("single", size=n, seed=seed)
    images = torch.stack([data.load(i).image for i in range(n)])
    labels = torch.tensor([data.load(i).label for i in range(n)])
    return float((adapter.predict(images).argmax(1) == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/probe-demo")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                              "probes_synthetic.json"))
    args = parser.parse_args()
    os.environ.setdefault("VITXAI_PROGRESS", "0")
    work = Path(args.work)
    start = time.perf_counter()
    results: dict = {"bundled": {}, "dinov2_small_random": {}}

    # 1. the bundled trunk: three probes from one feature extraction
    head_runs = work / "runs" / "head"
    run("compare", "--out", head_runs, "--overwrite")
    results["bundled"]["head"] = {"test_accuracy": test_accuracy(None),
                                  "truth": truth_scores(head_runs)}
    for readout in READOUTS:
        folder = work / "probes" / readout
        run("probe", "--n-images", 500, "--data-seed", 1, "--readout", readout,
            "--cache-dir", work / "cache", "--out", folder)
        card = json.loads((folder / "card.json").read_text())
        run_dir = work / "runs" / readout
        run("compare", "--probe", folder / "probe.safetensors", "--out", run_dir,
            "--overwrite")
        results["bundled"][readout] = {
            "heldout_accuracy": card["heldout_accuracy"],
            "head_heldout_accuracy": card["head_heldout_accuracy"], "l2": card["l2"],
            "test_accuracy": test_accuracy(folder / "probe.safetensors"),
            "truth": truth_scores(run_dir)}

    # 2. a self-supervised architecture at small size (random weights: offline)
    model = ["--model", "vit_small_patch14_reg4_dinov2", "--random-weights", "--img-size", 224]
    folder = work / "probes" / "dinov2-small"
    run("probe", *model, "--n-images", 300, "--data-seed", 1, "--readout", "cls+mean_patch",
        "--cache-dir", work / "cache", "--out", folder)
    card = json.loads((folder / "card.json").read_text())
    run_dir = work / "runs" / "dinov2-small"
    run("compare", *model, "--data", "synthetic", "--n-images", 6, "--probe",
        folder / "probe.safetensors", "--param", "lime.n_samples=300", "--param",
        "kernel_shap.n_samples=300", "--out", run_dir, "--overwrite")
    results["dinov2_small_random"] = {"heldout_accuracy": card["heldout_accuracy"],
                                      "l2": card["l2"], "truth": truth_scores(run_dir)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["torch"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
