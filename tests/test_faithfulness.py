"""Deletion/insertion curves and IDSDS single and incremental deletion on known answers."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import images_for, tiny_vit
from torch import nn

from vitxai.metrics.faithfulness import (
    auc,
    baseline_images,
    grid_cell_sums,
    incremental_deletion,
    perturbation_curve,
    single_deletion,
    spearman,
)
from vitxai.models import ModelAdapter

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class WeightedSum(nn.Module):
    """Logit 0 = Σ w ⊙ x_normalised, logit 1 = 0: deleting a pixel (to the mean colour, i.e.
    normalised zero) removes exactly its term, so the term is the perfect attribution."""

    num_classes = 2

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x * self.w).flatten(1).sum(1)
        return torch.stack([y, torch.zeros_like(y)], 1)


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    adapter = ModelAdapter(WeightedSum(w), MEAN, STD, (8, 8), "weighted_sum")
    x = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    perfect = (w * adapter.normalize(x)).sum(1)  # (1, 8, 8): each pixel's term
    return adapter, x, perfect


def _ranked(adapter, x, maps, **kw):
    curves, fr = perturbation_curve(adapter, x.expand(maps.shape[0], -1, -1, -1), maps, 0,
                                    output="logit", steps=16, **kw)
    return curves, auc(curves, fr)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_perfect_map_is_best_inverted_worst_random_in_the_middle(linear, mode):
    adapter, x, perfect = linear
    g = torch.Generator().manual_seed(1)
    randoms = torch.randn(40, 8, 8, generator=g, dtype=torch.float64)
    maps = torch.cat([perfect, -perfect, randoms])
    curves, area = _ranked(adapter, x, maps, mode=mode)
    best, worst, rand = area[0], area[1], area[2:]
    if mode == "deletion":  # removing the largest terms first drops the logit fastest
        assert (curves[0] <= curves[2:] + 1e-12).all() and (curves[1] >= curves[2:] - 1e-12).all()
        assert best < rand.min() and worst > rand.max()
    else:  # inserting the largest terms first raises it fastest
        assert (curves[0] >= curves[2:] - 1e-12).all() and (curves[1] <= curves[2:] + 1e-12).all()
        assert best > rand.max() and worst < rand.min()
    # a random order removes the terms at the average rate: its expected area is the midpoint
    middle = (best + worst) / 2
    assert abs(rand.mean() - middle) < 0.15 * abs(best - worst)


def test_linear_model_curve_values(linear):
    adapter, x, perfect = linear
    curves, fr = perturbation_curve(adapter, x, perfect, 0, score="logit", steps=64)
    top = perfect.flatten().sort(descending=True).values
    expected = perfect.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), top.cumsum(0)])
    assert torch.allclose(curves[0], expected, atol=1e-12)
    assert torch.equal(fr, torch.arange(65, dtype=torch.float64) / 64)


@pytest.mark.parametrize("baseline", ["mean", "blur", "image_mean", "uniform_normalized"])
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("space", ["pixel", "token"])
def test_curve_endpoints_exact(vit64, baseline, mode, space):
    x = images_for(vit64, 3)
    t = torch.tensor([1, 5, 7])
    maps = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    seen = []
    forward = vit64.logits
    vit64.logits = lambda images: seen.append(images.clone()) or forward(images)
    curves, fr = perturbation_curve(vit64, x, maps, t, mode=mode, space=space, steps=5,
                                    baseline=baseline, batch_size=7, seed=3)
    del vit64.logits
    base = baseline_images(vit64, x, baseline, seed=3)
    first, last = (x, base) if mode == "deletion" else (base, x)
    # the endpoint images are bit-identical to the original and the baseline images ...
    evaluated = torch.cat(seen).view(3, 6, 3, 32, 32)
    assert torch.equal(evaluated[:, 0], first) and torch.equal(evaluated[:, -1], last)
    # ... so the endpoints are the model's outputs on them (up to the last bits a matrix
    # product may change with the composition of the batch)
    for col, img in ((0, first), (-1, last)):
        out = vit64.predict(img).softmax(1)[torch.arange(3), t]
        assert torch.allclose(curves[:, col], out, rtol=0, atol=1e-14)
    assert curves.shape == (3, 6) and fr[0] == 0 and fr[-1] == 1
    assert ((curves >= 0) & (curves <= 1)).all()
    assert ((auc(curves, fr) >= 0) & (auc(curves, fr) <= 1)).all()


def test_ties_break_by_index_and_patch_units(vit64):
    x = images_for(vit64, 2)
    const = torch.zeros(2, 32, 32, dtype=torch.float64)
    index = torch.arange(1024, dtype=torch.float64).view(1, 32, 32).expand(2, -1, -1)
    kw = {"steps": 8, "batch_size": 32}
    # MoRF on a constant map = highest of −index first = lowest index first; LeRF likewise
    assert torch.equal(perturbation_curve(vit64, x, const, 3, **kw)[0],
                       perturbation_curve(vit64, x, -index, 3, **kw)[0])
    assert torch.equal(perturbation_curve(vit64, x, const, 3, order="lerf", **kw)[0],
                       perturbation_curve(vit64, x, index, 3, order="lerf", **kw)[0])
    # patch units = 8-px cells; a patch-constant map ranks pixels patch by patch
    patch_scores = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    patchwise = patch_scores.repeat_interleave(8, 1).repeat_interleave(8, 2)
    by_patch = perturbation_curve(vit64, x, patchwise, 3, space="token", steps=16)[0]
    assert torch.equal(by_patch, perturbation_curve(vit64, x, patchwise, 3, space=8, steps=16)[0])
    by_pixel = perturbation_curve(vit64, x, patchwise, 3, space="pixel", steps=16)[0]
    assert torch.allclose(by_patch, by_pixel, rtol=0, atol=1e-12)


def test_baselines_defined_in_pixel_space(vit64):
    x = images_for(vit64, 2)
    assert torch.equal(baseline_images(vit64, x, "mean"), vit64.mean.expand_as(x))
    assert torch.allclose(baseline_images(vit64, x, "image_mean"),
                          x.mean((2, 3), keepdim=True).expand_as(x))
    u = baseline_images(vit64, x, "uniform_normalized", seed=4)
    z = vit64.normalize(u)
    assert z.min() >= -1 and z.max() <= 1 and z.min() < -0.9 and z.max() > 0.9
    assert torch.equal(u, baseline_images(vit64, x, "uniform_normalized", seed=4))
    assert not torch.equal(u[0], u[1])
    flat = torch.full_like(x, 0.3)
    assert torch.allclose(baseline_images(vit64, flat, "blur"), flat)  # blur keeps constants
    assert baseline_images(vit64, x, "blur").std() < x.std() / 3


def test_random_baselines_follow_the_image_not_its_batch_position(vit64):
    """Seeded by image id, as methods are: image 7's baseline is the same in any batch."""
    x = images_for(vit64, 2)
    pair = baseline_images(vit64, x, "uniform_normalized", seed=1, image_ids=[7, 9])
    alone = baseline_images(vit64, x[1:], "uniform_normalized", seed=1, image_ids=[9])
    assert torch.equal(pair[1], alone[0])
    swapped = baseline_images(vit64, x.flip(0), "uniform_normalized", seed=1, image_ids=[9, 7])
    assert torch.equal(swapped[0], pair[1]) and torch.equal(swapped[1], pair[0])


