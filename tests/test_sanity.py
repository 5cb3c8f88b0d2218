"""Sanity checks (model randomisation, random logit) and complexity scores."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import images_for, tiny_vit

from vitxai.metrics.complexity import entropy, sparseness_gini
from vitxai.metrics.sanity import (
    default_layers,
    map_similarity,
    model_randomisation,
    random_logit,
    randomise_module,
    ssim,
)


def edge_detector(adapter, images, targets):
    """A 'method' that ignores the model: Sobel gradient magnitude of the grey image."""
    grey = images.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=images.dtype)
    gx = F.conv2d(grey, kx.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(grey, kx.T.reshape(1, 1, 3, 3), padding=1)
    return torch.sqrt(gx**2 + gy**2)[:, 0]


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(dtype=torch.float64)


def test_default_layers_from_the_head_down(vit):
    assert default_layers(vit.model) == ["head", "norm", "blocks.2", "blocks.1", "blocks.0",
                                         "patch_embed"]


def test_cascading_randomisation_gradient_low_edge_detector_high(vit):
    x = images_for(vit, 4)
    t = torch.tensor([0, 3, 5, 8])
    state = {k: v.clone() for k, v in vit.model.state_dict().items()}
    rng = torch.get_rng_state()
    ig = model_randomisation(vit, "integrated_gradients", x, t, steps=4, seed=1)
    edges = model_randomisation(vit, edge_detector, x, t, seed=1)
    edges_ssim = model_randomisation(vit, edge_detector, x, t, similarity="ssim", seed=1)
    assert list(ig) == default_layers(vit.model)
    # fully randomised model: the gradient method's maps no longer resemble the original ...
    assert ig["patch_embed"].abs().mean() < 0.3
    assert max(v.abs().mean() for v in ig.values()) < 0.6
    # ... while a model-independent method passes through unchanged
    for scores in (*edges.values(), *edges_ssim.values()):
        assert torch.allclose(scores, torch.ones(4, dtype=torch.float64))
    # the caller's model and the global RNG are untouched
    assert all(torch.equal(v, state[k]) for k, v in vit.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = model_randomisation(vit, "integrated_gradients", x, t, steps=4, seed=1)
    assert all(torch.equal(again[k], ig[k]) for k in ig)


def test_independent_randomises_one_layer_at_a_time(vit):
    x = images_for(vit, 2)
    layers = ["head", "blocks.1", "patch_embed"]
    seen = []

    def record(adapter, images, targets):
        seen.append({k: v.clone() for k, v in adapter.model.state_dict().items()})
        return edge_detector(adapter, images, targets)

    model_randomisation(vit, record, x, 1, mode="independent", layers=layers)
    original, *randomised = seen
    for layer, state in zip(layers, randomised, strict=True):
        changed = {k.rsplit(".", 1)[0] for k in state if not torch.equal(state[k], original[k])}
        assert changed and all(k.startswith(layer + ".") or k == layer for k in changed)
    ind = model_randomisation(vit, "integrated_gradients", x, 1, mode="independent",
                              layers=layers, steps=3)
    cas = model_randomisation(vit, "integrated_gradients", x, 1, layers=layers, steps=3)
    assert torch.equal(ind["head"], cas["head"])  # the first layer is randomised alike


def test_randomise_module_seeded():
    a, b = tiny_vit(), tiny_vit()
    randomise_module(a.model.head, 3)
    randomise_module(b.model.head, 3)
    assert torch.equal(a.model.head.weight, b.model.head.weight)
    randomise_module(b.model.head, 4)
    assert not torch.equal(a.model.head.weight, b.model.head.weight)
    assert a.model.head.weight.abs().max() <= 32**-0.5


def test_random_logit(vit):
    x = images_for(vit, 3)
    t = torch.tensor([2, 2, 9])
    calls = []

    def record(adapter, images, targets):
        calls.append(targets.clone())
        return edge_detector(adapter, images, targets)

    same = random_logit(vit, record, x, t, seed=0)
    assert torch.allclose(same, torch.ones(3, dtype=torch.float64))
    assert torch.equal(calls[0], t) and (calls[1] != t).all()
    assert ((calls[1] >= 0) & (calls[1] < 10)).all()
    ig = random_logit(vit, "integrated_gradients", x, t, seed=0, steps=4)
    assert ((ig >= -1) & (ig < 0.95)).all()


def test_ssim_matches_skimage_and_similarity_edge_cases():
    metrics = importlib.import_module("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 24, 20, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(2, 24, 20, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = [metrics.structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1.0)
           for i in range(2)]
    assert torch.allclose(ssim(a, b), torch.tensor(ref, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    const = torch.ones(1, 16, 16, dtype=torch.float64)
    noise = torch.rand(1, 16, 16, generator=g, dtype=torch.float64)
    assert torch.isnan(map_similarity(const, noise, "spearman")).all()
    assert torch.isnan(map_similarity(const, noise, "pearson_abs")).all()
    assert torch.isfinite(map_similarity(const, noise, "ssim")).all()
    assert torch.allclose(map_similarity(noise, -noise, "spearman"), -torch.ones(1).double())
    assert torch.allclose(map_similarity(noise, -noise, "pearson_abs"), torch.ones(1).double())


def test_gini():
    n = 64
    one_hot = torch.zeros(3, 8, 8)
    one_hot[0, 2, 5] = 1.0
    one_hot[1, 0, 0] = -7.0  # sign ignored
    one_hot[2] = 0.0
    gini = sparseness_gini(one_hot)
    assert torch.allclose(gini[:2], torch.full((2,), (n - 1) / n, dtype=torch.float64))
    assert gini[2] == 0  # all-zero map: defined as 0
    assert torch.allclose(sparseness_gini(torch.full((1, 8, 8), -2.0)), torch.zeros(1).double())
    v = torch.rand(1, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # mean absolute difference form: G = Σ_ij |v_i − v_j| / (2 n Σ v)
    brute = (v[0, :, None] - v[0, None, :]).abs().sum() / (2 * 30 * v.sum())
    assert torch.allclose(sparseness_gini(v), brute.view(1))


def test_entropy():
    stats = importlib.import_module("scipy.stats")
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = -3.0
    maps[1] = 0.5
    h = entropy(maps)
    assert h[0] == 0
    assert torch.allclose(h[1:], torch.full((2,), math.log(16), dtype=torch.float64))
    v = torch.randn(1, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert math.isclose(entropy(v).item(), stats.entropy(v.abs()[0].numpy()), rel_tol=1e-12)
