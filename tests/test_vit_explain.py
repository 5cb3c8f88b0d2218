"""The vit-explain entry point (root ``vit_explain.py``): modes, file names, written masks."""

from __future__ import annotations

import functools
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitxai.methods import attribute
from vitxai.models.bundled import load_bundled_model

SCRIPT = Path(__file__).resolve().parents[1] / "vit_explain.py"


@functools.cache
def script() -> dict:
    return runpy.run_path(str(SCRIPT))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A random 50×40 RGBA picture (resized and converted by the script)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)).save(path)
    return path


def expected(written_input: Path, method: str, targets: int | None = None, legacy: bool = False,
             **params) -> np.ndarray:
    """The library's map for the written input, overlaid as vit-explain does."""
    adapter = load_bundled_model()
    if legacy:  # vit-explain's normalisation
        adapter.mean = torch.full_like(adapter.mean, 0.5)
        adapter.std = torch.full_like(adapter.std, 0.5)
    img = np.array(Image.open(written_input))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    r = attribute(method, adapter, x, targets, legacy=legacy, **params)
    mask = r.maps[0].numpy() / float(r.native[0].max())
    return script()["show_mask_on_image"](img, mask)


@pytest.mark.parametrize("legacy", [False, True])
def test_attention_rollout_without_a_category(image, tmp_path, capsys, legacy):
    out = tmp_path / "out"
    args = ["--image_path", str(image), "--model", "bundled", "--out", str(out)]
    assert script()["main"](args + (["--legacy"] if legacy else [])) == 0
    assert "Doing Attention Rollout" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["attention_rollout_0.900_max.png",
                                                     "input.png"]
    size = load_bundled_model().input_size
    assert Image.open(out / "input.png").size == size[::-1]
    written = np.array(Image.open(out / "attention_rollout_0.900_max.png"))
    want = expected(out / "input.png", "attention_rollout", legacy=legacy, head_fusion="max",
                    discard_ratio=0.9)
    np.testing.assert_array_equal(written, want)


def test_gradient_rollout_with_a_category(image, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--image_path", str(image), "--model", "bundled", "--out", str(out),
            "--category_index", "3", "--discard_ratio", "0.5", "--head_fusion", "mean"]
    assert script()["main"](args) == 0
    assert "Doing Gradient Attention Rollout" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["grad_rollout_3_0.500_mean.png",
                                                     "input.png"]
    written = np.array(Image.open(out / "grad_rollout_3_0.500_mean.png"))
    np.testing.assert_array_equal(
        written, expected(out / "input.png", "grad_rollout", 3, discard_ratio=0.5))


def test_a_bad_image_path_is_one_line(tmp_path, capsys):
    code = script()["main"](["--image_path", str(tmp_path / "missing.png"), "--model",
                             "bundled", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "missing.png" in err
    assert not (tmp_path / "input.png").exists()