def test_deprecated_metric_names_warn_and_agree(vit64):
    x = images_for(vit64, 2)
    maps = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.warns(FutureWarning, match="'zero' is deprecated"):
        assert torch.equal(baseline_images(vit64, x, "zero"), baseline_images(vit64, x, "mean"))
    with pytest.warns(FutureWarning, match="'uniform' is deprecated"):
        old = baseline_images(vit64, x, "uniform", seed=2)
    assert torch.equal(old, baseline_images(vit64, x, "uniform_normalized", seed=2))
    with pytest.warns(FutureWarning, match="unit= is deprecated"):
        before = perturbation_curve(vit64, x, maps, [1, 2], unit="patch", output="logit")
    after = perturbation_curve(vit64, x, maps, [1, 2], space="token", score="logit")
    assert torch.equal(before[0], after[0])


def test_spearman_matches_scipy_with_ties():
    stats = importlib.import_module("scipy.stats")
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 5, (20, 16), generator=g).double()  # many ties
    b = torch.randn(20, 16, generator=g, dtype=torch.float64).round(decimals=0)
    ours = spearman(a, b)
    ref = torch.tensor([stats.spearmanr(a[i], b[i]).statistic for i in range(20)],
                       dtype=torch.float64)
    assert torch.allclose(ours, ref, atol=1e-12, equal_nan=True)
    constant = spearman(torch.ones(1, 16), torch.randn(1, 16))
    assert torch.isnan(constant).all()


