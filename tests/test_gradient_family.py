"""Saliency, Input×Gradient, SmoothGrad and IG-U against their definitions and captum."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import images_for, tiny_vit
from torch import nn

from vitxai.methods import BatchContext, attribute, get_method
from vitxai.methods.base import make_baseline
from vitxai.methods.gradient import IG_BASELINE
from vitxai.models.adapter import ModelAdapter

SIZE = 8
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
# captum warns that it switched requires_grad on for our plain input tensors
CAPTUM_GRAD_WARNING = "ignore:Input Tensor 0 did not already require gradients"


@pytest.fixture(scope="module")
def vit64():
    return tiny_vit(dtype=torch.float64)


@pytest.fixture(scope="module")
def linear() -> ModelAdapter:
    """float64 logits linear in the pixels: gradients are the (scaled) weights everywhere."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4)).double()
    return ModelAdapter(model, MEAN, STD, (SIZE, SIZE), "linear")


def test_registered_with_aliases() -> None:
    for alias, name in [("Saliency", "saliency"), ("IxG", "input_x_gradient"),
                        ("InputXGradient", "input_x_gradient"), ("SmoothGrad", "smoothgrad"),
                        ("IG-U", "integrated_gradients_uniform")]:
        spec = get_method(alias)
        assert spec.name == name and spec.family == "gradient" and not spec.vit_only
        assert spec.paper and spec.summary


@pytest.mark.parametrize(("method", "kw", "passes"), [
    ("saliency", {}, 1),
    ("input_x_gradient", {}, 1),
    ("smoothgrad", {"n_samples": 3}, 3),
    ("smoothgrad", {"base": "ig", "n_samples": 2, "steps": 5}, 10),
    ("integrated_gradients_uniform", {"steps": 7}, 7),
])
def test_shapes_and_cost(vit64, method, kw, passes) -> None:
    x = images_for(vit64, 2)
    r = attribute(method, vit64, x, [1, 2], **kw)
    assert r.maps.shape == (2, 32, 32) and r.channels.shape == (2, 3, 32, 32)
    assert r.native_kind == "pixel" and r.maps.dtype == torch.float64
    torch.testing.assert_close(r.channels.sum(1), r.maps, atol=1e-12, rtol=0)
    assert (r.cost.forward, r.cost.backward) == (passes, passes)


@pytest.mark.parametrize(("method", "kw"), [
    ("saliency", {"batch_size": 2}),
    ("input_x_gradient", {"batch_size": 2}),
    ("input_x_gradient", {"space": "pixel"}),
    ("smoothgrad", {"n_samples": 3, "batch_size": 4}),
    ("smoothgrad", {"base": "ig", "n_samples": 2, "steps": 4, "transform": "squared",
                    "baseline": "uniform_normalized", "batch_size": 3}),
    ("integrated_gradients_uniform", {"steps": 6, "batch_size": 5}),
])
def test_batch_equals_per_image(vit64, method, kw) -> None:
    x = images_for(vit64, 3)
    t = torch.tensor([0, 4, 8])
    ids = ["a", "b", "c"]
    batch = attribute(method, vit64, x, t, context=BatchContext.for_batch(3, 7, ids), **kw)
    single = torch.cat([
        attribute(method, vit64, x[i:i + 1], t[i:i + 1],
                  context=BatchContext.for_batch(1, 7, ids[i:i + 1]), **kw).channels
        for i in range(3)
    ])
    torch.testing.assert_close(batch.channels, single, atol=1e-8, rtol=0)


