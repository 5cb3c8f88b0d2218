#!/usr/bin/env python3
"""How maps made by removing patch tokens relate to blended tokens, pixels and the truth.

On the bundled benchmark (its trained ViT, generated images with known object masks) every
perturbation method runs three ways: token space with removed tokens (``removal="drop"``),
token space with blended tokens (``removal="blend"``, the default) and pixel space. Per image it
records the Spearman rank correlation of the drop map with the other two (on the 14×14 patch
grid; pixel maps are average-pooled to it), the maps' localisation of the object (pointing
game, relevance mass and rank accuracy against the truth mask) and seconds per image. It also
checks that ``removal="attention_mask"`` gives the drop map.

    python benchmarks/token_removal.py --images 16 --out benchmarks/results/token-removal.json
    python benchmarks/token_removal.py --quick          # smoke test (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from vitxai.data.synthetic import SyntheticBenchmark
from vitxai.methods import BatchContext, attribute
from vitxai.metrics.localization import mass_inside, pointing_game, rank_accuracy
from vitxai.models.bundled import load_bundled_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DATA_SEED, machine_info  # noqa: E402

#: each method's three variants; token-space RISE uses binary masks (drop needs them)
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "lime": {"drop": {"space": "token", "removal": "drop"},
             "blend": {"space": "token"}, "pixel": {}},
    "kernel_shap": {"drop": {"space": "token", "removal": "drop", "paired": True},
                    "blend": {"space": "token", "paired": True}, "pixel": {"paired": True}},
    "rise": {"drop": {"space": "token", "removal": "drop", "masks": "binary"},
             "blend": {"space": "token", "masks": "binary"}, "pixel": {}},
    "occlusion": {"drop": {"space": "token", "removal": "drop", "window": 16, "stride": 16},
                  "blend": {"space": "token", "window": 16, "stride": 16}, "pixel": {}},
}
SAMPLED = ("lime", "kernel_shap", "rise")


def to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(B, H, W) maps → (B, gh·gw) patch means."""
    return F.adaptive_avg_pool2d(maps[:, None].double(), grid)[:, 0].flatten(1).numpy()


def rho(a: np.ndarray, b: np.ndarray) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": int(len(v))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--samples", type=int, default=1000,
                   help="LIME/KernelSHAP coalitions and RISE masks per image")
    p.add_argument("--batch", type=int, default=8, help="images per attribute() call")
    p.add_argument("--quick", action="store_true", help="2 images, 40 samples: a smoke test")
    p.add_argument("--out", default="benchmarks/results/token-removal.json")
    args = p.parse_args(argv)
    n, samples = (2, 40) if args.quick else (args.images, args.samples)
    adapter = load_bundled_model()
    grid = adapter.grid_size
    data = SyntheticBenchmark("single", size=n, seed=DATA_SEED)
    items = [data.load(i) for i in range(n)]
    images = torch.stack([s.image for s in items])
    truth = [s.mask.numpy().astype(bool) for s in items]
    targets = torch.tensor([s.label for s in items])
    per: dict[str, dict[str, Any]] = {}
    for method, variants in VARIANTS.items():
        maps, seconds = {}, {}
        for name, kw in variants.items():
            kw = dict(kw, **({"n_samples": samples} if method in SAMPLED else {}))
            parts, start = [], time.perf_counter()
            for lo in range(0, n, args.batch):
                ctx = BatchContext.for_batch(min(args.batch, n - lo), seed=0,
                                             image_ids=list(range(lo, min(lo + args.batch, n))))
                parts.append(attribute(method, adapter, images[lo:lo + args.batch],
                                       targets[lo:lo + args.batch], context=ctx, **kw).maps)
            seconds[name] = (time.perf_counter() - start) / n
            maps[name] = torch.cat(parts)
            print(f"{method:<12} {name:<6} {seconds[name]:7.3f} s/image", flush=True)
        grids = {k: to_grid(v, grid) for k, v in maps.items()}
        row: dict[str, Any] = {"settings": {k: dict(v, **({"n_samples": samples}
                                                          if method in SAMPLED else {}))
                                            for k, v in variants.items()},
                               "seconds_per_image": seconds}
        for a, b in (("drop", "blend"), ("drop", "pixel"), ("blend", "pixel")):
            row[f"spearman_{a}_{b}"] = summary([rho(grids[a][i], grids[b][i])
                                                for i in range(n)])
        for name, m in maps.items():
            for metric, fn in (("pointing_game", pointing_game), ("mass_inside", mass_inside),
                               ("rank_accuracy", rank_accuracy)):
                row[f"{metric}_{name}"] = summary([fn(m[i].numpy(), truth[i])
                                                   for i in range(n)])
        per[method] = row
    # attention_mask gives the drop map (one batch, LIME)
    kw = dict(VARIANTS["lime"]["drop"], n_samples=min(samples, 200))
    x, t = images[:2], targets[:2]
    drop = attribute("lime", adapter, x, t, seed=1, **kw).native
    masked = attribute("lime", adapter, x, t, seed=1, **dict(kw, removal="attention_mask")).native
    check = {"max_abs_difference": float((drop - masked).abs().max()),
             "max_abs_value": float(drop.abs().max())}
    out = {"machine": machine_info(), "model": "bundled benchmark ViT (trained weights)",
           "images": n, "samples": samples, "data_seed": DATA_SEED, "quick": args.quick,
           "methods": per, "drop_equals_attention_mask": check,
           "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("\n| method | ρ(drop, blend) | ρ(drop, pixel) | ρ(blend, pixel) | pointing drop / "
          "blend / pixel | mass drop / blend / pixel | s/img drop / blend / pixel |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    trio = " / ".join
    for method, r in per.items():
        def f(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]['mean']:.2f}"
        print(f"| {method} | {f('spearman_drop_blend')} | {f('spearman_drop_pixel')} | "
              f"{f('spearman_blend_pixel')} | "
              f"{trio(f(f'pointing_game_{v}') for v in ('drop', 'blend', 'pixel'))} | "
              f"{trio(f(f'mass_inside_{v}') for v in ('drop', 'blend', 'pixel'))} | "
              + trio(f"{r['seconds_per_image'][v]:.2f}" for v in ("drop", "blend", "pixel"))
              + " |")
    print(f"\nattention_mask vs drop: max |Δ| {check['max_abs_difference']:.2e} "
          f"(max |value| {check['max_abs_value']:.2e})\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
