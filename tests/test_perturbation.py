"""LIME, KernelSHAP and their shared segmentation and perturbation engine."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import timm
import torch
from conftest import MEAN, STD, block_images
from torch import nn

import vitxai.methods.perturbation as P
from vitxai.methods.base import BatchContext, attribute, get_method
from vitxai.models.adapter import ModelAdapter, ViTAdapter

SIZE = 32


def slic(n: int) -> P.SegmentationParams:
    return P.SegmentationParams(algorithm="slic", n_segments=n)


@pytest.fixture(scope="module")
def vit() -> ViTAdapter:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=10,
    )
    return ViTAdapter(model, MEAN, STD, (SIZE, SIZE), "tiny-vit")


@pytest.fixture(scope="module")
def linear() -> ModelAdapter:
    """A float64 model whose logits are linear in the pixels, hence additive over superpixels."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10)).double()
    return ModelAdapter(model, MEAN, STD, (SIZE, SIZE), "linear")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Three images with different superpixel counts (exercises the NaN padding)."""
    return torch.cat([block_images(1, grid, SIZE, seed=i) for i, grid in enumerate((4, 3, 2))])


def additive_contributions(adapter: ModelAdapter, image: torch.Tensor, segments: torch.Tensor,
                           target: int, baseline: torch.Tensor) -> torch.Tensor:
    """Exact per-superpixel change of the linear model's target logit when switched off."""
    weight = adapter.model[1].weight[target].view(3, SIZE, SIZE)
    per_pixel = (weight * (image[0] - baseline[0]) / adapter.std[0]).sum(0)
    s = int(segments.max()) + 1
    return torch.zeros(s, dtype=torch.float64).scatter_add_(
        0, segments.flatten(), per_pixel.flatten().double()
    )


# ------------------------------------------------------------------------------- registry


def test_registered_with_aliases() -> None:
    for alias, name in [("LIME", "lime"), ("KernelSHAP", "kernel_shap"),
                        ("kernelshap", "kernel_shap")]:
        spec = get_method(alias)
        assert spec.name == name
        assert spec.family == "perturbation" and "segments" in spec.uses
        assert spec.paper and spec.summary


