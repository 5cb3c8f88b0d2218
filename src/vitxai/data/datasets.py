"""Image datasets, batching and seeded sub-sampling.

Every dataset yields :class:`Sample` objects holding an *unnormalised* image in [0, 1] (the
model adapter normalises), the ImageNet-1k label when known and, for benchmarks with ground
truth, the object masks. :func:`iter_batches` turns a dataset and a list of indices into
batches and reports unreadable files instead of crashing on them.
"""

from __future__ import annotations

import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image

from vitxai.data.imagenette import IMAGENETTE_VARIANTS
from vitxai.data.images import IMAGE_EXTENSIONS, UnreadableImageError, load_rgb

Transform = Callable[[Image.Image], torch.Tensor]

#: Imagenette class folders (WordNet ids) and their ImageNet-1k indices.
IMAGENETTE_CLASSES: dict[str, int] = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}
IMAGENETTE_SPLITS: tuple[str, ...] = ("train", "val")

_WNID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def _imagenet_info() -> timm.data.ImageNetInfo:
    return timm.data.ImageNetInfo()  # timm's bundled ImageNet-1k metadata, offline


@lru_cache(maxsize=1)
def _imagenet_index() -> dict[str, int]:
    """ImageNet-1k WordNet id -> class index."""
    return {wnid: i for i, wnid in enumerate(_imagenet_info().label_names())}


def imagenet_class_name(index: int) -> str:
    """Short ImageNet-1k class name, e.g. 0 -> "tench" (first synonym of the description)."""
    return _imagenet_info().index_to_description(index).split(",")[0]


@dataclass
class Sample:
    """One decoded image.

    Attributes
    ----------
    index : position in the dataset.
    image : float32 (3, H, W), values in [0, 1], not normalised.
    label : ImageNet-1k class index, -1 when unknown.
    path : the source file (or a synthetic identifier).
    mask : bool (H, W) ground truth of the labelled object, if the dataset has one.
    other_label, other_mask : a second object of another class in the same image
        (ground-truth benchmarks); -1 / None when absent.
    """

    index: int
    image: torch.Tensor
    label: int
    path: str
    mask: torch.Tensor | None = None
    other_label: int = -1
    other_mask: torch.Tensor | None = None


class ImageDataset(ABC):
    """What the pipeline needs from a dataset: a length, random access and a description.

    ``load`` may raise :class:`UnreadableImageError`; it must be thread-safe because
    :func:`iter_batches` decodes with a small thread pool.
    """

    name: str = "images"
    has_labels: bool = False
    has_masks: bool = False
    class_names: dict[int, str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, i: int) -> Sample:
        """Decode item ``i`` (0 <= i < len(self))."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for run records."""
        return {
            "name": self.name,
            "type": type(self).__name__,
            "n_images": len(self),
            "has_labels": self.has_labels,
            "has_masks": self.has_masks,
            "classes": {str(k): v for k, v in sorted(self.class_names.items())},
        }


def _is_image_file(name: str) -> bool:
    # Hidden files are skipped: macOS "._x.jpg" resource forks carry image suffixes.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_paths(root: Path) -> list[Path]:
    """Image files below directory ``root``, sorted by relative path, each real file once.

    Symbolic links to directories are followed (a dataset may link class folders from
    elsewhere), but every real directory is read once: the plain tree first, then the linked
    directories breadth-first, so a link back up the tree (``ln -s . loop``) adds nothing.
    A file reached by several paths (through directory or file links) is listed once, under
    a path without links where there is one. Hidden files and folders are skipped.
    """
    seen_dirs: set[str] = set()
    # real path -> (reached through a link, first such path): a direct path wins over links
    found: dict[str, tuple[bool, Path]] = {}
    pending = [root]
    while pending:
        top = pending.pop(0)
        # followlinks=False: linked directories are queued instead, so that the whole plain
        # tree (and each earlier link) claims its directories before later links reach them
        for dirpath, dirnames, filenames in os.walk(top):
            real_dir = os.path.realpath(dirpath)
            if real_dir in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real_dir)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            pending += [Path(dirpath, d) for d in dirnames if os.path.islink(Path(dirpath, d))]
            for f in sorted(f for f in filenames if _is_image_file(f)):
                path = Path(dirpath, f)
                link = path.is_symlink()
                real = os.path.realpath(path) if link else os.path.join(real_dir, f)
                linked = link or top is not root
                if real not in found or (found[real][0] and not linked):
                    found[real] = (linked, path)
    return sorted((p for _, p in found.values()), key=lambda p: p.relative_to(root).as_posix())


