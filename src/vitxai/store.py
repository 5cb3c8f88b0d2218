"""The run directory: layout, safe formats, streaming writes and resume.

Layout of a run directory::

    config.json              what was run: arguments, method parameters, versions, seed
    manifest.json            images done and skipped (with reasons), timings
    per_image_methods.csv    one row per (image, method): labels, target, cost, mask size,
                             ground-truth scores when the dataset has masks
    per_image_pairs.csv      one row per (image, method A, method B): IoU, Dice, coverage A→B
    aggregates.json          means over images (and how many images each mean covers)
    figures/                 heatmaps (PNG + SVG) and the sample image's maps and masks
    maps/batch_NNNNNN.safetensors   with --save_attr_maps: signed maps, native maps, masks

Rows are appended and flushed after every batch, so an interrupted run loses at most the
batch in flight, and a rerun with the same configuration continues where it stopped. The
store never computes anything; it writes what it is given. Formats: JSON, CSV, safetensors.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHOD_ROWS = "per_image_methods.csv"
PAIR_ROWS = "per_image_pairs.csv"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write; NaN and inf become null (undefined), since JSON has no NaN."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunStore:
    """Writes one run directory; see the module docstring for the layout.

    Args:
        root: the directory (created if missing).
        config: JSON-ready description of the run. When ``root`` already holds a run, its
            ``config["fingerprint"]`` must match, else :class:`RunDirectoryError`.
        overwrite: start afresh even if ``root`` holds another run's files.
    """

    def __init__(self, root: str | Path, config: Mapping[str, Any], overwrite: bool = False
                 ) -> None:
        self.root = Path(root)
        self.figures = self.root / "figures"
        self.maps = self.root / "maps"
        config_path = self.root / "config.json"
        if config_path.exists() and not overwrite:
            previous = json.loads(config_path.read_text())
            if previous.get("fingerprint") != config.get("fingerprint"):
                raise RunDirectoryError(
                    f"{self.root} holds a different run (other settings); choose a new --out "
                    "or pass --overwrite"
                )
        elif overwrite and self.root.exists():
            for name in (METHOD_ROWS, PAIR_ROWS, "manifest.json", "aggregates.json"):
                (self.root / name).unlink(missing_ok=True)
            for folder in (self.maps, self.figures):
                if folder.exists():
                    for f in folder.iterdir():
                        f.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(exist_ok=True)
        write_json(config_path, dict(config))
        self.manifest = self._read_manifest()

    # --- resume ----------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        if path.exists():
            return json.loads(path.read_text())
        return {"done": [], "skipped": [], "seconds": 0.0, "complete": False}

    def done_indices(self) -> set[int]:
        """Dataset indices already finished (or skipped) in an earlier, interrupted run."""
        return set(self.manifest["done"]) | {s["index"] for s in self.manifest["skipped"]}

    # --- streaming writes ------------------------------------------------------------------
    def _append_rows(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        append_csv(self.root / name, rows)

    def finish_batch(self, method_rows: Sequence[Mapping[str, Any]],
                     pair_rows: Sequence[Mapping[str, Any]], done: Iterable[int],
                     skipped: Iterable[tuple[int, str, str]], seconds: float) -> None:
        """Append a batch's rows, then record it as done (rows first: a crash in between
        at worst recomputes the batch, whose duplicate rows :func:`read_rows` drops)."""
        self._append_rows(METHOD_ROWS, method_rows)
        self._append_rows(PAIR_ROWS, pair_rows)
        self.manifest["done"].extend(int(i) for i in done)
        self.manifest["skipped"].extend(
            {"index": int(i), "path": p, "reason": r} for i, p, r in skipped
        )
        self.manifest["seconds"] = float(self.manifest["seconds"]) + seconds
        write_json(self.root / "manifest.json", self.manifest)

    def save_maps(self, first_index: int, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write one batch's maps as safetensors (atomic rename; never pickle)."""
        from safetensors.torch import save_file

        self.maps.mkdir(exist_ok=True)
        path = self.maps / f"batch_{first_index:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        path = self.root / name
        write_json(path, data)
        return path

    def complete(self) -> None:
        self.manifest["complete"] = True
        write_json(self.root / "manifest.json", self.manifest)


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows (same keys) to a CSV, writing the header first; flushed to disk."""
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.6g}"
    return value


def read_rows(root: str | Path, name: str, key: Sequence[str]) -> list[dict[str, Any]]:
    """Read a per-image CSV back, numbers parsed (empty = NaN), keeping the last row per key."""
    path = Path(root) / name
    if not path.exists():
        return []
    rows: dict[tuple, dict[str, Any]] = {}
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: _parse(v) for k, v in raw.items()}
            rows[tuple(row[k] for k in key)] = row
    return list(rows.values())


def _parse(value: str) -> Any:
    if value == "":
        return float("nan")
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def load_maps(root: str | Path) -> dict[str, torch.Tensor]:
    """All saved maps of a run, concatenated over batches (keys as written by the run)."""
    from safetensors.torch import load_file

    files = sorted((Path(root) / "maps").glob("batch_*.safetensors"))
    if not files:
        raise RunDirectoryError(
            f"{root} has no saved maps; rerun the comparison with --save_attr_maps"
        )
    parts = [load_file(str(f)) for f in files]
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch axis; superpixel coefficient rows (B, S) of different
    widths are NaN-padded to the widest, as within a batch."""
    width = max(t.shape[1] for t in tensors) if tensors[0].ndim == 2 else None
    if width is not None:
        tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("nan"))
                   if t.is_floating_point() else t for t in tensors]
    return torch.cat(tensors)
