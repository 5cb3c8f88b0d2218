"""Reading user annotations: class tables, class names, masks and boxes (pure functions).

Formats:

- class tables (targets, labels): CSV ``file,class``: an image file name or path relative
  to the image folder, and a class index or class name; an optional header row, blank lines
  and ``#`` comments are skipped.
- class names: a text file, one name per line, index = line number (from 0).
- masks: a folder of PNGs, one per image with the image's stem (or relative path without
  suffix); non-zero pixels are the object.
- boxes, pixel coordinates of the original image, x1/y1 exclusive (0-based edges):
  CSV ``file,x0,y0,x1,y1[,class]`` (several rows per image allowed); Pascal VOC XML (a folder
  of ``.xml`` or one file; VOC's 1-based inclusive ``xmin..xmax`` become ``xmin-1, xmax``);
  COCO instances JSON (``bbox`` = ``[x, y, width, height]``).

Every error is one line naming the file (and line, where there is one).
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: first cells of a header row
_HEADER_WORDS = {"file", "filename", "file_name", "image", "path", "name", "image_id"}


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel edges of the original image: columns x0 ≤ x < x1, rows
    y0 ≤ y < y1. ``label``: its class (name or index as text) where the file gives one;
    ``where``: the file and line it came from."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None
    where: str = ""


def _rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of a CSV file's non-blank, non-comment rows."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        yield n, cells


def _is_header(cells: list[str]) -> bool:
    return cells[0].lower() in _HEADER_WORDS


def read_class_table(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(image key, class text, where) per row of a ``file,class`` CSV."""
    out = []
    for k, (n, cells) in enumerate(_rows(path)):
        if k == 0 and _is_header(cells):
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise ValueError(f"{path} line {n}: expected 'file,class' (an image and a class "
                             f"index or name); got {','.join(cells)!r}")
        out.append((cells[0], cells[1], f"{path} line {n}"))
    return out


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names, one per line (index = line number from 0); surrounding spaces dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    for n, name in enumerate(names, start=1):
        if not name:
            raise ValueError(f"{path} line {n}: empty class name (one name per line, the "
                             "line number is the class index)")
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} {text!r} is not a finite number")
    return value


def _box(x0: float, y0: float, x1: float, y1: float, label: str | None, where: str) -> Box:
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: empty box ({x0:g}, {y0:g}, {x1:g}, {y1:g}); x1 must "
                         "exceed x0 and y1 exceed y0 (x1, y1 exclusive)")
    return Box(x0, y0, x1, y1, label, where)


