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
"""

from __future__ import annotations

from typing import Literal

import torch

from vitxai.params import check_choice

#: the surrogate games KernelSHAP can adjust for
Surrogate = Literal["logistic"]
#: ridge penalty on b relative to the weighted mean squared error of the probabilities: without
#: one the fit overfits badly at a few hundred samples (error 0.41–0.76 against 0.22–0.33 for
#: plain KernelSHAP on the bundled benchmark at 250), 1e-4 was the best of 3e-5…1e-3 there
#: (or within 3 % of it), with or without the area prior; scaled by (ā / a_j)² per feature
RIDGE = 1e-4
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


def _weighted_design(z: torch.Tensor, weights: torch.Tensor, ridge: float,
                     areas: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logistic fit's design [1, z] (n, S + 1), its weights normalised to sum 1 (n,) and
    its penalty per parameter (S + 1,): 0 on the intercept, ridge · (ā / a_j)² on b_j."""
    x = torch.cat([torch.ones(len(z), 1, dtype=torch.float64), z.double()], 1)
    penalty = torch.full((x.shape[1],), float(ridge), dtype=torch.float64)
    if areas is not None:
        areas = areas.double()
        penalty[1:] *= (areas.mean() / areas) ** 2
    penalty[0] = 0.0
    return x, weights.double() / weights.double().sum(), penalty


def fit_logistic(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                 ridge: float = RIDGE, areas: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit v(z) ≈ σ(a + b·z) by ridge-penalised weighted least squares.

    Minimises Σ_i w_i (y_i − σ(a + b·z_i))² / Σ_i w_i + ridge·Σ_j (ā / a_j)² b_j² (a is not
    penalised) by Levenberg–Marquardt, each step a solve of the damped normal equations.

    Args:
        z: (n, S) coalitions (bool or 0/1).
        y: (n,) scores in [0, 1].
        weights: (n,) non-negative weights, not all 0.
        ridge: the penalty (≥ 0).
        areas: (S,) positive feature areas a_j (any unit); None: all equal.

    Returns:
        a: () float64; b: (S,) float64.
    """
    x, w, penalty = _weighted_design(z, weights, ridge, areas)
    y = y.double()
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    theta[0] = torch.logit((w * y).sum().clamp(1e-4, 1 - 1e-4))

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
    return theta[0], theta[1:]


def effective_parameters(z: torch.Tensor, weights: torch.Tensor, a: torch.Tensor,
                         b: torch.Tensor, ridge: float = RIDGE,
                         areas: torch.Tensor | None = None) -> float:
    """Effective number of parameters of :func:`fit_logistic`'s fit at (a, b):
    tr[(JᵀWJ + P)⁻¹ JᵀWJ] of its Gauss–Newton linearisation (the degrees of freedom of a
    ridge smoother; Hastie & Tibshirani 1990, "Generalized Additive Models"), ≤ S + 1.

    The samples' residuals from the surrogate are smaller than its errors by about this many
    fitted parameters, which the standard errors correct for (HC1)."""
    x, w, penalty = _weighted_design(z, weights, ridge, areas)
    p = torch.sigmoid(x @ torch.cat([a.reshape(1), b]).double())
    jac = (p * (1 - p))[:, None] * x
    info = jac.T @ (w[:, None] * jac)
    return float(torch.linalg.solve(info + torch.diag(penalty), info).diagonal().sum())


def logistic_shapley(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                     pairs: int = PERMUTATION_PAIRS) -> torch.Tensor:
    """Shapley values of g(z) = σ(a + b·z), (S,) float64, by antithetic permutation sampling.

    Each of ``pairs`` uniform permutations is used with its reverse; a player's value is its
    mean marginal contribution σ(a + b·pre + b_i) − σ(a + b·pre) over them. The values sum
    exactly to g(1) − g(0) (each permutation's contributions telescope). No model call.
    """
    s = len(b)
    values = torch.zeros(s, dtype=torch.float64)
    chunk = max(1, 2_000_000 // max(s, 1))
    for start in range(0, pairs, chunk):
        order = torch.rand(min(chunk, pairs - start), s, generator=generator).argsort(1)
        order = torch.cat([order, order.flip(1)])
        steps = torch.cat([torch.zeros(len(order), 1, dtype=torch.float64),
                           b.double()[order].cumsum(1)], 1)
        gain = torch.sigmoid(a + steps).diff(dim=1)
        values.index_add_(0, order.flatten(), gain.flatten())
    return values / (2 * pairs)


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
        generators: one per image, for :func:`logistic_shapley`.

    Returns:
        surrogate_phi (B, S_max) float64, 0 on padding and unadjusted images; surrogate
        (B, n) float64 values ĝ(z) (0 where not adjusted or unused), so that
        φ = surrogate_phi + KernelSHAP(y − surrogate) is the adjusted estimate; and (B,)
        the fit's :func:`effective_parameters` (0 where not adjusted).
    """
    phi = torch.zeros(z.shape[0], z.shape[2], dtype=torch.float64)
    fitted = torch.zeros(y.shape, dtype=torch.float64)
    parameters = torch.zeros(z.shape[0], dtype=torch.float64)
    for i in torch.nonzero(adjust).flatten().tolist():
        s = int(counts[i])
        used = weights[i] > 0
        used[:2] = True  # the endpoints are exact values of the game: fit them too
        w = weights[i, used].clone()
        w[:2] = w[2:].mean() if len(w) > 2 else 1.0
        rows = z[i, used, :s]
        a, b = fit_logistic(rows, y[i, used], w, areas=areas[i, :s])
        phi[i, :s] = logistic_shapley(a, b, generators[i])
        fitted[i, used] = torch.sigmoid(a + rows.double() @ b)
        parameters[i] = effective_parameters(rows, w, a, b, areas=areas[i, :s])
    return phi, fitted, parameters
