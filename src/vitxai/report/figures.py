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
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

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


#: Line colours :func:`contrast_colour` chooses among for mask and ground-truth outlines.
CONTOUR_COLOURS: tuple[str, ...] = ("cyan", "magenta", "lime", "white", "black")


def dim_outside(image: np.ndarray, mask: np.ndarray, factor: float = 0.35,
                background: float = 0.0) -> np.ndarray:
    """``image`` with every pixel outside ``mask`` pulled towards ``background``.

    Outside pixels become ``background + factor * (pixel - background)`` (``factor`` 1
    leaves them, 0 replaces them by ``background``: 0 black, 0.5 grey); pixels inside
    the mask are returned unchanged. ``image`` is (H, W) or (H, W, C), ``mask`` (H, W)
    bool; the input is not modified.
    """
    img = np.asarray(image, dtype=float)
    keep = np.asarray(mask, dtype=bool)
    if img.ndim == 3:
        keep = keep[..., None]
    return np.where(keep, img, background + factor * (img - background))


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels on either side of ``mask``'s edge (4-neighbourhood).

    Empty when the mask is empty or full: there is no edge to draw.
    """
    m = np.asarray(mask, dtype=bool)
    edge = np.zeros_like(m)
    for axis in (0, 1):
        diff = np.diff(m, axis=axis)  # True between two pixels that differ
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def contrast_colour(image: np.ndarray, where: np.ndarray | None = None,
                    candidates: Sequence[str] = CONTOUR_COLOURS,
                    exclude: Sequence[str] = ()) -> str:
    """The candidate line colour that stands out most from ``image`` at ``where``.

    Each candidate is scored by its mean distance from the image pixels selected by
    ``where`` (e.g. :func:`mask_boundary`, the pixels a contour is drawn over): the
    Euclidean RGB distance plus the absolute difference in luminance, so that on a
    saturated image (pure yellow is as far in RGB from black as from cyan or magenta)
    the colour with the stronger light/dark contrast wins. Ties go to the earlier
    candidate. Pure: looks only at its arguments.

    Args:
        image: (H, W, 3) RGB in [0, 1] (or (H, W) grey).
        where: (H, W) bool pixels to compare against; all pixels when ``None`` or empty.
        candidates: matplotlib colour names or specs.
        exclude: candidates not to choose (e.g. a colour already used in the panel),
            ignored if it would exclude all of them.

    Returns:
        The chosen entry of ``candidates``.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    pixels = img.reshape(-1, 3)
    if where is not None and np.asarray(where, dtype=bool).any():
        pixels = img[np.asarray(where, dtype=bool)]
    pool = [c for c in candidates if c not in set(exclude)] or list(candidates)
    rgb = np.array([to_rgb(c) for c in pool])  # (K, 3)
    dist = np.linalg.norm(pixels[None] - rgb[:, None], axis=-1).mean(axis=1)
    lum = np.abs(_luminance(pixels)[None] - _luminance(rgb)[:, None]).mean(axis=1)
    return pool[int(np.argmax(dist + lum))]


