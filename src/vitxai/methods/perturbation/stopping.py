"""``n_samples="auto"``: sample until the map's estimated standard error is small enough.

LIME, KernelSHAP and RISE average over random coalitions or masks, so their maps carry
sampling noise that shrinks like 1/√n. With ``n_samples="auto"`` they evaluate in rounds
(each about 25 % more samples than the last) and after each round estimate, per image, the
standard error SE_j of every feature's value φ_j. An image stops once

    max_j SE_j / (max_j φ_j − min_j φ_j) < tolerance,

the convergence ratio of Covert & Lee 2021 ("Improving KernelSHAP: Practical Shapley Value
Estimation via Linear Regression", AISTATS; their shapreg package stops at 0.01), or when it
has used ``max_samples``. Images stop independently, and every draw is seeded per image, so a
batch gives the same maps and counts as its images one by one. How each method estimates SE:
KernelSHAP and LIME by the delta-method (sandwich) covariance of their regressions, RISE by
the sample variance of its i.i.d. per-mask terms (see each method).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import torch

from vitxai.params import check_range

#: a method's sample count: a number, or "auto" (:func:`sample_until`)
SampleCount = int | Literal["auto"]
#: growth of the sample count from one round to the next
GROWTH = 1.25


def check_sample_count(name: str, value: Any, minimum: int) -> None:
    """One-line ValueError unless ``value`` is "auto" or an integer ≥ ``minimum``."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"parameter {name}={value!r} must be an integer ≥ {minimum} or 'auto'")
    check_range(name, value, minimum, None)


def check_stopping(n_samples: Any, tolerance: float, max_samples: int, minimum: int) -> None:
    """Check ``n_samples``, ``tolerance`` (> 0) and ``max_samples`` (≥ ``minimum``)."""
    check_sample_count("n_samples", n_samples, minimum)
    check_range("tolerance", tolerance, 0.0, None, low_open=True)
    check_range("max_samples", max_samples, minimum, None)


def schedule(first: int, last: int, step: int = 1) -> list[int]:
    """Sample counts at which to check: ``first``, then ×1.25 each round (rounded up to a
    multiple of ``step`` above ``first``), ending exactly at ``last`` (≥ ``first``)."""
    first = min(first, last)
    counts = [first]
    while counts[-1] < last:
        grown = math.ceil(counts[-1] * GROWTH)
        grown = first + step * math.ceil((grown - first) / step)
        counts.append(min(grown, last))
    return counts


def convergence_ratio(values: torch.Tensor, se: torch.Tensor,
                      real: torch.Tensor | None = None) -> torch.Tensor:
    """(A,) max_j SE_j / (max_j φ_j − min_j φ_j) over each row's real features.

    Args:
        values, se: (A, ...) estimates and their standard errors.
        real: optional bool mask of the same shape; False entries (padding) are ignored.

    Returns:
        float64 ratios; 0 where every SE is 0 (an exact estimate, e.g. an enumeration), inf
        where the values are constant but not exact.
    """
    v, s = values.double().flatten(1), se.double().flatten(1)
    ok = torch.ones_like(v, dtype=torch.bool) if real is None else real.flatten(1)
    spread = (v.masked_fill(~ok, -math.inf).amax(1) - v.masked_fill(~ok, math.inf).amin(1))
    worst = s.masked_fill(~ok, 0).amax(1)
    return torch.where(worst == 0, torch.zeros_like(worst), worst / spread)


def unit_count(n: int, paired: bool, single: int = 0) -> int:
    """Independent units among n sampled rows: the rows, or with ``paired`` the first
    ``single`` rows alone and then pairs (z, 1 − z), a trailing unpaired row alone."""
    return single + math.ceil((n - single) / 2) if paired else n


def sandwich_standard_error(moves: torch.Tensor, paired: bool, fitted: float,
                            single: int = 0) -> torch.Tensor:
    """(S,) standard errors of a regression's S estimates from each sampled row's effect on
    them, ``moves`` (S, n) (the delta-method, or sandwich, estimate; White 1980, "A
    Heteroskedasticity-Consistent Covariance Matrix Estimator", Econometrica).

    The moves add up within a unit (:func:`unit_count`: rows, or pairs of paired sampling,
    whose residuals are correlated by design) before squaring: Var ≈ Σ_u (Σ_{i∈u} move_i)²,
    scaled by U / (U − ``fitted``) for U units (HC1: the residuals are partly fitted away).
    The caller returns inf instead while U ≤ ``fitted``.
    """
    n = moves.shape[1]
    if paired:
        end = single + 2 * ((n - single) // 2)
        moves = torch.cat([moves[:, :single],
                           moves[:, single:end].reshape(len(moves), -1, 2).sum(-1),
                           moves[:, end:]], dim=1)
    units = moves.shape[1]
    return ((moves**2).sum(1) * units / (units - fitted)).sqrt()


def sample_until(
    n_images: int,
    counts: list[int],
    evaluate: Callable[[torch.Tensor, int, int], None],
    estimate: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate in rounds until each image's convergence ratio is below ``tolerance``.

    Args:
        n_images: B.
        counts: the sample counts at which to check (:func:`schedule`); the last is the
            budget.
        evaluate: ``evaluate(active, lo, hi)`` evaluates samples [lo, hi) of the images whose
            indices are in ``active`` (A,) long.
        estimate: ``estimate(active, n)`` → (values (A, ...), ratio (A,)) from the first n
            samples of the active images.
        tolerance: stop an image once its ratio is below this.

    Returns:
        values (B, ...) from each image's last round, ratios (B,) float64 and the sample
        counts used (B,) int64.
    """
    active = torch.arange(n_images)
    ratio = torch.full((n_images,), math.nan, dtype=torch.float64)
    used = torch.zeros(n_images, dtype=torch.long)
    final: torch.Tensor | None = None
    lo = 0
    for n in counts:
        evaluate(active, lo, n)
        values, r = estimate(active, n)
        if final is None:
            final = values.new_zeros(n_images, *values.shape[1:])
        done = (r < tolerance) | (n == counts[-1])
        final[active[done]] = values[done]
        ratio[active[done]] = r[done].double()
        used[active[done]] = n
        active, lo = active[~done], n
        if not len(active):
            break
    assert final is not None
    return final, ratio, used
