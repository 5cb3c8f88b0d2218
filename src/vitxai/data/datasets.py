"""Image datasets, batching and seeded sub-sampling.

Every dataset yields :class:`Sample` objects holding an *unnormalised* image in [0, 1] (the
model adapter normalises), the ImageNet-1k label when known and, for benchmarks with ground
truth, the object masks. :func:`iter_batches` turns a dataset and a list of indices into
batches and reports unreadable files instead of crashing on them.
"""

from __future__ import annotations

import os
import re
import threading
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

from vitxai.data import annotations as ann
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


def imagenet_names(index: int) -> set[str]:
    """Every lower-case name of ImageNet-1k class ``index``: its synonyms and WordNet id."""
    info = _imagenet_info()
    return ({n.strip().lower() for n in info.index_to_description(index).split(",")}
            | {info.index_to_label_name(index).lower()})


@lru_cache(maxsize=1)
def _imagenet_lookup() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(short name or WordNet id -> indices, any synonym -> indices), lower case."""
    short: dict[str, list[int]] = {}
    every: dict[str, list[int]] = {}
    for i in range(len(_imagenet_info().label_names())):
        short.setdefault(imagenet_class_name(i).lower(), []).append(i)
        short.setdefault(_imagenet_info().index_to_label_name(i).lower(), []).append(i)
        for name in imagenet_names(i):
            every.setdefault(name, []).append(i)
    return short, every


def class_index(text: str, where: str, names: Sequence[str] | None = None) -> int:
    """The class index of ``text``: an index, or a name of ``names`` (a user's class list)
    or else of ImageNet-1k (short name, any synonym or WordNet id; case-insensitive).
    A one-line ValueError naming ``where`` for unknown or ambiguous names."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
        if names is not None and index >= len(names):
            raise ValueError(f"{where}: class index {index} is outside the {len(names)} class "
                             "names")
        return index
    if names is not None:
        lowered = [n.lower() for n in names]
        if text.lower() not in lowered:
            raise ValueError(f"{where}: unknown class name {text!r} (not among the "
                             f"{len(names)} class names)")
        return lowered.index(text.lower())
    short, every = _imagenet_lookup()
    found = short.get(text.lower()) or every.get(text.lower())
    if not found:
        raise ValueError(f"{where}: unknown class name {text!r} (not an ImageNet-1k class; "
                         "give a class index or a list of class names)")
    if len(found) > 1:
        raise ValueError(f"{where}: class name {text!r} is ambiguous (ImageNet-1k classes "
                         f"{', '.join(map(str, found))}); give the class index")
    return found[0]


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
    target : the class to explain, where the dataset names one (a targets file); else -1.
    """

    index: int
    image: torch.Tensor
    label: int
    path: str
    mask: torch.Tensor | None = None
    other_label: int = -1
    other_mask: torch.Tensor | None = None
    target: int = -1


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
        self.targets = [-1] * len(self.paths)
        self._crop_warned = threading.Event()

    def __len__(self) -> int:
        return len(self.paths)

    def _warn_crop(self, i: int, width: int, height: int) -> None:
        """Warn once per dataset when the transform's crop removes more than
        :data:`~vitxai.data.transforms.CROP_WARN_FRACTION` of an image's area."""
        from vitxai.data.transforms import CROP_WARN_FRACTION

        kept = getattr(self.transform, "kept_fraction", None)
        if kept is None or self._crop_warned.is_set():
            return
        lost = 1.0 - kept(width, height)
        if lost > CROP_WARN_FRACTION:
            self._crop_warned.set()
            warnings.warn(f"the crop removes {100 * lost:.0f} % of the area of {self.paths[i]} "
                          f"({width}×{height}); no_crop=True or crop_pct=1.0 keeps the whole "
                          "image (warned once)", stacklevel=2)

    def load(self, i: int) -> Sample:
        if not 0 <= i < len(self.paths):
            raise IndexError(f"index {i} out of range for {len(self.paths)} images")
        img = load_rgb(self.paths[i])
        self._warn_crop(i, *img.size)
        image = self.transform(img)
        return Sample(index=i, image=image, label=self.labels[i], path=str(self.paths[i]),
                      mask=self._truth(i, img), target=self.targets[i])

    def _truth(self, i: int, img: Image.Image) -> torch.Tensor | None:  # noqa: ARG002
        return None


class FolderDataset(_ImageFiles):
    """Any folder of images (searched recursively, sorted by relative path) or one image file.

    Symbolic links to folders are followed, each real folder and file read once (see
    :func:`_image_paths`). A single file is decoded once at construction, so a file that is
    not a readable image fails here, not later.

    Labels: an image inside a top-level subfolder named after an ImageNet-1k WordNet id
    (e.g. ``root/n01440764/x.jpg``) gets that class index; all others get -1 and keep their
    top-level folder name in ``folders`` (empty string for files directly in ``root``).
    A ``labels`` file overrides this rule for the images it lists.

    Files (see :mod:`vitxai.data.annotations` for the formats; images are named by file name
    or by path relative to ``root``):

    - ``labels``, ``targets``: ``file,class`` CSVs (class index or name) of the labels and of
      the class to explain per image (``Sample.target``; -1 where not listed).
    - ``class_names``: one class name per line (index = line number); names in the CSVs and
      boxes resolve against it, else against ImageNet-1k's names.
    - ``masks``: a folder of PNG masks with the images' stems (non-zero = object).
    - ``boxes``: CSV, Pascal VOC XML or COCO JSON; an image's boxes of its target class (the
      targets file, else its label) where their class names match it, else all of them, are
      rasterised at the original image size (with the mask, if both are given).

    Truth masks go through the image's own resize and crop (nearest interpolation), so
    ``Sample.mask`` is bool (H, W) at the input size. An image without truth (no annotation,
    an empty mask, or nothing left after the crop) is skipped at load with an
    :class:`UnreadableImageError` saying why, so runs list it. Boxes partly outside their
    image are clipped with one warning; a box wholly outside, an annotation naming no image
    of the folder, a mask of another size or a malformed file is a one-line ValueError.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Transform, *,
                 labels: str | os.PathLike[str] | None = None,
                 targets: str | os.PathLike[str] | None = None,
                 class_names: str | os.PathLike[str] | None = None,
                 masks: str | os.PathLike[str] | None = None,
                 boxes: str | os.PathLike[str] | None = None) -> None:
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
        super().__init__(paths, [index.get(f, -1) if _WNID.fullmatch(f) else -1
                                 for f in self.folders], transform)
        self.name = self.root.name or str(self.root)
        self.files = {k: v for k, v in (("labels", labels), ("targets", targets),
                                        ("class_names", class_names), ("masks", masks),
                                        ("boxes", boxes)) if v is not None}
        self.mask_files: dict[int, Path] = {}
        self.boxes: dict[int, list[ann.Box]] = {}
        if self.files:
            self._annotate(labels, targets, class_names, masks, boxes)

    # annotations ----------------------------------------------------------------------------
    def _keys(self) -> tuple[dict[str, int], dict[str, list[int]], dict[str, int],
                             dict[str, list[int]]]:
        rel = ([p.relative_to(self.root).as_posix() for p in self.paths]
               if self.root.is_dir() else [self.root.name])
        by_rel = {r: i for i, r in enumerate(rel)}
        by_name: dict[str, list[int]] = {}
        by_stem: dict[str, list[int]] = {}
        by_rel_stem: dict[str, int] = {}
        for i, r in enumerate(rel):
            by_name.setdefault(r.rsplit("/", 1)[-1], []).append(i)
            by_stem.setdefault(Path(r).stem, []).append(i)
            by_rel_stem.setdefault(str(Path(r).with_suffix("").as_posix()), i)
        return by_rel, by_name, by_rel_stem, by_stem

    def _find(self, key: str, where: str, stem: bool = False) -> int:
        """The index of the image ``key`` names (relative path, else unique file name or, for
        masks, stem); a one-line ValueError naming ``where`` otherwise."""
        by_rel, by_name, by_rel_stem, by_stem = self._lookup
        k = key.replace("\\", "/").removeprefix("./")
        exact, names = (by_rel_stem, by_stem) if stem else (by_rel, by_name)
        if k in exact:
            return exact[k]
        found = names.get(k) or names.get(k.rsplit("/", 1)[-1]) or []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{where}: {key!r} names {len(found)} images in {self.root} "
                             "(e.g. " + ", ".join(str(self.paths[i]) for i in found[:2])
                             + "); give the path relative to the folder")
        raise ValueError(f"{where}: no image {key!r} in {self.root}")

    def _annotate(self, labels, targets, class_names, masks, boxes) -> None:
        self._lookup = self._keys()
        names = ann.read_class_names(class_names) if class_names is not None else None
        self.user_class_names = names
        for path, table in (("labels", labels), ("targets", targets)):
            if table is None:
                continue
            values = self.labels if path == "labels" else self.targets
            for key, text, where in ann.read_class_table(table):
                values[self._find(key, where)] = class_index(text, where, names)
        self.has_labels = any(x >= 0 for x in self.labels)
        used = sorted({x for x in self.labels + self.targets if x >= 0})
        if names is not None:
            self.class_names = dict(enumerate(names))
        else:
            self.class_names = {x: imagenet_class_name(x) for x in used}
        if masks is not None:
            for key, path in ann.read_mask_dir(masks).items():
                self.mask_files[self._find(key, str(path), stem=True)] = path
        if boxes is not None:
            for key, found in ann.read_boxes(boxes).items():
                self.boxes.setdefault(self._find(key, found[0].where), []).extend(found)
        if masks is None and boxes is None:
            return
        if not callable(getattr(self.transform, "mask", None)):
            raise ValueError("truth masks need the transform of vitxai.data.eval_transform "
                             "(it applies the image's resize and crop to them)")
        self.has_masks = True
        self._check_sizes()
        missing = [i for i in range(len(self.paths))
                   if i not in self.mask_files and i not in self.boxes]
        if missing:
            warnings.warn(f"{len(missing)} of {len(self.paths)} images have no mask or box "
                          f"(e.g. {self.paths[missing[0]]}); they are skipped", stacklevel=3)

    def _check_sizes(self) -> None:
        """Masks of another size and boxes wholly outside their image are errors; boxes
        partly outside are clipped, with one warning."""
        clipped: list[ann.Box] = []
        for i in sorted(set(self.mask_files) | set(self.boxes)):
            size = _oriented_size(self.paths[i])
            if size is None:
                continue  # unreadable: skipped when loaded
            if i in self.mask_files:
                msize = ann.mask_size(self.mask_files[i])
                if msize != size:
                    raise ValueError(f"mask {self.mask_files[i]} is {msize[0]}×{msize[1]} but "
                                     f"image {self.paths[i]} is {size[0]}×{size[1]}")
            kept = []
            for b in self.boxes.get(i, []):
                c = ann.clip_box(b, *size)
                if c is None:
                    raise ValueError(f"{b.where}: box ({b.x0:g}, {b.y0:g}, {b.x1:g}, "
                                     f"{b.y1:g}) lies outside image {self.paths[i]} "
                                     f"({size[0]}×{size[1]})")
                if c is not b:
                    clipped.append(b)
                kept.append(c)
            if i in self.boxes:
                self.boxes[i] = kept
        if clipped:
            b = clipped[0]
            warnings.warn(f"{len(clipped)} boxes lie partly outside their images and were "
                          f"clipped (first: {b.where})", stacklevel=4)

    def _class_of(self, i: int) -> set[str]:
        """Lower-case names of image ``i``'s target class (targets file, else label)."""
        c = self.targets[i] if self.targets[i] >= 0 else self.labels[i]
        if c < 0:
            return set()
        names = getattr(self, "user_class_names", None)
        if names is not None:
            return {str(c), names[c].lower()} if c < len(names) else {str(c)}
        return {str(c)} | (imagenet_names(c) if c < 1000 else set())

    def _truth(self, i: int, img: Image.Image) -> torch.Tensor | None:
        if not self.has_masks:
            return None
        width, height = img.size
        truth = np.zeros((height, width), dtype=bool)
        why = "no mask or box"
        if i in self.mask_files:
            m = ann.load_mask(self.mask_files[i])
            if m.shape != truth.shape:
                raise UnreadableImageError(self.paths[i], f"mask {self.mask_files[i]} is "
                                           f"{m.shape[1]}×{m.shape[0]}, the image "
                                           f"{width}×{height}")
            truth |= m
            why = f"mask {self.mask_files[i]} is empty"
        if i in self.boxes:
            wanted = self._class_of(i)
            mine = [b for b in self.boxes[i] if b.label is not None
                    and b.label.strip().lower() in wanted]
            truth |= ann.rasterise_boxes(mine or self.boxes[i], width, height)
        if not truth.any():
            raise UnreadableImageError(self.paths[i], f"no ground truth: {why}")
        out = self.transform.mask(truth)  # type: ignore[attr-defined]
        if not out.any():
            raise UnreadableImageError(self.paths[i], "no ground truth: the crop removes the "
                                       "whole object")
        return out

    def describe(self) -> dict[str, Any]:
        pairs = zip(self.folders, self.labels, strict=True)
        unlabelled = sorted({f for f, x in pairs if x < 0 and f})
        out = {**super().describe(), "root": str(self.root), "unlabelled_folders": unlabelled}
        if self.files:  # only then: runs recorded before these options keep their fingerprints
            out["annotations"] = {k: str(v) for k, v in self.files.items()}
            out["n_targets"] = sum(1 for t in self.targets if t >= 0)
        return out


def _oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as :func:`load_rgb` returns it (EXIF rotation applied),
    from its header; None when it cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - skipped with a reason when loaded
        return None
    return (height, width) if turned else (width, height)


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
    targets : int64 (B,): the class each image asks to be explained (a targets file), -1 where
        the dataset names none (then the run's target rule applies).
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
    targets: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

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
        targets=torch.tensor([s.target for s in samples], dtype=torch.long),
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