def _outline(ax: plt.Axes, mask: np.ndarray, colour: str, dashed: bool = False) -> None:
    """Draw ``mask``'s edge on ``ax`` as a contour at 0.5 (nothing if it has no edge)."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.5,
                   linestyles="dashed" if dashed else "solid")


#: Factor :func:`sample_figure` dims the image outside a mask by (towards black).
DIM_FACTOR = 0.35


def sample_figure(image: np.ndarray, maps: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray], title: str, path: Path,
                  truth: np.ndarray | None = None) -> Path:
    """One image with, per method, its signed map (top) and its binary mask (bottom).

    A mask panel shows the image dimmed (:func:`dim_outside`, :data:`DIM_FACTOR`)
    outside the method's mask, the mask's edge as a solid line in the colour of
    :data:`CONTOUR_COLOURS` that contrasts most with the pixels under it
    (:func:`contrast_colour`), and, when ``truth`` is given, the ground truth's edge
    dashed in one second contrasting colour on every panel (see the figure's legend).

    Args:
        image: (H, W, 3) in [0, 1], the unnormalised model input.
        maps: method → (H, W) signed map, shown on a diverging scale symmetric about 0
            (a sequential scale from 0 for maps without negative values).
        masks: method → (H, W) bool mask, drawn as described above.
        truth: optional (H, W) ground-truth mask, outlined on the image and mask panels.
    """
    names = list(maps)
    cols = len(names) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 5.6), squeeze=False,
                             layout="constrained")  # keeps titles clear of the images above
    image = np.clip(np.asarray(image, dtype=float), 0, 1)
    bool_masks = {n: np.asarray(masks[n], dtype=bool) for n in names}
    shown = {n: dim_outside(image, bool_masks[n], DIM_FACTOR) for n in names}
    gt = None if truth is None else np.asarray(truth, dtype=float) > 0.5
    if gt is not None and not gt.any():
        gt = None
    truth_colour = None
    if gt is not None:  # one colour for every panel: judged on all the images it crosses
        edge = mask_boundary(gt)
        under = [image, dim_outside(image, gt, DIM_FACTOR), *shown.values()]
        truth_colour = contrast_colour(np.concatenate([u[edge] for u in under])[None])
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    if gt is not None:
        _outline(axes[0, 0], gt, truth_colour, dashed=True)
        axes[1, 0].imshow(dim_outside(image, gt, DIM_FACTOR))
        _outline(axes[1, 0], gt, truth_colour, dashed=True)
        axes[1, 0].set_title(f"ground truth ({gt.mean():.0%})", fontsize=9)
    for j, name in enumerate(names, start=1):
        m = np.asarray(maps[name], dtype=float)
        peak = float(np.nanmax(np.abs(m))) or 1.0
        if np.nanmin(m) >= 0:  # non-negative methods: a sequential scale shows more
            axes[0, j].imshow(m, cmap="inferno", vmin=0, vmax=peak)
        else:
            axes[0, j].imshow(m, cmap="RdBu_r", vmin=-peak, vmax=peak)
        axes[0, j].set_title(name, fontsize=9)
        mask = bool_masks[name]
        axes[1, j].imshow(shown[name])
        colour = contrast_colour(shown[name], mask_boundary(mask),
                                 exclude=() if truth_colour is None else (truth_colour,))
        _outline(axes[1, j], mask, colour)
        if gt is not None:
            _outline(axes[1, j], gt, truth_colour, dashed=True)
        axes[1, j].set_title(f"mask ({mask.mean():.0%})", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    handles = [Line2D([], [], color="0.2", lw=1.5,
                      label="method mask (solid, colour per panel; dimmed outside)")]
    if truth_colour is not None:
        handles.append(Line2D([], [], color=truth_colour, lw=1.5, ls="--",
                              label=f"ground truth (dashed {truth_colour})"))
    legend = fig.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                        fontsize=8)
    legend.get_frame().set_facecolor("0.7")  # white, cyan, lime and black lines all show
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


def gae_extremes_figure(images: np.ndarray, maps: Mapping[str, np.ndarray],
                        scores: Mapping[str, np.ndarray], path: Path, k: int = 2) -> Path:
    """The ``k`` best and ``k`` worst explained positives of GAE per method (one row each),
    each image with its map overlaid and its GAE score, as the reference's plot.

    Args:
        images: (P, H, W, 3) the GAE positives in [0, 1].
        maps: method → (P, H, W) relevance of each positive.
        scores: method → (P,) GAE per positive.
    """
    names = list(maps)
    k = max(1, min(k, images.shape[0] // 2 or 1))
    fig, axes = plt.subplots(len(names), 2 * k, figsize=(2.1 * 2 * k, 2.3 * len(names)),
                             squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        order = np.argsort(-np.nan_to_num(scores[name], nan=-np.inf), kind="stable")
        chosen = [*order[:k], *order[::-1][:k]]
        for col, i in enumerate(chosen):
            ax = axes[row, col]
            ax.imshow(overlay(images[i], maps[name][i]))
            kind = "best" if col < k else "worst"
            ax.set_title(f"{name}: {kind}\nGAE {scores[name][i]:.3f}", fontsize=8)
            ax.set_axis_off()
    return save_figure(fig, path, dpi=100)

