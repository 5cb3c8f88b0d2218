"""Train the bundled benchmark ViT on freshly generated synthetic images.

``vitxai train-benchmark`` (or ``python -m vitxai.train``) trains a small timm
``VisionTransformer`` on an endless stream of :mod:`vitxai.data.synthetic` "single" images
(seed ``seed``; no image is seen twice), tests it on a fresh split generated with another seed,
and writes ``benchmark_vit.safetensors``, ``benchmark_vit.json`` (the machine-readable card
read by :mod:`vitxai.models.bundled`) and ``benchmark_vit.md`` into ``out_dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

import vitxai
from vitxai.data.synthetic import CLASS_NAMES, GENERATOR_VERSION, generate
from vitxai.models.bundled import (
    BUNDLED_CARD,
    BUNDLED_NAME,
    BUNDLED_WEIGHTS,
    TRAIN_COMMAND,
    benchmark_accuracy,
)
from vitxai.models.loading import adapt

#: timm ``VisionTransformer`` kwargs of the bundled model: patch 16 at 224 like ViT-B/16,
#: narrow and shallow so it trains on 2 CPU cores in minutes.
MODEL_KWARGS: dict[str, Any] = {
    "img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2,
    "mlp_ratio": 4.0, "num_classes": len(CLASS_NAMES), "class_token": True,
    "global_pool": "token",
}
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1 + np.cos(np.pi * min(1.0, progress)))


def _batch(seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generate("single", range(step * batch_size, (step + 1) * batch_size), seed)
    return g.images, g.labels


def train_benchmark_model(
    out_dir: str | Path = BUNDLED_CARD.parent,
    *,
    seed: int = 0,
    steps: int = 1800,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 100,
    test_size: int = 2000,
    test_seed: int | None = None,
    time_budget_s: float = 1200.0,
    threads: int = 2,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, test and write the benchmark ViT and its card; returns the card.

    Args:
        out_dir: where the three files go (default: the package's assets, i.e. replace the
            bundled model).
        seed: seeds the weights' initialisation and the training images (split "single").
        steps, batch_size: optimisation steps of ``batch_size`` new images each.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        test_size, test_seed: size and seed of the fresh test split (default seed + 1000,
            never the training seed).
        time_budget_s: training stops early (and the card says so) once this many seconds
            have passed, so a slow machine still finishes; testing is not counted.
        threads: torch CPU threads while training (restored afterwards).
        model_kwargs: overrides of :data:`MODEL_KWARGS`.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: ``test_seed`` equal to ``seed`` (the test images must be unseen).
    """
    test_seed = seed + 1000 if test_seed is None else test_seed
    if test_seed == seed:
        raise ValueError("test_seed must differ from the training seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {**MODEL_KWARGS, **(model_kwargs or {})}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = VisionTransformer(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu0 = time.process_time()
    start = time.perf_counter()
    done, stopped_early, running = 0, False, None
    bar = tqdm(total=steps, desc="train benchmark ViT", disable=not progress, unit="step")
    # One thread generates the next batch while torch works on this one.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitxai-gen")
    try:
        model.train()
        pending = pool.submit(_batch, seed, 0, batch_size)
        for step in range(steps):
            images, labels = pending.result()
            if step + 1 < steps:
                pending = pool.submit(_batch, seed, step + 1, batch_size)
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, lr, warmup_steps)
            logits = model((images.float() - mean) / std)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done = step + 1
            acc = float((logits.argmax(1) == labels).float().mean())
            running = acc if running is None else 0.98 * running + 0.02 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{running:.3f}")
            if time.perf_counter() - start > time_budget_s and done < steps:
                stopped_early = True
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    train_s = time.perf_counter() - start
    train_cpu_s = time.process_time() - cpu0
    model.eval()
    data_config = {"input_size": [3, kwargs["img_size"], kwargs["img_size"]], "mean": list(MEAN),
                   "std": list(STD), "interpolation": "bilinear", "crop_pct": 1.0,
                   "crop_mode": "center"}
    config = dict(data_config, input_size=tuple(data_config["input_size"]))
    t0 = time.perf_counter()
    accuracy = benchmark_accuracy(adapt(model, BUNDLED_NAME, config), test_size, test_seed)
    test_s = time.perf_counter() - t0
    torch.set_num_threads(saved_threads)

    weights = out / BUNDLED_WEIGHTS.name
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "model": BUNDLED_NAME})
    command = (f"{TRAIN_COMMAND} --out {out} --seed {seed} --time-budget {time_budget_s:g}")
    card: dict[str, Any] = {
        "name": BUNDLED_NAME,
        "description": "timm VisionTransformer trained from scratch on vitxai's synthetic "
                       "ground-truth benchmark (vitxai.data.synthetic, split 'single')",
        "model": {"class": "timm.models.vision_transformer.VisionTransformer",
                  "kwargs": kwargs,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data_config": data_config,
        "classes": {str(k): v for k, v in CLASS_NAMES.items()},
        "seed": seed,
        "command": command,
        "python_api": (f"vitxai.train.train_benchmark_model({str(out)!r}, seed={seed}, "
                       f"steps={steps}, batch_size={batch_size}, lr={lr}, "
                       f"weight_decay={weight_decay}, warmup_steps={warmup_steps}, "
                       f"time_budget_s={time_budget_s:g})"),
        "training": {
            "data": {"split": "single", "seed": seed, "generator_version": GENERATOR_VERSION,
                     "images_seen": done * batch_size, "each_image_once": True},
            "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay,
                          "schedule": f"linear warm-up {warmup_steps} steps, cosine to 0",
                          "grad_clip_norm": 1.0, "batch_size": batch_size,
                          "steps_planned": steps, "steps_done": done,
                          "stopped_early_by_time_budget": stopped_early},
            "wall_time_s": round(train_s, 1),
            "cpu_time_s": round(train_cpu_s, 1),
            "time_budget_s": time_budget_s,
            "test_time_s": round(test_s, 1),
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": threads,
                        "platform": platform.platform(),
                        "load_average_at_start": load_start,
                        "load_average_at_end": (os.getloadavg()[0]
                                                if hasattr(os, "getloadavg") else None)},
        },
        "test": {"split": "single", "seed": test_seed, "size": test_size,
                 "accuracy": round(accuracy, 4)},
        "versions": {"vitxai": vitxai.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "weights": {"file": weights.name, "bytes": weights.stat().st_size,
                    "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                    "dtype": "float32"},
    }
    (out / BUNDLED_CARD.name).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (out / "benchmark_vit.md").write_text(_markdown(card), encoding="utf-8")
    return card


def _markdown(card: dict[str, Any]) -> str:
    """The human-readable model card."""
    tr, te, m = card["training"], card["test"], card["model"]
    kw = m["kwargs"]
    opt = tr["optimizer"]
    mach = tr["machine"]
    early = " (stopped early by the time budget)" if opt["stopped_early_by_time_budget"] else ""
    classes = ", ".join(f"{k} {v}" for k, v in card["classes"].items())
    return f"""# {card['name']}

A real timm `VisionTransformer` (patch {kw['patch_size']} at {kw['img_size']}, class token),
trained from scratch on vitxai's synthetic ground-truth benchmark (`vitxai.data.synthetic`,
generator version {tr['data']['generator_version']}). Not an ImageNet model: its
{kw['num_classes']} classes are the benchmark's ({classes}); the class is decided only by
one object per image, whose pixel mask is known.

| | |
|---|---|
| architecture | embed_dim {kw['embed_dim']}, depth {kw['depth']}, heads {kw['num_heads']}, \
mlp_ratio {kw['mlp_ratio']}, {m['parameters']:,} parameters |
| input | {card['data_config']['input_size']}, mean {card['data_config']['mean']}, \
std {card['data_config']['std']}, values in [0, 1] before normalisation |
| **test accuracy** | **{te['accuracy']:.4f}** on {te['size']} fresh images \
(split {te['split']}, seed {te['seed']}) |
| training data | {tr['data']['images_seen']:,} generated images, each seen once \
(split single, seed {tr['data']['seed']}) |
| optimiser | AdamW lr {opt['lr']}, wd {opt['weight_decay']}, batch {opt['batch_size']}, \
{opt['steps_done']}/{opt['steps_planned']} steps{early}, {opt['schedule']} |
| training time | {tr['wall_time_s'] / 60:.1f} min wall ({tr['cpu_time_s'] / 60:.1f} min CPU) \
on {mach['cores']} cores × {mach['cpu']} with {mach['torch_threads']} torch threads; \
load average {mach['load_average_at_start']} at start, {mach['load_average_at_end']} at end |
| versions | torch {card['versions']['torch']}, timm {card['versions']['timm']}, \
vitxai {card['versions']['vitxai']} |
| weights | `{card['weights']['file']}`, {card['weights']['bytes'] / 1e6:.2f} MB, \
sha256 `{card['weights']['sha256'][:16]}…` |

Reproduce: `{card['command']}` (seed {card['seed']}; CPU thread scheduling makes runs
numerically close, not bit-identical).

Load: `vitxai.models.bundled.load_bundled_model()`.
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m vitxai.train``: the same options as ``vitxai train-benchmark``."""
    p = argparse.ArgumentParser(prog="python -m vitxai.train", description=__doc__)
    p.add_argument("--out", default=str(BUNDLED_CARD.parent))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=1200.0,
                   help="seconds of training at most (default 1200 = 20 min)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    card = train_benchmark_model(args.out, seed=args.seed, time_budget_s=args.time_budget,
                                 steps=args.steps, batch_size=args.batch_size,
                                 test_size=args.test_size, progress=not args.no_progress)
    json.dump({k: card[k] for k in ("test", "training", "weights")}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
