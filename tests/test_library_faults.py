"""Library faults of issue 10: argument names, headless models, GAE groups, peak memory and
float64 maps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CFG, images_for, tiny_vit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitxai.data.datasets import ImageDataset, Sample
from vitxai.data.synthetic import SyntheticBenchmark
from vitxai.evaluate import EvaluateSettings, _recomputing_groups
from vitxai.methods import attribute, get_method
from vitxai.metrics.gae import gae, mosaic_groups
from vitxai.models import ModelAdapter, adapt, load_model
from vitxai.models.bundled import load_bundled_model

# ------------------------------------------------------- 9: a method parameter called "method"


def test_method_parameter_named_method_reaches_the_method(vit64):
    x, t = images_for(vit64, 2), [1, 2]
    left = attribute("integrated_gradients", vit64, x, t, method="riemann_left", steps=4)
    params = get_method("integrated_gradients").make_params(method="riemann_left", steps=4)
    same = attribute("integrated_gradients", vit64, x, t, method_params=params)
    default = attribute("integrated_gradients", vit64, x, t, steps=4)
    assert torch.equal(left.maps, same.maps)
    assert not torch.allclose(left.maps, default.maps)  # the quadrature really changed
    # the four leading arguments are positional-only: a keyword is a method parameter
    with pytest.raises(ValueError, match="has no parameter targets"):
        attribute("saliency", vit64, x, targets=t)


# ------------------------------------------------------------------ 10: models without head


def _headless_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=0)


def test_headless_model_is_refused_when_adapted():
    with pytest.raises(ValueError, match=r"no classifier head \(num_classes=0\)") as info:
        adapt(_headless_vit(), name="backbone", config=TINY_CFG)
    assert "\n" not in str(info.value) and "'backbone'" in str(info.value)
    with pytest.raises(ValueError, match="no classifier head"):
        load_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32)
    # the same architecture with a head, and plain modules that declare no num_classes, pass
    assert load_model("vit_small_patch16_224", pretrained=False, num_classes=5,
                      img_size=32).num_classes == 5
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    assert ModelAdapter(plain, (0.5,) * 3, (0.5,) * 3, (8, 8)).num_classes == 0


def test_attribute_refuses_a_model_whose_head_was_removed():
    adapter = tiny_vit(depth=1)
    x = images_for(adapter, 1)
    assert attribute("attention_rollout", adapter, x).maps.shape == (1, 32, 32)
    adapter.model.reset_classifier(0)  # after wrapping: outputs are now 32 features
    assert adapter.model(adapter.normalize(x)).shape == (1, 32)
    with pytest.raises(ValueError, match="no classifier head"):
        attribute("attention_rollout", adapter, x)
    with pytest.raises(ValueError, match="no classifier head"):
        attribute("saliency", adapter, x, [3])


# ---------------------------------------------------------------- 11: GAE's groups of four


def _classes(labels, groups):
    return [[labels[k] for k in g] for g in groups]


def test_mosaic_groups_distinct_classes_on_sorted_labels():
    labels = sorted([c for c in range(5) for _ in range(6)])  # class-sorted, as Imagenette val
    groups = mosaic_groups(labels, 7, seed=0)
    assert len(groups) == 7 and all(len(g) == 4 for g in groups)
    flat = [k for g in groups for k in g]
    assert len(set(flat)) == len(flat) and all(0 <= k < len(labels) for k in flat)
    assert all(len(set(c)) == 4 for c in _classes(labels, groups))
    assert mosaic_groups(labels, 7, seed=0) == groups  # deterministic per seed
    assert any(mosaic_groups(labels, 7, seed=s) != groups for s in range(1, 4))


def test_mosaic_groups_distinct_whenever_possible():
    # 3 groups from classes of 3, 3, 3, 1, 1, 1 images: only possible if every group takes
    # one image of each large class (a draw that pairs two singletons fails)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 5]
    for seed in range(20):
        groups = mosaic_groups(labels, 3, seed)
        assert all(len(set(c)) == 4 for c in _classes(labels, groups)), seed
        assert sorted(k for g in groups for k in g) == list(range(12))


def test_mosaic_groups_fallback_with_few_classes():
    two = [0] * 8 + [1] * 8
    for g in _classes(two, mosaic_groups(two, 4, seed=3)):
        assert Counter(g) == {0: 2, 1: 2}  # as even as two classes allow
    three = [0] * 4 + [1] * 4 + [2] * 4
    for g in _classes(three, mosaic_groups(three, 3, seed=1)):
        assert len(set(g)) == 3
    one = [7] * 5
    (g,) = mosaic_groups(one, 1, seed=0)
    assert len(set(g)) == 4
    with pytest.raises(ValueError, match="n_groups"):
        mosaic_groups(one, 2, seed=0)
    with pytest.raises(ValueError, match="n_groups"):
        mosaic_groups(one, 0, seed=0)


class _SortedByLabel(ImageDataset):
    """A view of a dataset in class order (as Imagenette's val folder is read)."""

    def __init__(self, base: ImageDataset) -> None:
        labels = [base.load(i).label for i in range(len(base))]
        self.base = base
        self.order = sorted(range(len(base)), key=lambda i: (labels[i], i))
        self.labels = [labels[i] for i in self.order]
        self.class_names = base.class_names

    def __len__(self) -> int:
        return len(self.order)

    def load(self, i: int) -> Sample:
        return dataclasses.replace(self.base.load(self.order[i]), index=i)


@pytest.fixture(scope="module")
def bundled_sorted():
    adapter = load_bundled_model()
    data = _SortedByLabel(SyntheticBenchmark(size=24, seed=0))
    assert data.labels[:4] == [data.labels[0]] * 4  # the first four share a class
    return adapter, data


def test_random_map_contrastiveness_needs_groups_of_different_classes(bundled_sorted):
    adapter, data = bundled_sorted
    g = torch.Generator().manual_seed(0)

    def random_map(images, targets):
        return torch.rand(images.shape[0], *images.shape[-2:], generator=g)

    images = torch.stack([data.load(i).image for i in range(len(data))])
    first = gae(adapter, random_map, images[:4])
    assert first["contrastiveness"].tolist() == [1.0]  # one class: any map scores C = 1
    groups = mosaic_groups(data.labels, 2, seed=0)
    drawn = gae(adapter, random_map, images[[k for grp in groups for k in grp]])
    assert (drawn["contrastiveness"] < 0.25).all()


def test_evaluate_gae_draws_groups_of_different_classes(bundled_sorted, tmp_path):
    adapter, data = bundled_sorted
    targets = torch.tensor(data.labels)
    out = _recomputing_groups(
        tmp_path, adapter, data, list(range(len(data))), targets, ["attention_rollout"],
        {"methods": {"attention_rollout": {}}}, EvaluateSettings(groups=("gae",),
                                                                  sanity_images=8))
    (row,) = out["tables"]["GAE (Vukadin et al. 2024)"]["rows"]
    per_positive = out["tables"]["GAE: every positive"]["rows"]
    assert len(per_positive) == 2 and (tmp_path / "figures" / "gae_extremes.png").is_file()
    assert [r[0] for r in per_positive] == ["attention_rollout"] * 2
    # rollout is class-agnostic: over four classes its mosaic relevance covers the other
    # classes' tiles (the first eight images, mostly one class, gave C = 0.5)
    assert float(row[4]) < 0.25


# ---------------------------------------------------------------------- 12: peak memory


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


linux_memory = pytest.mark.skipif(_status_kb("VmHWM") is None, reason="needs Linux VmHWM")


def _raise_high_water_mark(mib: int = 256) -> None:
    block = np.ones(mib * 2**20 // 8)  # touched: resident
    del block  # a large block goes back to the system: RSS falls, the mark stays


@linux_memory
def test_attribute_leaves_the_peak_memory_mark_alone():
    adapter = tiny_vit(depth=1)
    x = images_for(adapter, 2)
    _raise_high_water_mark()
    mark = _status_kb("VmHWM")
    assert mark - _status_kb("VmRSS") > 200 * 1024
    r = attribute("saliency", adapter, x)
    assert _status_kb("VmHWM") >= mark  # not reset (clear_refs would drop it to the RSS)
    # the mark did not rise during the call, so the call's own peak is unknown
    assert r.cost.peak_memory_mb is None


_HUNGRY = """
import json, sys
import torch
from torch import nn
from vitxai.methods import attribute
from vitxai.models import ModelAdapter

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

class Hungry(nn.Module):  # a linear classifier whose forward touches nbytes of scratch
    num_classes = 3

    def __init__(self, nbytes):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 3)
        self.nbytes = nbytes

    def forward(self, x):
        scratch = torch.ones(self.nbytes // 4)
        return self.linear(x.flatten(1)) + 0 * scratch[0]

mark = status_kb("VmHWM")
need = (mark - status_kb("VmRSS") + int(sys.argv[1]) * 1024) * 1024  # above the mark
adapter = ModelAdapter(Hungry(need), (0.5,) * 3, (0.5,) * 3, (8, 8), "hungry")
r = attribute("saliency", adapter, torch.rand(1, 3, 8, 8), [0])
print(json.dumps({"mark": mark, "after": status_kb("VmHWM"), "peak": r.cost.peak_memory_mb}))
"""


@linux_memory
def test_peak_memory_reported_when_the_call_raises_the_mark():
    # a fresh process, so that the scratch needed to pass the mark stays small
    done = subprocess.run([sys.executable, "-c", _HUNGRY, "64"], capture_output=True,
                          text=True, check=True, timeout=300)
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["after"] > out["mark"] + 32 * 1024
    assert out["peak"] == pytest.approx(out["after"] / 1024, abs=1)


@linux_memory
def test_measure_memory_gives_the_calls_own_peak():
    adapter = tiny_vit(depth=1)
    x = images_for(adapter, 2)
    _raise_high_water_mark()
    mark = _status_kb("VmHWM")
    r = attribute("saliency", adapter, x, measure_memory=True)
    if _status_kb("VmHWM") >= mark:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    # the reset is asked for: the peak is the call's, well below the earlier mark
    assert r.cost.peak_memory_mb is not None and r.cost.peak_memory_mb < mark / 1024 - 100


# -------------------------------------------------------------------- 13: float64 maps


@pytest.mark.parametrize("name", ["attention_rollout", "raw_attention", "chefer2021a",
                                  "chefer2021b", "gradcam"])
def test_float64_patch_maps_are_upsampled_in_float64(vit64, name):
    x = images_for(vit64, 2)
    r = attribute(name, vit64, x, [1, 2])
    assert r.maps.dtype == r.native.dtype == torch.float64
    ref = F.interpolate(r.native[:, None], size=x.shape[-2:], mode="bilinear",
                        align_corners=False)[:, 0]
    assert torch.equal(r.maps, ref)  # not rounded through float32 on the way
    assert not torch.equal(r.maps, r.maps.float().double())


@pytest.mark.parametrize("space", ["pixel", "token"])
@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_float64_feature_maps_keep_float64(vit64, name, space):
    x = images_for(vit64, 2)
    r = attribute(name, vit64, x, [1, 2], n_samples=40, space=space)
    assert r.maps.dtype == torch.float64
    if space == "pixel":
        ref = r.native.gather(1, r.segments.flatten(1)).view(r.segments.shape)
    else:
        ref = F.interpolate(r.native[:, None], size=x.shape[-2:], mode="nearest")[:, 0]
    assert torch.equal(r.maps, ref)
    assert not torch.equal(r.maps, r.maps.float().double())



@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gae_images": 6}, "gae_images=6 must be a positive multiple of 4"),
    ({"gae_steps": 1}, "gae_steps=1 must be ≥ 2"),
])
def test_gae_settings_are_checked_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvaluateSettings(groups=("gae",), **kwargs)


def test_evaluate_gae_legacy_schedule_is_recorded(bundled_sorted, tmp_path):
    adapter, data = bundled_sorted
    out = _recomputing_groups(
        tmp_path, adapter, data, list(range(len(data))), torch.tensor(data.labels),
        ["attention_rollout"], {"methods": {"attention_rollout": {}}},
        EvaluateSettings(groups=("gae",), sanity_images=0, gae_images=4, gae_steps=3,
                         gae_legacy=True))
    table = out["tables"]["GAE (Vukadin et al. 2024)"]
    assert "3 masking steps, schedule legacy" in table["text"] and len(table["rows"]) == 1
