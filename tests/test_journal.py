"""Fault injection: the run directory survives kills, full disks, second writers and tampering.

A chain of real processes writes one run directory; each is SIGKILLed (or stopped mid-row by
RLIMIT_FSIZE, as a full disk would stop it) at a different write of a batch, and the next one
resumes. The end state must equal an uninterrupted run: rows, line counts, aggregates, maps.
The driver (``tests/fault_driver.py``) names the write events of the store.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitxai.cli import main
from vitxai.store import RunLock, load_maps

DRIVER = Path(__file__).with_name("fault_driver.py")
ARGS = ["compare", "--n-images", "6", "--batch-size", "2",
        "--methods", "attention_rollout", "lime", "--param", "lime.n_samples=16",
        "--segmentation", 'algorithm="slic"', "--save_attr_maps", "--no-progress"]
TIMING = {"seconds_per_image", "peak_memory_mb"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Forker:
    """Client of ``fault_driver.py serve``: each run is a forked child of one process that
    imported torch and timm once (seconds saved per run)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "serve"], env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._read())["ready"]
        self.logs: dict[int, Path] = {}

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        assert line, "fault driver server died"
        return line

    def _ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def start(self, spec: str, out: Path, *extra: str, env: dict | None = None) -> int:
        n = len(self.logs)
        log = self.workdir / f"job{n}"
        pid = self._ask({"op": "start", "spec": spec, "env": env or {},
                         "argv": [*ARGS, "--out", str(out), *extra],
                         "stdout": f"{log}.out", "stderr": f"{log}.err"})["pid"]
        self.logs[pid] = log
        return pid

    def wait(self, pid: int) -> tuple[int, str]:
        """(exit code or minus the signal, stderr)."""
        status = self._ask({"op": "wait", "pid": pid})["status"]
        return status, Path(f"{self.logs[pid]}.err").read_text()

    def run(self, spec: str, out: Path, *extra: str) -> tuple[int, str]:
        return self.wait(self.start(spec, out, *extra))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("forker"))
    yield f
    f.close()


def _method_rows(root: Path) -> list[dict[str, str]]:
    with (root / "per_image_methods.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _aggregates(root: Path) -> dict:
    agg = json.loads((root / "aggregates.json").read_text())
    agg.pop("seconds")
    for sub in agg["subsets"].values():
        for per in sub["per_method"].values():
            for k in TIMING:
                per.pop(k)
    return agg


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def _assert_same_run(a: Path, b: Path) -> None:
    assert _method_rows(a) == _method_rows(b)
    for name in ("per_image_methods.csv", "per_image_pairs.csv"):
        assert _lines(a / name) == _lines(b / name), name
    assert (a / "per_image_pairs.csv").read_bytes() == (b / "per_image_pairs.csv").read_bytes()
    assert _aggregates(a) == _aggregates(b)
    assert sorted(p.name for p in (a / "maps").iterdir()) == \
        sorted(p.name for p in (b / "maps").iterdir())
    ma, mb = load_maps(a), load_maps(b)
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]) or torch.allclose(
            ma[key], mb[key], rtol=0, atol=0, equal_nan=True), key
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == list(range(6))
    assert not list(b.rglob("*.tmp")), "temporary files left behind"


