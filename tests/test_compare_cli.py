"""End to end: `vitxai compare` on generated images with a random timm ViT, offline."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitxai.cli import main
from vitxai.compare import SEED_METHODS, CompareSettings, compare
from vitxai.data import FolderDataset, eval_transform
from vitxai.store import load_maps

FAST = ["--param", "lime.n_samples=24", "--param", "kernel_shap.n_samples=24",
        "--param", "integrated_gradients.steps=4", "--param", "gradient_shap.n_samples=4",
        "--segmentation", "algorithm=\"slic\"", "--no-progress"]
MODEL = ["--model", "bundled"]  # the small shipped ViT keeps the end-to-end runs fast
RANDOM = ["--model", "vit_tiny_patch16_224", "--random-weights"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = np.zeros((150, 200, 3), dtype=np.uint8)
        arr[..., i] = 200
        arr[40:110, 60:140] = rng.integers(0, 255, (70, 80, 3))
        Image.fromarray(arr).save(root / f"img{i}.png")
    Image.fromarray(np.full((64, 64), 128, np.uint8), mode="L").save(root / "grey.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def full_run(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    with pytest.warns(UserWarning, match="broken.jpg"):
        code = main(["compare", "--data", str(image_dir), *MODEL, *FAST, "--out", str(out),
                     "--save_attr_maps", "--idx_sample_img", "2", "--batch-size", "2"])
    assert code == 0
    return out


def test_run_directory_has_every_promised_file(full_run):
    for name in ("config.json", "manifest.json", "aggregates.json", "per_image_methods.csv",
                 "per_image_pairs.csv"):
        assert (full_run / name).is_file(), name
    for metric in ("iou", "dice", "coverage"):
        for ext in ("png", "svg"):
            assert (full_run / "figures" / f"{metric}_heatmap.{ext}").stat().st_size > 1000
    assert (full_run / "figures" / "sample_2.png").stat().st_size > 1000
    config = json.loads((full_run / "config.json").read_text())
    assert config["seed"] == 0 and config["versions"]["torch"] == torch.__version__
    assert set(config["methods"]) == set(SEED_METHODS)
    assert any("bundled ViT" in n for n in config["notes"])


def test_unreadable_image_is_listed_not_fatal(full_run):
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert [s["path"].endswith("broken.jpg") for s in manifest["skipped"]] == [True]
    assert sorted(manifest["done"]) == [1, 2, 3, 4] and manifest["complete"]


def test_rows_and_aggregates(full_run):
    with (full_run / "per_image_methods.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * len(SEED_METHODS)
    with (full_run / "per_image_pairs.csv").open() as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 4 * len(SEED_METHODS) * (len(SEED_METHODS) - 1)
    agg = json.loads((full_run / "aggregates.json").read_text())
    iou = np.array(agg["subsets"]["all"]["pairwise"]["iou"]["mean"], dtype=float)
    cov = np.array(agg["subsets"]["all"]["pairwise"]["coverage"]["mean"], dtype=float)
    assert iou.shape == (6, 6) and np.allclose(iou, iou.T, equal_nan=True)
    assert np.all((iou[np.isfinite(iou)] >= 0) & (iou[np.isfinite(iou)] <= 1))
    assert np.isfinite(cov).any()
    lime = agg["subsets"]["all"]["per_method"]["lime"]
    assert lime["forward_passes"]["mean"] == 24


def test_saved_maps_are_safe_and_complete(full_run):
    maps = load_maps(full_run)
    assert maps["index"].tolist() == [1, 2, 3, 4]
    for m in SEED_METHODS:
        assert maps[f"{m}.map"].shape == (4, 224, 224)
        assert set(maps[f"{m}.mask"].unique().tolist()) <= {0, 1}
    assert maps["lime.segments"].shape == (4, 224, 224)
    assert maps["integrated_gradients.channels"].shape == (4, 3, 224, 224)


def test_same_seed_same_numbers(image_dir, full_run, tmp_path):
    out = tmp_path / "again"
    assert main(["compare", "--data", str(image_dir), *MODEL, *FAST, "--out", str(out),
                 "--save_attr_maps", "--idx_sample_img", "2", "--batch-size", "3"]) == 0
    a, b = load_maps(full_run), load_maps(out)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, equal_nan=True), key


def test_resume_after_interruption(image_dir, tmp_path, monkeypatch):
    import vitxai.runner as runner_module  # the per-batch loop
    from vitxai.models.bundled import load_bundled_model

    adapter = load_bundled_model()
    dataset = FolderDataset(image_dir, eval_transform(adapter.data_config))
    settings = CompareSettings(methods=["attention_rollout", "integrated_gradients"],
                               method_params={"integrated_gradients": {"steps": 2}},
                               batch_size=1)
    real = runner_module.attribute
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # third image, first method
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "attribute", failing)
    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        compare(adapter, dataset, tmp_path / "r", settings, progress=False)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert sorted(manifest["done"]) == [1, 2] and not manifest["complete"]
    monkeypatch.setattr(runner_module, "attribute", real)
    seen = []
    monkeypatch.setattr(runner_module, "attribute",
                        lambda *a, **k: seen.append(1) or real(*a, **k))
    compare(adapter, dataset, tmp_path / "r", settings, progress=False)
    assert len(seen) == 2 * 2  # images 3 and 4 only
    with (tmp_path / "r" / "per_image_methods.csv").open() as f:
        assert sorted({int(r["index"]) for r in csv.DictReader(f)}) == [1, 2, 3, 4]


def test_bad_input_errors(image_dir, tmp_path, capsys):
    assert main(["compare", "--data", str(image_dir), *MODEL, "--methods", "LIME", "magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'magic'; valid methods:" in err and "chefer2021a" in err
    assert main(["compare", "--data", "imagenette", "--data-root", str(tmp_path), *MODEL]) == 2
    assert "vitxai data imagenette" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "--data", str(empty), *MODEL]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["compare", "--data", str(image_dir), "--model", "resnet10t",
                 "--random-weights", "--no-progress", "--methods", "attention_rollout"]) == 2
    assert "attention_rollout' needs a ViT" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["compare", "--data", str(image_dir), *MODEL, *FAST, "--methods",
                 "AttentionRollout", "--out", str(other), "--sample_size", "99"]) == 0
    assert main(["compare", "--data", str(image_dir), *MODEL, *FAST, "--methods",
                 "BeyondAttention", "--out", str(other)]) == 2
    assert "different run" in capsys.readouterr().err


def test_sample_size_above_dataset_warns_and_uses_all(image_dir, tmp_path):
    with pytest.warns(UserWarning, match="sample_size"):
        main(["compare", "--data", str(image_dir), *MODEL, *FAST, "--methods", "rollout",
              "--out", str(tmp_path / "r"), "--sample_size", "50"])
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert len(manifest["done"]) + len(manifest["skipped"]) == 5


def test_run_comparison_script_accepts_original_flags(image_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "run_comparison.py"
    out = tmp_path / "seed"
    proc = subprocess.run(
        [sys.executable, str(script), "--methods", "AttentionRollout", "IntegratedGradients",
         "--idx_sample_img", "1", "--save_attr_maps", "--sample_size", "2", *RANDOM,
         "--data", str(image_dir), "--out", str(out), "--param",
         "integrated_gradients.steps=2", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "figures" / "sample_1.png").exists()
    assert (out / "maps").is_dir()


@pytest.mark.parametrize("target", ["folder", "file"])
def test_no_readable_image_is_one_line(tmp_path, capsys, target):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "b.png").write_bytes(b"")
    data = folder if target == "folder" else folder / "a.jpg"
    with warnings.catch_warnings(record=True):
        code = main(["compare", "--data", str(data), *MODEL, "--methods", "attention_rollout",
                     "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if target == "folder":  # readable files are only known to be unreadable once decoded
        assert f"no readable images in {data}: 2 skipped, see" in err[0]
    else:  # a single file is decoded up front
        assert f"cannot read image {data}" in err[0]
