"""Gradient methods on one batched gradient kernel.

Saliency, Input×Gradient, Integrated Gradients (also with the IDSDS uniform baseline, "IG-U"),
SmoothGrad over IxG or IG, and GradientSHAP all evaluate ∂y_c/∂x at one or many points per
image. :func:`path_gradient_sum` builds the points chunk by chunk, streams them through the model
``batch_size`` at a time (:func:`target_gradient` per chunk; parameters frozen, so
backward only reaches the input; the chunk halves when it runs out of memory) and folds each
chunk's gradients into a per-image sum, so memory does not grow with the number of points.
We do not call captum here: its GradientShap and NoiseTunnel draw one random stream for the
whole batch (a batch then differs from its images one by one) and its methods cannot share
the kernel; captum is used in the tests as the reference.

Maps: ``maps`` is the channel sum (B, H, W), which keeps IG's completeness; ``channels`` holds
the (B, 3, H, W) attribution so that the unified mask can clip before the channel mean.

Gradients are taken with respect to the [0, 1] pixels. Since x_norm = (x − μ)/σ per channel,
∂y/∂x_norm = σ·∂y/∂x: methods of the form (x − x′) ⊙ ∂y/∂x (IG, GradientSHAP) are the same in
both spaces, while Input×Gradient and saliency are not (see their ``space`` notes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vitxai.batching import AdaptiveBatch, default_batch_size, run_chunked
from vitxai.methods.base import (
    Attribution,
    Baseline,
    BatchContext,
    Cost,
    check_baseline,
    make_baseline,
    pixel_attribution,
    register_method,
)
from vitxai.models.adapter import ModelAdapter
from vitxai.params import check_batch_size, check_choice, check_range

InputSpace = Literal["normalized", "pixel"]
INPUT_SPACES: tuple[str, ...] = ("normalized", "pixel")


def target_gradient(adapter: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∂y_t/∂x (M, 3, H, W) for points x (M, 3, H, W) and targets t (M,): one forward and one
    backward. y is the pre-softmax output; samples are independent in eval mode, so one
    backward of Σ_m y_{m, t_m} yields every point's gradient."""
    x = x.detach().requires_grad_(True)
    y = adapter.logits(x)
    (grad,) = torch.autograd.grad(y.gather(1, t.to(y.device)[:, None]).sum(), x)
    return grad