@pytest.fixture(scope="module")
def reference(forker, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("journal") / "reference"
    events = out.with_suffix(".events")
    code, err = forker.run(f"record:{events}", out)
    assert code == 0, err
    assert events.read_text().count("renamed:manifest.json") == 5  # open, 3 batches, complete
    return out


def test_every_kill_and_full_disk_resumes_to_the_uninterrupted_run(forker, reference, tmp_path):
    rng = np.random.default_rng(20241202)
    # Events of one process: 6 on opening (config, manifest), then 10 per batch (map file 3,
    # two CSV appends 4, manifest 3) plus the sample figure's 3 in the first batch. The
    # seeded kills fall before the process's first commit, so the chain below stays fixed.
    seeded = [f"kill:@{k}" for k in rng.integers(1, 16, size=3)]
    chain = [
        "kill:renamed:config.json#1",        # config written, manifest not yet
        "kill:tmp-written:batch_#1",         # map file complete under its temporary name
        "kill:append:per_image_methods#1",   # map file renamed, no rows yet
        "kill:appended:per_image_methods#1",  # between the two CSV appends
        "efbig:append:per_image_methods#1",  # the append stops mid-row: file size limit
        "kill:appended:per_image_pairs#1",   # rows written, the commit not made
        "kill:tmp-written:manifest.json#2",  # the commit half-way
        "efbig:append:per_image_pairs#1",    # mid-row in the second CSV
        "efbig-kill:append:per_image_methods#1",  # killed with half a row on disk
        "kill:renamed:manifest.json#2",      # just after the first commit
        *seeded,
        "efbig:append:per_image_pairs#2",    # one batch committed, the next stopped mid-row
        "kill:write:aggregates.json#1",      # every batch committed, nothing derived yet
        "kill:tmp-written:coverage_heatmap.png#1",  # during the figures
        "kill:renamed:manifest.json#2",      # right after the run was marked complete
    ]
    out = tmp_path / "run"
    for spec in chain:
        code, err = forker.run(spec, out)
        if spec.startswith("efbig-kill"):
            assert code == -9, (spec, code, err[-2000:])
            committed = json.loads((out / "manifest.json").read_text())["committed"]
            rows = out / "per_image_methods.csv"
            assert rows.stat().st_size == committed[rows.name] + 30  # the fragment is there
        elif spec.startswith("kill"):
            assert code == -9, (spec, code, err[-2000:])
        else:  # the write error is one line, exit 1, and no traceback
            assert code == 1, (spec, code, err[-2000:])
            errors = [line for line in err.splitlines() if "vitxai: error" in line]
            assert len(errors) == 1 and "File too large" in errors[0], err[-2000:]
            assert "Traceback" not in err
    code, err = forker.run("record:" + str(tmp_path / "events"), out)
    assert code == 0, err[-2000:]
    _assert_same_run(reference, out)


def test_a_second_writer_is_refused_at_once_naming_the_holder(forker, reference, tmp_path):
    out = tmp_path / "run"
    flag = tmp_path / "paused"
    first = forker.start("pause:renamed:manifest.json#2", out,
                         env={"FAULT_PAUSE_FILE": str(flag)})
    try:
        for _ in range(1200):
            if flag.exists():
                break
            time.sleep(0.05)
        assert flag.exists(), "the first run never reached its first commit"
        start = time.perf_counter()
        code, err = forker.run("record:" + str(tmp_path / "events"), out)
        assert code == 2
        errors = err.strip().splitlines()
        assert len(errors) == 1 and f"in use by pid {first} " in errors[0], err
        assert time.perf_counter() - start < 60
    finally:
        flag.unlink(missing_ok=True)
        code, err = forker.wait(first)
    assert code == 3, err[-2000:]  # finished normally (the pause is no fault)
    _assert_same_run(reference, out)


def test_lock_held_in_process_and_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["compare", "--n-images", "2", "--methods", "attention_rollout", "--no-progress",
            "--out", str(out)]
    with RunLock(out):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {os.getpid()}" in err[0]
        for cmd in (["evaluate", str(out)], ["report", str(out)]):
            assert main(cmd) == 2
    (out / ".lock").write_text("pid 999999 on a-host-that-died since 2020-01-01 00:00:00")
    assert main(args) == 0
    assert str(os.getpid()) in (out / ".lock").read_text()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluated") / "run"
    assert main(["compare", "--n-images", "4", "--batch-size", "2", "--no-progress",
                 "--methods", "attention_rollout", "raw_attention", "--evaluate",
                 "--steps", "4", "--out", str(out)]) == 0
    for name in ("evaluation.json", "per_image_evaluation.csv", "report.html", "report.md"):
        assert (out / name).is_file(), name
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_overwrite_removes_every_derived_result(evaluated, tmp_path):
    out = _copy(evaluated, tmp_path)
    (out / "notes.txt").write_text("mine")  # not vitxai's: must survive
    assert main(["compare", "--n-images", "2", "--methods", "attention_rollout",
                 "--no-progress", "--out", str(out), "--overwrite"]) == 0
    for name in ("evaluation.json", "per_image_evaluation.csv", "report.html", "report.md",
                 "figures/faithfulness_curves.png"):
        assert not (out / name).exists(), name
    assert not list((out / "maps").iterdir())
    assert (out / "notes.txt").read_text() == "mine"
    agg = json.loads((out / "aggregates.json").read_text())
    assert agg["methods"] == ["attention_rollout"] and agg["run"]["n_images"] == 2
    assert main(["report", str(out)]) == 0
    assert "raw_attention" not in (out / "report.md").read_text()


def test_report_refuses_evaluation_of_another_run(evaluated, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["compare", "--n-images", "4", "--batch-size", "2", "--no-progress",
                 "--methods", "attention_rollout", "raw_attention", "--seed", "1",
                 "--out", str(other)]) == 0
    shutil.copy(evaluated / "evaluation.json", other / "evaluation.json")
    capsys.readouterr()
    assert main(["report", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluation.json was computed from run" in err[0]


def test_unfinished_run_is_neither_evaluated_nor_reported(forker, tmp_path, capsys):
    out = tmp_path / "run"
    assert forker.run("kill:renamed:manifest.json#3", out)[0] == -9  # 2 batches of 3
    for cmd in (["evaluate", str(out)], ["report", str(out)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unfinished run (4 of 6 images done)" in err[0], err


def test_missing_or_corrupt_map_file_is_named_unless_allowed(evaluated, tmp_path, capsys):
    out = _copy(evaluated, tmp_path)
    (out / "maps" / "batch_000002.safetensors").unlink()
    assert main(["evaluate", str(out), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_000002.safetensors" in err[0]
    assert main(["evaluate", str(out), "--steps", "4", "--no-progress",
                 "--allow-missing"]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["n_images"] == 2 and ev["missing_maps"][0]["indices"] == [2, 3]
    assert "Images skipped: missing map files" in (out / "report.md").read_text()

    out2 = tmp_path / "corrupt"
    shutil.copytree(evaluated, out2)
    path = out2 / "maps" / "batch_000000.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert main(["evaluate", str(out2), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_000000.safetensors is unreadable" in err[0]


def test_map_file_of_another_run_is_refused(evaluated, tmp_path, capsys):
    out = _copy(evaluated, tmp_path)
    other = tmp_path / "other"
    assert main(["compare", "--n-images", "4", "--batch-size", "2", "--no-progress", "--seed",
                 "3", "--methods", "attention_rollout", "raw_attention", "--save_attr_maps",
                 "--out", str(other)]) == 0
    shutil.copy(other / "maps" / "batch_000000.safetensors",
                out / "maps" / "batch_000000.safetensors")
    capsys.readouterr()
    assert main(["evaluate", str(out), "--steps", "4", "--no-progress"]) == 2
    assert "belongs to run" in capsys.readouterr().err


def test_rows_changed_behind_the_journal_are_refused_on_resume(evaluated, tmp_path, capsys):
    out = _copy(evaluated, tmp_path)
    rows = out / "per_image_methods.csv"
    rows.write_bytes(rows.read_bytes()[:-50])
    assert main(["compare", "--n-images", "4", "--batch-size", "2", "--no-progress",
                 "--methods", "attention_rollout", "raw_attention", "--save_attr_maps",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shorter" in err[0] and "per_image_methods.csv" in err[0]


def test_a_run_recorded_with_deprecated_names_resumes(forker, reference, tmp_path):
    """A run written before the vocabulary change (docs/conventions.md) is the same run."""
    from safetensors.torch import load_file, save_file

    from vitxai.compare import fingerprint
    from vitxai.methods import get_method

    out = tmp_path / "run"
    assert forker.run("kill:renamed:manifest.json#2", out)[0] == -9  # one batch committed
    config = json.loads((out / "config.json").read_text())
    renamed = 0
    for name, params in config["methods"].items():
        for old, new in get_method(name).renamed.items():
            if new in params:
                params[old] = params.pop(new)
                renamed += 1
    assert renamed >= 2, "the run's methods have no renamed parameter to test with"
    old = fingerprint(config)
    assert old != config["fingerprint"]
    config["fingerprint"] = old
    (out / "config.json").write_text(json.dumps(config))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"] = old
    (out / "manifest.json").write_text(json.dumps(manifest))
    for path in (out / "maps").iterdir():
        save_file(load_file(str(path)), str(path), metadata={"fingerprint": old})
    code, err = forker.run("record:" + str(tmp_path / "events"), out)
    assert code == 0, err[-2000:]
    _assert_same_run(reference, out)
    assert main(["evaluate", str(out), "--steps", "2", "--no-progress"]) == 0


def test_deprecated_evaluation_options_still_work(evaluated, tmp_path):
    out = _copy(evaluated, tmp_path)
    with pytest.warns(FutureWarning, match="--unit is deprecated"):
        assert main(["evaluate", str(out), "--steps", "4", "--no-progress", "--unit", "patch",
                     "--baseline", "zero"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["settings"]["space"] == "token"
    new = tmp_path / "new"
    shutil.copytree(evaluated, new)
    assert main(["evaluate", str(new), "--steps", "4", "--no-progress"]) == 0
    assert (out / "per_image_evaluation.csv").read_bytes() == \
        (new / "per_image_evaluation.csv").read_bytes()
