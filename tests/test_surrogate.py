"""KernelSHAP and LIME regression-adjusted by a logistic surrogate (``surrogate="logistic"``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from conftest import MEAN, STD, block_images, tiny_vit
from torch import nn

import vitxai.methods.perturbation as P
from vitxai.methods.base import BatchContext, attribute, get_method, params_record
from vitxai.methods.perturbation.kernel_shap import adjusted_shapley_fit
from vitxai.methods.perturbation.lime import adjusted_ridge
from vitxai.methods.perturbation.surrogate import (
    LogisticSurrogate,
    fit_logistic,
    fit_to_kernel_shap_samples,
)
from vitxai.models.adapter import ModelAdapter

Game = Callable[[torch.Tensor], torch.Tensor]


def exact_shapley(value: Game, s: int) -> torch.Tensor:
    """Shapley values by enumerating every permutation's marginal contributions (small S)."""
    phi = torch.zeros(s, dtype=torch.float64)
    orders = list(itertools.permutations(range(s)))
    for order in orders:
        z = torch.zeros(s + 1, s, dtype=torch.bool)
        for j, player in enumerate(order):
            z[j + 1:, player] = True
        v = value(z)
        phi[list(order)] += v.diff()
    return phi / len(orders)


def saturating_game(s: int, interaction: float, seed: int = 0) -> Game:
    """v(z) = σ(a + b·z + interaction·Σ c_ijk z_i z_j z_k / S): a probability that saturates,
    logistic exactly when ``interaction`` is 0."""
    g = torch.Generator().manual_seed(seed)
    b = 1.5 * torch.randn(s, generator=g, dtype=torch.float64)
    a = -0.5 * float(b.sum())
    c = torch.randn(s, s, s, generator=g, dtype=torch.float64) / s

    def value(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        cubic = torch.einsum("...i,...j,...k,ijk->...", z, z, z, c)
        return torch.sigmoid(a + z @ b + interaction * cubic)
    return value


def sampled_estimate(value: Game, s: int, n: int, seed: int, surrogate: str | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ, its standard errors) of paired leverage KernelSHAP on one image."""
    counts = torch.tensor([s])
    ctx = BatchContext.for_batch(1, seed)
    z, w, _ = P.kernel_shap_coalitions(ctx, counts, n, True, "leverage")
    y = value(z)
    fit = adjusted_shapley_fit(z, y, w, counts, surrogate, torch.tensor([False]),
                               [ctx.generator(0, "surrogate")], torch.ones(1, s))
    se = P.kernel_shap_standard_error(z, fit.game, w, counts, fit.game_phi, True,
                                      surrogate_parameters=fit.surrogate_parameters)
    return fit.phi, se


def test_fit_logistic_recovers_a_logistic_game() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.rand(400, 9, generator=g) < 0.5
    a, b = torch.tensor(-1.0, dtype=torch.float64), torch.randn(9, generator=g,
                                                                dtype=torch.float64)
    y = torch.sigmoid(a + z.double() @ b)
    fit = fit_logistic(z, y, torch.rand(400, generator=g, dtype=torch.float64), ridge=0.0,
                       interacting=0)
    torch.testing.assert_close(fit.a, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(fit.b, b, atol=1e-6, rtol=0)
    assert len(fit.c) == 0 and 9.9 < fit.parameters < 10.0 + 1e-6  # a and b, unpenalised
    shrunk = fit_logistic(z, y, torch.ones(400, dtype=torch.float64), ridge=1e-2,
                          interacting=0)
    assert shrunk.b.norm() < 0.9 * b.norm()  # the ridge pulls b towards 0
    assert shrunk.parameters < 9.0  # and takes effective parameters away


def test_fit_logistic_finds_the_interactions_of_the_strongest_features() -> None:
    """A game with one pairwise interaction between two strong features: the additive fit
    picks them among the ``interacting``, the second fit recovers c, and the surrogate's
    values match the game's."""
    g = torch.Generator().manual_seed(5)
    z = torch.rand(600, 10, generator=g) < 0.5
    b = torch.tensor([0.2, 3.0, -0.1, 0.3, 2.5, 0.1, -0.2, 0.15, 0.05, -0.3],
                     dtype=torch.float64)
    zz = z.double()
    y = torch.sigmoid(-2.0 + zz @ b - 4.0 * zz[:, 1] * zz[:, 4])
    fit = fit_logistic(z, y, torch.ones(600, dtype=torch.float64), ridge=0.0, interacting=3,
                       interaction_ridge=0.0)
    pairs = fit.pairs.tolist()  # of the 3 largest |b_j| of the additive fit
    assert len(pairs) == 3 and [1, 4] in pairs
    expected = torch.tensor([-4.0 if p == [1, 4] else 0.0 for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(fit.c, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(fit.b, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(fit(z), y, atol=1e-6, rtol=0)
    assert fit.parameters == pytest.approx(14.0, abs=1e-3)  # 1 + 10 + 3, unpenalised
    # with the default penalty the interacting surrogate fits better than the additive one
    plain = fit_logistic(z, y, torch.ones(600, dtype=torch.float64), interacting=0)
    pairs = fit_logistic(z, y, torch.ones(600, dtype=torch.float64))
    assert (pairs(z) - y).abs().mean() < 0.2 * (plain(z) - y).abs().mean()


def test_area_prior_is_a_ridge_on_area_scaled_features() -> None:
    """Penalising b_j by λ(ā/a_j)² is the plain ridge on features scaled by a_j/ā (b_j = c_j
    β_j): the two fits agree, equal areas change nothing, and a small feature is shrunk more
    than a large one with the same effect."""
    g = torch.Generator().manual_seed(2)
    z = torch.rand(300, 6, generator=g) < 0.5
    y = torch.sigmoid(-0.5 + z.double() @ torch.tensor([2.0, 2.0, -1.0, 0.5, 1.0, 0.0],
                                                        dtype=torch.float64))
    y = y + 0.02 * torch.randn(300, generator=g, dtype=torch.float64)
    w = torch.rand(300, generator=g, dtype=torch.float64)
    areas = torch.tensor([10.0, 1.0, 3.0, 5.0, 2.0, 4.0], dtype=torch.float64)
    scale = areas / areas.mean()
    fit = fit_logistic(z, y, w, ridge=1e-2, areas=areas, interacting=0)
    scaled = fit_logistic(z.double() * scale, y, w, ridge=1e-2, interacting=0)
    torch.testing.assert_close(fit.a, scaled.a, atol=1e-6, rtol=0)
    torch.testing.assert_close(fit.b, scale * scaled.b, atol=1e-6, rtol=0)
    equal = fit_logistic(z, y, w, ridge=1e-2, areas=torch.full((6,), 7.0))
    torch.testing.assert_close(equal.b, fit_logistic(z, y, w, ridge=1e-2).b, atol=1e-9, rtol=0)
    b = fit.b
    assert b[0] > b[1]  # same true effect: the small feature's prior pulls it towards 0


def adjusted_estimate(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, seed: int,
                      **fit: object) -> torch.Tensor:
    """φ(ĝ) + KernelSHAP(y − ĝ) of one image's samples (z (1, n, S), y and w (1, n)) with
    ĝ fitted with ``fit`` as :func:`adjusted_shapley_fit` fits it."""
    s = z.shape[2]
    g = fit_to_kernel_shap_samples(z[0], y[0], w[0], **fit)
    residual = (y[0] - g(z[0]))[None]
    return (g.shapley(torch.Generator().manual_seed(seed))
            + P.constrained_shapley_fit(z, residual, w, torch.tensor([s]))[0])


def test_area_prior_helps_kernel_shap_when_effects_grow_with_area() -> None:
    """The prior's premise: where a feature's logit effect is proportional to its area, the
    KernelSHAP adjusted by an additive surrogate with the features' areas is closer to the
    Shapley values than with one penalty for all (3 games × 10 draws of 60 paired leverage
    evaluations); the default surrogate gets the prior too."""
    s, errors = 16, {"areas": [], "equal": []}
    for game in range(3):
        g = torch.Generator().manual_seed(game)
        areas = torch.randint(1, 12, (s,), generator=g).double()
        b = 0.35 * areas * torch.randn(s, generator=g, dtype=torch.float64).abs()
        a = -0.6 * b.sum()
        exact = LogisticSurrogate.additive(a, b).shapley(torch.Generator().manual_seed(1),
                                                         200_000)
        for seed in range(10):
            ctx, counts = BatchContext.for_batch(1, seed), torch.tensor([s])
            z, w, _ = P.kernel_shap_coalitions(ctx, counts, 60, True, "leverage")
            y = torch.sigmoid(a + z.double() @ b)
            y = y + 0.01 * torch.randn(y.shape, generator=g, dtype=torch.float64)
            for name, prior in (("areas", areas), ("equal", torch.ones(s))):
                phi = adjusted_estimate(z, y, w, seed, areas=prior, interacting=0)
                errors[name].append(float((phi - exact).norm() / exact.norm()))
            if game == 0 and seed == 0:
                fit = adjusted_shapley_fit(z, y, w, counts, "logistic", torch.tensor([False]),
                                           [torch.Generator().manual_seed(0)], areas[None])
                torch.testing.assert_close(fit.phi[0], adjusted_estimate(z, y, w, 0,
                                                                         areas=areas))
    mean = {name: sum(e) / len(e) for name, e in errors.items()}
    assert mean["areas"] < 0.9 * mean["equal"], mean


def test_interactions_help_on_the_bundled_model() -> None:
    """Where they were found: on a benchmark image whose target probability saturates (1.000;
    image 6 of benchmarks/convergence.py's set), whose fitted logit has interactions of
    both signs as large as the strongest features' effects, the default surrogate's pairwise
    terms leave KernelSHAP less to estimate than the additive surrogate: the same 3 draws of
    250 paired leverage evaluations, against 6,000 of plain paired KernelSHAP."""
    from vitxai.data.synthetic import SyntheticBenchmark
    from vitxai.models.bundled import load_bundled_model

    adapter = load_bundled_model()
    image = SyntheticBenchmark("single", size=7, seed=20240).load(6).image[None]
    target = adapter.predict(image).argmax(1)
    segments = P.shared_segments(BatchContext.for_batch(1), image, P.SegmentationParams())
    counts = P.num_segments(segments)
    areas = P.feature_areas(segments, counts)[0]

    def sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1, seed), counts, n, True,
                                           "leverage")
        return z, P.evaluate_coalitions(adapter, image, segments, z, target), w

    z, y, w = sample(6000, 99)
    assert float(y[0, 1]) > 0.999  # saturated
    reference = P.constrained_shapley_fit(z, y, w, counts)[0]
    errors = {0: 0.0, 16: 0.0}
    for seed in range(3):
        z, y, w = sample(250, seed)
        for interacting in errors:
            phi = adjusted_estimate(z, y, w, seed, areas=areas, interacting=interacting)
            errors[interacting] += float((phi - reference).norm() / reference.norm())
    assert errors[16] < 0.9 * errors[0], errors


def test_feature_areas_count_pixels_per_feature() -> None:
    segments = torch.tensor([[[0, 0, 1], [2, 2, 2]], [[0, 1, 1], [1, 1, 1]]])
    areas = P.feature_areas(segments, torch.tensor([3, 2]))
    torch.testing.assert_close(areas, torch.tensor([[2.0, 1.0, 3.0], [1.0, 5.0, 0.0]],
                                                   dtype=torch.float64))


@pytest.mark.parametrize("interactions", [False, True])
def test_surrogate_shapley_is_the_shapley_value(interactions: bool) -> None:
    """Against enumeration of all 7! orders (additive, and with three pairwise interactions,
    one of them on a player in two); efficiency is exact."""
    s, a = 7, torch.tensor(0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(s, generator=g, dtype=torch.float64)
    pairs = torch.tensor([[0, 3], [3, 5], [1, 6]] if interactions else [], dtype=torch.long)
    surrogate = LogisticSurrogate(a, b, pairs.reshape(-1, 2),
                                  2 * torch.randn(len(pairs), generator=g, dtype=torch.float64),
                                  0.0)
    exact = exact_shapley(surrogate, s)
    phi = surrogate.shapley(torch.Generator().manual_seed(0))
    torch.testing.assert_close(phi, exact, atol=2e-3, rtol=0)
    ends = surrogate(torch.tensor([[False] * s, [True] * s]))
    torch.testing.assert_close(phi.sum(), ends[1] - ends[0])


def test_surrogate_shapley_of_a_lone_player() -> None:
    """A lone player gets σ(a + b_i) − σ(a) and the others 0."""
    s, a = 7, torch.tensor(0.3, dtype=torch.float64)
    lone = torch.zeros(s, dtype=torch.float64)
    lone[3] = 2.0
    phi = LogisticSurrogate.additive(a, lone).shapley(torch.Generator().manual_seed(0), pairs=10)
    expected = torch.zeros(s, dtype=torch.float64)
    expected[3] = torch.sigmoid(a + 2) - torch.sigmoid(a)
    torch.testing.assert_close(phi, expected)


def test_adjustment_is_near_exact_on_a_logistic_game() -> None:
    """Where the game is logistic the residual is only what the ridge leaves: a few samples
    per feature give the Shapley values several times more accurately than plain KernelSHAP."""
    s = 7
    value = saturating_game(s, 0.0)
    exact = exact_shapley(value, s)
    errors = {}
    for surrogate in (None, "logistic"):
        phi = sampled_estimate(value, s, 40, 0, surrogate)[0][0]
        errors[surrogate] = float((phi - exact).norm() / exact.norm())
        torch.testing.assert_close(phi.sum(), exact.sum())  # efficiency
    assert errors["logistic"] < 0.4 * errors[None] and errors["logistic"] < 0.08, errors


def test_adjustment_is_consistent_and_less_noisy() -> None:
    """With interactions the surrogate is only approximate: the estimate still converges to the
    Shapley values (enumerated: 2^16 coalitions), and at a small budget it is less noisy than
    plain KernelSHAP."""
    s, counts = 16, torch.tensor([16])
    value = saturating_game(s, 2.0)
    z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1), counts, 2**s)
    exact = P.constrained_shapley_fit(z, value(z), w, counts)[0]

    def error(n: int, seed: int, surrogate: str | None) -> float:
        phi = sampled_estimate(value, s, n, seed, surrogate)[0][0]
        return float((phi - exact).norm() / exact.norm())

    assert error(20002, 0, "logistic") < 0.02  # sampled, not enumerated
    plain = sum(error(100, seed, None) for seed in range(20))
    adjusted = sum(error(100, seed, "logistic") for seed in range(20))
    assert adjusted < 0.7 * plain, (adjusted / 20, plain / 20)


def test_adjusted_standard_error_is_calibrated() -> None:
    """The sandwich SE of the residual game tracks the spread of the adjusted estimates."""
    s = 10
    value = saturating_game(s, 2.0, seed=3)
    estimates, ses = [], []
    for seed in range(40):
        phi, se = sampled_estimate(value, s, 200, seed, "logistic")
        estimates.append(phi[0])
        ses.append(se[0])
    ratio = torch.stack(ses).mean(0) / torch.stack(estimates).std(0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


def lime_estimate(value: Game, s: int, n: int, seed: int, surrogate: str | None,
                  paired: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients (S,), standard errors (S,)) of LIME on one image."""
    counts = torch.tensor([s])
    ctx = BatchContext.for_batch(1, seed)
    z = P.lime_coalitions(ctx, counts, n, paired).double()
    w = P.lime_weights(z, counts, 0.25)
    fit = adjusted_ridge(z, value(z), w, 1.0, counts, 0.25, surrogate,
                         [ctx.generator(0, "surrogate")], torch.ones(1, s))
    se = P.lime_standard_error(z, fit.game, w, 1.0, fit.game_coef, fit.game_intercept, counts,
                               paired, fit.surrogate_parameters)
    return fit.coef[0], se[0]


def test_adjusted_lime_estimates_the_same_regression_with_less_noise() -> None:
    """LIME's coefficients are linear in the scores: adjusted and plain fits agree at many
    samples (the same estimand), and at few the adjusted one is closer to it."""
    s = 12
    value = saturating_game(s, 0.25, seed=1)
    target = lime_estimate(value, s, 200_001, 0, None)[0]
    adjusted = lime_estimate(value, s, 200_001, 1, "logistic")[0]
    assert float((adjusted - target).norm() / target.norm()) < 0.02

    def error(seed: int, surrogate: str | None) -> float:
        coef = lime_estimate(value, s, 101, seed, surrogate)[0]
        return float((coef - target).norm() / target.norm())

    plain = sum(error(seed, None) for seed in range(20))
    adjusted_error = sum(error(seed, "logistic") for seed in range(20))
    assert adjusted_error < 0.75 * plain, (adjusted_error / 20, plain / 20)


def test_adjusted_lime_standard_error_is_calibrated() -> None:
    s = 10
    value = saturating_game(s, 2.0, seed=3)
    fits = [lime_estimate(value, s, 201, seed, "logistic") for seed in range(40)]
    ratio = torch.stack([se for _, se in fits]).mean(0) / torch.stack(
        [coef for coef, _ in fits]).std(0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


def steep_adapter(scale: float = 10.0) -> ModelAdapter:
    """float64 logits scale · linear(x) over 3 classes: softmax probabilities that saturate
    across coalitions, the regime the surrogate is for."""
    torch.manual_seed(4)
    linear = nn.Linear(3 * 32 * 32, 3).double()
    model = nn.Sequential(nn.Flatten(), linear)
    with torch.no_grad():
        linear.weight.mul_(scale)
    return ModelAdapter(model, MEAN, STD, (32, 32), "steep")


def test_end_to_end_more_accurate_efficient_and_exact_when_enumerated() -> None:
    """On a model: closer to the exact Shapley values than plain paired KernelSHAP at the same
    budget, Σφ = f(x) − f(∅) per image, and enumerated images are not adjusted (exact)."""
    adapter = steep_adapter()
    x, t = block_images(1, 3, dtype=torch.float64), torch.tensor([2])
    seg = P.SegmentationParams(algorithm="slic", n_segments=9)
    exact = attribute("kernel_shap", adapter, x, t, n_samples=2**12, segmentation=seg)
    s = int(P.num_segments(exact.segments)[0])
    assert 7 <= s <= 12 and float(exact.native.abs().max()) > 0.05  # a game worth adjusting
    kw = dict(n_samples=6 * s, paired=True, sampling="leverage", segmentation=seg)
    errors = {None: 0.0, "logistic": 0.0}
    for seed, surrogate in itertools.product(range(10), errors):
        r = attribute("kernel_shap", adapter, x, t, surrogate=surrogate,
                      context=BatchContext.for_batch(1, seed), **kw)
        errors[surrogate] += float((r.native - exact.native).norm() / exact.native.norm())
        torch.testing.assert_close(r.native.sum(), exact.native.sum())  # efficiency
    assert errors["logistic"] < 0.7 * errors[None], errors
    adjusted = attribute("kernel_shap", adapter, x, t, n_samples=2**12, segmentation=seg,
                         surrogate="logistic")
    torch.testing.assert_close(adjusted.native, exact.native)


def test_auto_stops_with_the_residual_standard_error() -> None:
    """n_samples="auto" with the surrogate reports finite ratios and stops within budget."""
    vit = tiny_vit(dtype=torch.float64)
    x = block_images(2, 3, size=32, dtype=torch.float64)
    r = attribute("kernel_shap", vit, x, [1, 2], n_samples="auto", max_samples=300,
                  paired=True, surrogate="logistic", tolerance=0.1,
                  segmentation=P.SegmentationParams(algorithm="slic", n_segments=9))
    assert r.evaluations is not None and (r.evaluations <= 300).all()
    assert torch.isfinite(r.standard_error).all()
    assert ((r.standard_error < 0.1) | (r.evaluations == 300)).all()


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_parameter_checks_and_record(method) -> None:
    spec = get_method(method)
    with pytest.raises(ValueError, match="surrogate='logistic' models a probability: use "
                                         "score='probability'") as info:
        spec.make_params(surrogate="logistic", score="logit")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="surrogate='linear' is not one of"):
        spec.make_params(surrogate="linear")
    assert "surrogate" not in params_record(spec.make_params())
    assert params_record(spec.make_params(surrogate="logistic"))["surrogate"] == "logistic"
    assert math.isfinite(spec.make_params(surrogate="logistic").tolerance)
