"""Inputs: folder walking through symbolic links, EXIF orientation, unreadable single files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitxai.data import FolderDataset, eval_transform, load_rgb

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
          "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="needs POSIX symbolic links")


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
    return path


def _names(ds: FolderDataset) -> list[str]:
    return [Path(p).relative_to(ds.root).as_posix() for p in ds.paths]


@needs_symlinks
def test_symlink_loops_add_no_images(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png", seed=1)
    (tmp_path / "loop").symlink_to(".")  # once turned these 2 images into 82
    ds = FolderDataset(tmp_path, eval_transform(CONFIG))
    assert _names(ds) == ["a.png", "sub/b.png"]


@needs_symlinks
def test_linked_folders_are_followed_and_files_listed_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(outside / "fish" / "x.png")
    _png(root / "real" / "a.png", seed=1)
    root.joinpath("n01440764").symlink_to(outside / "fish")  # a class folder kept elsewhere
    root.joinpath("alias").symlink_to("real")  # sorts before "real": still listed once
    root.joinpath("real", "same.png").symlink_to("a.png")  # a file link to a listed file
    ds = FolderDataset(root, eval_transform(CONFIG))
    # each real file once, under a path without links where there is one
    assert _names(ds) == ["n01440764/x.png", "real/a.png"]
    assert ds.labels == [0, -1]  # the linked folder's name gives the ImageNet class
    assert _names(FolderDataset(root, eval_transform(CONFIG))) == _names(ds)


def _quadrants(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """Four solid quadrants (red, green / blue, white): any flip or rotation shows."""
    w, h = size
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(a)


# Orientation tag -> how the camera stored the upright image (the inverse of the tag's fix).
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # the tag asks for a 90° clockwise turn to view
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    5: Image.Transpose.TRANSPOSE,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    upright = _quadrants()
    stored = upright.transpose(STORED[orientation])
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:  # the file really holds the rotated pixels and the tag
        assert raw.size == stored.size and raw.getexif()[0x0112] == orientation
    image = load_rgb(path)
    assert image.size == upright.size
    diff = np.abs(np.asarray(image, dtype=float) - np.asarray(upright, dtype=float))
    assert diff.mean() < 8  # JPEG noise only; a wrong orientation differs by ~150
    # and so through a dataset
    single = FolderDataset(path, eval_transform(CONFIG))
    assert single.load(0).image.shape == (3, 32, 32)


def test_untagged_jpeg_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    _quadrants().save(path, quality=95)
    image = load_rgb(path)
    assert image.size == (48, 32)
    assert np.abs(np.asarray(image, float) - np.asarray(_quadrants(), float)).mean() < 8


def test_single_unreadable_file_fails_at_construction(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg") as info:
        FolderDataset(bad, eval_transform(CONFIG))
    assert "\n" not in str(info.value) and "pass an image file" in str(info.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        FolderDataset(notes, eval_transform(CONFIG))


def test_folder_without_image_files_fails_at_construction(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no images found in") as info:
        FolderDataset(tmp_path, eval_transform(CONFIG))
    assert "\n" not in str(info.value)