class _ImageFiles(ImageDataset):
    """A dataset backed by a list of image files with known (or -1) labels."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Transform
                 ) -> None:
        self.paths = list(paths)
        self.labels = [int(x) for x in labels]
        self.transform = transform
        self.has_labels = any(x >= 0 for x in self.labels)
        self.class_names = {x: imagenet_class_name(x) for x in sorted(set(self.labels)) if x >= 0}

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Sample:
        if not 0 <= i < len(self.paths):
            raise IndexError(f"index {i} out of range for {len(self.paths)} images")
        image = self.transform(load_rgb(self.paths[i]))
        return Sample(index=i, image=image, label=self.labels[i], path=str(self.paths[i]))


class FolderDataset(_ImageFiles):
    """Any folder of images (searched recursively, sorted by relative path) or one image file.

    Symbolic links to folders are followed, each real folder and file read once (see
    :func:`_image_paths`). A single file is decoded once at construction, so a file that is
    not a readable image fails here, not later.

    Labels: an image inside a top-level subfolder named after an ImageNet-1k WordNet id
    (e.g. ``root/n01440764/x.jpg``) gets that class index; all others get -1 and keep their
    top-level folder name in ``folders`` (empty string for files directly in ``root``).
    """

    def __init__(self, root: str | os.PathLike[str], transform: Transform) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"image path not found: {self.root}")
        if self.root.is_file():
            try:
                load_rgb(self.root)
            except UnreadableImageError as e:
                raise ValueError(f"{e}; pass an image file or a folder of images") from e
            paths = [self.root]
        else:
            paths = _image_paths(self.root)
            if not paths:
                raise ValueError(
                    f"no images found in {self.root} (searched recursively for "
                    f"{' '.join(sorted(IMAGE_EXTENSIONS))})"
                )
        rel = [p.relative_to(self.root).parts for p in paths]  # () for a single file
        self.folders = [parts[0] if len(parts) > 1 else "" for parts in rel]
        index = _imagenet_index()
        labels = [index.get(f, -1) if _WNID.fullmatch(f) else -1 for f in self.folders]
        super().__init__(paths, labels, transform)
        self.name = self.root.name or str(self.root)

    def describe(self) -> dict[str, Any]:
        pairs = zip(self.folders, self.labels, strict=True)
        unlabelled = sorted({f for f, x in pairs if x < 0 and f})
        return {**super().describe(), "root": str(self.root), "unlabelled_folders": unlabelled}


class Imagenette(_ImageFiles):
    """fast.ai's Imagenette2: ``root/imagenette2[-320|-160]/{split}/{wnid}/*.JPEG``.

    All ten class folders are read in sorted order and labelled with their ImageNet-1k index
    (:data:`IMAGENETTE_CLASSES`); one split only ("val" by default: its images are ImageNet
    validation images, unseen by ImageNet-trained models; "train" must be asked for).
    """

    def __init__(self, root: str | os.PathLike[str] = "data", variant: str = "full",
                 split: str = "val", *, transform: Transform) -> None:
        if variant not in IMAGENETTE_VARIANTS:
            raise ValueError(
                f"unknown Imagenette variant {variant!r}; valid: {', '.join(IMAGENETTE_VARIANTS)}"
            )
        if split not in IMAGENETTE_SPLITS:
            raise ValueError(
                f"unknown Imagenette split {split!r}; valid: {', '.join(IMAGENETTE_SPLITS)}"
            )
        self.root, self.variant, self.split = Path(root), variant, split
        folder = self.root / IMAGENETTE_VARIANTS[variant] / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Imagenette ({variant}) not found at {folder}; download it with "
                f"vitxai.data.download_imagenette(root={str(self.root)!r}, variant={variant!r})"
            )
        wnids = sorted(d.name for d in folder.iterdir()
                       if d.is_dir() and not d.name.startswith("."))
        unknown = [w for w in wnids if w not in IMAGENETTE_CLASSES]
        if unknown:
            raise ValueError(f"unexpected class folders in {folder}: {' '.join(unknown)}")
        missing = sorted(set(IMAGENETTE_CLASSES) - set(wnids))
        if missing:
            warnings.warn(f"Imagenette at {folder} lacks classes {' '.join(missing)}",
                          stacklevel=2)
        paths: list[Path] = []
        labels: list[int] = []
        for wnid in wnids:
            files = sorted(f for f in os.listdir(folder / wnid) if _is_image_file(f))
            paths += [folder / wnid / f for f in files]
            labels += [IMAGENETTE_CLASSES[wnid]] * len(files)
        if not paths:
            raise ValueError(f"no images found in {folder}")
        super().__init__(paths, labels, transform)
        self.name = f"{IMAGENETTE_VARIANTS[variant]}/{split}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "variant": self.variant,
                "split": self.split}


@dataclass
class Batch:
    """Images decoded together; skipped (unreadable) items are listed, not included.

    Attributes
    ----------
    images : float32 (B, 3, H, W) in [0, 1]; (0, 3, 0, 0) when every item was skipped.
    labels, other_labels : int64 (B,), -1 where unknown / absent.
    indices, paths : dataset index and source of each image.
    masks, other_masks : bool (B, H, W), or None when the dataset has none.
    skipped : (index, path, reason) of each item that could not be read.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    paths: list[str]
    masks: torch.Tensor | None = None
    other_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    other_masks: torch.Tensor | None = None
    skipped: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


