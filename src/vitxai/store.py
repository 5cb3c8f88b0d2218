"""The run directory: layout, a crash-safe journal of batches, one writer at a time.

Layout of a run directory::

    config.json              what was run: arguments, method parameters, versions, seed
    manifest.json            the journal: images done and skipped (with reasons), the committed
                             length of every CSV, the committed map files, timings
    per_image_methods.csv    one row per (image, method): labels, target, cost, mask size,
                             ground-truth scores when the dataset has masks
    per_image_pairs.csv      one row per (image, method A, method B): IoU, Dice, coverage A→B
    aggregates.json          means over images (and how many images each mean covers)
    figures/                 heatmaps (PNG + SVG) and the sample image's maps and masks
    maps/batch_NNNNNN.safetensors   with save_attr_maps: signed maps, native maps, masks
    evaluation.json, per_image_evaluation.csv, report.html, report.md   derived results
    .lock                    who writes the directory now (pid, host)

Guarantees (each one tested in ``tests/test_journal.py``):

- **One writer.** :class:`RunLock` holds an exclusive ``flock`` on ``.lock`` for as long as a
  command writes the directory; a second writer fails at once with a message naming the
  holder. The kernel drops the lock of a dead process, so a lock left by a kill is taken over.
- **A batch is committed as a unit.** Its map file is written and renamed into place, its rows
  are appended and synced, and only then is the manifest, which records the new byte length of
  each CSV and the new map file, replaced atomically: the manifest is the commit. Reopening a
  run truncates every CSV back to its committed length and removes map files and temporary
  files the manifest does not name, so a kill or a full disk at any point loses at most the
  batch in flight and never leaves a half row or a duplicate row.
- **No stale derived results.** Aggregates and evaluation results record the fingerprint and
  image count of the run they were computed from; ``overwrite`` removes them all.

The store never computes anything; it writes what it is given. Formats: JSON, CSV,
safetensors.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHOD_ROWS = "per_image_methods.csv"
PAIR_ROWS = "per_image_pairs.csv"
CONFIG = "config.json"
MANIFEST = "manifest.json"
AGGREGATES = "aggregates.json"
EVALUATION = "evaluation.json"
EVALUATION_ROWS = "per_image_evaluation.csv"
REPORTS = ("report.html", "report.md")
LOCK = ".lock"
#: files derived from a run's rows and maps; removed with it by ``overwrite``
DERIVED = (AGGREGATES, EVALUATION, EVALUATION_ROWS, *REPORTS)
_JOURNALED = (METHOD_ROWS, PAIR_ROWS)
_TMP = ".tmp"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


# --- durable writes -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> Path:
    """Write ``path`` through a synced temporary file renamed into place.

    ``write(tmp_path)`` writes the content; readers see the old file or the whole new one,
    never a part, whatever kills the process (the temporary file is removed on error).
    """
    path = Path(path)
    tmp = path.with_name(path.name + _TMP)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path) from e
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # writers in other languages (safetensors) report an OS error only in their message
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code and isinstance(e, Exception):
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` with the file it concerns (a failed ``write`` carries no file name)."""
    if error.filename is not None and not str(error.filename).endswith(_TMP):
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write; NaN and inf become null (undefined), since JSON has no NaN."""
    text = json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n"))


def read_json(path: Path) -> Any:
    """Read a JSON file the run wrote; a damaged file is a :class:`RunDirectoryError`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirectoryError(f"{path} is damaged ({type(e).__name__}); start the run "
                                "afresh with overwrite") from e


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


