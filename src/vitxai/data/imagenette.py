"""Downloading and unpacking fast.ai's Imagenette2 archives (resumable, verified, safe)."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

#: Imagenette variant -> archive / folder name.
IMAGENETTE_VARIANTS: dict[str, str] = {
    "full": "imagenette2",
    "320": "imagenette2-320",
    "160": "imagenette2-160",
}
_BASE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"

# Whole-file md5 of each archive, as verified by torchvision.datasets.Imagenette
# (pytorch/vision, torchvision/datasets/imagenette.py, `_ARCHIVES`). fastai's
# fastai/data/checks.txt also lists (size, md5) for these URLs, but its md5 covers only the
# first 2**20 bytes (fastai's `_check_file`) and its entries changed when the archives were
# repacked (different sizes in different fastai commits), so it is not used here.
# Truncation is also caught by comparing the received bytes with the Content-Length.
IMAGENETTE_MD5: dict[str, str] = {
    "full": "fe2fc210e6bb7c5664d602c3cd71e612",
    "320": "3df6f0d01a2c9592104656642f5e78a3",
    "160": "e793b78cc4c9e9a4ccc0c1155377a412",
}

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset could not be downloaded, verified or unpacked; the message says what to do."""


def imagenette_url(variant: str) -> str:
    """The official archive URL of an Imagenette variant ("full", "320" or "160")."""
    return f"{_BASE_URL}{_variant_name(variant)}.tgz"


def _variant_name(variant: str) -> str:
    if variant not in IMAGENETTE_VARIANTS:
        raise ValueError(
            f"unknown Imagenette variant {variant!r}; valid: {', '.join(IMAGENETTE_VARIANTS)}"
        )
    return IMAGENETTE_VARIANTS[variant]


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None for parts it lacks."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _fetch(url: str, part: Path, timeout: float, progress: bool, desc: str) -> None:
    """Stream ``url`` into ``part``, resuming from its current size with an HTTP Range.

    Raises urllib/OSError/HTTPException on network failure (``part`` is kept for a later
    resume) and :class:`ConnectionError` when fewer bytes than announced arrived.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Range starts at or past the end: complete if the sizes agree, else start over.
        if _content_range(e.headers.get("Content-Range"))[1] == offset:
            return
        part.unlink()
        return _fetch(url, part, timeout, progress, desc)
    with resp:
        start, _ = _content_range(resp.headers.get("Content-Range"))
        if offset and (resp.status != 206 or start != offset):
            offset = 0  # the server ignored the Range header (200): restart from scratch
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, disable=not progress,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes "
                              "(run again to resume)")


def _extract(archive: Path, root: Path, name: str) -> Path:
    """Unpack ``archive`` (which must hold ``name/``) into ``root/name``, all or nothing."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-unpack-", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            # filter="data" refuses absolute paths, "..", links out of tmp and device files.
            tar.extractall(tmp, filter="data")
        if not (tmp / name).is_dir():
            raise DownloadError(f"archive {archive} does not contain a folder {name}/")
        # Unpacked beside the target and renamed at the end, so an interrupted unpack never
        # leaves a half-filled root/name that would count as "already extracted".
        os.replace(tmp / name, root / name)
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(f"cannot unpack {archive} into {root}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / name


def download_imagenette(root: str | os.PathLike[str] = "data", variant: str = "full",
                        progress: bool = True, *, url: str | None = None,
                        md5: str | None = None, timeout: float = 10.0,
                        keep_archive: bool = False) -> Path:
    """Download, verify and unpack Imagenette2 into ``root/imagenette2[-320|-160]``.

    Nothing is fetched when that folder already holds a ``train`` or ``val`` split. The
    archive streams into ``root/NAME.tgz.part`` (resumed with an HTTP Range request when a
    partial file exists), is checked against the Content-Length and the md5, renamed to
    ``NAME.tgz`` only then, and unpacked with tarfile's "data" filter.

    Parameters
    ----------
    root : folder receiving the archive and the unpacked dataset (created if needed).
    variant : "full" (1.56 GB), "320" or "160" (shorter side resized to that many pixels).
    progress : show a tqdm progress bar.
    url : archive URL; default: the official fast.ai URL of ``variant``.
    md5 : expected whole-file md5 (hex). Default: the known value when ``url`` is the
        official one, none for a custom ``url``; "" disables the md5 check.
    timeout : seconds to wait for the server to connect or send data.
    keep_archive : keep ``NAME.tgz`` after unpacking (deleted by default).

    Returns the unpacked dataset folder. Raises :class:`DownloadError` (one-line message)
    when offline or on any download, checksum or unpacking failure.
    """
    name = _variant_name(variant)
    root = Path(root)
    dest = root / name
    if (dest / "val").is_dir() or (dest / "train").is_dir():
        return dest
    source = url or imagenette_url(variant)
    expected = (md5 if md5 is not None else ("" if url else IMAGENETTE_MD5[variant])).lower()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{name}.tgz"
    if archive.exists() and expected and _md5_of(archive) != expected:
        archive.unlink()  # a stale or foreign file under the final name: fetch again
    if not archive.exists():
        part = root / f"{name}.tgz.part"
        try:
            _fetch(source, part, timeout, progress, name)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"cannot download {name} from {source}: HTTP {e.code} "
                                f"{e.reason}; download it by hand and unpack into {root}") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = " ".join(str(getattr(e, "reason", None) or e).split())  # one line
            raise DownloadError(f"cannot download {name} from {source}: {reason}; "
                                f"download it by hand and unpack into {root}") from e
        if expected:
            got = _md5_of(part)
            if got != expected:
                part.unlink()
                raise DownloadError(
                    f"checksum mismatch for {name} from {source}: md5 {got}, expected "
                    f"{expected}; the download was deleted (if the archive changed upstream, "
                    f"pass md5='' to skip the check, or download it by hand and unpack into "
                    f"{root})"
                )
        os.replace(part, archive)
    _extract(archive, root, name)
    if not keep_archive:
        archive.unlink()
    return dest