# ------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_shapes_and_maps_constant_per_superpixel(vit, batch, method) -> None:
    result = attribute(method, vit, batch, n_samples=64, segmentation=slic(9))
    counts = P.num_segments(result.segments)
    assert len(set(counts.tolist())) > 1  # padding is exercised
    assert result.maps.shape == (3, SIZE, SIZE) and result.maps.dtype == torch.float32
    assert result.native.shape == (3, int(counts.max()))
    assert result.native_kind == "superpixel" and result.segments.dtype == torch.int64
    for b in range(3):
        s = int(counts[b])
        assert torch.isfinite(result.native[b, :s]).all()
        assert torch.isnan(result.native[b, s:]).all()
        torch.testing.assert_close(result.maps[b], result.native[b][result.segments[b]])
    assert result.cost.backward == 0
    assert result.cost.forward == (64 if method == "lime" else
                                   math.ceil(sum(min(2**int(s), 64) for s in counts) / 3))


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_batch_equals_per_image(vit, batch, method) -> None:
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    params = dict(n_samples=100, batch_size=32, segmentation=slic(9))
    together = attribute(method, vit, batch, context=BatchContext.for_batch(3, 7, ids), **params)
    for i in range(3):
        alone = attribute(method, vit, batch[i:i + 1],
                          context=BatchContext.for_batch(1, 7, ids[i:i + 1]), **params)
        s = int(P.num_segments(alone.segments)[0])
        torch.testing.assert_close(together.native[i, :s], alone.native[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(together.maps[i], alone.maps[0], atol=1e-6, rtol=0)


def test_seeded_coalitions() -> None:
    counts = torch.tensor([20, 12])
    ctx = [BatchContext.for_batch(2, seed) for seed in (0, 0, 1)]
    lime = [P.lime_coalitions(c, counts, 50) for c in ctx]
    shap = [P.kernel_shap_coalitions(c, counts, 50)[0] for c in ctx]
    for draws in (lime, shap):
        assert torch.equal(draws[0], draws[1])
        assert not torch.equal(draws[0], draws[2])
    assert lime[0][:, 0, :12].all() and not lime[0][1, :, 12:].any()


def test_kernel_shap_samples_follow_shapley_kernel() -> None:
    s, n = 16, 20000  # 2^16 > n: sampled, not enumerated
    z, weights, valid = P.kernel_shap_coalitions(BatchContext.for_batch(1), torch.tensor([s]), n)
    assert valid.all() and (weights[0, 2:] == 1).all() and (weights[0, :2] == 0).all()
    assert not z[0, 0].any() and z[0, 1].all()
    sizes = z[0, 2:].sum(1)
    assert sizes.min() >= 1 and sizes.max() <= s - 1
    k = torch.arange(1, s, dtype=torch.float64)
    kernel = (s - 1) / (k * (s - k))
    frequency = torch.bincount(sizes, minlength=s)[1:].double() / (n - 2)
    torch.testing.assert_close(frequency, kernel / kernel.sum(), atol=0.01, rtol=0)
    # Uniform subsets of each size: every player is in about half the coalitions.
    half = torch.full((s,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(z[0, 2:].double().mean(0), half, atol=0.015, rtol=0)


def test_methods_deterministic(vit, batch) -> None:
    for method in ("lime", "kernel_shap"):
        runs = [attribute(method, vit, batch, seed=s, n_samples=40, segmentation=slic(16))
                for s in (3, 3, 4)]
        assert torch.equal(runs[0].maps, runs[1].maps)
        assert not torch.equal(runs[0].maps, runs[2].maps)


# ------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("baseline", ["mean", "black", 0.3])
def test_additive_model_recovered(linear, baseline) -> None:
    image = block_images(1, 4, SIZE, seed=5).double()
    target = 3
    seg_params = slic(16)
    segments = P.segment(image, seg_params)
    s = int(segments.max()) + 1
    assert 2**s > 300  # the sampled regime, not enumeration
    expected = additive_contributions(linear, image, segments[0], target,
                                      P.baseline_colour(linear, baseline))
    common = dict(score="logit", baseline=baseline, segmentation=seg_params, n_samples=300)
    shap = attribute("kernel_shap", linear, image, target, **common)
    lime0 = attribute("lime", linear, image, target, alpha=0.0, **common)
    lime_small = attribute("lime", linear, image, target, alpha=1e-6, **common)
    assert shap.native.dtype == torch.float64  # float64 models keep float64 end to end
    torch.testing.assert_close(shap.native[0], expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lime0.native[0], expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lime_small.native[0], expected, atol=1e-6, rtol=1e-6)


def exact_shapley(value: dict[tuple[int, ...], float], s: int) -> torch.Tensor:
    phi = torch.zeros(s, dtype=torch.float64)
    for i in range(s):
        others = [j for j in range(s) if j != i]
        for k in range(s):
            w = math.factorial(k) * math.factorial(s - k - 1) / math.factorial(s)
            for t in itertools.combinations(others, k):
                phi[i] += w * (value[tuple(sorted((*t, i)))] - value[t])
    return phi


def test_enumerated_fit_is_exact_shapley_of_any_game() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 3, 1])
    z, weights, valid = P.kernel_shap_coalitions(BatchContext.for_batch(3), counts, 64)
    assert valid.sum(1).tolist() == [32, 8, 2]
    y = torch.full(valid.shape, float("nan"), dtype=torch.float64)
    expected = []
    for b, s in enumerate(counts.tolist()):
        game = {t: torch.randn(1, generator=g, dtype=torch.float64).item()
                for k in range(s + 1) for t in itertools.combinations(range(s), k)}
        for r in range(int(valid[b].sum())):
            y[b, r] = game[tuple(torch.nonzero(z[b, r, :s])[:, 0].tolist())]
        expected.append(exact_shapley(game, s))
    phi = P.constrained_shapley_fit(z, y, weights, counts)
    for b, s in enumerate(counts.tolist()):
        torch.testing.assert_close(phi[b, :s], expected[b], atol=1e-10, rtol=1e-10)
        assert (phi[b, s:] == 0).all()


def test_kernel_shap_exact_on_vit_when_enumerating(vit) -> None:
    image = block_images(1, 2, SIZE, seed=3)
    seg_params = slic(4)
    result = attribute("kernel_shap", vit, image, 2, n_samples=64, segmentation=seg_params)
    segments = result.segments
    s = int(segments.max()) + 1
    assert result.cost.forward == 2**s
    subsets = [t for k in range(s + 1) for t in itertools.combinations(range(s), k)]
    z = torch.zeros(1, len(subsets), s, dtype=torch.bool)
    for r, t in enumerate(subsets):
        z[0, r, list(t)] = True
    y = P.evaluate_coalitions(vit, image, segments, z, torch.tensor([2]))
    expected = exact_shapley({t: y[0, r].item() for r, t in enumerate(subsets)}, s)
    torch.testing.assert_close(result.native[0].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_kernel_shap_efficiency(vit, batch, score) -> None:
    targets = torch.tensor([0, 4, 9])
    result = attribute("kernel_shap", vit, batch, targets, n_samples=50, score=score,
                       segmentation=slic(16))
    full = vit.predict(batch).double()
    empty = vit.predict(vit.mean.expand_as(batch)).double()
    if score == "probability":
        full, empty = full.softmax(1), empty.softmax(1)
    delta = (full - empty).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(result.native.double().nansum(1), delta, atol=1e-6, rtol=0)


def test_weighted_ridge_matches_sklearn() -> None:
    linear_model = importlib.import_module("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (60, 7)).astype(np.float64)
    y = rng.normal(size=60)
    w = rng.uniform(0.1, 1.0, 60)
    for alpha in (1.0, 0.3, 0.0):
        ref = linear_model.Ridge(alpha=alpha).fit(x, y, sample_weight=w)
        padded = torch.cat([torch.from_numpy(x), torch.zeros(60, 2, dtype=torch.float64)], 1)
        coef, intercept = P.weighted_ridge(
            padded[None], torch.from_numpy(y)[None], torch.from_numpy(w)[None], alpha
        )
        np.testing.assert_allclose(coef[0, :7].numpy(), ref.coef_, atol=1e-10)
        np.testing.assert_allclose(intercept[0].item(), ref.intercept_, atol=1e-10)
        assert (coef[0, 7:].abs() < 1e-12).all()


def test_lime_regression_matches_lime_package() -> None:
    """Our distances, kernel and ridge reproduce lime 0.2.0.1's ``LimeBase`` fit."""
    lime_base = importlib.import_module("lime.lime_base")
    metrics = importlib.import_module("sklearn.metrics")
    counts = torch.tensor([9])
    z = P.lime_coalitions(BatchContext.for_batch(1), counts, 200)
    y = torch.randn(1, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = z[0].numpy().astype(np.float64)
    distances = metrics.pairwise_distances(data, data[:1], metric="cosine").ravel()
    np.testing.assert_allclose(P.lime_weights(z, counts, 0.25)[0].numpy(),
                               np.sqrt(np.exp(-(distances**2) / 0.25**2)), atol=1e-12)
    base = lime_base.LimeBase(lambda d: np.sqrt(np.exp(-(d**2) / 0.25**2)), random_state=0)
    labels = np.stack([np.zeros(200), y[0].numpy()], 1)
    _, explanation, _, _ = base.explain_instance_with_data(data, labels, distances, 1, 100000)
    reference = np.zeros(9)
    for feature, weight in explanation:
        reference[feature] = weight
    coef, _ = P.weighted_ridge(z.double(), y, P.lime_weights(z, counts, 0.25), 1.0)
    np.testing.assert_allclose(coef[0].numpy(), reference, atol=1e-10)


# ------------------------------------------------------------------------------- segmentation


def test_segmentation_on_unnormalised_image_and_shared(vit, batch, monkeypatch) -> None:
    from skimage import segmentation

    seen: list[np.ndarray] = []
    original = segmentation.quickshift

    def counting(image, **kwargs):
        seen.append(image)
        return original(image, **kwargs)

    monkeypatch.setattr(segmentation, "quickshift", counting)
    other = ViTAdapter(vit.model, (0.0, 0.1, 0.9), (1.0, 0.05, 0.5), (SIZE, SIZE), "other")
    ctx = BatchContext.for_batch(3, planned=["lime", "kernel_shap"])
    lime = attribute("lime", vit, batch, context=ctx, n_samples=8)
    shap = attribute("kernel_shap", vit, batch, context=ctx, n_samples=8)
    assert len(seen) == 3  # once per image for both methods
    shown = batch[1].permute(1, 2, 0).numpy().astype(np.float64)  # images run in threads,
    assert any(np.array_equal(image, shown) for image in seen)  # in no fixed order
    elsewhere = attribute("lime", other, batch, n_samples=8)
    assert len(seen) == 6  # a new context segments again...
    assert torch.equal(lime.segments, shap.segments)
    assert torch.equal(lime.segments, elsewhere.segments)  # ...identically whatever mean/std
    for b in range(3):
        assert torch.equal(torch.unique(lime.segments[b]),
                           torch.arange(int(lime.segments[b].max()) + 1))


@pytest.mark.parametrize("algorithm", ["quickshift", "slic"])
def test_threaded_segmentation_equals_one_by_one(batch, algorithm) -> None:
    params = P.SegmentationParams(algorithm=algorithm)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = P.segment(batch, params)
        torch.set_num_threads(1)
        alone = torch.cat([P.segment(batch[i:i + 1], params) for i in range(len(batch))])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


# ------------------------------------------------------------------------------- engine


def test_engine_chunks_and_perturbed_images(vit, batch, monkeypatch) -> None:
    segments = P.segment(batch, slic(9))
    counts = P.num_segments(segments)
    z = P.lime_coalitions(BatchContext.for_batch(3), counts, 50)
    targets = torch.tensor([1, 2, 3])
    calls: list[torch.Tensor] = []
    original = vit.logits

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.clone())
        return original(images)

    monkeypatch.setattr(vit, "logits", counting)
    y = P.evaluate_coalitions(vit, batch, segments, z, targets, batch_size=16, score="logit")
    assert len(calls) == math.ceil(3 * 50 / 16) and max(len(c) for c in calls) == 16
    flat = torch.cat(calls)
    for b, j in [(0, 0), (0, 7), (1, 20), (2, 49)]:
        keep = z[b, j][segments[b]]
        expected = torch.where(keep, batch[b], vit.mean[0])
        assert torch.equal(flat[b * 50 + j], expected)
        assert y[b, j] == pytest.approx(original(expected[None])[0, targets[b]].item(),
                                        abs=1e-5)
    calls.clear()
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[1, 10:] = False
    y = P.evaluate_coalitions(vit, batch, segments, z, targets, batch_size=16, valid=valid)
    assert len(calls) == math.ceil(110 / 16)
    assert torch.isnan(y[1, 10:]).all() and torch.isfinite(y[valid]).all()
    assert ((y[valid] > 0) & (y[valid] < 1)).all()  # probabilities by default


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("method", "name", "value"), [
    ("lime", "n_samples", 1),
    ("lime", "batch_size", 0),
    ("lime", "kernel_width", 0.0),
    ("lime", "alpha", -1.0),
    ("lime", "score", "logits"),
    ("lime", "baseline", "red"),
    ("lime", "baseline", 1.5),
    ("kernel_shap", "n_samples", 2),
    ("kernel_shap", "batch_size", 0),
    ("kernel_shap", "score", "prob"),
])
def test_invalid_params(method, name, value) -> None:
    with pytest.raises(ValueError, match=name):
        get_method(method).make_params(**{name: value})


def test_invalid_segmentation_params() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        P.SegmentationParams(algorithm="felzenszwalb")
    with pytest.raises(ValueError, match="n_segments"):
        get_method("lime").make_params(segmentation={"algorithm": "slic", "n_segments": 0})
    params = get_method("kernel_shap").make_params(segmentation={"algorithm": "slic"})
    assert params.segmentation == P.SegmentationParams(algorithm="slic")