def read_boxes_csv(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Image key → boxes of a ``file,x0,y0,x1,y1[,class]`` CSV (header row optional)."""
    out: dict[str, list[Box]] = {}
    for k, (n, cells) in enumerate(_rows(path)):
        if k == 0 and _is_header(cells):
            continue
        where = f"{path} line {n}"
        if len(cells) not in (5, 6) or not cells[0]:
            raise ValueError(f"{where}: expected 'file,x0,y0,x1,y1' (optionally ',class'); "
                             f"got {','.join(cells)!r}")
        x0, y0, x1, y1 = (_number(c, name, where)
                          for c, name in zip(cells[1:5], ("x0", "y0", "x1", "y1"), strict=True))
        label = cells[5] if len(cells) == 6 and cells[5] else None
        out.setdefault(cells[0], []).append(_box(x0, y0, x1, y1, label, where))
    return out


def _voc_file(path: Path) -> tuple[str, list[Box]]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: not a Pascal VOC annotation (root element <{root.tag}>)")
    filename = (root.findtext("filename") or "").strip() or path.stem
    boxes = []
    for k, obj in enumerate(root.iter("object")):
        where = f"{path} object {k + 1}"
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{where}: no <bndbox>")
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(tag)
            if text is None:
                raise ValueError(f"{where}: <bndbox> lacks <{tag}>")
            values.append(_number(text.strip(), tag, where))
        xmin, ymin, xmax, ymax = values
        name = (obj.findtext("name") or "").strip() or None
        boxes.append(_box(xmin - 1, ymin - 1, xmax, ymax, name, where))  # 1-based inclusive
    return filename, boxes


def read_voc(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Image file name → boxes of Pascal VOC XML files (a folder of ``.xml``, or one file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation path not found: {path}")
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no .xml files in {path}")
    out: dict[str, list[Box]] = {}
    for f in files:
        name, boxes = _voc_file(f)
        out.setdefault(name, []).extend(boxes)
    return out


def read_coco(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Image ``file_name`` → boxes of a COCO instances JSON, labelled with their category
    names (images without annotations are absent)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO instances file (needs 'images' and "
                         "'annotations' lists)")
    try:
        images = {im["id"]: str(im["file_name"]) for im in data["images"]}
        categories = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: an image or category entry lacks {e}") from None
    out: dict[str, list[Box]] = {}
    for k, ann in enumerate(data["annotations"]):
        where = f"{path} annotation {k + 1}"
        if not isinstance(ann, dict) or "bbox" not in ann or "image_id" not in ann:
            raise ValueError(f"{where}: needs 'image_id' and 'bbox'")
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} is not among the images")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, width, height]; got {bbox!r}")
        x, y, w, h = (_number(str(v), name, where)
                      for v, name in zip(bbox, ("x", "y", "width", "height"), strict=True))
        cat = ann.get("category_id")
        label = categories.get(cat, None if cat is None else str(cat))
        out.setdefault(images[ann["image_id"]], []).append(_box(x, y, x + w, y + h, label,
                                                                where))
    return out


def read_boxes(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Boxes by format: ``.csv`` → :func:`read_boxes_csv`, ``.json`` → :func:`read_coco`,
    ``.xml`` or a folder → :func:`read_voc`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"box file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".xml":
        return read_voc(path)
    if suffix == ".csv":
        return read_boxes_csv(path)
    if suffix == ".json":
        return read_coco(path)
    raise ValueError(f"{path}: unknown box format; use .csv (file,x0,y0,x1,y1), Pascal VOC "
                     ".xml (or a folder of them) or COCO instances .json")


def read_mask_dir(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Relative path without suffix (posix) → PNG file, for every PNG below ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"mask folder not found: {root}")
    out = {}
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() == ".png" and not f.name.startswith(".") and f.is_file():
            out[f.relative_to(root).with_suffix("").as_posix()] = f
    if not out:
        raise ValueError(f"no .png masks in {root}")
    return out


def mask_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of a mask file, from its header."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:  # noqa: BLE001 - decoders raise many types
        raise ValueError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Bool (H, W): the non-zero pixels of a mask image (any channel; alpha ignored)."""
    try:
        with Image.open(path) as img:
            img.load()
            a = np.asarray(img.convert("RGB") if img.mode in ("P", "PA", "LA", "RGBA")
                           else img)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None
    return a.any(axis=-1) if a.ndim == 3 else a != 0


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """``box`` clipped to a ``width`` × ``height`` image (itself when inside); None when
    nothing of it is inside."""
    x0, y0 = max(box.x0, 0.0), max(box.y0, 0.0)
    x1, y1 = min(box.x1, float(width)), min(box.y1, float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    if (x0, y0, x1, y1) == (box.x0, box.y0, box.x1, box.y1):
        return box
    return Box(x0, y0, x1, y1, box.label, box.where)


def rasterise_boxes(boxes: Iterable[Box], width: int, height: int) -> np.ndarray:
    """Bool (height, width): the pixels whose centres lie in any box (clipped to the image).

    For integer edges this is exactly columns x0 … x1-1 and rows y0 … y1-1.
    """
    out = np.zeros((int(height), int(width)), dtype=bool)
    for b in boxes:
        c0, c1 = (max(0, min(int(width), math.ceil(v - 0.5))) for v in (b.x0, b.x1))
        r0, r1 = (max(0, min(int(height), math.ceil(v - 0.5))) for v in (b.y0, b.y1))
        out[r0:r1, c0:c1] = True
    return out
