"""`vitxai evaluate` and `vitxai report` on a small run; the report opens in a real browser."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitxai.cli import main

MODEL = ["--model", "bundled", "--no-progress"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(images / f"{i}.png")
    out = root / "run"
    assert main(["compare", "--data", str(images), *MODEL, "--methods", "rollout",
                 "chefer2021a", "IG", "--param", "integrated_gradients.steps=2", "--out",
                 str(out), "--evaluate", "--steps", "4"]) == 0
    return out


def test_evaluation_tables_and_rows(evaluated):
    ev = json.loads((evaluated / "evaluation.json").read_text())
    titles = set(ev["tables"])
    for name in ("deletion AUC", "insertion AUC", "single deletion ρ", "Gini sparseness"):
        assert f"Evaluation: {name}" in titles
    assert "Agreement beyond masks (patches)" in titles
    deletion = ev["tables"]["Evaluation: deletion AUC"]["rows"]
    assert {r[1] for r in deletion} == {"attention_rollout", "chefer2021a",
                                         "integrated_gradients"}
    for row in deletion:
        mean = float(row[2])
        low, high = (float(v) for v in row[3].strip("[]").split(","))
        assert 0 <= low <= mean <= high <= 1
    with (evaluated / "per_image_evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and all(r["deletion_auc"] for r in rows)
    from vitxai.metrics.scores import EVALUATION_SCORES

    scored = [(EVALUATION_SCORES[k], float(v)) for r in rows for k, v in r.items()
              if k in EVALUATION_SCORES and v]
    assert {s.name for s, _ in scored} >= {"deletion_auc", "insertion_auc", "gini"}
    assert all(s.contains(v) for s, v in scored if np.isfinite(v)), scored


def test_report_is_self_contained(evaluated):
    html = (evaluated / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # sample, 3 heatmaps, curves
    assert "Evaluation: insertion AUC" in html and "Configuration and versions" in html
    assert (evaluated / "report.md").read_text().startswith("# vitxai report")


def test_evaluate_needs_saved_maps(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    out = tmp_path / "run"
    assert main(["compare", "--data", str(images), *MODEL, "--methods", "rollout",
                 "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--no-progress"]) == 2
    assert "--save_attr_maps" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "check_report.py"
    spec = importlib.util.spec_from_file_location("check_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ok, message = module.check(evaluated / "report.html", tmp_path / "shot.png")
    assert ok, message


def test_recorded_parameters_rebuild_the_methods(tmp_path):
    """Recomputing groups (sanity, GAE) rebuild each method from config.json, nested
    segmentation included."""
    import json

    from vitxai.cli import main
    from vitxai.methods.perturbation import SegmentationParams
    from vitxai.models.bundled import load_bundled_model
    from vitxai.runner import recorded_methods

    out = tmp_path / "r"
    assert main(["compare", "--n-images", "2", "--methods", "lime", "--no-progress",
                 "--param", "lime.n_samples=16", "--segmentation", 'algorithm="slic"',
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    params = recorded_methods(load_bundled_model(), config)
    assert params["lime"].params.segmentation == SegmentationParams(algorithm="slic")
    assert params["lime"].params.n_samples == 16
