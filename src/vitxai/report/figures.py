"""Every figure vitxai draws (matplotlib), each saved atomically through :func:`save_figure`:
agreement heatmaps, the sample image's maps and masks, deletion/insertion curves, and the
overlays of ``explain``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitxai.store import atomic_write  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, **kwargs: object) -> Path:
    """Save and close ``fig`` atomically: a kill never leaves a truncated image behind."""
    fmt = path.suffix.lstrip(".")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
    plt.close(fig)
    return path


def agreement_heatmap(matrix: np.ndarray, names: Sequence[str], title: str, stem: Path,
                      counts: np.ndarray | None = None, row_label: str = "",
                      col_label: str = "") -> list[Path]:
    """Annotated (M, M) heatmap saved as ``stem``.png and ``stem``.svg.

    NaN cells (undefined: no image had a non-empty denominator) are shown blank as "n/a".
    ``counts`` (M, M), when given, is printed under each value as the number of images.
    """
    m = np.asarray(matrix, dtype=float)
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="YlGnBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}"
            if counts is not None:
                text += f"\nn={int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(m[i, j]) and m[i, j] > 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    atomic_write(paths[1], lambda tmp: fig.savefig(tmp, format="svg"))
    save_figure(fig, paths[0], dpi=150)
    return paths


def sample_figure(image: np.ndarray, maps: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray], title: str, path: Path,
                  truth: np.ndarray | None = None) -> Path:
    """One image with, per method, its signed map (top) and its binary mask (bottom).

    Args:
        image: (H, W, 3) in [0, 1], the unnormalised model input.
        maps: method → (H, W) signed map, shown on a diverging scale symmetric about 0
            (a sequential scale from 0 for maps without negative values).
        masks: method → (H, W) bool mask, overlaid on the image.
        truth: optional (H, W) ground-truth mask, outlined on the image panel.
    """
    names = list(maps)
    cols = len(names) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 5.0), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    if truth is not None and truth.any():
        axes[0, 0].contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        axes[1, 0].imshow(truth, cmap="gray", vmin=0, vmax=1)
        axes[1, 0].set_title("ground truth", fontsize=9)
    for j, name in enumerate(names, start=1):
        m = np.asarray(maps[name], dtype=float)
        peak = float(np.nanmax(np.abs(m))) or 1.0
        if np.nanmin(m) >= 0:  # non-negative methods: a sequential scale shows more
            axes[0, j].imshow(m, cmap="inferno", vmin=0, vmax=peak)
        else:
            axes[0, j].imshow(m, cmap="RdBu_r", vmin=-peak, vmax=peak)
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].imshow(image)
        axes[1, j].imshow(np.ma.masked_where(~masks[name], masks[name]), cmap="autumn",
                          alpha=0.55, vmin=0, vmax=1)
        axes[1, j].set_title(f"mask ({masks[name].mean():.0%})", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET overlay of max(map, 0)/max on an (H, W, 3) image in [0, 1]; returns (H, W, 3)."""
    pos = np.clip(attribution, 0, None)
    peak = pos.max()
    heat = matplotlib.colormaps["jet"](pos / peak if peak > 0 else pos)[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)


def overlay_figure(image: np.ndarray, maps: Mapping[str, np.ndarray], title: str,
                   path: Path) -> Path:
    """The image and one :func:`overlay` per method side by side (vit-explain's display).

    Args:
        image: (H, W, 3) in [0, 1], the unnormalised model input.
        maps: method → (H, W) signed map.
    """
    cols = len(maps) + 1
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 3.0), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (name, m) in zip(axes[0, 1:], maps.items(), strict=True):
        ax.imshow(overlay(image, m))
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def curves_figure(curves: Mapping[str, np.ndarray], path: Path) -> Path:
    """Mean deletion (left) and insertion (right) curves per method.

    Args:
        curves: method → (N, 2, K) target probabilities of N images, deletion then
            insertion, at K evenly spaced shares of perturbed units from 0 to 1.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        x = np.linspace(0, 1, c.shape[-1])
        for j, ax in enumerate(axes):
            ax.plot(x, np.nanmean(c[:, j], axis=0), label=name)
    for ax, title in zip(axes, ("deletion (most relevant first)", "insertion"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("share of units perturbed")
        ax.set_ylabel("target probability")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    return save_figure(fig, path, dpi=120)
