"""Tests for vitxai.data: image decoding, transforms, datasets, batching and downloads.

No network: downloads are served from a local http.server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import time
import urllib.error
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from vitxai.data import (
    IMAGENETTE_CLASSES,
    DownloadError,
    FolderDataset,
    Imagenette,
    UnreadableImageError,
    download_imagenette,
    eval_transform,
    iter_batches,
    load_rgb,
    select_indices,
)
from vitxai.data import imagenette as imagenette_module
from vitxai.data.images import to_rgb

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875,
          "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _rgb_image(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mode_of(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _save(img: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


# ---------------------------------------------------------------- images


def test_load_rgb_grey_and_bilevel(tmp_path: Path) -> None:
    grey = _save(Image.new("L", (4, 3), 77), tmp_path / "g.png")
    out = load_rgb(grey)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert np.all(np.asarray(out) == 77)
    bilevel = _save(Image.new("1", (4, 3), 1), tmp_path / "b.png")
    assert np.all(np.asarray(load_rgb(bilevel)) == 255)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_load_rgb_alpha_composited_over_white(tmp_path: Path, mode: str) -> None:
    colour = (10, 0) if mode == "LA" else (200, 10, 10, 0)
    img = Image.new(mode, (4, 2), colour)  # fully transparent
    img.putpixel((0, 0), (10, 255) if mode == "LA" else (200, 10, 10, 255))  # one opaque
    out = np.asarray(load_rgb(_save(img, tmp_path / f"{mode}.png")))
    assert out.shape == (2, 4, 3)
    assert np.all(out[1, 1] == 255)  # transparent -> white background
    expected = (10, 10, 10) if mode == "LA" else (200, 10, 10)
    assert tuple(out[0, 0]) == expected


def test_load_rgb_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((2, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (black) is transparent
    path = _save(img, tmp_path / "p.png")
    assert _mode_of(path) == "P"
    out = np.asarray(load_rgb(path))
    assert tuple(out[0, 0]) == (255, 255, 255)  # not black
    assert tuple(out[0, 2]) == (255, 0, 0)


def test_load_rgb_cmyk(tmp_path: Path) -> None:
    img = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink = white
    img.paste((0, 255, 255, 0), (0, 0, 4, 8))  # magenta + yellow = red
    out = np.asarray(load_rgb(_save(img, tmp_path / "c.jpg")))
    assert out.shape == (8, 8, 3)
    assert np.all(out[:, 6:] > 240)
    assert np.all(out[:, :2, 0] > 200) and np.all(out[:, :2, 1:] < 60)


def test_load_rgb_16bit_gradient_is_not_white(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "g16.png")
    assert _mode_of(path) == "I;16"
    out = np.asarray(load_rgb(path))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200
    np.testing.assert_allclose(out[0], np.rint(ramp[0] / 257), atol=1)


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_to_rgb_high_depth_modes_are_rescaled(mode: str) -> None:
    ramp = np.linspace(0, 65535, 64)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (64, 1), ramp.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(ramp.astype(np.int32)[None])
    else:
        img = Image.fromarray((ramp / 65535).astype(np.float32)[None])  # floats in [0, 1]
    assert img.mode == mode
    out = np.asarray(to_rgb(img))
    assert out.shape == (1, 64, 3)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 50


def test_unreadable_files_raise_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all\n" * 10)
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(junk)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"cannot read image {junk}: ")
    assert "\n" not in str(info.value) and info.value.path == str(junk)

    buf = io.BytesIO()
    _rgb_image((64, 64)).save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableImageError, match="cannot read image .*cut.jpg"):
        load_rgb(truncated)
    with pytest.raises(UnreadableImageError):
        load_rgb(tmp_path / "missing.png")


# ---------------------------------------------------------------- transforms


def test_eval_transform_shape_range_and_no_normalisation() -> None:
    t = eval_transform(CONFIG)
    x = t(_rgb_image((50, 40)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # The config's mean/std (0.5) are not applied: white stays 1, black stays 0.
    assert torch.all(t(Image.new("RGB", (50, 40), (255, 255, 255))) == 1.0)
    assert torch.all(t(Image.new("RGB", (50, 40), (0, 0, 0))) == 0.0)
    assert eval_transform({**CONFIG, "input_size": (3, 24, 40)})(_rgb_image()).shape == (3, 24, 40)


def test_eval_transform_follows_crop_pct() -> None:
    img = _rgb_image((64, 64), seed=3)
    a = eval_transform(CONFIG)(img)
    b = eval_transform({**CONFIG, "crop_pct": 1.0})(img)
    assert a.shape == b.shape and not torch.allclose(a, b)
    # crop_pct 1.0 on a square image at the target size is a plain resize.
    same = eval_transform({**CONFIG, "crop_pct": 1.0})(img.resize((32, 32)))
    np.testing.assert_allclose(same.numpy(), np.asarray(img.resize((32, 32))).transpose(2, 0, 1)
                               / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="input_size"):
        eval_transform({"crop_pct": 0.9})


# ---------------------------------------------------------------- datasets


def test_folder_dataset_wnid_folders_give_imagenet_labels(tmp_path: Path) -> None:
    _save(_rgb_image(seed=1), tmp_path / "n03888257" / "b.jpg")
    _save(_rgb_image(seed=2), tmp_path / "n01440764" / "a.png")
    _save(_rgb_image(seed=3), tmp_path / "n01440764" / "deep" / "c.JPEG")
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    _save(_rgb_image(seed=4), tmp_path / "n01440764" / "._a.jpg")  # hidden: ignored
    ds = FolderDataset(tmp_path, eval_transform(CONFIG))
    assert [Path(p).name for p in ds.paths] == ["a.png", "c.JPEG", "b.jpg"]
    assert ds.labels == [0, 0, 701]
    assert ds.has_labels and not ds.has_masks
    assert ds.class_names == {0: "tench", 701: "parachute"}
    s = ds.load(2)
    assert s.index == 2 and s.label == 701 and s.image.shape == (3, 32, 32) and s.mask is None
    assert ds.describe()["n_images"] == 3
    with pytest.raises(IndexError):
        ds.load(3)


def test_folder_dataset_other_folders_and_single_file(tmp_path: Path) -> None:
    _save(_rgb_image(), tmp_path / "cats" / "x.png")
    _save(_rgb_image(), tmp_path / "top.png")
    ds = FolderDataset(tmp_path, eval_transform(CONFIG))
    assert ds.labels == [-1, -1] and not ds.has_labels and ds.class_names == {}
    assert ds.folders == ["cats", ""]
    assert ds.describe()["unlabelled_folders"] == ["cats"]
    single = FolderDataset(tmp_path / "top.png", eval_transform(CONFIG))
    assert len(single) == 1 and single.load(0).label == -1


def test_folder_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in"):
        FolderDataset(tmp_path / "empty", eval_transform(CONFIG))
    with pytest.raises(FileNotFoundError, match="not found"):
        FolderDataset(tmp_path / "nope", eval_transform(CONFIG))


def _fake_imagenette(root: Path, name: str = "imagenette2-320") -> None:
    # Created in reverse order so that a listing-order bug would show.
    for split in ("train", "val"):
        for k, wnid in enumerate(reversed(list(IMAGENETTE_CLASSES))):
            _save(_rgb_image((12, 10), seed=k), root / name / split / wnid / f"{split}_{k}.JPEG")


def test_imagenette_classes_match_timm_imagenet_indices() -> None:
    wnids = timm.data.ImageNetInfo().label_names()
    assert {w: wnids.index(w) for w in IMAGENETTE_CLASSES} == IMAGENETTE_CLASSES


def test_imagenette_sorted_mapping_and_val_default(tmp_path: Path) -> None:
    _fake_imagenette(tmp_path)
    ds = Imagenette(tmp_path, variant="320", transform=eval_transform(CONFIG))
    assert len(ds) == 10
    assert ds.labels == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert all("/val/" in Path(p).as_posix() for p in ds.paths)
    assert ds.describe()["split"] == "val" and ds.name == "imagenette2-320/val"
    train = Imagenette(tmp_path, "320", "train", transform=eval_transform(CONFIG))
    assert all("/train/" in Path(p).as_posix() for p in train.paths)
    batch = next(iter_batches(ds, [0, 9], 2))
    assert batch.labels.tolist() == [0, 701] and batch.images.shape == (2, 3, 32, 32)


def test_imagenette_errors(tmp_path: Path) -> None:
    _fake_imagenette(tmp_path)
    with pytest.raises(ValueError, match="valid: train, val"):
        Imagenette(tmp_path, "320", "test", transform=eval_transform(CONFIG))
    with pytest.raises(ValueError, match="valid: full, 320, 160"):
        Imagenette(tmp_path, "512", transform=eval_transform(CONFIG))
    with pytest.raises(FileNotFoundError) as info:
        Imagenette(tmp_path, "160", transform=eval_transform(CONFIG))
    assert (f"vitxai.data.download_imagenette(root={str(tmp_path)!r}, variant='160')"
            in str(info.value))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- batching and sampling


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches_skips_unreadable_files(tmp_path: Path, workers: int) -> None:
    for k in range(3):
        _save(_rgb_image(seed=k), tmp_path / f"{k}.png")
    (tmp_path / "3_bad.png").write_bytes(b"\x89PNG broken")
    ds = FolderDataset(tmp_path, eval_transform(CONFIG))
    with pytest.warns(UserWarning, match="cannot read image .*3_bad.png") as record:
        batches = list(iter_batches(ds, [0, 1, 2, 3, 3], batch_size=2, workers=workers))
    assert all("\n" not in str(w.message) for w in record)
    assert [b.indices for b in batches] == [[0, 1], [2], []]
    assert batches[1].skipped == [(3, str(tmp_path / "3_bad.png"), batches[1].skipped[0][2])]
    empty = batches[2]  # all skipped, still yielded
    assert len(empty) == 0 and empty.images.shape[0] == 0 and len(empty.skipped) == 1
    b = batches[0]
    assert b.images.shape == (2, 3, 32, 32) and b.labels.tolist() == [-1, -1]
    assert b.masks is None and b.other_masks is None and b.other_labels.tolist() == [-1, -1]
    assert b.paths == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    with pytest.raises(ValueError):
        next(iter_batches(ds, [0], 0))


def test_select_indices() -> None:
    assert select_indices(5, None, 0) == [0, 1, 2, 3, 4]
    with pytest.warns(UserWarning, match="exceeds"):
        assert select_indices(3, 10, 0) == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_indices(3, 3, 0) == [0, 1, 2]
    a = select_indices(1000, 20, seed=7)
    assert a == select_indices(1000, 20, seed=7) and a == sorted(a) and len(set(a)) == 20
    assert a != select_indices(1000, 20, seed=8)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            select_indices(10, bad, 0)


# ---------------------------------------------------------------- download


def _archive(name: str = "imagenette2-160", evil: bool = False) -> bytes:
    buf = io.BytesIO()
    img = io.BytesIO()
    _rgb_image((12, 10)).save(img, "JPEG")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = [f"{name}/val/n01440764/a.JPEG", f"{name}/train/n01440764/b.JPEG"]
        if evil:
            members.append("../evil.JPEG")
        for member in members:
            info = tarfile.TarInfo(member)
            info.size = len(img.getvalue())
            tar.addfile(info, io.BytesIO(img.getvalue()))
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    data = b""
    honour_range = True
    truncate_next = False
    ranges: list[str | None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv, data = self.server, self.server.data
        requested = self.headers.get("Range")
        srv.ranges.append(requested)
        start = 0
        if requested and srv.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.truncate_next:  # announce everything, send half, hang up
            srv.truncate_next = False
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.data, srv.ranges = _archive(), []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/imagenette2-160.tgz"
    yield srv
    srv.shutdown()
    srv.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_extracts_and_skips_when_present(tmp_path: Path, server: _Server) -> None:
    out = download_imagenette(tmp_path, "160", progress=False, url=server.url,
                              md5=_md5(server.data))
    assert out == tmp_path / "imagenette2-160"
    assert (out / "val" / "n01440764" / "a.JPEG").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenette2-160"]  # no leftovers
    with pytest.warns(UserWarning, match="lacks classes n02102040"):
        assert len(Imagenette(tmp_path, "160", transform=eval_transform(CONFIG))) == 1
    download_imagenette(tmp_path, "160", progress=False, url=server.url)
    assert server.ranges == [None]  # second call did not download


def test_download_resumes_partial_file(tmp_path: Path, server: _Server) -> None:
    half = len(server.data) // 2
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(server.data[:half])
    download_imagenette(tmp_path, "160", progress=False, url=server.url,
                        md5=_md5(server.data), keep_archive=True)
    assert server.ranges == [f"bytes={half}-"]
    assert (tmp_path / "imagenette2-160.tgz").read_bytes() == server.data
    assert (tmp_path / "imagenette2-160" / "train" / "n01440764" / "b.JPEG").is_file()


def test_download_completes_when_part_is_whole(tmp_path: Path, server: _Server) -> None:
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(server.data)
    download_imagenette(tmp_path, "160", progress=False, url=server.url, md5=_md5(server.data))
    assert server.ranges == [f"bytes={len(server.data)}-"]  # answered 416: nothing left
    assert (tmp_path / "imagenette2-160" / "val").is_dir()


def test_download_resumes_after_connection_drop(tmp_path: Path, server: _Server) -> None:
    server.truncate_next = True
    with pytest.raises(DownloadError, match="run again to resume"):
        download_imagenette(tmp_path, "160", progress=False, url=server.url)
    assert 0 < (tmp_path / "imagenette2-160.tgz.part").stat().st_size < len(server.data)
    download_imagenette(tmp_path, "160", progress=False, url=server.url, md5=_md5(server.data))
    assert server.ranges[0] is None and server.ranges[1].startswith("bytes=")
    assert (tmp_path / "imagenette2-160" / "val").is_dir()


def test_download_restarts_when_server_ignores_range(tmp_path: Path, server: _Server) -> None:
    server.honour_range = False
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(b"stale bytes of another file")
    download_imagenette(tmp_path, "160", progress=False, url=server.url, md5=_md5(server.data))
    assert server.ranges == ["bytes=27-"]
    assert (tmp_path / "imagenette2-160" / "val").is_dir()


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download_imagenette(tmp_path, "160", progress=False, url=server.url, md5="0" * 32)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_unsafe_archive(tmp_path: Path, server: _Server) -> None:
    server.data = _archive(evil=True)
    with pytest.raises(DownloadError, match="cannot unpack"):
        download_imagenette(tmp_path / "data", "160", progress=False, url=server.url)
    assert not (tmp_path / "evil.JPEG").exists()
    assert not (tmp_path / "data" / "imagenette2-160").exists()


def test_download_offline_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/imagenette2-320.tgz"
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_imagenette(tmp_path, "320", progress=False, url=url, timeout=2)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith(f"cannot download imagenette2-320 from {url}: ")
    assert message.endswith(f"; download it by hand and unpack into {tmp_path}")
    assert "\n" not in message


def test_download_default_url_and_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    seen = []

    def offline(request, timeout):
        seen.append((request.full_url, timeout))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(imagenette_module.urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match="from https://s3.amazonaws.com/fast-ai-imageclas/"
                                            "imagenette2.tgz: no network; download it by hand"):
        download_imagenette(tmp_path, progress=False)
    assert seen == [("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz", 10.0)]
    # A file already under the final name that fails the known md5 is not trusted.
    (tmp_path / "imagenette2-160.tgz").write_bytes(b"junk")
    with pytest.raises(DownloadError):
        download_imagenette(tmp_path, "160", progress=False)
    assert not (tmp_path / "imagenette2-160.tgz").exists()