@pytest.mark.parametrize(("method", "kw"), [
    ("smoothgrad", {"n_samples": 2}),
    ("smoothgrad", {"base": "ig", "n_samples": 2, "steps": 3}),
    ("integrated_gradients_uniform", {"steps": 4}),
])
def test_random_methods_seeded(vit64, method, kw) -> None:
    x = images_for(vit64, 1)
    a, b, c = (attribute(method, vit64, x, 1, seed=s, **kw).maps for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.filterwarnings(CAPTUM_GRAD_WARNING)
def test_saliency_is_absolute_gradient(vit64) -> None:
    captum = importlib.import_module("captum.attr")
    x = images_for(vit64, 2)
    t = torch.tensor([3, 5])
    r = attribute("saliency", vit64, x, t)
    assert (r.channels >= 0).all() and (r.maps >= 0).all()
    ref = captum.Saliency(vit64.logits).attribute(x, target=t, abs=True)
    torch.testing.assert_close(r.channels, ref, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings(CAPTUM_GRAD_WARNING)
def test_ixg_normalized_equals_captum_and_differs_from_pixel(vit64) -> None:
    captum = importlib.import_module("captum.attr")
    x = images_for(vit64, 2)
    t = torch.tensor([1, 7])
    ours = attribute("IxG", vit64, x, t)
    ref = captum.InputXGradient(vit64.model).attribute(vit64.normalize(x), target=t)
    torch.testing.assert_close(ours.channels, ref, atol=1e-10, rtol=0)
    # pixel space is x ⊙ ∂y/∂x on [0, 1] pixels: not invariant to the normalisation
    pixel = attribute("IxG", vit64, x, t, space="pixel")
    ref_pixel = captum.InputXGradient(vit64.logits).attribute(x, target=t)
    torch.testing.assert_close(pixel.channels, ref_pixel, atol=1e-10, rtol=0)
    assert not torch.allclose(pixel.channels, ours.channels, atol=1e-6)


@pytest.mark.parametrize(("kw", "base", "base_kw"), [
    ({"input_space": "normalized"}, "input_x_gradient", {"input_space": "normalized"}),
    ({"input_space": "pixel"}, "input_x_gradient", {"input_space": "pixel"}),
    ({"base": "ig", "steps": 6}, "integrated_gradients", {"steps": 6}),
    ({"base": "ig", "steps": 6, "baseline": "uniform_normalized"}, "integrated_gradients",
     {"steps": 6, "baseline": "uniform_normalized"}),
])
def test_smoothgrad_without_noise_is_its_base(vit64, kw, base, base_kw) -> None:
    x = images_for(vit64, 2)
    t = torch.tensor([2, 9])
    sg = attribute("smoothgrad", vit64, x, t, seed=5, sigma=0.0, n_samples=3, **kw)
    ref = attribute(base, vit64, x, t, seed=5, **base_kw)
    torch.testing.assert_close(sg.channels, ref.channels, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("transform", ["squared", "abs"])
def test_smoothgrad_transforms_non_negative(vit64, transform) -> None:
    x = images_for(vit64, 2)
    r = attribute("smoothgrad", vit64, x, [0, 1], n_samples=3, transform=transform)
    assert (r.channels >= 0).all() and (r.maps >= 0).all() and r.maps.sum() > 0


@pytest.mark.parametrize(("space", "transform", "sigma"), [
    ("normalized", "none", None), ("pixel", "squared", None), ("normalized", "none", 0.1)])
def test_smoothgrad_noise_is_absolute_in_pixel_units(linear, space, transform, sigma) -> None:
    """σ is absolute, in pixel units; the default is one normalised unit, std_c per channel
    (docs/methods.md §11)."""
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    t, n = torch.tensor([1, 3]), 5
    ctx = BatchContext.for_batch(2, seed=11)
    r = attribute("smoothgrad", linear, x, t, context=ctx, n_samples=n, sigma=sigma,
                  input_space=space, transform=transform)
    weight = linear.model[1].weight.view(-1, 3, SIZE, SIZE)
    grad = weight[t] / linear.std  # ∂y/∂x in pixels, the same at every point
    scale = linear.std[0] if sigma is None else sigma
    expected = []
    for i in range(2):
        eps = torch.randn(n, 3, SIZE, SIZE, generator=ctx.generator(i, "smoothgrad"),
                          dtype=torch.float64)
        noisy = x[i] + scale * eps
        a = (noisy - linear.mean[0] if space == "normalized" else noisy) * grad[i]
        expected.append((a**2 if transform == "squared" else a).mean(0))
    torch.testing.assert_close(r.channels, torch.stack(expected), atol=1e-12, rtol=1e-12)


def test_deprecated_names_give_the_same_maps_with_a_warning(linear) -> None:
    """Old names (docs/conventions.md) work for one release: same results, a FutureWarning."""
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    cases = [
        # stdev 1.0 is one normalised unit: the default sigma (std_c per channel)
        ("smoothgrad", {"stdev": 1.0, "space": "pixel", "internal_batch_size": 3},
         {"input_space": "pixel", "batch_size": 3}),
        ("integrated_gradients", {"method": "riemann_left", "internal_batch_size": 4},
         {"quadrature": "riemann_left", "batch_size": 4}),
        ("gradient_shap", {"stdevs": 0.1, "baselines": ("black",), "n_samples": 3},
         {"sigma": 0.1, "baseline": ("black",), "n_samples": 3}),
        ("input_x_gradient", {"space": "pixel"}, {"input_space": "pixel"}),
    ]
    for method, old, new in cases:
        with pytest.warns(FutureWarning, match="deprecated"):
            before = attribute(method, linear, x, [1, 3], seed=4, **old)
        after = attribute(method, linear, x, [1, 3], seed=4, **new)
        torch.testing.assert_close(before.maps, after.maps, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        get_method("gradient_shap").make_params(stdevs=0.1, sigma=0.2)


def test_ig_uniform_completeness_and_baseline(vit64) -> None:
    x = images_for(vit64, 2)
    t = torch.tensor([3, 6])
    ctx = BatchContext.for_batch(2, seed=2)
    r = attribute("IG-U", vit64, x, t, context=ctx, steps=256)
    base = make_baseline(vit64, x, "uniform_normalized", ctx, IG_BASELINE)
    normalised = vit64.normalize(base)
    assert normalised.min() >= -1 and normalised.max() <= 1 and normalised.std() > 0.5
    with torch.no_grad():
        delta = (vit64.logits(x) - vit64.logits(base)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(r.maps.sum((1, 2)), delta, rtol=0.01, atol=0)
    same = attribute("integrated_gradients", vit64, x, t, context=ctx, steps=256,
                     baseline="uniform_normalized")
    torch.testing.assert_close(r.channels, same.channels, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("method", "name", "value"), [
    ("saliency", "batch_size", 0),
    ("input_x_gradient", "input_space", "normalised"),
    ("input_x_gradient", "batch_size", 0),
    ("smoothgrad", "base", "gradient_shap"),
    ("smoothgrad", "n_samples", 0),
    ("smoothgrad", "sigma", -0.1),
    ("smoothgrad", "transform", "relu"),
    ("smoothgrad", "input_space", "rgb"),
    ("smoothgrad", "steps", 0),
    ("smoothgrad", "baseline", "grey"),
    ("integrated_gradients_uniform", "steps", 0),
    ("integrated_gradients_uniform", "quadrature", "simpson"),
    ("integrated_gradients", "baseline", "zeros"),
    ("gradient_shap", "baseline", ("mean", "noise")),
])
def test_invalid_params(method, name, value) -> None:
    with pytest.raises(ValueError, match=f"parameter {name}=") as info:
        get_method(method).make_params(**{name: value})
    assert "\n" not in str(info.value)