def path_gradient_sum(adapter: ModelAdapter, targets: torch.Tensor, starts: torch.Tensor,
                      ends: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
                      batch_size: int | None, *, times_difference: bool = False,
                      start_index: torch.Tensor | None = None,
                      batcher: AdaptiveBatch | None = None) -> torch.Tensor:
    """Σ_k w_k ∇y(s_k + α_k (e_k − s_k)) per image, or Σ_k w_k (e_k − s_k) ⊙ ∇y(...).

    The B·K points are built and evaluated chunk by chunk (``batch_size`` points per
    forward and backward; a chunk that runs out of memory is retried at half the size, kept
    for the rest of the call, :func:`vitxai.batching.run_chunked`), and each chunk's gradients
    are folded into a (B, 3, H, W) sum at once, so memory does not grow with K: no (B, K, 3,
    H, W) points or gradients ever exist, unless the caller passes them as endpoints. The fold
    is one matrix product of the chunk's one-hot-times-weight rows with its gradients, which is
    deterministic on every device (an ``index_add_`` is not on CUDA).

    Args:
        targets: (B,) long, the class whose logit is differentiated.
        starts, ends: (B, K, 3, H, W) path endpoints, or (B, 1, 3, H, W) shared by all K points
            of an image (then e − s is computed once per image).
        alphas, weights: (B, K) interpolation points and their weights.
        times_difference: multiply each point's gradient by its own (e_k − s_k) before summing
            (GradientSHAP, whose endpoints differ per point).
        start_index: optional (B, K) long: point k of image b starts at
            ``starts[b, start_index[b, k]]`` (a few distinct baselines shared by many points,
            without a (B, K, 3, H, W) copy).
        batcher: optional :class:`~vitxai.batching.AdaptiveBatch` used instead of a fresh one
            (``batch_size`` is then ignored); its ``size`` tells where it settled.

    Returns:
        (B, 3, H, W) weighted sums (accumulated in float64) in the endpoints' dtype.
    """
    b, k = alphas.shape
    shape = starts.shape[2:]
    device = starts.device
    if batch_size is None:
        batch_size = default_batch_size(device)
    flat_alpha = alphas.reshape(-1).to(device, starts.dtype)
    flat_weight = weights.reshape(-1).to(device, starts.dtype)
    flat_targets = targets.to(device).repeat_interleave(k)
    shared = starts.shape[1] == 1 and ends.shape[1] == 1 and start_index is None
    flat_start = None if start_index is None else start_index.reshape(-1).to(device)
    diffs = (ends - starts)[:, 0] if shared else None  # (B, 3, H, W), once per image
    # chunks fold in the gradients' dtype and add up in float64: the chunk size the
    # out-of-memory back-off settles on changes the result only by float32 rounding
    total = torch.zeros(b, *shape, dtype=torch.float64, device=device)

    def chunk(lo: int, hi: int) -> tuple[int, torch.Tensor]:
        flat = torch.arange(lo, hi, device=device)
        bi, ki = flat // k, flat % k
        alpha = flat_alpha[lo:hi].view(-1, 1, 1, 1)
        if diffs is not None:
            d = diffs[bi]
            points = torch.addcmul(starts[bi, 0], alpha, d)
        else:
            si = flat_start[lo:hi] if flat_start is not None else (
                ki if starts.shape[1] > 1 else 0)
            s = starts[bi, si]
            d = ends[bi, ki if ends.shape[1] > 1 else 0] - s
            points = torch.addcmul(s, alpha, d)
        grads = target_gradient(adapter, points, flat_targets[lo:hi])
        if times_difference:
            grads = grads * d
        # rows are image-major, so a chunk spans images bi[0] .. bi[-1]
        first = int(bi[0])
        fold = torch.zeros(int(bi[-1]) - first + 1, hi - lo, dtype=grads.dtype, device=device)
        fold[bi - first, torch.arange(hi - lo, device=device)] = flat_weight[lo:hi]
        return first, fold @ grads.reshape(hi - lo, -1)

    def add(_lo: int, _hi: int, out: tuple[int, torch.Tensor]) -> None:
        first, sums = out
        total[first:first + sums.shape[0]] += sums.view(-1, *shape).double()

    run_chunked(chunk, b * k, batch_size, consume=add, batcher=batcher)
    return total.to(starts.dtype)


def gradients_at(adapter: ModelAdapter, targets: torch.Tensor, points: torch.Tensor,
                 batch_size: int | None) -> torch.Tensor:
    """∂y_t/∂x at given points: (B, K, 3, H, W) points → (B, K, 3, H, W) gradients.

    For saliency, Input×Gradient and SmoothGrad over IxG, which transform each point's
    gradient before averaging; streamed in chunks that back off on out-of-memory errors.
    """
    b, k = points.shape[:2]
    flat = points.reshape(b * k, *points.shape[2:])
    flat_targets = targets.to(points.device).repeat_interleave(k)
    size = default_batch_size(points.device) if batch_size is None else batch_size
    grads = run_chunked(lambda lo, hi: target_gradient(adapter, flat[lo:hi],
                                                       flat_targets[lo:hi]),
                        b * k, size)
    return torch.cat(grads).view_as(points)


# The generator purpose of IG's baseline. IG-U and SmoothGrad over IG draw theirs under the same
# name, so that IG-U equals IG(baseline="uniform_normalized") and SmoothGrad with σ = 0 equals
# IG for every baseline, random ones included.
IG_BASELINE = "ig_baseline"