def _cell_drops(adapter, x, t, grid=4):
    """Reference d_k by explicit loops: logit(x) − logit(x with cell k at the mean colour)."""
    h = x.shape[-1] // grid
    y0 = adapter.predict(x)[torch.arange(len(x)), t]
    drops = torch.zeros(len(x), grid * grid, dtype=torch.float64)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        xk = x.clone()
        xk[:, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = adapter.mean
        drops[:, k] = y0 - adapter.predict(xk)[torch.arange(len(x)), t]
    return drops


def test_single_deletion_oracle_negation_constant(vit64):
    x = images_for(vit64, 3)
    t = torch.tensor([2, 4, 9])
    drops = _cell_drops(vit64, x, t)
    # spread each drop over its 8×8 cell: the map's cell sums are the drops
    oracle = (drops.view(3, 4, 4) / 64).repeat_interleave(8, 1).repeat_interleave(8, 2)
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.allclose(single_deletion(vit64, x, oracle, t), ones)
    assert torch.allclose(single_deletion(vit64, x, -oracle, t), -ones)
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    constant = noise.clone()
    constant[1] = 0.25
    rho = single_deletion(vit64, x, constant, t)
    assert torch.isnan(rho[1]) and not torch.isnan(rho[[0, 2]]).any()
    assert torch.allclose(rho[[0, 2]], spearman(grid_cell_sums(noise, (8, 8)), drops)[[0, 2]])


def test_single_deletion_abs_after_channel_sum_and_56px_cells():
    adapter = tiny_vit(img_size=224, patch_size=56, depth=1, dtype=torch.float64)
    x = images_for(adapter, 1)
    drops = _cell_drops(adapter, x, torch.tensor([3]))
    cell_map = (drops.view(1, 4, 4) / 56**2).repeat_interleave(56, 1).repeat_interleave(56, 2)
    # three channels that sum to the oracle but whose magnitudes do not
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 224, 224, generator=g, dtype=torch.float64)
    channels = torch.stack([cell_map + noise, -noise, torch.zeros_like(noise)], 1)
    assert torch.allclose(single_deletion(adapter, x, channels, 3), torch.ones(1).double())
    expected = spearman(drops.abs(), drops)
    assert torch.allclose(single_deletion(adapter, x, channels, 3, transform="abs"), expected)
    assert not torch.allclose(expected, spearman(grid_cell_sums(channels.abs().sum(1), (56, 56)),
                                                 drops))
    one = torch.zeros(1, 224, 224)
    one[0, 56, 112] = 1.0  # row 56 starts the second cell row, column 112 the third column
    assert grid_cell_sums(one, (56, 56)).argmax().item() == 4 + 2


def test_incremental_deletion_mean_softmax_over_32_steps(linear):
    adapter, x, perfect = linear
    score = incremental_deletion(adapter, x, perfect, 0, order="descending")
    ranking = torch.argsort(-perfect.flatten(), stable=True)
    probs = []
    for s in range(32):
        k = s * 64 // 32
        xs = x.clone().view(1, 3, 64)
        xs[:, :, ranking[:k]] = adapter.mean.view(1, 3, 1)
        probs.append(adapter.predict(xs.view(1, 3, 8, 8)).softmax(1)[0, 0])
    assert torch.allclose(score, torch.stack(probs).mean().view(1), atol=1e-12)
    assert score < incremental_deletion(adapter, x, perfect, 0, order="ascending")


def test_incremental_deletion_ties_deterministic(vit64):
    x = images_for(vit64, 2)
    const = torch.full((2, 32, 32), 0.5, dtype=torch.float64)
    index = torch.arange(1024, dtype=torch.float64).view(1, 32, 32).expand(2, -1, -1)
    kw = {"steps": 8}
    assert torch.equal(incremental_deletion(vit64, x, const, 1, **kw),
                       incremental_deletion(vit64, x, index, 1, **kw))
    assert torch.equal(incremental_deletion(vit64, x, const, 1, order="descending", **kw),
                       incremental_deletion(vit64, x, -index, 1, order="descending", **kw))


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_incremental_deletion_reattribution_only_grows(vit64, order):
    x = images_for(vit64, 2)
    maps = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = []
    g = torch.Generator().manual_seed(4)

    def reattribute(now: torch.Tensor) -> torch.Tensor:
        seen.append(now)
        return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)  # a new order

    steps = 8
    score = incremental_deletion(vit64, x, maps, 1, steps=steps, order=order,
                                 reattribute=reattribute)
    assert len(seen) == steps - 2 and ((score >= 0) & (score <= 1)).all()
    deleted = [(img == vit64.mean).all(1) for img in seen]  # (2, 32, 32) per step 1…steps−2
    for s, (before, after) in enumerate(zip(deleted, deleted[1:], strict=False), start=1):
        assert (before <= after).all()  # nothing deleted comes back
        assert (after.flatten(1).sum(1) == (s + 1) * 1024 // steps).all()
    # re-attributing with the same map keeps the ranking: the score without (batched over
    # the steps, hence the last-bit tolerance)
    fixed = incremental_deletion(vit64, x, maps, 1, steps=steps, order=order)
    same = incremental_deletion(vit64, x, maps, 1, steps=steps, order=order,
                                reattribute=lambda now: maps)
    assert torch.allclose(fixed, same, rtol=0, atol=1e-14)
