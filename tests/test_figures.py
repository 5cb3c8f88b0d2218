"""The sample figure's mask panels: dimming outside the mask, contrasting outline colours."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vitxai.report import figures
from vitxai.report.figures import (
    contrast_colour,
    dim_outside,
    mask_boundary,
    sample_figure,
)

DARK = {"black"}
LIGHT = {"white", "cyan", "lime"}


def _square_mask(size: int = 16, lo: int = 4, hi: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_dim_outside_exact():
    rng = np.random.default_rng(0)
    image = rng.random((6, 5, 3))
    mask = np.zeros((6, 5), dtype=bool)
    mask[1:4, 2:4] = True
    before = image.copy()
    out = dim_outside(image, mask, 0.35)
    np.testing.assert_array_equal(out[mask], image[mask])
    np.testing.assert_allclose(out[~mask], 0.35 * image[~mask], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(image, before)  # input untouched
    grey = dim_outside(image, mask, 0.5, background=0.5)
    np.testing.assert_allclose(grey[~mask], 0.5 + 0.5 * (image[~mask] - 0.5), atol=1e-15)
    np.testing.assert_array_equal(dim_outside(image, np.ones((6, 5), bool), 0.0), image)
    assert dim_outside(image[..., 0], mask, 0.0)[~mask].max() == 0.0  # (H, W) works too


def test_mask_boundary():
    mask = _square_mask(8, 2, 5)
    edge = mask_boundary(mask)
    assert edge[2, 2] and edge[1, 2] and edge[4, 4] and edge[5, 4]  # both sides of the edge
    assert not edge[3, 3] and not edge[0, 0]  # interior and far outside
    assert not mask_boundary(np.zeros((4, 4), bool)).any()
    assert not mask_boundary(np.ones((4, 4), bool)).any()


@pytest.mark.parametrize("rgb", [(1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (0.95, 0.85, 0.2),
                                 (1.0, 0.75, 0.1)])
def test_contrast_colour_dark_on_light(rgb):
    image = np.broadcast_to(np.array(rgb), (16, 16, 3))
    mask = _square_mask()
    assert contrast_colour(image) in DARK
    assert contrast_colour(image, mask_boundary(mask)) in DARK


@pytest.mark.parametrize("rgb", [(0.0, 0.0, 0.0), (0.1, 0.05, 0.1), (0.15, 0.1, 0.0)])
def test_contrast_colour_light_on_dark(rgb):
    image = np.broadcast_to(np.array(rgb), (16, 16, 3))
    assert contrast_colour(image, mask_boundary(_square_mask())) in LIGHT


def test_contrast_colour_looks_only_at_where():
    image = np.zeros((16, 16, 3))
    image[:, 8:] = 1.0  # right half white
    where = np.zeros((16, 16), bool)
    where[:, 12] = True
    assert contrast_colour(image, where) in DARK
    assert contrast_colour(image, ~where & (np.arange(16) < 8)[None]) in LIGHT


def test_contrast_colour_exclude_and_candidates():
    white = np.ones((4, 4, 3))
    assert contrast_colour(white, exclude=("black",)) != "black"
    assert contrast_colour(white, candidates=("white", "navy")) == "navy"
    assert contrast_colour(white, candidates=("black",), exclude=("black",)) == "black"
    assert contrast_colour(np.ones((4, 4))) in DARK  # grey images


def _inputs(size: int = 32):
    image = np.full((size, size, 3), (0.95, 0.85, 0.2))  # yellow, the case that was hard
    image[: size // 2] *= 0.6
    mask = np.zeros((size, size), bool)
    mask[8:20, 6:18] = True
    truth = np.zeros((size, size), bool)
    truth[10:26, 10:26] = True
    maps = {"a": np.linspace(-1, 1, size * size).reshape(size, size),
            "b": np.linspace(0, 1, size * size).reshape(size, size)}
    masks = {"a": mask, "b": ~mask}
    return image, maps, masks, truth


@pytest.mark.parametrize("with_truth", [True, False])
def test_sample_figure_writes_png(tmp_path, with_truth):
    image, maps, masks, truth = _inputs()
    (tmp_path / "figures").mkdir()
    path = sample_figure(image, maps, masks, "title", tmp_path / "figures" / "s.png",
                         truth=truth if with_truth else None)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []  # closed
    assert not list(path.parent.glob("*.tmp*"))


def test_sample_figure_empty_and_full_masks(tmp_path):
    image, maps, _, truth = _inputs()
    masks = {"a": np.zeros((32, 32), bool), "b": np.ones((32, 32), bool)}
    assert sample_figure(image, maps, masks, "t", tmp_path / "s.png",
                         truth=np.zeros((32, 32), bool)).exists()


def test_sample_figure_mask_panels(tmp_path, monkeypatch):
    """The saved mask panels show the image dimmed outside the mask, outlined."""
    image, maps, masks, truth = _inputs()
    seen = {}
    save = figures.save_figure

    def capture(fig, path, **kwargs):
        axes = np.array(fig.axes[:6]).reshape(2, 3)
        seen["panels"] = [np.asarray(ax.images[0].get_array()) for ax in axes[1]]
        seen["contours"] = [len(ax.collections) for ax in axes[1]]
        seen["colours"] = [[c.get_edgecolor()[0][:3] for c in ax.collections]
                           for ax in axes[1]]
        return save(fig, path, **kwargs)

    monkeypatch.setattr(figures, "save_figure", capture)
    sample_figure(image, maps, masks, "t", tmp_path / "s.png", truth=truth)
    gt_panel, panel_a, panel_b = seen["panels"]
    for panel, mask in ((gt_panel, truth), (panel_a, masks["a"]), (panel_b, masks["b"])):
        np.testing.assert_allclose(panel[mask], image[mask])
        assert (panel[~mask] < image[~mask]).all()  # darker outside
        np.testing.assert_allclose(panel, dim_outside(image, mask, figures.DIM_FACTOR))
    assert seen["contours"] == [1, 2, 2]  # truth only; mask + truth on each method panel
    truth_rgb = seen["colours"][0][0]
    for mask_rgb, gt_rgb in seen["colours"][1:]:
        np.testing.assert_allclose(gt_rgb, truth_rgb)  # one truth colour on every panel
        assert not np.allclose(mask_rgb, truth_rgb)  # the mask's colour differs from it
