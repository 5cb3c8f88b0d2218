"""Regression adjustment for KernelSHAP and LIME: take a logistic surrogate's share out of the
sampling noise.

KernelSHAP is linear in the game's values and exact for additive games, so its sampling error
comes entirely from the non-additive part of the game. With ``score="probability"`` most of
that part is the softmax's saturation: the target probability of a coalition z is close to a
logistic function of an additive score, g(z) = σ(a + b·z) (on the bundled benchmark's images
g explains 96–98 % of the kernel-weighted variance of the probabilities, an additive model
88–92 %). Regression adjustment (Witter et al. 2025, "Regression-adjusted Monte Carlo
Estimators for Shapley Values and Probabilistic Values"; as a control variate, Goldwasser &
Hooker 2024, "Stabilizing Estimates of Shapley Values with Control Variates") estimates

    φ(v) = φ(ĝ) + φ(v − ĝ),

with ĝ fitted to the sampled coalitions, φ(ĝ) computed without the model (antithetic
permutation sampling of a closed-form function) and φ(v − ĝ) by KernelSHAP on the same
coalitions. The residual v − ĝ is much closer to additive than v, so the second term is much
less noisy; an additive surrogate would change nothing (KernelSHAP reproduces it exactly).
The estimate keeps efficiency (Σφ = v(1) − v(0): both terms are efficient) and is consistent
whatever the game: as the samples grow ĝ tends to the best logistic fit and the KernelSHAP term
to the Shapley values of what that fit leaves.

LIME's estimand is a weighted ridge regression, also linear in the scores, so the same split
works there with φ(ĝ) replaced by ĝ's LIME coefficients on many fresh coalitions
(:func:`~vitxai.methods.perturbation.lime.adjusted_ridge`).

The fit is ridge-penalised weighted least squares on the probability scale (weighted as the
method weighs its samples, so it fits where the kernel puts its mass), solved by
Levenberg–Marquardt. The penalty on a feature's coefficient b_j is λ (ā / a_j)², a_j the
feature's area (pixels of a superpixel, patches of a token cell) and ā their mean: a Gaussian
prior whose standard deviation grows with the area, since removing a superpixel twice as large
moves the logit about twice as far. Superpixels differ in area by an order of magnitude, so a
common penalty shrinks the large ones too much and the small ones too little; with the area
prior the adjusted KernelSHAP's error at 250 evaluations falls by 13 % on the bundled
benchmark's images 0–5 and by 6 % on six more not used to choose it (docs/methods.md). Equal
areas (patches) give the plain ridge.
Fitting the log-odds instead is worse than no surrogate: near-zero probabilities dominate
it (benchmarks/README.md).

What the logistic fit leaves is mostly interactions between the strong features: parts of an
object that count only together, or stand in for one another. Where the target probability
saturates (the bundled model gives 1.000 on four of its benchmark's images) they dominate
the residual, and pairing and the additive surrogate save little. So the fit adds pairwise
terms c_jk z_j z_k inside the logistic, between the INTERACTING features of largest |b_j|
(fewer at small samples, :func:`interacting_count`), and keeps them only where generalised
cross-validation prefers them. On the bundled benchmark's saturated images the fitted
|c_jk| reach the strongest |b_j| (up to 5) and the weighted residual falls 2.6–5×; the
adjusted KernelSHAP's error at 250 evaluations falls on all eight images measured (mean
0.411 → 0.320, docs/methods.md). Their Shapley values are as cheap as the additive ones:
along a permutation c_jk enters the logit at the later of j's and k's steps.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from vitxai.params import check_choice

#: the surrogate games KernelSHAP can adjust for
Surrogate = Literal["logistic"]
#: ridge penalty on b relative to the weighted mean squared error of the probabilities: without
#: one the fit overfits badly at a few hundred samples (error 0.41–0.76 against 0.22–0.33 for
#: plain KernelSHAP on the bundled benchmark at 250), 1e-4 was the best of 3e-5…1e-3 there
#: (or within 3 % of it), with or without the area prior; scaled by (ā / a_j)² per feature
RIDGE = 1e-4
#: the features whose pairwise interactions the surrogate models: the INTERACTING largest
#: |b_j| of the additive fit, C(16, 2) = 120 coefficients c_jk. On the bundled benchmark's
#: images 0–1 and 6–11 at 250 evaluations (4 draws) 12, 16 and 24 gave mean errors 0.328 /
#: 0.319 / 0.332 against 0.411 without interactions (docs/methods.md)
INTERACTING = 16
#: ridge penalty on the c_jk (same scale as RIDGE): with 16 features 1e-5 / 3e-5 / 1e-4 gave
#: 0.321 / 0.319 / 0.334 there (1e-3 ≈ 0.40 with 12)
INTERACTION_RIDGE = 3e-5
#: antithetic permutation pairs for the surrogate's Shapley values: their Monte Carlo error is
#: 0.1–0.4 % of ‖φ‖ on the bundled benchmark, negligible beside the sampling error of the
#: game's own estimate (errors add in quadrature)
PERMUTATION_PAIRS = 10_000
_ITERATIONS = 60


def check_surrogate(surrogate: object, score: str) -> None:
    """One-line ValueError unless ``surrogate`` is None or "logistic" with a probability."""
    check_choice("surrogate", surrogate, (None, "logistic"))
    if surrogate is not None and score != "probability":
        raise ValueError(f"parameter surrogate={surrogate!r} models a probability: use "
                         f"score='probability', or surrogate=None with score={score!r}")


class LogisticSurrogate(NamedTuple):
    """g(z) = σ(a + b·z + Σ_p c_p z_j z_k) over coalitions z ∈ {0, 1}^S, (j, k) = pairs[p]:
    a logistic function of an additive score with a few pairwise interactions (float64)."""

    a: torch.Tensor  #: () the intercept
    b: torch.Tensor  #: (S,) the features' effects on the logit
    pairs: torch.Tensor  #: (P, 2) long, the interacting features j < k
    c: torch.Tensor  #: (P,) their interaction effects on the logit
    parameters: float  #: the fit's effective number of parameters (:func:`fit_logistic`)

    @classmethod
    def additive(cls, a: torch.Tensor, b: torch.Tensor, parameters: float = 0.0
                 ) -> LogisticSurrogate:
        """σ(a + b·z): no interactions."""
        return cls(a, b, torch.zeros(0, 2, dtype=torch.long),
                   torch.zeros(0, dtype=torch.float64), parameters)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """g(z), (n,) float64, for coalitions z (n, S) bool or 0/1."""
        return torch.sigmoid(design(z, self.pairs)
                             @ torch.cat([self.a.reshape(1), self.b, self.c]))

    def shapley(self, generator: torch.Generator, pairs: int = PERMUTATION_PAIRS
                ) -> torch.Tensor:
        """Shapley values of g, (S,) float64, by antithetic permutation sampling.

        Each of ``pairs`` uniform permutations is used with its reverse; a player's value is
        its mean marginal contribution g(pre ∪ {i}) − g(pre) over them. Along a permutation
        b_i enters the logit at player i's step and c_jk at the later of j's and k's, so the
        logits of all S + 1 prefixes are one scatter and a cumulative sum. The values sum
        exactly to g(1) − g(0) (each permutation's contributions telescope). No model call.
        """
        s = len(self.b)
        values = torch.zeros(s, dtype=torch.float64)
        effects = torch.cat([self.b, self.c])
        chunk = max(1, 2_000_000 // max(s + len(self.c), 1))
        for start in range(0, pairs, chunk):
            order = torch.rand(min(chunk, pairs - start), s, generator=generator).argsort(1)
            order = torch.cat([order, order.flip(1)])
            step = order.argsort(1) + 1  # the prefix at which each player is in
            step = torch.cat([step, torch.maximum(step[:, self.pairs[:, 0]],
                                                  step[:, self.pairs[:, 1]])], 1)
            logits = torch.zeros(len(order), s + 1, dtype=torch.float64)
            logits.scatter_add_(1, step, effects.expand(len(order), -1))
            gain = torch.sigmoid(self.a + logits.cumsum(1)).diff(dim=1)
            values.index_add_(0, order.flatten(), gain.flatten())
        return values / (2 * pairs)


def design(z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(n, 1 + S + P) float64 rows [1, z, z_j z_k] of coalitions z (n, S), (j, k) = pairs[p]
    ((P, 2) long): the regressors of :class:`LogisticSurrogate`'s logit."""
    z = z.double()
    return torch.cat([torch.ones(len(z), 1, dtype=torch.float64), z,
                      z[:, pairs[:, 0]] * z[:, pairs[:, 1]]], 1)


def _levenberg_marquardt(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                         penalty: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ minimising Σ_i w_i (y_i − σ(x_i·θ))² + Σ_j penalty_j θ_j², from ``theta``; each step
    a solve of the damped normal equations of the Gauss–Newton linearisation."""
    def loss(t: torch.Tensor) -> float:
        return float((w * (y - torch.sigmoid(x @ t)) ** 2).sum() + (penalty * t * t).sum())

    damping, current = 1e-3, loss(theta)
    for _ in range(_ITERATIONS):
        p = torch.sigmoid(x @ theta)
        jac = (p * (1 - p))[:, None] * x
        grad = jac.T @ (w * (y - p)) - penalty * theta
        hess = jac.T @ (w[:, None] * jac) + torch.diag(penalty)
        step = torch.linalg.solve(hess + damping * torch.diag(hess.diagonal().clamp_min(1e-12)),
                                  grad)
        trial = loss(theta + step)
        if trial <= current:
            theta, current, damping = theta + step, trial, max(damping / 3, 1e-9)
            if float(step.abs().max()) < 1e-7:
                break
        else:
            damping *= 5
    return theta


def _effective_parameters(x: torch.Tensor, w: torch.Tensor, penalty: torch.Tensor,
                          theta: torch.Tensor) -> float:
    """tr[(JᵀWJ + P)⁻¹ JᵀWJ] of the Gauss–Newton linearisation at θ: the degrees of freedom of
    a ridge smoother (Hastie & Tibshirani 1990, "Generalized Additive Models"), ≤ len(θ)."""
    p = torch.sigmoid(x @ theta)
    jac = (p * (1 - p))[:, None] * x
    info = jac.T @ (w[:, None] * jac)
    return float(torch.linalg.solve(info + torch.diag(penalty), info).diagonal().sum())


def interacting_count(n: int, s: int, interacting: int = INTERACTING) -> int:
    """How many features interact in a surrogate fitted to n samples of S features: at most
    ``interacting``, and at most m with C(m, 2) ≤ (n − S − 1) / 2, so that the interactions
    take at most half the samples the additive fit leaves (at 60 samples of 16 features,
    all C(16, 2) interactions would drown a logistic game's additive fit in noise)."""
    spare = max(n - s - 1, 0) / 2
    m = int((1 + math.sqrt(1 + 8 * spare)) / 2)  # the largest m with m(m − 1)/2 ≤ spare
    return min(interacting, s, m if m >= 2 else 0)


def fit_logistic(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                 ridge: float = RIDGE, areas: torch.Tensor | None = None,
                 interacting: int = INTERACTING,
                 interaction_ridge: float = INTERACTION_RIDGE) -> LogisticSurrogate:
    """Fit v(z) ≈ g(z) = σ(a + b·z + Σ c_jk z_j z_k) by ridge-penalised weighted least squares.

    Minimises Σ_i w_i (y_i − g(z_i))² / Σ_i w_i + ridge·Σ_j (ā / a_j)² b_j²
    + interaction_ridge·Σ c_jk² (a is not penalised) by Levenberg–Marquardt: first the
    additive fit (no c), then, over the pairs of its features with the largest |b_j|
    (:func:`interacting_count` of them), the full fit started from it; the one of the two
    with the smaller generalised cross-validation error is returned, so that interactions are
    modelled where the samples show them.

    Args:
        z: (n, S) coalitions (bool or 0/1).
        y: (n,) scores in [0, 1].
        weights: (n,) non-negative weights, not all 0.
        ridge: the penalty on b (≥ 0).
        areas: (S,) positive feature areas a_j (any unit); None: all equal.
        interacting: at most this many features interact (< 2: none, the additive fit).
        interaction_ridge: the penalty on the c_jk (≥ 0).

    Returns:
        the fitted :class:`LogisticSurrogate`; its ``parameters`` are the fit's effective
        number of parameters, by which the samples' residuals from it are smaller than its
        errors (the standard errors correct for them, HC1).
    """
    s = z.shape[1]
    w = weights.double() / weights.double().sum()
    y = y.double()
    penalty = torch.full((s + 1,), float(ridge), dtype=torch.float64)
    if areas is not None:
        areas = areas.double()
        penalty[1:] *= (areas.mean() / areas) ** 2
    penalty[0] = 0.0
    x = design(z, torch.zeros(0, 2, dtype=torch.long))
    theta = torch.zeros(s + 1, dtype=torch.float64)
    theta[0] = torch.logit((w * y).sum().clamp(1e-4, 1 - 1e-4))
    theta = _levenberg_marquardt(x, y, w, penalty, theta)
    best = LogisticSurrogate.additive(theta[0], theta[1:],
                                      _effective_parameters(x, w, penalty, theta))
    top = theta[1:].abs().argsort(descending=True)[:interacting_count(len(z), s, interacting)]
    if len(top) < 2:
        return best
    pairs = torch.combinations(top.sort().values, 2)
    x = design(z, pairs)
    penalty = torch.cat([penalty, torch.full((len(pairs),), float(interaction_ridge),
                                             dtype=torch.float64)])
    theta = _levenberg_marquardt(x, y, w, penalty, torch.cat(
        [theta, torch.zeros(len(pairs), dtype=torch.float64)]))
    pairwise = LogisticSurrogate(theta[0], theta[1:s + 1], pairs, theta[s + 1:],
                                 _effective_parameters(x, w, penalty, theta))
    return min(best, pairwise, key=lambda g: _generalised_cross_validation(g, z, y, w))


def _generalised_cross_validation(g: LogisticSurrogate, z: torch.Tensor, y: torch.Tensor,
                                  w: torch.Tensor) -> float:
    """Σ_i w_i (y_i − g(z_i))² / (1 − k / n)², k the effective parameters (Craven & Wahba
    1979, "Smoothing noisy data with spline functions"): an estimate of the out-of-sample
    error, inf when the fit has as many parameters as samples."""
    spare = 1 - g.parameters / len(z)
    return float((w * (y - g(z)) ** 2).sum()) / spare**2 if spare > 0 else math.inf


def fit_to_kernel_shap_samples(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                               areas: torch.Tensor | None = None,
                               interacting: int = INTERACTING) -> LogisticSurrogate:
    """:func:`fit_logistic` to one image's KernelSHAP samples: the rows of positive weight and
    the two endpoints, which KernelSHAP constrains rather than weighs but which are exact values
    of the game, weighted as the mean sample.

    Args:
        z: (n, S) coalitions, row 0 empty and row 1 full. y: (n,) scores (any value where the
            weight is 0 on rows ≥ 2). weights: (n,) KernelSHAP's regression weights.
        areas, interacting: as :func:`fit_logistic`.
    """
    used = weights > 0
    used[:2] = True
    w = weights[used].double()
    w[:2] = w[2:].mean() if len(w) > 2 else 1.0
    return fit_logistic(z[used], y[used], w, areas=areas, interacting=interacting)


def logistic_adjustment(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                        counts: torch.Tensor, areas: torch.Tensor, adjust: torch.Tensor,
                        generators: list[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the logistic surrogate's Shapley values and its values on the coalitions.

    Args:
        z: (B, n, S_max) coalitions, row 0 empty and row 1 full (KernelSHAP's layout).
        y: (B, n) scores (NaN where the weight is 0 on rows ≥ 2).
        weights: (B, n) KernelSHAP's regression weights (0 on rows 0, 1 and unused rows).
        counts: (B,) real features S_b.
        areas: (B, S_max) the features' areas (:func:`fit_logistic`'s prior).
        adjust: (B,) bool, the images to adjust (others get zeros).
        generators: one per image, for :meth:`LogisticSurrogate.shapley`.

    Returns:
        surrogate_phi (B, S_max) float64, 0 on padding and unadjusted images; surrogate
        (B, n) float64 values ĝ(z) (0 where not adjusted), so that
        φ = surrogate_phi + KernelSHAP(y − surrogate) is the adjusted estimate; and (B,)
        the fit's effective parameters (0 where not adjusted).
    """
    phi = torch.zeros(z.shape[0], z.shape[2], dtype=torch.float64)
    fitted = torch.zeros(y.shape, dtype=torch.float64)
    parameters = torch.zeros(z.shape[0], dtype=torch.float64)
    for i in torch.nonzero(adjust).flatten().tolist():
        s = int(counts[i])
        surrogate = fit_to_kernel_shap_samples(z[i, :, :s], y[i], weights[i], areas[i, :s])
        phi[i, :s] = surrogate.shapley(generators[i])
        fitted[i] = surrogate(z[i, :, :s])
        parameters[i] = surrogate.parameters
    return phi, fitted, parameters