# --- one writer -----------------------------------------------------------------------------
class RunLock:
    """Exclusive lock of a run directory for one writing command (a context manager).

    An ``flock`` on ``root/.lock``, which records the holder's pid, host and start time. The
    kernel releases it when the holder exits in any way (SIGKILL included), so a lock file
    left by a dead process is simply taken over. ``flock`` works on local file systems and
    on NFS (Linux emulates it with byte-range locks).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryError(f"{self.root} is in use by {holder}; wait for it to "
                                    "finish or choose another run directory") from None
        info = (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (see class doc)
            self._fd = None


# --- the journal ----------------------------------------------------------------------------
def _fresh_manifest(fingerprint: str | None) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "done": [], "skipped": [], "seconds": 0.0,
            "complete": False, "committed": dict.fromkeys(_JOURNALED, 0), "maps": {}}


class RunStore:
    """Writes one run directory; see the module docstring for the layout and guarantees.

    Use it as a context manager: it holds the directory's :class:`RunLock` until closed.

    Args:
        root: the directory (created if missing).
        config: JSON-ready description of the run. When ``root`` already holds a run, its
            ``config["fingerprint"]`` must match, else :class:`RunDirectoryError`.
        overwrite: start afresh, removing every artefact of the run ``root`` holds (rows,
            maps, figures and derived results); files vitxai did not write are left alone.
        same_run: earlier fingerprints of this very run (recorded under names since
            renamed); a run recorded with one of them is continued, not refused.
    """

    def __init__(self, root: str | Path, config: Mapping[str, Any], overwrite: bool = False,
                 same_run: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.same_run = tuple(same_run)
        self.figures = self.root / "figures"
        self.maps = self.root / "maps"
        self.fingerprint = config.get("fingerprint")
        self._lock = RunLock(self.root)
        self._lock.__enter__()
        try:
            self._open(config, overwrite)
        except BaseException:
            self._lock.__exit__()
            raise

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory's lock."""
        self._lock.__exit__()

    def _open(self, config: Mapping[str, Any], overwrite: bool) -> None:
        config_path = self.root / CONFIG
        if config_path.exists() and not overwrite:
            previous = read_json(config_path)
            if previous.get("fingerprint") not in (self.fingerprint, *self.same_run):
                raise RunDirectoryError(
                    f"{self.root} holds a different run (other settings); choose a new run "
                    "directory or overwrite it"
                )
        elif overwrite:
            self._remove_artefacts()
        self.figures.mkdir(exist_ok=True)
        manifest_path = self.root / MANIFEST
        if manifest_path.exists():
            self.manifest = read_json(manifest_path)
            self.manifest.setdefault("committed", self._legacy_lengths())
            self.manifest.setdefault("maps", None)
            if self.manifest.get("fingerprint") in self.same_run:  # map files keep their owner
                self.manifest["previous_fingerprints"] = [
                    *self.manifest.get("previous_fingerprints", []), self.manifest["fingerprint"]]
                self.manifest["fingerprint"] = self.fingerprint
        else:  # nothing was ever committed: whatever rows or maps exist are not this run's
            self.manifest = _fresh_manifest(self.fingerprint)
        self._roll_back()
        write_json(config_path, dict(config))
        write_json(manifest_path, self.manifest)

    def _legacy_lengths(self) -> dict[str, int]:
        """Runs written before the journal: trust the files as they are."""
        return {n: (self.root / n).stat().st_size if (self.root / n).exists() else 0
                for n in _JOURNALED}

    def _remove_artefacts(self) -> None:
        for name in (CONFIG, MANIFEST, *_JOURNALED, *DERIVED):
            (self.root / name).unlink(missing_ok=True)
        for folder in (self.maps, self.figures):
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.is_file():
                        f.unlink()

    def _roll_back(self) -> None:
        """Undo whatever the last process wrote after its last commit (see module doc)."""
        for name, length in self.manifest["committed"].items():
            path = self.root / name
            size = path.stat().st_size if path.exists() else 0
            if size < length:
                raise RunDirectoryError(
                    f"{path} is shorter ({size} bytes) than its committed length ({length}): "
                    "it was changed outside vitxai; start the run afresh with overwrite")
            if size > length:
                with path.open("rb+") as f:
                    f.truncate(length)
                    os.fsync(f.fileno())
        for folder in (self.root, self.figures):
            for leftover in folder.glob(f"*{_TMP}"):
                leftover.unlink()
        if self.manifest["maps"] is not None and self.maps.is_dir():
            for f in self.maps.iterdir():
                if f.is_file() and f.name not in self.manifest["maps"]:
                    f.unlink()  # an uncommitted batch's maps (or its temporary file)

    def require_columns(self, name: str, columns: Iterable[str]) -> None:
        """Refuse, before any work, to continue a run whose committed ``name`` rows lack
        ``columns`` (written by an older vitxai; see :func:`append_csv`)."""
        if not self.manifest["committed"].get(name):
            return
        header = csv_header(self.root / name) or []
        absent = [c for c in columns if c not in header]
        if absent:
            raise RunDirectoryError(
                f"{self.root / name} lacks the column(s) {', '.join(absent)}: this run was "
                "written by an older vitxai; finish it with that version or start afresh "
                "with overwrite")

    def done_indices(self) -> set[int]:
        """Dataset indices already finished (or skipped) in an earlier, interrupted run."""
        return set(self.manifest["done"]) | {s["index"] for s in self.manifest["skipped"]}

    # --- streaming writes ------------------------------------------------------------------
    def save_maps(self, first_index: int, tensors: Mapping[str, torch.Tensor]) -> str:
        """Write one batch's maps as safetensors (atomic; never pickle); returns the file
        name to pass to :meth:`finish_batch`, which commits it."""
        from safetensors.torch import save_file

        self.maps.mkdir(exist_ok=True)
        path = self.maps / f"batch_{first_index:06d}.safetensors"
        data = {k: v.contiguous() for k, v in tensors.items()}
        metadata = {"fingerprint": str(self.fingerprint)}
        atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))
        return path.name

    def finish_batch(self, method_rows: Sequence[Mapping[str, Any]],
                     pair_rows: Sequence[Mapping[str, Any]], done: Iterable[int],
                     skipped: Iterable[tuple[int, str, str]], seconds: float,
                     maps_file: str | None = None) -> None:
        """Commit one batch: append its rows, then replace the manifest (the commit).

        A failure while appending (a full disk, say) truncates the CSVs back to their
        committed lengths before the error propagates; a kill is undone on reopening.
        """
        committed = self.manifest["committed"]
        done = [int(i) for i in done]
        lengths = {}
        try:
            for name, rows in ((METHOD_ROWS, method_rows), (PAIR_ROWS, pair_rows)):
                lengths[name] = append_csv(self.root / name, rows)
        except BaseException:
            self._roll_back()
            raise
        manifest = dict(self.manifest)
        manifest["committed"] = committed | lengths
        manifest["done"] = [*self.manifest["done"], *done]
        manifest["skipped"] = [*self.manifest["skipped"], *(
            {"index": int(i), "path": p, "reason": r} for i, p, r in skipped)]
        manifest["seconds"] = float(self.manifest["seconds"]) + seconds
        if maps_file is not None and manifest["maps"] is not None:
            manifest["maps"] = manifest["maps"] | {maps_file: done}
        write_json(self.root / MANIFEST, manifest)
        self.manifest = manifest

    def write_json(self, name: str, data: Any) -> Path:
        path = self.root / name
        write_json(path, data)
        return path

    def complete(self) -> None:
        self.manifest["complete"] = True
        write_json(self.root / MANIFEST, self.manifest)


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> int:
    """Append rows (same keys) to a CSV, with the header when the file is empty; synced.
    Rows whose keys differ from the file's header are refused (:class:`RunDirectoryError`).

    Returns the file's length in bytes afterwards (its new committed length).
    """
    try:
        with path.open("a", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                if f.tell() == 0:
                    writer.writeheader()
                else:
                    _check_header(path, list(rows[0].keys()))
                for row in rows:
                    writer.writerow({k: _format(v) for k, v in row.items()})
                f.flush()
                os.fsync(f.fileno())
            return f.tell()
    except OSError as e:
        raise _naming(e, path) from e


def csv_header(path: Path) -> list[str] | None:
    """The column names of a CSV, None when it is missing or empty."""
    try:
        with Path(path).open(newline="") as f:
            return next(csv.reader(f), None)
    except FileNotFoundError:
        return None


def _check_header(path: Path, columns: list[str]) -> None:
    """Refuse to append rows whose columns differ from those of the file (a run begun by
    another vitxai version): rows of two layouts would not read back."""
    header = csv_header(path)
    if header is not None and header != columns:
        raise RunDirectoryError(
            f"{path} has other columns than this vitxai writes (this run was written by an "
            "older vitxai); finish it with that version or start afresh with overwrite")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write a whole CSV atomically (rows with the same keys)."""
    return atomic_write(Path(path), lambda tmp: append_csv(tmp, rows))


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.6g}"
    return value


def read_rows(root: str | Path, name: str, key: Sequence[str]) -> list[dict[str, Any]]:
    """Read a per-image CSV back, numbers parsed (empty = NaN), one row per key."""
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


# --- reading a finished run -----------------------------------------------------------------
def finished_run(root: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, manifest) of a run that ``compare`` finished; else a one-line error.

    Derived results (evaluation, report) are only computed from finished runs, so that they
    never describe fewer images than the run holds.
    """
    root = Path(root)
    if not (root / CONFIG).is_file():
        raise RunDirectoryError(f"{root} is not a run directory (no {CONFIG}); run "
                                "`vitxai compare` first")
    config = read_json(root / CONFIG)
    manifest = read_json(root / MANIFEST) if (root / MANIFEST).is_file() else {}
    if not manifest.get("complete") or not (root / AGGREGATES).is_file():
        done = len(manifest.get("done", [])) + len(manifest.get("skipped", []))
        raise RunDirectoryError(
            f"{root} is an unfinished run ({done} of {config.get('n_images', '?')} images "
            "done); rerun the same `vitxai compare` command to finish it first")
    return config, manifest


def run_identity(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What derived results record of the run they were computed from."""
    return {"fingerprint": config.get("fingerprint"), "n_images": len(manifest["done"])}


def check_derived(root: str | Path, name: str, data: Mapping[str, Any],
                  identity: Mapping[str, Any], remedy: str) -> None:
    """Refuse derived results (``data`` read from ``root/name``) of another run; the error
    ends with ``remedy``."""
    recorded = data.get("run")
    if recorded != dict(identity):
        what = ("an unknown run" if not recorded else
                f"run {recorded.get('fingerprint')} with {recorded.get('n_images')} images")
        raise RunDirectoryError(
            f"{Path(root) / name} was computed from {what}, not from this run "
            f"({identity['fingerprint']}, {identity['n_images']} images); {remedy}")


def read_evaluation(root: str | Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's evaluation results, None when it has none; results computed from another
    run than ``identity`` (:func:`run_identity`), or from fewer of its images, are a
    :class:`RunDirectoryError`."""
    root = Path(root)
    if not (root / EVALUATION).is_file():
        return None
    evaluation = read_json(root / EVALUATION)
    check_derived(root, EVALUATION, evaluation, identity,
                  "evaluate the run again (`vitxai evaluate`)")
    return evaluation


def read_maps(root: str | Path, *, allow_missing: bool = False
              ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """All committed maps of a run, concatenated over batches, and the files skipped.

    Every map file the manifest commits must exist, load and belong to this run; otherwise a
    :class:`RunDirectoryError` names the file, unless ``allow_missing``, which skips it and
    lists ``{"file", "reason", "indices"}`` in the second return value.
    """
    from safetensors import safe_open

    root = Path(root)
    manifest = read_json(root / MANIFEST) if (root / MANIFEST).is_file() else {}
    committed = manifest.get("maps")
    owners = {manifest.get("fingerprint"), *manifest.get("previous_fingerprints", [])}
    if committed is None:  # runs written before the journal
        committed = {f.name: None for f in sorted((root / "maps").glob("batch_*.safetensors"))}
    if not committed:
        raise RunDirectoryError(
            f"{root} has no saved maps; rerun the comparison with save_attr_maps=True")
    parts, missing = [], []
    for name in sorted(committed):
        path = root / "maps" / name
        try:
            if not path.is_file():
                raise RunDirectoryError("missing")
            with safe_open(str(path), framework="pt") as f:
                owner = (f.metadata() or {}).get("fingerprint")
                if manifest.get("fingerprint") and owner and owner not in owners:
                    raise RunDirectoryError(f"belongs to run {owner}")
                parts.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not allow_missing:
                raise RunDirectoryError(
                    f"map file {path} is unreadable ({reason}); recompute the run with "
                    "overwrite, or skip its images with allow_missing=True") from None
            missing.append({"file": str(path.relative_to(root)), "reason": reason,
                            "indices": committed[name]})
    if not parts:
        raise RunDirectoryError(f"{root}: none of its {len(committed)} map files is readable")
    maps = {k: _concat([p[k] for p in parts]) for k in parts[0]}
    absent = sorted(set(manifest.get("done", [])) - set(maps["index"].tolist())
                    - {i for m in missing for i in m["indices"] or ()})
    if absent and not allow_missing:
        raise RunDirectoryError(f"{root}/maps lacks the maps of {len(absent)} finished images "
                                f"(first: {absent[:5]}); recompute the run with overwrite, or "
                                "skip them with allow_missing=True")
    if absent:
        missing.append({"file": None, "reason": "no map file", "indices": absent})
    return maps, missing


def load_maps(root: str | Path) -> dict[str, torch.Tensor]:
    """All saved maps of a run, concatenated over batches (keys as written by the run)."""
    return read_maps(root)[0]


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch axis; superpixel coefficient rows (B, S) of different
    widths are NaN-padded to the widest, as within a batch."""
    width = max(t.shape[1] for t in tensors) if tensors[0].ndim == 2 else None
    if width is not None:
        tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("nan"))
                   if t.is_floating_point() else t for t in tensors]
    return torch.cat(tensors)
