"""Complexity of attribution maps: how concentrated the attribution mass is.

Both scores look at magnitudes |a| only and treat every element of a map as one feature: pass
(B, H, W) maps to score pixels, or a (B, gh, gw) native map to score patches. They are computed
in torch, batched over images, in float64, and returned on the CPU as (B,) tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["entropy", "sparseness_gini"]


def _magnitudes(maps: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(maps).double()
    if a.ndim < 2 or a[0].numel() == 0:
        raise ValueError(f"maps must be (B, ...) with at least one feature, got {tuple(a.shape)}")
    if torch.isnan(a).any():
        raise ValueError("maps contain NaN")
    return a.reshape(a.shape[0], -1).abs()


def sparseness_gini(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of |map| (Chalasani et al. 2020, "Concise Explanations of Neural Networks
    using Adversarial Training", ICML).

    With the n magnitudes sorted ascending, v_(1) ≤ … ≤ v_(n):
    G = Σ_i (2i − n − 1)·v_(i) / (n·Σ_i v_(i)).

    Args:
        maps: (B, ...) attribution maps; signs are ignored.

    Returns:
        (B,) float64 in [0, (n − 1)/n]: (n − 1)/n for a one-hot map (all mass on one feature,
        the sparsest), 0 for a constant map (the densest). An all-zero map has no mass to
        distribute and is defined as 0, the value of the constant map it is a limit of.
    """
    v = torch.sort(_magnitudes(maps), dim=1).values
    n = v.shape[1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=v.device)
    total = v.sum(1)
    g = ((2 * i - n - 1) * v).sum(1) / (n * total)
    return torch.where(total > 0, g, torch.zeros_like(g)).cpu()


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log) of |map| normalised to a distribution.

    p_i = |a_i| / Σ_j |a_j|, H = −Σ_i p_i log p_i with 0·log 0 = 0 (Bhatt, Weller & Moura 2020,
    "Evaluating and Aggregating Feature-based Model Explanations", IJCAI: "complexity").

    Args:
        maps: (B, ...) attribution maps; signs are ignored.

    Returns:
        (B,) float64 in [0, log n]: 0 for a one-hot map, log n for a constant nonzero map. An
        all-zero map is defined as log n as well: it singles out no feature, like the uniform
        distribution (a documented convention; the entropy is otherwise undefined).
    """
    v = _magnitudes(maps)
    n = v.shape[1]
    total = v.sum(1, keepdim=True)
    p = v / total.clamp(min=torch.finfo(torch.float64).tiny)
    h = -torch.special.xlogy(p, p).sum(1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, math.log(n))).cpu()
