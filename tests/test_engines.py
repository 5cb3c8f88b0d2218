"""Ray engine: the same results as a local run, worker deaths retried, the driver resumed."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitxai.compare as compare_module
from vitxai.cli import main
from vitxai.engines import EngineSettings, RayPool

ray = pytest.importorskip("ray", reason="the ray extra is part of the test extras")

RUN = ["compare", "--n-images", "5", "--methods", "saliency", "attention_rollout", "lime",
       "--param", "lime.n_samples=24", "--batch-size", "2", "--save_attr_maps",
       "--no-progress"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance of 2 CPU workers for the module (engines join it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def _rows(out: Path, name: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader((out / name).open()))
    for r in rows:  # timings and memory differ between processes
        for key in ("seconds_per_image", "peak_memory_mb"):
            r.pop(key, None)
    return rows


def assert_same_results(a: Path, b: Path) -> None:
    for name in ("per_image_methods.csv", "per_image_pairs.csv"):
        assert _rows(a, name) == _rows(b, name), name
    maps_a, maps_b = sorted((a / "maps").glob("*")), sorted((b / "maps").glob("*"))
    assert [p.name for p in maps_a] == [p.name for p in maps_b]
    for pa, pb in zip(maps_a, maps_b, strict=True):
        ta, tb = load_file(str(pa)), load_file(str(pb))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k].nan_to_num(7.5), tb[k].nan_to_num(7.5)), (pa.name, k)
    agg_a, agg_b = (json.loads((d / "aggregates.json").read_text()) for d in (a, b))
    for agg in (agg_a, agg_b):
        for key in ("seconds", "run"):
            agg.pop(key)
        for subset in agg["subsets"].values():
            for per in subset["per_method"].values():
                per.pop("seconds_per_image")
                per.pop("peak_memory_mb")
    assert agg_a == agg_b


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The local reference, computed with one torch thread as the 1-core workers are: float
    reductions split over another number of threads may differ in the last bits."""
    out = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*RUN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_gives_the_local_results(local_ray, local_run, tmp_path, workers):
    out = tmp_path / "run"
    assert main([*RUN, "--engine", "ray", "--workers", str(workers), "--cpus-per-worker", "1",
                 "--out", str(out)]) == 0
    assert_same_results(local_run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["engine"]["name"] == "ray" and len(config["engine"]["devices"]) == workers
    assert config["fingerprint"] == json.loads((local_run / "config.json").read_text())[
        "fingerprint"]


def test_shipped_images_give_the_same_results(local_ray, local_run, tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "--engine", "ray", "--workers", "2", "--ship-images",
                 "--out", str(out)]) == 0
    assert_same_results(local_run, out)


def test_a_killed_worker_has_its_batch_retried(local_ray, local_run, tmp_path, monkeypatch):
    submit, killed = RayPool._submit, []

    def submit_then_kill(self, worker, job, item):
        future = submit(self, worker, job, item)
        if not killed:  # the first batch's worker dies while it computes
            killed.append(item[0])
            ray.kill(worker)
        return future

    monkeypatch.setattr(RayPool, "_submit", submit_then_kill)
    out = tmp_path / "run"
    assert main([*RUN, "--engine", "ray", "--workers", "2", "--out", str(out)]) == 0
    assert killed == [[0, 1]]
    assert_same_results(local_run, out)


def test_a_killed_driver_resumes_without_recomputing(local_ray, local_run, tmp_path,
                                                     monkeypatch):
    commit, computed = compare_module.commit_batch, []

    def commit_then_die(store, payload, names, sample_index):
        commit(store, payload, names, sample_index)
        raise KeyboardInterrupt  # the driver dies right after its first commit

    monkeypatch.setattr(compare_module, "commit_batch", commit_then_die)
    out = tmp_path / "run"
    assert main([*RUN, "--engine", "ray", "--workers", "2", "--out", str(out)]) == 130
    monkeypatch.setattr(compare_module, "commit_batch", commit)
    submit = RayPool._submit

    def counting(self, worker, job, item):
        computed.append(item[0])
        return submit(self, worker, job, item)

    monkeypatch.setattr(RayPool, "_submit", counting)
    assert main([*RUN, "--engine", "ray", "--workers", "2", "--out", str(out)]) == 0
    assert sorted(computed) == [[2, 3], [4]]  # the committed batch [0, 1] is not redone
    assert_same_results(local_run, out)


def test_without_ray_the_engine_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main([*RUN, "--engine", "ray", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == 'vitxai: error: engine \'ray\' needs Ray: pip install -e ".[ray]"'


def test_engine_settings_are_checked():
    with pytest.raises(ValueError, match="engine='spark' must be one of local, ray"):
        EngineSettings("spark")
    with pytest.raises(ValueError, match="gpus_per_worker=-1"):
        EngineSettings("ray", gpus_per_worker=-1)


def test_idsds_on_ray_equals_local(local_ray, tmp_path, monkeypatch):
    """evaluate --idsds recomputes every map on the fine-tuned model: on Ray workers (which
    rebuild the model from the run's source and the checkpoint) the ρ are the same."""
    monkeypatch.setenv("VITXAI_PROGRESS", "0")
    run, tuned = tmp_path / "run", tmp_path / "ft"
    assert main(["compare", "--n-images", "3", "--methods", "rollout", "IG", "--param",
                 "integrated_gradients.steps=2", "--save_attr_maps", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["finetune-deletion", "--n-images", "8", "--val-size", "4", "--epochs", "1",
                 "--batch-size", "4", "--out", str(tuned), "--no-progress"]) == 0
    common = ["evaluate", str(run), "--idsds", "--checkpoint", str(tuned), "--steps", "3",
              "--no-progress"]

    def idsds_rows() -> list:
        rows = list(csv.DictReader((run / "per_image_evaluation.csv").open()))
        return [(r["index"], r["method"], r["idsds"]) for r in rows]

    assert main(common) == 0
    local = idsds_rows()
    assert main([*common, "--engine", "ray", "--workers", "2"]) == 0
    assert idsds_rows() == local and len(local) == 6
