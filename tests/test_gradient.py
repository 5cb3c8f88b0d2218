"""Integrated Gradients and GradientSHAP against their definitions and captum."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import images_for

from vitxai.methods import BatchContext, attribute


def test_ig_completeness_within_one_percent(vit64):
    x = images_for(vit64, 2)
    t = torch.tensor([3, 6])
    r = attribute("integrated_gradients", vit64, x, t, steps=256, baseline="black")
    with torch.no_grad():
        delta = (vit64.logits(x) - vit64.logits(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    total = r.maps.sum((1, 2)).double()
    assert torch.allclose(total, delta, rtol=0.01)
    assert torch.allclose(r.channels.sum(1), r.maps, atol=1e-10)


def test_ig_equals_captum_on_normalised_input(vit64):
    captum = importlib.import_module("captum.attr")
    x = images_for(vit64, 2)
    t = torch.tensor([1, 2])
    ours = attribute("integrated_gradients", vit64, x, t, steps=20, baseline="mean")
    # captum on the normalised input with its default zero baseline: the same path, and
    # (x − x′)·∂y/∂x is invariant under the per-channel affine normalisation
    ig = captum.IntegratedGradients(vit64.model)
    ref = ig.attribute(vit64.normalize(x), target=t, n_steps=20).sum(1)
    assert torch.allclose(ours.maps.double(), ref, atol=1e-8)


@pytest.mark.parametrize("method,kw", [
    ("integrated_gradients", {"steps": 8, "baseline": "uniform", "batch_size": 5}),
    ("gradient_shap", {"n_samples": 6, "sigma": 0.1, "batch_size": 4}),
])
def test_batch_equals_per_image(vit64, method, kw):
    x = images_for(vit64, 3)
    t = torch.tensor([0, 4, 8])
    ids = ["a", "b", "c"]
    batch = attribute(method, vit64, x, t, context=BatchContext.for_batch(3, 7, ids), **kw)
    single = torch.cat([
        attribute(method, vit64, x[i:i + 1], t[i:i + 1],
                  context=BatchContext.for_batch(1, 7, ids[i:i + 1]), **kw).maps
        for i in range(3)
    ])
    assert torch.allclose(batch.maps, single, atol=1e-10)


def test_gradient_shap_seeded(vit64):
    x = images_for(vit64, 1)
    kw = {"n_samples": 5, "sigma": 0.2}
    a = attribute("gradient_shap", vit64, x, 1, seed=3, **kw).maps
    b = attribute("gradient_shap", vit64, x, 1, seed=3, **kw).maps
    c = attribute("gradient_shap", vit64, x, 1, seed=4, **kw).maps
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_gradient_shap_on_linear_model_is_exact_shap():
    # f(x) = w·x: gradients are constant, so E[(x − x′)·w] = (x − E x′)·w for any α, noise 0
    from vitxai.models.adapter import ModelAdapter

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    adapter = ModelAdapter(lin.double(), (0.0,) * 3, (1.0,) * 3, (4, 4), "linear")
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    r = attribute("gradient_shap", adapter, x, 1, n_samples=4, baseline=("black",))
    w = lin[1].weight[1].view(3, 4, 4)
    assert torch.allclose(r.channels[0], x[0] * w, atol=1e-10)


def test_parameter_errors(vit):
    x = images_for(vit, 1)
    with pytest.raises(ValueError, match="steps"):
        attribute("integrated_gradients", vit, x, 0, steps=0)
    with pytest.raises(ValueError, match="n_samples"):
        attribute("gradient_shap", vit, x, 0, n_samples=-1)
    with pytest.raises(ValueError, match="no parameter bogus"):
        attribute("gradient_shap", vit, x, 0, bogus=1)
    with pytest.raises(ValueError, match="unknown method 'nope'; valid methods: .*chefer2021a"):
        attribute("nope", vit, x, 0)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_path_kernel_equals_per_point_formula(vit64, chunk):
    """The streamed kernel (points built per chunk, folded into per-image sums) equals
    Σ_k w_k (e_k − s_k) ⊙ ∇y(s_k + α_k (e_k − s_k)) written out point by point."""
    from vitxai.methods.gradient import gradients_at, path_gradient_sum

    x = images_for(vit64, 2)  # float64 model and images
    t = torch.tensor([2, 7])
    g = torch.Generator().manual_seed(0)
    bases = torch.rand(2, 3, *x.shape[1:], generator=g, dtype=x.dtype)  # 3 baselines
    choice = torch.randint(3, (2, 6), generator=g)
    ends = x[:, None] + 0.1 * torch.randn(2, 6, *x.shape[1:], generator=g, dtype=x.dtype)
    alphas = torch.rand(2, 6, generator=g, dtype=x.dtype)
    weights = torch.rand(2, 6, generator=g, dtype=x.dtype)
    starts = torch.stack([bases[i, choice[i]] for i in range(2)])
    points = starts + alphas[..., None, None, None] * (ends - starts)
    grads = gradients_at(vit64, t, points, 64)
    w = weights[..., None, None, None]
    expected = (w * (ends - starts) * grads).sum(1)
    got = path_gradient_sum(vit64, t, bases, ends, alphas, weights, chunk,
                            times_difference=True, start_index=choice)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # shared endpoints (IG's layout): Σ_k w_k ∇y, e − s taken once per image
    shared = path_gradient_sum(vit64, t, bases[:, :1], x[:, None], alphas, weights, chunk)
    line = bases[:, :1] + alphas[..., None, None, None] * (x[:, None] - bases[:, :1])
    torch.testing.assert_close(shared, (w * gradients_at(vit64, t, line, 64)).sum(1),
                               rtol=1e-10, atol=1e-12)