def _load(dataset: ImageDataset, i: int) -> Sample | UnreadableImageError:
    try:
        return dataset.load(i)
    except UnreadableImageError as e:
        return e


def _stack_masks(masks: list[torch.Tensor | None], what: str) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    if len(present) != len(masks):
        raise ValueError(f"some samples of the batch have a {what} and others not")
    return torch.stack(present).bool()


def _collate(indices: list[int], results: list[Sample | UnreadableImageError]) -> Batch:
    kept: list[int] = []
    samples: list[Sample] = []
    skipped: list[tuple[int, str, str]] = []
    for i, r in zip(indices, results, strict=True):
        if isinstance(r, UnreadableImageError):
            # stacklevel 4: _collate <- iter_batches <- the caller's loop.
            warnings.warn(f"skipping item {i}: {r}", stacklevel=4)
            skipped.append((i, r.path, r.reason))
        else:
            kept.append(i)
            samples.append(r)
    images = torch.stack([s.image for s in samples]) if samples else torch.empty(0, 3, 0, 0)
    return Batch(
        images=images,
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        indices=kept,
        paths=[s.path for s in samples],
        masks=_stack_masks([s.mask for s in samples], "mask"),
        other_labels=torch.tensor([s.other_label for s in samples], dtype=torch.long),
        other_masks=_stack_masks([s.other_mask for s in samples], "other_mask"),
        skipped=skipped,
    )


def iter_batches(dataset: ImageDataset, indices: Sequence[int], batch_size: int,
                 workers: int = 2) -> Iterator[Batch]:
    """Decode ``indices`` in order, ``batch_size`` at a time.

    Unreadable items are skipped with a one-line warning and listed in ``Batch.skipped``, so
    a batch may hold fewer images than asked, or none (it is still yielded, so callers can
    record the skips). With ``workers`` > 0 a thread pool decodes, one batch ahead of the
    caller; ``workers=0`` decodes in the calling thread. Other errors propagate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = [int(i) for i in indices]
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            yield _collate(chunk, [_load(dataset, i) for i in chunk])
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitxai-decode")
    try:
        pending = [pool.submit(_load, dataset, i) for i in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            # Queue the next batch before handing this one out, so decoding overlaps the
            # caller's model work.
            nxt = chunks[k + 1] if k + 1 < len(chunks) else []
            pending = [pool.submit(_load, dataset, i) for i in nxt]
            yield _collate(chunk, [f.result() for f in current])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def select_indices(n: int, sample_size: int | None, seed: int) -> list[int]:
    """Indices of the images to use: all of ``range(n)`` or a seeded random subset.

    ``sample_size`` None -> all; larger than ``n`` -> all, with a warning; otherwise
    ``sample_size`` distinct indices drawn with ``numpy.random.default_rng(seed)``,
    returned sorted (same ``n``, size and seed -> same indices). Raises ValueError for
    ``sample_size`` <= 0 or ``n`` < 0.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if sample_size is None:
        return list(range(n))
    if sample_size <= 0:
        raise ValueError(f"sample_size must be a positive integer or None, got {sample_size}")
    if sample_size >= n:
        if sample_size > n:
            warnings.warn(f"sample_size {sample_size} exceeds the {n} images; using all of them",
                          stacklevel=2)
        return list(range(n))
    chosen = np.random.default_rng(seed).choice(n, size=sample_size, replace=False)
    return sorted(int(i) for i in chosen)