@dataclass(frozen=True)
class IntegratedGradientsParams:
    """Integrated Gradients (Sundararajan et al. 2017).

    Attributes:
        steps: number of path points, ≥ 1 (captum's default 50).
        baseline: see :func:`make_baseline`; default "mean" = captum's zero on normalised input.
        quadrature: "gausslegendre" (captum's default) or "riemann_trapezoid",
            "riemann_left", "riemann_right", "riemann_middle".
        batch_size: path points per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    steps: int = 50
    baseline: Baseline = "mean"
    quadrature: str = "gausslegendre"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check_ig(self.steps, self.quadrature, self.batch_size)
        check_baseline("baseline", self.baseline)


def _check_ig(steps: int, quadrature: str, batch_size: int | None) -> None:
    check_range("steps", steps, 1, None)
    check_batch_size("batch_size", batch_size)
    check_choice("quadrature", quadrature, tuple(_QUADRATURES))


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (nodes + 1), 0.5 * w


def _riemann(kind: str) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    def rule(n: int) -> tuple[np.ndarray, np.ndarray]:
        if kind == "trapezoid":
            if n == 1:
                return np.array([0.5]), np.array([1.0])
            a = np.linspace(0, 1, n)
            w = np.full(n, 1.0 / (n - 1))
            w[[0, -1]] /= 2
            return a, w
        offset = {"left": 0.0, "right": 1.0, "middle": 0.5}[kind]
        return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)
    return rule


_QUADRATURES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "gausslegendre": _gauss_legendre,
    "riemann_trapezoid": _riemann("trapezoid"),
    "riemann_left": _riemann("left"),
    "riemann_right": _riemann("right"),
    "riemann_middle": _riemann("middle"),
}


@register_method(
    "integrated_gradients",
    renamed={"method": "quadrature", "internal_batch_size": "batch_size"},
    params=IntegratedGradientsParams,
    family="gradient",
    aliases=("IntegratedGradients", "ig"),
    paper="Sundararajan, Taly & Yan 2017, 'Axiomatic Attribution for Deep Networks', ICML",
    summary="(x − x′) ⊙ ∫₀¹ ∇y(x′ + α(x − x′)) dα by quadrature; completeness holds.",
)
def integrated_gradients(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                         p: IntegratedGradientsParams, context: BatchContext) -> Attribution:
    base = make_baseline(adapter, images, p.baseline, context, IG_BASELINE)
    channels = ig_channels(adapter, images, targets, base, p.steps, p.quadrature,
                           p.batch_size)
    return pixel_attribution("integrated_gradients", channels, targets,
                             Cost(forward=p.steps, backward=p.steps))


def ig_channels(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                base: torch.Tensor, steps: int, quadrature: str, batch_size: int | None
                ) -> torch.Tensor:
    """(B, 3, H, W) IG attribution (x − x′) ⊙ Σ_k w_k ∇y(x′ + α_k(x − x′))."""
    alpha, weight = _QUADRATURES[quadrature](steps)
    b = images.shape[0]
    alphas = torch.as_tensor(alpha, dtype=images.dtype).expand(b, -1)
    weights = torch.as_tensor(weight, dtype=torch.float64).expand(b, -1)
    grads = path_gradient_sum(adapter, targets, base[:, None], images[:, None], alphas,
                              weights, batch_size)
    return (images - base) * grads


@dataclass(frozen=True)
class IntegratedGradientsUniformParams:
    """IG-U: Integrated Gradients from a U(−1, 1) baseline in normalised units (IDSDS).

    By default the baseline is ``make_baseline(..., "uniform_normalized", ...)`` drawn per
    image from its generator, so this method equals ``integrated_gradients`` with
    ``baseline="uniform_normalized"``; it is registered separately because IDSDS reports it as
    a method of its own (the best one on ViT-B/16). IDSDS's code draws one 1×3×H×W baseline
    for the whole run after seeding: ``draw="run"`` does that (from the run's seed alone).

    Attributes:
        steps: number of path points, ≥ 1 (IDSDS: 50 Gauss–Legendre).
        quadrature: the rule, as for :class:`IntegratedGradientsParams`.
        batch_size: path points per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        draw: "image" (a baseline per image, from the seed and the image id) or "run" (one
            baseline for every image, from the seed; IDSDS's choice).
    """

    steps: int = 50
    quadrature: str = "gausslegendre"
    batch_size: int | None = None
    draw: Literal["image", "run"] = "image"

    def __post_init__(self) -> None:
        _check_ig(self.steps, self.quadrature, self.batch_size)
        check_choice("draw", self.draw, ("image", "run"))


@register_method(
    "integrated_gradients_uniform",
    renamed={"method": "quadrature", "internal_batch_size": "batch_size"},
    params=IntegratedGradientsUniformParams,
    family="gradient",
    aliases=("IG-U", "IntegratedGradientsUniform"),
    paper="Sundararajan, Taly & Yan 2017, ICML; uniform baseline as in Hesse et al. 2024, "
          "'Benchmarking the Attribution Quality of Vision Models' (IDSDS), NeurIPS D&B",
    summary="Integrated Gradients from a per-image U(−1, 1) baseline in normalised units.",
)
def integrated_gradients_uniform(adapter: ModelAdapter, images: torch.Tensor,
                                 targets: torch.Tensor, p: IntegratedGradientsUniformParams,
                                 context: BatchContext) -> Attribution:
    if p.draw == "run":
        u = 2 * torch.rand(images.shape[1:], generator=context.run_generator(IG_BASELINE),
                           dtype=torch.float64) - 1
        base = (adapter.mean + adapter.std * u.to(images)).expand_as(images)
    else:
        base = make_baseline(adapter, images, "uniform_normalized", context, IG_BASELINE)
    channels = ig_channels(adapter, images, targets, base, p.steps, p.quadrature,
                           p.batch_size)
    return pixel_attribution("integrated_gradients_uniform", channels, targets,
                             Cost(forward=p.steps, backward=p.steps))


@dataclass(frozen=True)
class GradientShapParams:
    """GradientSHAP (Lundberg & Lee 2017; captum's formulation).

    For each of ``n_samples`` draws: add N(0, sigma²) noise to the image, pick a baseline
    uniformly from ``baseline``, pick α ~ U(0, 1), and take (x̃ − x′) ⊙ ∇y(x′ + α(x̃ − x′));
    the attribution is the mean. Randomness comes from each image's own generator.

    Attributes:
        n_samples: draws per image, ≥ 1 (captum's tutorial and the original comparison: 50).
        sigma: noise standard deviation in pixel units ([0, 1] images), ≥ 0.
        baseline: the baseline distribution, names as in :func:`make_baseline`.
        batch_size: points per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    n_samples: int = 50
    sigma: float = 0.0
    baseline: tuple[Baseline, ...] = ("mean", "black")
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_range("n_samples", self.n_samples, 1, None)
        check_range("sigma", self.sigma, 0.0, None)
        check_batch_size("batch_size", self.batch_size)
        if not self.baseline:
            raise ValueError("parameter baseline must name at least one baseline")
        for b in self.baseline:
            check_baseline("baseline", b)


@register_method(
    "gradient_shap",
    renamed={"stdevs": "sigma", "baselines": "baseline", "internal_batch_size": "batch_size"},
    params=GradientShapParams,
    family="gradient",
    aliases=("GradientSHAP", "gradshap"),
    paper="Lundberg & Lee 2017, 'A Unified Approach to Interpreting Model Predictions', "
          "NeurIPS (expected gradients form)",
    summary="Mean of (x̃ − x′) ⊙ ∇y at random points between random baselines and noisy x.",
)
def gradient_shap(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                  p: GradientShapParams, context: BatchContext) -> Attribution:
    b, n = images.shape[0], p.n_samples
    bases = torch.stack([make_baseline(adapter, images, name, context, f"gs_baseline{j}")
                         for j, name in enumerate(p.baseline)], dim=1)  # (B, nb, 3, H, W)
    choice, alphas, noise = [], [], []
    for i in range(b):
        g = context.generator(i, "gradient_shap")
        choice.append(torch.randint(len(p.baseline), (n,), generator=g))
        alphas.append(torch.rand(n, generator=g, dtype=torch.float64))
        noise.append(torch.randn(n, *images.shape[1:], generator=g) * p.sigma
                     if p.sigma > 0 else None)
    noisy = images[:, None].expand(b, n, *images.shape[1:])
    if p.sigma > 0:
        noisy = noisy + torch.stack(noise).to(images)
    channels = path_gradient_sum(adapter, targets, bases, noisy,
                                 torch.stack(alphas).to(images.dtype),
                                 torch.full((b, n), 1.0 / n, dtype=torch.float64),
                                 p.batch_size, times_difference=True,
                                 start_index=torch.stack(choice))
    return pixel_attribution("gradient_shap", channels, targets,
                             Cost(forward=n, backward=n))


# --------------------------------------------------------------------------------------------
# Saliency, Input×Gradient and SmoothGrad
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyParams:
    """Gradient saliency (Simonyan, Vedaldi & Zisserman 2014).

    Attributes:
        batch_size: images per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_batch_size("batch_size", self.batch_size)


@register_method(
    "saliency",
    renamed={"internal_batch_size": "batch_size"},
    params=SaliencyParams,
    family="gradient",
    aliases=("Saliency", "vanilla_gradient"),
    paper="Simonyan, Vedaldi & Zisserman 2014, 'Deep Inside Convolutional Networks: "
          "Visualising Image Classification Models and Saliency Maps', ICLR workshop",
    summary="|∂y/∂x| of the target logit per pixel and channel (non-negative).",
)
def saliency(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
             p: SaliencyParams, context: BatchContext) -> Attribution:
    """``channels`` = |∂y_c/∂x| (B, 3, H, W) w.r.t. the [0, 1] pixels, all ≥ 0.

    ``maps`` is their channel sum, as for every pixel method here (the unified mask reduces
    ``channels`` itself); the paper's map is the channel *maximum*, ``channels.amax(1)``. With
    respect to the normalised input, channel c would be scaled by σ_c.
    """
    grads = gradients_at(adapter, targets, images[:, None], p.batch_size)[:, 0]
    return pixel_attribution("saliency", grads.abs(), targets, Cost(forward=1, backward=1))


def ixg_channels(adapter: ModelAdapter, points: torch.Tensor, grads: torch.Tensor,
                 space: InputSpace) -> torch.Tensor:
    """Input×Gradient from pixel points and their pixel gradients (same shapes).

    "normalized": x_norm ⊙ ∂y/∂x_norm = ((x − μ)/σ) ⊙ (σ ∂y/∂x) = (x − μ) ⊙ ∂y/∂x, captum's
    InputXGradient on the normalised tensor, which the literature (and IDSDS) computes;
    "pixel": x ⊙ ∂y/∂x on [0, 1] pixels. The two differ by μ ⊙ ∂y/∂x: unlike IG, IxG has an
    implicit baseline (the space's zero), so it is not invariant to the normalisation.
    """
    if space == "normalized":
        return (points - adapter.mean) * grads
    return points * grads


@dataclass(frozen=True)
class InputXGradientParams:
    """Input×Gradient (Shrikumar et al. 2016).

    Attributes:
        input_space: "normalized" (default; x_norm ⊙ ∂y/∂x_norm as captum and IDSDS) or
            "pixel" (x ⊙ ∂y/∂x on [0, 1] pixels), see :func:`ixg_channels`.
        batch_size: images per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    input_space: InputSpace = "normalized"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("input_space", self.input_space, INPUT_SPACES)
        check_batch_size("batch_size", self.batch_size)


@register_method(
    "input_x_gradient",
    renamed={"space": "input_space", "internal_batch_size": "batch_size"},
    params=InputXGradientParams,
    family="gradient",
    aliases=("IxG", "InputXGradient"),
    paper="Shrikumar et al. 2016, 'Not Just a Black Box: Learning Important Features "
          "Through Propagating Activation Differences', arXiv:1605.01713",
    summary="Input ⊙ ∂y/∂input of the target logit, by default on the normalised input.",
)
def input_x_gradient(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                     p: InputXGradientParams, context: BatchContext) -> Attribution:
    grads = gradients_at(adapter, targets, images[:, None], p.batch_size)[:, 0]
    channels = ixg_channels(adapter, images, grads, p.input_space)
    return pixel_attribution("input_x_gradient", channels, targets, Cost(forward=1, backward=1))


SmoothGradBase = Literal["ixg", "ig"]
Transform = Literal["none", "abs", "squared"]
_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda a: a,
    "abs": torch.abs,
    "squared": torch.square,
}


@dataclass(frozen=True)
class SmoothGradParams:
    """SmoothGrad (Smilkov et al. 2017) over Input×Gradient or Integrated Gradients.

    For each of ``n_samples`` draws, Gaussian noise of standard deviation ``sigma`` (pixel
    units of [0, 1] images) is added to the image, the base method is applied to the noisy
    image, ``transform`` is applied per sample and channel, and the results are averaged
    (captum's NoiseTunnel: "smoothgrad", "smoothgrad_sq" = "squared"). IDSDS's IxG-SG /
    IG-SG: 4 samples, σ = 1.0 in normalised units, i.e. σ_c pixel units in channel c — the
    default (docs/evaluation.md §2).

    Attributes:
        base: "ixg" (Input×Gradient) or "ig" (Integrated Gradients).
        n_samples: noisy copies per image, ≥ 1.
        sigma: noise standard deviation in pixel units, ≥ 0 (absolute, 0 gives the base
            method); None: the model's std per channel (one normalised unit, IDSDS).
        stdev: deprecated (until vitxai 0.3): noise in normalised units, σ_c·stdev pixel
            units per channel; give ``sigma`` or ``stdev``, not both.
        transform: "none", "abs" (mean of |a|) or "squared" (SmoothGrad-Squared, mean of a²).
        input_space: the Input×Gradient space ("ixg" base only), see
            :class:`InputXGradientParams`.
        steps: Gauss–Legendre points per IG ("ig" base only), ≥ 1.
        baseline: the IG baseline ("ig" base only; fixed while the input is noised, as in
            captum), names as in :func:`make_baseline`.
        batch_size: points per model call, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    base: SmoothGradBase = "ixg"
    n_samples: int = 4
    sigma: float | None = None
    stdev: float | None = None
    transform: Transform = "none"
    input_space: InputSpace = "normalized"
    steps: int = 50
    baseline: Baseline = "mean"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("base", self.base, ("ixg", "ig"))
        check_range("n_samples", self.n_samples, 1, None)
        if self.sigma is not None:
            check_range("sigma", self.sigma, 0.0, None)
        if self.stdev is not None:
            check_range("stdev", self.stdev, 0.0, None)
            if self.sigma is not None:
                raise ValueError("smoothgrad: give sigma (pixel units) or the deprecated stdev "
                                 "(normalised units), not both")
            warnings.warn("smoothgrad.stdev is deprecated; give sigma in pixel units (stdev "
                          "s is s·std_c per channel)", FutureWarning, stacklevel=5)
        check_choice("transform", self.transform, tuple(_TRANSFORMS))
        check_choice("input_space", self.input_space, INPUT_SPACES)
        check_range("steps", self.steps, 1, None)
        check_baseline("baseline", self.baseline)
        check_batch_size("batch_size", self.batch_size)


@register_method(
    "smoothgrad",
    renamed={"space": "input_space", "internal_batch_size": "batch_size"},
    params=SmoothGradParams,
    family="gradient",
    aliases=("SmoothGrad", "SG", "NoiseTunnel"),
    paper="Smilkov et al. 2017, 'SmoothGrad: removing noise by adding noise', "
          "ICML workshop (arXiv:1706.03825)",
    summary="Mean of IxG or IG over Gaussian-noised copies of the image (optionally |·| or ²).",
)
def smoothgrad(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
               p: SmoothGradParams, context: BatchContext) -> Attribution:
    """Noise comes from ``context.generator(i, "smoothgrad")``; the IG baseline is drawn as by
    ``integrated_gradients`` (same generator purpose), so σ = 0 reproduces the base method."""
    b, n = images.shape[0], p.n_samples
    noise = torch.stack([  # cast per image: B·n float64 noise images would double memory
        torch.randn(n, *images.shape[1:], generator=context.generator(i, "smoothgrad"),
                    dtype=torch.float64).to(images)
        for i in range(b)
    ])
    # one normalised unit is σ_c pixel units in channel c
    sigma = (adapter.std[:, None] * (1.0 if p.stdev is None else p.stdev) if p.sigma is None
             else p.sigma)
    noisy = images[:, None] + sigma * noise  # (B, n, 3, H, W)
    transform = _TRANSFORMS[p.transform]
    if p.base == "ixg":
        grads = gradients_at(adapter, targets, noisy, p.batch_size)
        channels = transform(ixg_channels(adapter, noisy, grads, p.input_space)).mean(dim=1)
        passes = n
    else:
        base = make_baseline(adapter, images, p.baseline, context, IG_BASELINE)
        # one IG per noisy copy keeps memory at one IG's (B·steps gradients), not n times it
        channels = torch.stack([
            transform(ig_channels(adapter, noisy[:, k], targets, base, p.steps,
                                  "gausslegendre", p.batch_size))
            for k in range(n)
        ]).mean(dim=0)
        passes = n * p.steps
    return pixel_attribution("smoothgrad", channels, targets,
                             Cost(forward=passes, backward=passes))
