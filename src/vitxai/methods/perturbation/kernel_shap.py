"""KernelSHAP (Lundberg & Lee 2017, "A unified approach to interpreting model predictions",
NeurIPS).

Features (superpixels, or patches in token space) are switched off in coalitions drawn from the
Shapley kernel; least squares constrained to φ0 = f(∅) and Σφ = f(x) − f(∅) gives the
attributions. With all coalitions enumerated the result is the exact Shapley value.

Paired (antithetic) sampling evaluates every drawn coalition z together with its complement
1 − z (Covert & Lee 2021, "Improving KernelSHAP: Practical Shapley Value Estimation via Linear
Regression", AISTATS); the estimate is then exact for games whose interactions are at most
pairwise (Mayer & Wüthrich 2025, "Shapley Values: Paired-Sampling Approximations", arXiv
2508.12947) and much less noisy on real models. ``sampling="leverage"`` draws coalition
sizes uniformly instead of from the kernel, each row weighted by kernel / sampling
probability (Musco & Witter 2025, "Provably Accurate Shapley Value Estimation via Leverage
Score Sampling", ICLR: the rows' leverage scores are equal within a size and their totals
equal across sizes); on real models it needs about 1.3× fewer evaluations for the same error
(docs/methods.md). ``surrogate="logistic"`` adds the Shapley values of a logistic fit to the
samples and estimates only the rest by KernelSHAP (regression adjustment, Witter et al. 2025;
:mod:`~vitxai.methods.perturbation.surrogate`; with pairwise interactions between the
strongest features inside the logistic): 2.2× fewer evaluations for the same error on the
bundled benchmark's probabilities (docs/methods.md). ``n_samples="auto"``
samples until the estimated standard error is small
(:mod:`~vitxai.methods.perturbation.stopping`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from vitxai.methods.base import (
    RECORDED_WHEN_SET,
    Attribution,
    BatchContext,
    Cost,
    Score,
    register_method,
)
from vitxai.methods.perturbation.engine import (
    ColourBaseline,
    Space,
    check_colour_baseline,
    check_score,
    check_space,
    evaluate_coalitions,
)
from vitxai.methods.perturbation.features import (
    check_feature_grid,
    feature_areas,
    feature_attribution,
    feature_segments,
)
from vitxai.methods.perturbation.removal import Removal, check_removal, check_token_removal
from vitxai.methods.perturbation.segmentation import (
    SegmentationParams,
    as_segmentation,
    num_segments,
)
from vitxai.methods.perturbation.stopping import (
    SampleCount,
    check_stopping,
    convergence_ratio,
    sample_until,
    sandwich_standard_error,
    schedule,
    unit_count,
)
from vitxai.methods.perturbation.surrogate import (
    Surrogate,
    check_surrogate,
    logistic_adjustment,
)
from vitxai.methods.perturbation.tokens import TokenBaseline, token_vit
from vitxai.params import check_batch_size, check_choice

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter

#: how sampled coalitions are drawn: sizes from the Shapley kernel (unit weights), or
#: uniformly with importance weights (leverage-score sampling)
Sampling = Literal["kernel", "leverage"]


@dataclass(frozen=True)
class KernelShapParams:
    """Parameters of :func:`kernel_shap`.

    Attributes:
        n_samples: model evaluations per image including the two endpoints (≥ 3). When
            2^S ≤ n_samples all 2^S coalitions are evaluated instead (exact Shapley values).
            "auto": sample in rounds until the convergence ratio (estimated standard error
            relative to the map's range) is below ``tolerance``, at most ``max_samples``
            (:mod:`~vitxai.methods.perturbation.stopping`).
        batch_size: perturbed images per forward pass (≥ 1); None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        score: what is read from the model: "probability" (target softmax) or "logit".
        baseline: colour of removed superpixels: "mean" (the model's mean colour), "black" or
            a grey in [0, 1] (pixel space).
        segmentation: see :class:`SegmentationParams` (pixel space).
        space: "pixel" (superpixels) or "token" (ViTs only: every patch is a player, masked
            at the token level), as for :class:`LimeParams`.
        token_baseline: the embedding of masked tokens, "mean" or "zero" (token space,
            ``removal="blend"``).
        removal: token space: "blend" (masked tokens become ``token_baseline``), "drop"
            (they are removed from the sequence: cheaper forwards) or "attention_mask"
            (:mod:`~vitxai.methods.perturbation.removal`).
        grid: token space: None (every patch a feature) or cells per side of a grid × grid
            partition of the patch grid, each cell one feature (≥ 1, at most the patch grid;
            :func:`~vitxai.methods.perturbation.features.patch_segments`): fewer features,
            fewer samples for the same error.
        paired: evaluate each sampled coalition and its complement (Covert & Lee 2021).
        sampling: "kernel" (sizes drawn from the Shapley kernel, unit weights: captum's and
            shap's scheme) or "leverage" (sizes uniform, rows weighted by kernel / sampling
            probability; Musco & Witter 2025), see :func:`kernel_shap_coalitions`.
        surrogate: None, or "logistic": fit σ(a + b·z + Σ c_jk z_j z_k) (a few pairwise
            interactions, :func:`~vitxai.methods.perturbation.surrogate.fit_logistic`) to
            the sampled scores, take its
            Shapley values (computed without the model) and estimate only the residual game
            by KernelSHAP (:mod:`~vitxai.methods.perturbation.surrogate`); needs
            ``score="probability"``. Images whose coalitions are enumerated are exact and
            not adjusted.
        tolerance: ``n_samples="auto"`` stops an image once max_j SE(φ_j) / (max φ − min φ)
            is below this (> 0).
        max_samples: ``n_samples="auto"``: evaluations per image at most (≥ 3).
    """

    n_samples: SampleCount = 1000
    batch_size: int | None = None
    score: Score = "probability"
    baseline: ColourBaseline = "mean"
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"
    removal: Removal = field(default="blend", metadata=RECORDED_WHEN_SET)
    grid: int | None = field(default=None, metadata=RECORDED_WHEN_SET)
    paired: bool = field(default=False, metadata=RECORDED_WHEN_SET)
    sampling: Sampling = field(default="kernel", metadata=RECORDED_WHEN_SET)
    surrogate: Surrogate | None = field(default=None, metadata=RECORDED_WHEN_SET)
    tolerance: float = field(default=0.05, metadata=RECORDED_WHEN_SET)
    max_samples: int = field(default=4000, metadata=RECORDED_WHEN_SET)

    def __post_init__(self) -> None:
        check_stopping(self.n_samples, self.tolerance, self.max_samples, 3)
        check_batch_size("batch_size", self.batch_size)
        check_score(self.score)
        check_colour_baseline(self.baseline)
        check_space(self.space, self.token_baseline)
        check_removal(self.removal, self.space)
        check_choice("sampling", self.sampling, ("kernel", "leverage"))
        check_surrogate(self.surrogate, self.score)
        check_feature_grid(self.grid, self.space)
        object.__setattr__(self, "segmentation", as_segmentation(self.segmentation))


def shapley_kernel(s: int, k: torch.Tensor) -> torch.Tensor:
    """Shapley kernel weight (S−1) / (C(S, k)·k·(S−k)) of a coalition of k of s players."""
    binom = torch.tensor([math.comb(s, j) for j in range(s + 1)], dtype=torch.float64)
    k = k.long()
    return (s - 1) / (binom[k] * k * (s - k))


def kernel_shap_coalitions(context: BatchContext, counts: torch.Tensor, n_samples: int,
                           paired: bool = False, sampling: Sampling = "kernel"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coalitions for KernelSHAP, per image from ``context.generator(i, "kernel_shap")``.

    Row 0 is the empty coalition and row 1 the full one. When 2^S ≤ n_samples the other rows
    are all 2^S − 2 proper coalitions with their exact Shapley-kernel weights; otherwise they
    are n_samples − 2 draws from the kernel (size k ∈ 1..S−1 with probability ∝
    (S−1)/(k(S−k)), then a uniform subset of that size), each of unit weight. With
    ``sampling="leverage"`` the size is uniform on 1..S−1 instead and a row of size k weighs
    p_kernel(k) / p_uniform(k) (importance weights with mean 1), so the weighted regression
    estimates the same Shapley values (Musco & Witter 2025). With ``paired`` the draws come
    in pairs (z, 1 − z), rows 2 + 2i and 3 + 2i (both size laws are symmetric in k ↔ S − k,
    so the complement is itself a draw; Covert & Lee 2021); an odd count drops the last
    complement.

    Returns:
        coalitions (B, n, S_max) bool, weights (B, n) float64 (0 on the endpoint and unused
        rows), valid (B, n) bool marking the rows to evaluate.
    """
    sizes = [2**s if 2**s <= n_samples else n_samples for s in counts.tolist()]
    b, n, s_max = len(counts), max(sizes), int(counts.max())
    z = torch.zeros(b, n, s_max, dtype=torch.bool)
    weights = torch.zeros(b, n, dtype=torch.float64)
    valid = torch.arange(n)[None] < torch.tensor(sizes)[:, None]
    for i, s in enumerate(counts.tolist()):
        z[i, 1, :s] = True
        m = sizes[i] - 2
        if m == 0:
            continue
        if 2**s <= n_samples:
            codes = torch.arange(1, 2**s - 1)
            rows = (codes[:, None] >> torch.arange(s)) & 1
            weights[i, 2:2 + m] = shapley_kernel(s, rows.sum(1))
        else:
            g = context.generator(i, "kernel_shap")
            k = torch.arange(1, s, dtype=torch.float64)
            kernel = (s - 1) / (k * (s - k))
            draws = (m + 1) // 2 if paired else m
            law = kernel if sampling == "kernel" else torch.ones_like(kernel)
            size = 1 + torch.multinomial(law, draws, replacement=True, generator=g)
            # Ranks of i.i.d. uniforms are a uniform random permutation; the players ranked
            # below k form a uniform random subset of size k.
            ranks = torch.rand(draws, s, generator=g).argsort(1).argsort(1)
            rows = ranks < size[:, None]
            # p_kernel(k) / p_law(k): 1 when drawing from the kernel
            weight = (kernel / kernel.sum() / (law / law.sum()))[size - 1]
            if paired:
                rows = torch.stack([rows, ~rows], dim=1).reshape(-1, s)[:m]
                weight = weight.repeat_interleave(2)[:m]
            weights[i, 2:2 + m] = weight if sampling == "leverage" else 1.0
        z[i, 2:2 + m, :s] = rows.bool()
    return z, weights, valid


def constrained_shapley_fit(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                            counts: torch.Tensor) -> torch.Tensor:
    """Batched KernelSHAP regression with the endpoint constraints enforced exactly.

    Minimises Σ_i w_i (y_i − f(∅) − z_i·φ)² subject to Σφ = f(x) − f(∅) = Δ (φ0 = f(∅) is
    fixed). Writing φ = (Δ/S)·1 + ψ with ψ in the sum-zero subspace, i.e. ψ = C v with the
    centring projector C = I − 11ᵀ/S (restricted to the image's S real superpixels), turns it
    into an unconstrained least-squares problem in v; the minimum-norm solution (gelsd) gives
    the minimum-norm φ when the sampled coalitions do not determine it, and zero on padding.

    Args:
        z: (B, n, S_max) coalitions; row 0 empty, row 1 full.
        y: (B, n) scores (NaN allowed where the weight is 0).
        weights: (B, n) non-negative regression weights (0 on rows 0, 1 and unused rows).
        counts: (B,) number of real superpixels S_b.

    Returns:
        (B, S_max) float64 φ, 0 on padding; Σφ equals Δ to rounding.
    """
    b, _, s_max = z.shape
    real = (torch.arange(s_max)[None] < counts[:, None]).double()
    s = counts.double()[:, None]
    base, delta = y[:, :1], y[:, 1:2] - y[:, :1]
    uniform = delta / s * real  # (B, S_max), sums to Δ
    proj = torch.diag_embed(real) - real[:, :, None] * real[:, None, :] / s[..., None]
    zz, yy, ww = z[:, 2:].double(), y[:, 2:], weights[:, 2:]
    if zz.shape[1] == 0:  # every image has S = 1: φ = Δ
        return uniform
    residual = torch.nan_to_num(yy - base - (zz * uniform[:, None]).sum(-1))
    root = ww.sqrt()
    a = root[..., None] * (zz @ proj)
    v = torch.linalg.lstsq(a, (root * residual)[..., None], driver="gelsd").solution
    return uniform + (proj @ v)[..., 0]


class ShapleyFit(NamedTuple):
    """A KernelSHAP estimate and what its standard error reads (all float64)."""

    phi: torch.Tensor  #: (B, S_max) the estimate
    game: torch.Tensor  #: (B, n) the scores fitted to the samples: y, or y − ĝ
    game_phi: torch.Tensor  #: (B, S_max) KernelSHAP of ``game``
    surrogate_parameters: torch.Tensor  #: (B,) effective parameters of ĝ's fit (0: none)


def adjusted_shapley_fit(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                         counts: torch.Tensor, surrogate: Surrogate | None,
                         enumerated: torch.Tensor, generators: list[torch.Generator],
                         areas: torch.Tensor) -> ShapleyFit:
    """:func:`constrained_shapley_fit`, regression-adjusted by ``surrogate`` on the sampled
    images (not on ``enumerated`` ones, which are exact already): φ(ĝ) + KernelSHAP(y − ĝ).
    ``areas`` (B, S_max): the features' areas, the surrogate's prior
    (:func:`~vitxai.methods.perturbation.surrogate.fit_logistic`).
    """
    if surrogate is None:
        phi = constrained_shapley_fit(z, y, weights, counts)
        return ShapleyFit(phi, y, phi, torch.zeros(len(counts), dtype=torch.float64))
    surrogate_phi, fitted, parameters = logistic_adjustment(z, y, weights, counts, areas,
                                                            ~enumerated, generators)
    game = y - fitted
    game_phi = constrained_shapley_fit(z, game, weights, counts)
    return ShapleyFit(surrogate_phi + game_phi, game, game_phi, parameters)


def kernel_shap_standard_error(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                               counts: torch.Tensor, phi: torch.Tensor, paired: bool,
                               enumerated: torch.Tensor | None = None,
                               surrogate_parameters: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """Estimated standard errors of sampled KernelSHAP values, (B, S_max) float64.

    The delta-method (sandwich) estimate of the estimator's covariance, the plug-in form of
    the asymptotic covariance Covert & Lee 2021 derive: with the centred design
    a_i = C z_i (C as in :func:`constrained_shapley_fit`), row weights w_i (1, or the
    importance weights of leverage sampling), G = Σ_i w_i a_i a_iᵀ and residuals
    r_i = y_i − f(∅) − z_i·φ, the fitted values move by q_i w_i r_i per sample,
    q_i = C G⁺ a_i, so Var φ_j ≈ Σ_u (Σ_{i∈u} q_ij w_i r_i)² over independent units u:
    single draws, or the pairs (z, 1 − z) of paired sampling (whose two residuals are
    correlated by design). It is scaled by U / (U − S + 1 − k) for U units (an HC1
    correction: with few units per feature the residuals are partly fitted away; k the
    effective parameters of a surrogate fitted to the same samples, whose game y − ĝ is then
    passed as ``y``), and is inf while U ≤ S − 1 + k. Enumerated images (all 2^S
    coalitions) are exact: 0.

    Args:
        z, y, weights, counts: as for :func:`constrained_shapley_fit` (sampled rows are
            leading and contiguous from row 2; pairs on rows 2 + 2i, 3 + 2i).
        phi: (B, S_max) the fitted values.
        paired: whether rows come in pairs.
        enumerated: (B,) bool, images whose rows are all 2^S coalitions with their exact
            kernel weights; None: those with 2^S ≤ the rows available.
        surrogate_parameters: (B,) k above (:class:`ShapleyFit`); None: 0.
    """
    b, n_rows, s_max = z.shape
    if enumerated is None:
        enumerated = torch.tensor([2**s <= n_rows for s in counts.tolist()])
    se = torch.zeros(b, s_max, dtype=torch.float64)
    for i, s in enumerate(counts.tolist()):
        w = weights[i, 2:]
        sampled = w > 0
        if bool(enumerated[i]) or not bool(sampled.any()):
            continue  # exact, or nothing sampled
        n = int(sampled.sum())
        rows, w = z[i, 2:2 + n, :s].double(), w[:n]
        fitted = s - 1 + (0.0 if surrogate_parameters is None
                          else float(surrogate_parameters[i]))
        if unit_count(n, paired) <= fitted:
            se[i, :s] = math.inf
            continue
        centre = torch.eye(s, dtype=torch.float64) - 1.0 / s
        a = rows @ centre
        r = y[i, 2:2 + n] - y[i, 0] - rows @ phi[i, :s]
        q = centre @ torch.linalg.pinv(a.T @ (w[:, None] * a), hermitian=True) @ a.T  # (S, n)
        se[i, :s] = sandwich_standard_error(q * (w * r)[None], paired, fitted)
    return se


@register_method(
    "kernel_shap",
    renamed={"fill": "baseline", "output": "score", "token_fill": "token_baseline"},
    params=KernelShapParams,
    family="perturbation",
    paper="Lundberg & Lee 2017, 'A unified approach to interpreting model predictions', "
          "NeurIPS",
    summary="Shapley values of superpixels by Shapley-kernel weighted least squares.",
    uses={"segments"},
    aliases=("KernelSHAP", "kernelshap"),
)
def kernel_shap(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                params: KernelShapParams, context: BatchContext) -> Attribution:
    """KernelSHAP on superpixels (or patches): each pixel gets its feature's Shapley value.

    The natives satisfy efficiency exactly: per image Σ_features φ = f(x) − f(all removed).
    ``cost.forward`` is the evaluations per image (n_samples, or 2^S when enumerating),
    rounded up on average over the batch when images differ. With ``n_samples="auto"`` the
    result also carries each image's ``standard_error`` (convergence ratio) and
    ``evaluations``.
    """
    if params.space == "token":
        check_token_removal(token_vit(adapter, "kernel_shap"), params.removal, "kernel_shap")
    segments = feature_segments(adapter, images, context, "kernel_shap", params.space,
                                params.segmentation, params.grid)
    counts = num_segments(segments)
    areas = feature_areas(segments, counts)
    budget = params.max_samples if params.n_samples == "auto" else params.n_samples
    z, weights, valid = kernel_shap_coalitions(context, counts, budget, params.paired,
                                               params.sampling)

    def evaluate(rows: torch.Tensor) -> torch.Tensor:
        return evaluate_coalitions(adapter, images, segments, z, targets,
                                   baseline=params.baseline, score=params.score,
                                   batch_size=params.batch_size, valid=rows,
                                   space=params.space, token_baseline=params.token_baseline,
                                   removal=params.removal)

    exact = torch.tensor([2**s <= budget for s in counts.tolist()])
    images_at = torch.arange(len(counts))

    def generators(active: torch.Tensor) -> list[torch.Generator]:
        # fresh per estimate: each round's surrogate values depend on its samples only
        return [context.generator(i, "kernel_shap surrogate")
                for i in images_at[active].tolist()]

    if params.n_samples != "auto":
        phi = adjusted_shapley_fit(z, evaluate(valid), weights, counts, params.surrogate,
                                   exact, generators(images_at), areas).phi
        return feature_attribution("kernel_shap", phi, segments, counts, params.space, images,
                                   targets,
                                   Cost(forward=math.ceil(int(valid.sum()) / len(counts))))
    y = torch.full(valid.shape, math.nan, dtype=torch.float64)
    size = valid.sum(1)  # 2^S for enumerated images, else max_samples
    # enumerated images are exact: they evaluate (and stop) in the first round

    def upto(active: torch.Tensor, n: int) -> torch.Tensor:
        return torch.where(exact[active], size[active], torch.tensor(n))

    def evaluate_round(active: torch.Tensor, lo: int, hi: int) -> None:
        col = torch.arange(valid.shape[1])
        rows = torch.zeros_like(valid)
        rows[active] = (col >= lo) & (col < upto(active, hi)[:, None]) & valid[active]
        y[rows] = evaluate(rows)[rows]

    def estimate(active: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = int(upto(active, n).max())
        zz, yy = z[active, :cols], y[active, :cols]
        ww = torch.where(torch.arange(cols) < upto(active, n)[:, None], weights[active, :cols],
                         0.0)
        fit = adjusted_shapley_fit(zz, yy, ww, counts[active], params.surrogate,
                                   exact[active], generators(active), areas[active])
        se = kernel_shap_standard_error(zz, fit.game, ww, counts[active], fit.game_phi,
                                        params.paired, exact[active],
                                        fit.surrogate_parameters)
        phi = fit.phi
        real = torch.arange(z.shape[2])[None] < counts[active, None]
        return phi, convergence_ratio(phi, se, real)

    # the sandwich estimate needs many more units than features (its HC1 factor)
    first = min(budget, 2 + 4 * int(counts.max()))
    phi, ratio, used = sample_until(len(counts), schedule(first, budget, 2 if params.paired
                                                          else 1),
                                    evaluate_round, estimate, params.tolerance)
    used = torch.where(exact, size, used)
    result = feature_attribution("kernel_shap", phi, segments, counts, params.space, images,
                                 targets, Cost(forward=math.ceil(int(used.sum()) / len(used))))
    result.standard_error, result.evaluations = ratio, used
    return result
