"""Gradient methods: Integrated Gradients and GradientSHAP on one batched gradient kernel.

Both evaluate ∂y_c/∂x at many points per image. :func:`input_gradients` streams all points of
a batch through the model in chunks of ``internal_batch_size`` (parameters frozen, so backward
only reaches the input). We do not call captum here: its GradientShap draws one random stream
for the whole batch (a batch then differs from its images one by one) and its IG cannot share
the kernel; captum's IG is used in the tests as the reference.

Maps: ``maps`` is the channel sum (B, H, W), which keeps IG's completeness; ``channels`` holds
the (B, 3, H, W) attribution so that the unified mask can clip before the channel mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vitxai.methods.base import Attribution, BatchContext, Cost, check_range, register_method
from vitxai.models.adapter import ModelAdapter

Baseline = Literal["mean", "black", "white", "uniform"] | float


def make_baseline(adapter: ModelAdapter, images: torch.Tensor, baseline: Baseline,
                  context: BatchContext, purpose: str) -> torch.Tensor:
    """A (B, 3, H, W) baseline in pixel space.

    "mean": the model's mean colour, i.e. zero of the normalised input (captum's default zero
    baseline on normalised tensors, used by the original comparison); "black"; "white";
    "uniform": U(0, 1) noise drawn per image from its own generator; a float: that grey level.
    """
    if isinstance(baseline, int | float):
        return torch.full_like(images, float(baseline))
    if baseline == "mean":
        return adapter.mean.expand_as(images).clone()
    if baseline == "black":
        return torch.zeros_like(images)
    if baseline == "white":
        return torch.ones_like(images)
    if baseline == "uniform":
        return torch.stack([
            torch.rand(images.shape[1:], generator=context.generator(i, purpose))
            for i in range(images.shape[0])
        ]).to(images)
    raise ValueError(
        f"baseline must be 'mean', 'black', 'white', 'uniform' or a number, got {baseline!r}"
    )


def input_gradients(adapter: ModelAdapter, points: Iterator[torch.Tensor],
                    targets: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """For each chunk of points (M, 3, H, W) and targets (M,), yield ∂y_t/∂x (M, 3, H, W).

    y is the pre-softmax output. Samples are independent in eval mode, so one backward of
    Σ_m y_{m, t_m} yields every point's gradient.
    """
    for x, t in zip(points, targets, strict=True):
        x = x.detach().requires_grad_(True)
        y = adapter.logits(x)
        (grad,) = torch.autograd.grad(y.gather(1, t.to(y.device)[:, None]).sum(), x)
        yield grad


def _chunked(total: int, size: int, make: Callable[[int, int], torch.Tensor]
             ) -> Iterator[torch.Tensor]:
    for start in range(0, total, size):
        yield make(start, min(start + size, total))


def path_gradient_sum(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                      starts: torch.Tensor, ends: torch.Tensor, alphas: torch.Tensor,
                      weights: torch.Tensor, internal_batch_size: int) -> torch.Tensor:
    """Σ_k w_k ∇y(start + α_k (end − start)) per image, with per-image α and w.

    Args:
        images: only its batch size matters here (B).
        starts, ends: (B, K, 3, H, W) or broadcastable (B, 1, 3, H, W) path endpoints.
        alphas, weights: (B, K) interpolation points and their weights.

    Returns:
        (B, K, 3, H, W) gradients weighted by ``weights`` (not summed, so callers may pair them
        with per-point differences).
    """
    b, k = alphas.shape
    shape = images.shape[1:]
    flat_alpha = alphas.reshape(-1).to(images)
    total = b * k

    def make_points(lo: int, hi: int) -> torch.Tensor:
        # index the endpoints per chunk so that B·K images never exist at once
        flat = torch.arange(lo, hi, device=images.device)
        bi, ki = flat // k, flat % k
        s = starts[bi, ki if starts.shape[1] > 1 else 0]
        e = ends[bi, ki if ends.shape[1] > 1 else 0]
        return s + flat_alpha[lo:hi].view(-1, 1, 1, 1) * (e - s)

    flat_targets = targets.repeat_interleave(k)
    grads = torch.cat(list(input_gradients(
        adapter,
        _chunked(total, internal_batch_size, make_points),
        _chunked(total, internal_batch_size, lambda lo, hi: flat_targets[lo:hi]),
    )))
    return grads.reshape(b, k, *shape) * weights.to(grads).view(b, k, 1, 1, 1)


def pixel_attribution(name: str, channels: torch.Tensor, targets: torch.Tensor, cost: Cost
                      ) -> Attribution:
    """Wrap a (B, 3, H, W) attribution: maps = channel sum, native = maps."""
    maps = channels.sum(dim=1)
    return Attribution(name, maps, maps, "pixel", targets, cost, channels=channels)


@dataclass(frozen=True)
class IntegratedGradientsParams:
    """Integrated Gradients (Sundararajan et al. 2017).

    Attributes:
        steps: number of path points, ≥ 1 (captum's default 50).
        baseline: see :func:`make_baseline`; default "mean" = captum's zero on normalised input.
        method: "gausslegendre" (captum's default) or "riemann_trapezoid", "riemann_left",
            "riemann_right", "riemann_middle".
        internal_batch_size: path points per model call, ≥ 1.
    """

    steps: int = 50
    baseline: Baseline = "mean"
    method: str = "gausslegendre"
    internal_batch_size: int = 64

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 1, None)
        check_range("internal_batch_size", self.internal_batch_size, 1, None)
        if self.method not in _QUADRATURES:
            raise ValueError(
                f"parameter method={self.method!r} must be one of {', '.join(_QUADRATURES)}"
            )


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
    params=IntegratedGradientsParams,
    family="gradient",
    aliases=("IntegratedGradients", "ig"),
    paper="Sundararajan, Taly & Yan 2017, 'Axiomatic Attribution for Deep Networks', ICML",
    summary="(x − x′) ⊙ ∫₀¹ ∇y(x′ + α(x − x′)) dα by quadrature; completeness holds.",
)
def integrated_gradients(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                         p: IntegratedGradientsParams, context: BatchContext) -> Attribution:
    base = make_baseline(adapter, images, p.baseline, context, "ig_baseline")
    alpha, weight = _QUADRATURES[p.method](p.steps)
    b = images.shape[0]
    alphas = torch.as_tensor(alpha, dtype=images.dtype).expand(b, -1)
    weights = torch.as_tensor(weight, dtype=images.dtype).expand(b, -1)
    grads = path_gradient_sum(adapter, images, targets, base[:, None], images[:, None],
                              alphas, weights, p.internal_batch_size)
    channels = (images - base) * grads.sum(dim=1)
    return pixel_attribution("integrated_gradients", channels, targets,
                             Cost(forward=p.steps, backward=p.steps))


@dataclass(frozen=True)
class GradientShapParams:
    """GradientSHAP (Lundberg & Lee 2017; captum's formulation).

    For each of ``n_samples`` draws: add N(0, stdevs²) noise to the image, pick a baseline
    uniformly from ``baselines``, pick α ~ U(0, 1), and take (x̃ − x′) ⊙ ∇y(x′ + α(x̃ − x′));
    the attribution is the mean. Randomness comes from each image's own generator.

    Attributes:
        n_samples: draws per image, ≥ 1 (captum's tutorial and the original comparison: 50).
        stdevs: noise standard deviation in pixel units ([0, 1] images), ≥ 0.
        baselines: the baseline distribution, names as in :func:`make_baseline`.
        internal_batch_size: points per model call, ≥ 1.
    """

    n_samples: int = 50
    stdevs: float = 0.0
    baselines: tuple[Baseline, ...] = ("mean", "black")
    internal_batch_size: int = 64

    def __post_init__(self) -> None:
        check_range("n_samples", self.n_samples, 1, None)
        check_range("stdevs", self.stdevs, 0.0, None)
        check_range("internal_batch_size", self.internal_batch_size, 1, None)
        if not self.baselines:
            raise ValueError("parameter baselines must name at least one baseline")


@register_method(
    "gradient_shap",
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
                         for j, name in enumerate(p.baselines)], dim=1)  # (B, nb, 3, H, W)
    choice, alphas, noise = [], [], []
    for i in range(b):
        g = context.generator(i, "gradient_shap")
        choice.append(torch.randint(len(p.baselines), (n,), generator=g))
        alphas.append(torch.rand(n, generator=g, dtype=torch.float64))
        noise.append(torch.randn(n, *images.shape[1:], generator=g) * p.stdevs
                     if p.stdevs > 0 else None)
    picked = torch.stack([bases[i, choice[i]] for i in range(b)])  # (B, n, 3, H, W)
    noisy = images[:, None].expand(b, n, *images.shape[1:])
    if p.stdevs > 0:
        noisy = noisy + torch.stack(noise).to(images)
    grads = path_gradient_sum(adapter, images, targets, picked, noisy,
                              torch.stack(alphas).to(images.dtype),
                              torch.full((b, n), 1.0 / n, dtype=images.dtype),
                              p.internal_batch_size)
    channels = ((noisy - picked) * grads).sum(dim=1)
    return pixel_attribution("gradient_shap", channels, targets,
                             Cost(forward=n, backward=n))
