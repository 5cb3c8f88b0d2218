"""``vitxai probe``: train a linear probe on a frozen backbone's features.

Self-supervised ViTs (DINOv2, MAE, CLIP's image tower) have no classifier, so no class-specific
map exists until one is trained. The protocol is the linear evaluation of CLIP (Radford et al.
2021, §3.2: L-BFGS logistic regression, L2 strength chosen on a held-out split) on the
read-outs of :mod:`vitxai.models.probe`:

1. **Features, once.** The backbone's final tokens are read out in batches (class token and
   mean patch token, both kept) and cached on disk as safetensors, keyed by the model, its
   weights, the preprocessing and the images; another read-out or regularisation reuses them.
2. **Fit.** Multinomial logistic regression, mean cross-entropy + λ/2·‖W‖² on standardised
   features (the standardisation is folded back into W and b), minimised by full-batch L-BFGS
   with strong-Wolfe line search (a convex problem: the optimum, not a schedule). λ is chosen
   from a grid by accuracy on a stratified held-out split (ties by held-out log-loss); the
   probe is then refit on all images with that λ.
3. **Output.** ``probe.safetensors`` (weights, read-out, sizes and the card in its metadata),
   ``card.json`` and ``card.md``: backbone, read-out, classes, image size, train and held-out
   accuracy (and the backbone's own head's on the same split, where it has one), λ, seed.

The probe's outputs are indexed like the dataset's labels (synthetic classes 0–9, ImageNet
indices for Imagenette, class folders in sorted order), so ``--probe`` explains the same class
indices that the data's labels and targets use. Classes absent from the training images get
zero weights and a bias far below every trained logit: they never win.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from vitxai.models.adapter import ModelAdapter
from vitxai.models.probe import READOUTS, LinearProbe, check_readout, save_probe
from vitxai.source import RunSource
from vitxai.store import atomic_write

#: default grid of the L2 strength λ (on standardised features)
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: bump when the cached features change meaning
FEATURES_VERSION = 1
#: classes absent from training sit this far below the lowest trained logit
_ABSENT_MARGIN = 20.0


@dataclass
class Features:
    """Per-image read-outs of a frozen backbone.

    Attributes:
        cls: (M, D) class token after the final norm (NaN-free; zeros without a class token).
        mean_patch: (M, D) mean of the patch tokens after the final norm.
        labels: (M,) class indices (−1 = unknown).
        head: (M,) the backbone's own head's prediction, −1 where it has none.
    """

    cls: torch.Tensor
    mean_patch: torch.Tensor
    labels: torch.Tensor
    head: torch.Tensor

    def readout(self, readout: str) -> torch.Tensor:
        """(M, K·D) the probe input of ``readout`` (parts in :data:`READOUTS` order)."""
        parts = {"cls": self.cls, "mean_patch": self.mean_patch}
        return torch.cat([parts[p] for p in check_readout(readout).split("+")], dim=1)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False,
                disable=os.environ.get("VITXAI_PROGRESS", "1") == "0")


@torch.inference_mode()
def extract_features(adapter: ModelAdapter, dataset, labels: Sequence[int] | None = None,
                     batch_size: int = 32) -> Features:
    """Read out every readable image of ``dataset`` through ``adapter``'s frozen backbone.

    Args:
        adapter: a timm ViT (built with ``features_only=True`` when headless).
        labels: class index per dataset image (−1 = unknown); None = the dataset's own.

    Returns:
        :class:`Features` in float32 on the CPU, one row per readable image (unreadable ones
        are skipped with a warning by the batch loader).
    """
    from vitxai.data import iter_batches

    model = adapter.model
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_head = int(getattr(model, "num_classes", 0) or 0) > 0
    cls, mean, head, found = [], [], [], []
    with _progress(len(dataset), "features") as bar:
        for batch in iter_batches(dataset, list(range(len(dataset))), batch_size):
            bar.update(len(batch.indices) + len(batch.skipped))
            if not len(batch.indices):
                continue
            x = batch.images.to(adapter.device, adapter.dtype)
            tokens = model.forward_features(adapter.normalize(x))
            cls.append(tokens[:, 0].float().cpu() if getattr(model, "cls_token", None)
                       is not None else torch.zeros(len(x), tokens.shape[-1]))
            mean.append(tokens[:, prefix:].mean(1).float().cpu())
            head.append(model.forward_head(tokens).argmax(1).cpu() if has_head
                        else torch.full((len(x),), -1))
            found.append(batch.labels if labels is None
                         else torch.as_tensor([labels[i] for i in batch.indices]))
    if not cls:
        raise ValueError("no readable image in the data")
    return Features(torch.cat(cls), torch.cat(mean), torch.cat(found).long(), torch.cat(head))


def _file_identity(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime": stat.st_mtime}


def feature_key(source: RunSource, adapter: ModelAdapter, dataset,
                labels: Sequence[int] | None = None) -> str:
    """The cache key: model, weights file, preprocessing, images (names and count), labels."""
    record = {k: v for k, v in source.record().items() if k not in ("device", "targets")}
    files = [str(p) for p in getattr(dataset, "paths", [])]
    identity = {"version": FEATURES_VERSION, "source": record,
                "checkpoint": _file_identity(source.checkpoint),
                "data_config": {k: str(v) for k, v in adapter.data_config.items()},
                "images": len(dataset), "files": hashlib.sha256("\n".join(files).encode())
                .hexdigest(), "labels": None if labels is None else hashlib.sha256(
                    json.dumps(list(map(int, labels))).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(source: RunSource, adapter: ModelAdapter, dataset,
                    labels: Sequence[int] | None, cache_dir: Path, batch_size: int = 32
                    ) -> tuple[Features, Path, bool]:
    """(features, cache file, reused): read from ``cache_dir`` or extracted and written there
    atomically; a damaged cache file is extracted again, never trusted."""
    key = feature_key(source, adapter, dataset, labels)
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            return Features(t["cls"], t["mean_patch"], t["labels"], t["head"]), path, True
        except Exception:  # noqa: BLE001, S110 - any damage: extract again
            pass
    features = extract_features(adapter, dataset, labels, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save_bytes({"cls": features.cls.contiguous(), "mean_patch": features.mean_patch
                       .contiguous(), "labels": features.labels, "head": features.head})
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return features, path, False


def heldout_split(labels: torch.Tensor, fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices, stratified: each class with ≥ 2 images gives
    round(fraction·n) of them (at least 1) to the held-out part."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def fit_multinomial(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None,
                    max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised x: argmin mean CE + λ/2·‖W‖².

    Args:
        x: (M, F) float64 features (already standardised); y: (M,) in [0, num_classes).
        init: a warm start (W, b).

    Returns:
        (W (C, F), b (C,)) in float64.
    """
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _scores(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor
            ) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the linear classifier on (x, y)."""
    if not len(y):
        return math.nan, math.nan
    logits = x @ w.T + b
    return (float((logits.argmax(1) == y).double().mean()),
            float(F.cross_entropy(logits, y)))


@dataclass
class ProbeFit:
    """A fitted probe and what its card reports."""

    probe: LinearProbe
    l2: float
    grid: dict[str, float]
    train_accuracy: float
    heldout_accuracy: float
    head_heldout_accuracy: float | None
    n_train: int
    n_heldout: int
    classes_seen: list[int]


def fit_probe(features: Features, readout: str, num_prefix_tokens: int, *,
              num_classes: int | None = None, l2_grid: Sequence[float] = L2_GRID,
              heldout: float = 0.2, seed: int = 0) -> ProbeFit:
    """Choose λ on a held-out split, refit on all labelled images, return the probe.

    Raises:
        ValueError: fewer than two classes among the labelled images, or no labels.
    """
    keep = features.labels >= 0
    if not keep.any():
        raise ValueError("the data has no labels: give a folder with one subfolder per class, "
                         "labels=FILE.csv, Imagenette or the synthetic benchmark")
    labels = features.labels[keep]
    seen = labels.unique(sorted=True)
    if len(seen) < 2:
        raise ValueError(f"the data has one class ({int(seen[0])}) only; a probe needs at "
                         "least two")
    if not 0 < heldout < 1:
        raise ValueError(f"heldout={heldout} must be in (0, 1)")
    x = features.readout(readout)[keep].double()
    y = torch.searchsorted(seen, labels)  # compact class ids 0..K−1
    train, held = heldout_split(y, heldout, seed)
    mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    grid: dict[str, float] = {}
    best, init = None, None
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak: warm starts converge fast
        init = fit_multinomial(z[train], y[train], len(seen), l2, init)
        accuracy, loss = _scores(z[held], y[held], *init)
        grid[f"{l2:g}"] = accuracy
        # the best held-out accuracy; ties (frequent on small held-out sets) by log-loss
        if best is None or (accuracy, -loss) > best[1]:
            best = (l2, (accuracy, -loss))
    l2, (heldout_acc, _) = best
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w, b = fit_multinomial(z, y, len(seen), l2)
    train_acc = _scores(z, y, w, b)[0]
    # fold the standardisation into the weights: W(x − μ)/σ + b = (W/σ)x + (b − W/σ·μ)
    w = w / sd
    b = b - w @ mu
    total = max(int(seen.max()) + 1, num_classes or 0)
    weight = torch.zeros(total, x.shape[1], dtype=torch.float64)
    bias = torch.full((total,), float((x @ w.T + b).min()) - _ABSENT_MARGIN,
                      dtype=torch.float64)
    weight[seen], bias[seen] = w, b
    probe = LinearProbe(readout, features.cls.shape[1], total, num_prefix_tokens)
    with torch.no_grad():
        probe.linear.weight.copy_(weight)
        probe.linear.bias.copy_(bias)
    head_acc = None
    if (features.head >= 0).all():
        head = features.head[keep][held]
        head_acc = float((head == labels[held]).double().mean())
    return ProbeFit(probe, l2, grid, train_acc, heldout_acc, head_acc, len(train), len(held),
                    seen.tolist())


def folder_class_labels(dataset) -> tuple[list[int], dict[int, str]] | None:
    """Labels from one subfolder per class (sorted names → 0, 1, ...), for a folder dataset
    without other labels; None when its images are not all in class subfolders."""
    folders = getattr(dataset, "folders", None)
    if not folders or any(not f for f in folders):
        return None
    names = sorted(set(folders))
    index = {n: i for i, n in enumerate(names)}
    return [index[f] for f in folders], dict(enumerate(names))


def _labels(dataset) -> tuple[list[int] | None, dict[int, str]]:
    """(labels per image, or None for the dataset's own per-sample labels; class names)."""
    names = dict(getattr(dataset, "class_names", {}) or {})
    labels = getattr(dataset, "labels", None)
    if labels is None:  # generated data: labels come with the samples
        return None, names
    if any(x >= 0 for x in labels):
        return list(labels), names
    folders = folder_class_labels(dataset)
    if folders is not None:
        return folders
    raise ValueError("the data has no labels: give a folder with one subfolder per class, "
                     "labels=FILE.csv, Imagenette or the synthetic benchmark")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitxai" / "features"


def train_probe(source: RunSource, out: str | Path, *, readout: str = "cls",
                l2_grid: Sequence[float] = L2_GRID, heldout: float = 0.2, seed: int = 0,
                batch_size: int = 32, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole ``vitxai probe`` job; returns the card (also written to ``out``).

    Writes ``out/probe.safetensors``, ``out/card.json`` and ``out/card.md``.
    """
    check_readout(readout)
    start = time.perf_counter()
    adapter, dataset, notes = source.load(features_only=True)
    if not adapter.is_vit:
        raise ValueError(f"a linear probe reads ViT tokens; {adapter.name!r} is not a timm ViT")
    labels, names = _labels(dataset)
    features, cache, reused = cached_features(source, adapter, dataset, labels,
                                              Path(cache_dir or default_cache_dir()),
                                              batch_size)
    fit = fit_probe(features, readout, adapter.num_prefix_tokens, l2_grid=l2_grid,
                    heldout=heldout, seed=seed,  # every class the data names has an output
                    num_classes=max(names) + 1 if names else None)
    if adapter.num_classes != fit.probe.num_classes:  # another label space (CLIP's projection)
        fit.head_heldout_accuracy = None
    card = {
        "backbone": adapter.name, "readout": readout,
        "img_size": list(adapter.input_size), "in_features": fit.probe.in_features,
        "num_classes": fit.probe.num_classes, "num_prefix_tokens": adapter.num_prefix_tokens,
        "classes": {str(c): names.get(c, str(c)) for c in fit.classes_seen},
        "train_accuracy": fit.train_accuracy, "heldout_accuracy": fit.heldout_accuracy,
        "head_heldout_accuracy": fit.head_heldout_accuracy,
        "n_train": fit.n_train, "n_heldout": fit.n_heldout, "l2": fit.l2,
        "l2_grid_heldout_accuracy": fit.grid, "seed": seed, "heldout_fraction": heldout,
        "source": {k: v for k, v in source.record().items() if k != "device"},
        "features": {"cache": str(cache), "reused": reused,
                     "images": int(features.labels.numel())},
        "seconds": round(time.perf_counter() - start, 2), "notes": notes,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_probe(out / "probe.safetensors", fit.probe.float(), card)
    text = json.dumps(card, indent=2) + "\n"
    atomic_write(out / "card.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    markdown = card_markdown(card)
    atomic_write(out / "card.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable card."""
    def pct(v: float | None) -> str:
        return "–" if v is None or v != v else f"{100 * v:.1f} %"

    grid = ", ".join(f"λ={k}: {pct(v)}" for k, v in card["l2_grid_heldout_accuracy"].items())
    return (
        f"# Linear probe on {card['backbone']}\n\n"
        f"| | |\n|---|---|\n"
        f"| read-out | `{card['readout']}` ({card['in_features']} features per part) |\n"
        f"| classes | {len(card['classes'])} trained of {card['num_classes']} outputs |\n"
        f"| image size | {card['img_size'][0]}×{card['img_size'][1]} |\n"
        f"| train accuracy | {pct(card['train_accuracy'])} ({card['n_train']} + "
        f"{card['n_heldout']} images, refit on all) |\n"
        f"| held-out accuracy | {pct(card['heldout_accuracy'])} ({card['n_heldout']} images) |\n"
        f"| backbone's own head, same held-out images | {pct(card['head_heldout_accuracy'])} |\n"
        f"| L2 λ (standardised features) | {card['l2']:g}; held-out accuracy by λ: {grid} |\n"
        f"| seed | {card['seed']} |\n\n"
        "Multinomial logistic regression by L-BFGS on the frozen backbone's read-out, λ chosen "
        "on the held-out split, then refit on all images (docs/methods.md §13).\n"
    )


__all__ = ["L2_GRID", "READOUTS", "Features", "ProbeFit", "cached_features",
           "extract_features", "fit_probe", "train_probe"]
