"""The Ray engine on this machine: 1 vs 2 workers, start-up and per-batch overheads.

Runs ``vitxai compare`` on the embedded default (12 images, six seed methods, bundled ViT)
locally and on a local Ray instance with one worker (2 cores) and with two (1 core each), and
measures Ray's start-up (instance and workers with their model) and its cost per batch
(a cheap method, one image per batch, Ray against local). Also counts the model evaluations
per image of the six seed methods from their own ``Cost``, the input of the README's
estimate for Imagenette on many GPUs.

    python benchmarks/ray_scaling.py    # ~6 min on 2 cores → benchmarks/results/ray_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vitxai.compare import CompareSettings, compare
from vitxai.engines import EngineSettings
from vitxai.methods import attribute
from vitxai.models import load_model
from vitxai.runner import SEED_METHODS
from vitxai.source import RunSource


def timed_compare(out: Path, engine: EngineSettings | None, settings: CompareSettings,
                  source: RunSource) -> dict[str, float]:
    adapter, dataset, _ = source.load()
    start = time.perf_counter()
    compare(adapter, dataset, out, settings, progress=False, source=source.record(),
            engine=engine)
    wall = time.perf_counter() - start
    config = json.loads((out / "config.json").read_text())
    return {"wall_s": round(wall, 2), "engine": config["engine"]["name"],
            "workers": len(config["engine"].get("devices", [None]))}


def ray_startup(workers: int, cpus: int, source: RunSource) -> float:
    """Seconds to start a local Ray instance and ``workers`` actors holding the model."""
    from vitxai.engines import RayEngine

    adapter, dataset, _ = source.load()
    start = time.perf_counter()
    engine = RayEngine(EngineSettings("ray", workers=workers, cpus_per_worker=cpus),
                       source.record(), CompareSettings(methods=["attention_rollout"]),
                       dataset)
    seconds = time.perf_counter() - start
    engine.close()
    return round(seconds, 2)


def evaluations_per_image() -> dict[str, dict[str, int]]:
    """Forward and backward passes per image of the six seed methods (their ``Cost``), on a
    ViT-B/16 with random weights (the counts do not depend on the weights)."""
    adapter = load_model("vit_base_patch16_224", pretrained=False)
    images = torch.rand(1, 3, 224, 224)
    out = {}
    for name in SEED_METHODS:
        if name in ("lime", "kernel_shap"):  # counts only: 1000 samples by definition
            out[name] = {"forward": 1000, "backward": 0}
            continue
        cost = attribute(name, adapter, images, [0]).cost
        out[name] = {"forward": int(cost.forward), "backward": int(cost.backward)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                              "ray_scaling.json"))
    args = parser.parse_args()
    os.environ.setdefault("VITXAI_PROGRESS", "0")
    source = RunSource()
    default = CompareSettings(measure_memory=False)
    cheap = CompareSettings(methods=["attention_rollout"], batch_size=1, measure_memory=False)
    cheap_source = RunSource(n_images=24)
    results: dict = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                 "torch_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["default_run"] = {
            "local (2 threads)": timed_compare(root / "local", None, default, source),
            "ray, 1 worker × 2 cores": timed_compare(
                root / "ray1", EngineSettings("ray", workers=1, cpus_per_worker=2), default,
                source),
            "ray, 2 workers × 1 core": timed_compare(
                root / "ray2", EngineSettings("ray", workers=2, cpus_per_worker=1), default,
                source),
        }
        local = timed_compare(root / "cheap-local", None, cheap, cheap_source)["wall_s"]
        ray = timed_compare(root / "cheap-ray", EngineSettings("ray", workers=1,
                                                               cpus_per_worker=2),
                            cheap, cheap_source)["wall_s"]
        startup = ray_startup(1, 2, cheap_source)
        results["per_batch_overhead_s"] = round((ray - startup - local) / 24, 4)
        results["startup_s"] = {"1 worker": startup, "2 workers": ray_startup(2, 1, source)}
    results["evaluations_per_image_vit_b16"] = evaluations_per_image()
    results["torch"] = torch.__version__
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
