"""Results do not change: every method's maps and a comparison's rows against a recording.

``tests/golden/`` was recorded by ``tests/golden/make_golden.py`` before the code was
reorganised (issue 11); a refactoring that changes any result fails here. Parameters are
passed by their current names; a renamed parameter keeps its old name as an alias.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = Path(__file__).parent / "golden"
#: fewer model evaluations than the defaults, same code paths
FAST = {
    "lime": {"n_samples": 48}, "kernel_shap": {"n_samples": 48},
    "rise": {"n_masks": 48}, "occlusion": {"window": 56, "stride": 56},
    "integrated_gradients": {"steps": 8}, "integrated_gradients_uniform": {"steps": 8},
    "gradient_shap": {"n_samples": 8}, "smoothgrad": {"n_samples": 4},
}
SEGMENTATION = {"algorithm": "slic"}
TIMING = {"seconds_per_image", "peak_memory_mb", "path"}


def _inputs():
    from vitxai.data.synthetic import SyntheticBenchmark
    from vitxai.models.bundled import load_bundled_model

    adapter = load_bundled_model()
    data = SyntheticBenchmark(split="single", size=2, seed=20240)
    samples = [data.load(i) for i in range(2)]
    return (adapter, torch.stack([s.image for s in samples]),
            torch.tensor([s.label for s in samples]))


def golden_maps() -> dict[str, torch.Tensor]:
    """Every registered method's maps on two images, average-pooled to (2, 28, 28)."""
    from vitxai.methods import METHODS, BatchContext, attribute
    from vitxai.methods.perturbation import SegmentationParams

    adapter, x, t = _inputs()
    out = {}
    for name, spec in sorted(METHODS.items()):
        if spec.family == "cam":  # CNN feature maps only (tests/test_cam.py); this is a ViT
            continue
        params = dict(FAST.get(name, {}))
        if "segments" in spec.uses:
            params["segmentation"] = SegmentationParams(**SEGMENTATION)
        ctx = BatchContext.for_batch(2, seed=0, image_ids=[0, 1], planned=[name])
        maps = attribute(name, adapter, x, t, context=ctx, **params).maps
        out[name] = F.avg_pool2d(maps[:, None].double(), 8)[:, 0].float()
    return out


def golden_rows(out: Path) -> list[dict[str, str]]:
    """Per-image method rows of a three-image comparison of the seed methods (no timings)."""
    from vitxai.cli import main

    args = ["compare", "--n-images", "3", "--batch-size", "2", "--no-progress",
            "--out", str(out), "--segmentation", 'algorithm="slic"']
    for method, params in FAST.items():
        if method in ("lime", "kernel_shap", "integrated_gradients", "gradient_shap"):
            args += [x for k, v in params.items() for x in ("--param", f"{method}.{k}={v}")]
    assert main(args) == 0
    with (out / "per_image_methods.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    return load_file(str(HERE / "maps.safetensors"))


#: relevance propagated through every layer in float32 differs from CPU to CPU by up to
#: ~1e-3 of the map's scale (measured 6e-4 between two x86 machines); a changed rule moves
#: it by its own size
PROPAGATED = {"chefer_full_lrp": 2e-3, "chefer_lrp_rollout": 2e-3}


def test_every_method_gives_the_recorded_maps(recorded):
    now = golden_maps()
    assert sorted(now) == sorted(recorded)
    for name, maps in now.items():
        scale = float(recorded[name].abs().max().clamp(min=1e-12))
        atol = PROPAGATED.get(name, 1e-5) * scale
        assert torch.allclose(maps, recorded[name], rtol=1e-4, atol=atol), name


#: columns added to the rows after the recording (issue 12: what the model predicted); they
#: describe the prediction and change no result, so each is checked for presence only
ADDED_COLUMNS = {"top5", "top5_probability"}


def test_a_comparison_gives_the_recorded_rows(tmp_path):
    recorded = json.loads((HERE / "rows.json").read_text())
    rows = golden_rows(tmp_path / "run")
    assert len(rows) == len(recorded)
    for row, old in zip(rows, recorded, strict=True):
        assert set(row) == set(old) | ADDED_COLUMNS  # no recorded column lost, none unknown
    for row, old in zip(rows, recorded, strict=True):
        for key, value in old.items():
            assert same_cell(row[key], value), (old["method"], old["index"], key, row[key], value)


def same_cell(now: str, then: str) -> bool:
    """Equal CSV cells; numbers (written with 6 significant digits) to 1e-4 relative, as
    another CPU rounds the last digit differently."""
    try:
        a, b = float(now), float(then)
    except ValueError:
        return now == then
    return a == b or abs(a - b) <= 1e-4 * max(abs(a), abs(b))
