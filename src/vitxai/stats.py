"""Statistics for "method A beats method B": bootstrap intervals, paired tests, rankings.

Scores are per-image values of one metric, one array of shape (n,) per method, aligned by
image: ``scores[m][i]`` is method m on image i. NaN (an undefined score) and ±inf are
ignored: a mean uses the finite values of its method, a paired comparison the images
where both methods are finite.

- :func:`bootstrap_ci`: mean and bootstrap confidence interval of one method;
- :func:`paired_tests`: Wilcoxon signed-rank test for every pair of methods, with a
  multiple-comparison correction (:func:`adjust_pvalues`);
- :func:`ranking`: methods sorted by mean, with ties where the data cannot separate
  neighbours.

References
----------
B. Efron, R. Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall, 1993
(percentile and BCa intervals, ch. 13–14). F. Wilcoxon, "Individual comparisons by ranking
methods", Biometrics Bulletin 1(6), 1945. S. Holm, "A simple sequentially rejective multiple
test procedure", Scandinavian Journal of Statistics 6(2), 1979. J. Demšar, "Statistical
comparisons of classifiers over multiple data sets", JMLR 7, 2006 (Wilcoxon over
Friedman/t-tests for comparing methods on shared test items).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtr, ndtri
from scipy.stats import wilcoxon

__all__ = [
    "PairedTest",
    "RankRow",
    "adjust_pvalues",
    "bootstrap_ci",
    "paired_tests",
    "ranking",
]

# Below this many paired images the exact two-sided Wilcoxon p-value cannot drop below
# 2 / 2**5 = 0.0625, so no difference could ever be significant at the usual levels.
MIN_PAIRS = 6
# Resampled values drawn per chunk (about 8 MiB of float64), bounding bootstrap memory.
_BOOT_CHUNK = 2**20


@dataclass(frozen=True)
class PairedTest:
    """One row of :func:`paired_tests`: methods ``a`` and ``b`` on their shared images.

    Attributes:
        a, b: method names, in the order of the ``scores`` mapping.
        n_pairs: images where both scores are finite.
        mean_diff: mean of the paired differences, oriented so that > 0 means ``a`` is
            better (a − b when higher is better, b − a otherwise); NaN when n_pairs = 0.
        statistic: Wilcoxon statistic (scipy's, two-sided: the smaller signed-rank sum);
            NaN where the test was not run.
        p_value: two-sided p-value, 1.0 where the test was not run.
        p_adjusted: p-value after the multiple-comparison correction.
        significant: ``p_adjusted < alpha``.
    """

    a: str
    b: str
    n_pairs: int
    mean_diff: float
    statistic: float
    p_value: float
    p_adjusted: float
    significant: bool


@dataclass(frozen=True)
class RankRow:
    """One row of :func:`ranking`.

    Attributes:
        rank: 1-based competition rank (1, 1, 3, ...) shared by a tie group; None for a
            method without any finite score.
        method: method name.
        mean: mean of the finite scores.
        ci_low, ci_high: bootstrap confidence interval of the mean.
        tied_with: the other methods of the same rank group, best first.
    """

    rank: int | None
    method: str
    mean: float
    ci_low: float
    ci_high: float
    tied_with: list[str] = field(default_factory=list)


def bootstrap_ci(
    values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: Literal["percentile", "bca"] = "percentile",
) -> tuple[float, float, float]:
    """Mean of the finite values and its bootstrap confidence interval.

    Parameters
    ----------
    values : array_like, any shape (flattened), usually (n,)
        Per-image scores; NaN and ±inf are dropped, and n counts the remaining values.
    confidence : float in (0, 1)
        Coverage of the two-sided interval.
    n_resamples : int ≥ 1
        Bootstrap resamples (each n values drawn with replacement).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same interval.
    method : {"percentile", "bca"}
        "percentile": the (1 − c)/2 and (1 + c)/2 quantiles of the resampled means
        (linear interpolation). "bca": bias-corrected and accelerated (Efron 1987), with
        bias z0 = Φ⁻¹(share of resampled means below the mean, ties counted half, clipped
        to [1/(2R), 1 − 1/(2R)] for R resamples so that it stays finite) and acceleration
        from the jackknife means; better coverage for skewed scores.

    Returns
    -------
    (mean, low, high) : tuple of float
        low ≤ mean ≤ high in general (not guaranteed for BCa on tiny samples).
        n = 0: (nan, nan, nan). n = 1, or all values equal: (v, v, v), since every
        resample has the same mean.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be ≥ 1, got {n_resamples}")
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if np.all(x == x[0]):
        return (mean, mean, mean)
    n = x.size
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    step = max(1, _BOOT_CHUNK // n)
    for s in range(0, n_resamples, step):
        rows = min(step, n_resamples - s)
        boot[s:s + rows] = x[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    alpha = 1.0 - confidence
    quantiles = np.array([alpha / 2, 1.0 - alpha / 2])
    if method == "bca":
        share = (np.sum(boot < mean) + 0.5 * np.sum(boot == mean)) / n_resamples
        z0 = ndtri(np.clip(share, 0.5 / n_resamples, 1.0 - 0.5 / n_resamples))
        jack = (x.sum() - x) / (n - 1)  # leave-one-out means
        dev = jack.mean() - jack
        den = 6.0 * np.sum(dev**2) ** 1.5
        accel = np.sum(dev**3) / den if den > 0 else 0.0
        z = ndtri(quantiles)
        quantiles = ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    low, high = np.quantile(boot, quantiles)
    return mean, float(low), float(high)


def adjust_pvalues(
    p_values: ArrayLike, method: Literal["holm", "bonferroni", "none"] = "holm"
) -> np.ndarray:
    """Family-wise error correction of m p-values.

    Parameters
    ----------
    p_values : array_like, shape (m,)
        Raw p-values in [0, 1].
    method : {"holm", "bonferroni", "none"}
        "bonferroni": min(1, m·p). "holm" (step-down, uniformly more powerful than
        Bonferroni at the same family-wise error rate): with p sorted ascending,
        p̃_(j) = max_{i ≤ j} min(1, (m − i + 1) · p_(i)). "none": unchanged.

    Returns
    -------
    ndarray of float64, shape (m,)
        Adjusted p-values in the original order, each ≥ its raw p-value.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    m = p.size
    if method == "none":
        return p.copy()
    if method == "bonferroni":
        return np.minimum(1.0, m * p)
    if method == "holm":
        order = np.argsort(p, kind="stable")
        stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted = np.empty(m)
        adjusted[order] = np.maximum.accumulate(stepped)  # keep the order of the raw p's
        return adjusted
    raise ValueError(f"method must be 'holm', 'bonferroni' or 'none', got {method!r}")


def paired_tests(
    scores: Mapping[str, ArrayLike],
    *,
    higher_is_better: bool = True,
    correction: Literal["holm", "bonferroni", "none"] = "holm",
    alpha: float = 0.05,
    zero_method: Literal["wilcox", "zsplit"] = "wilcox",
) -> list[PairedTest]:
    """Two-sided Wilcoxon signed-rank test between every pair of methods.

    Parameters
    ----------
    scores : mapping of method name -> array_like of shape (n,)
        Per-image scores, all of the same length n and aligned by image.
    higher_is_better : bool
        Only orients ``mean_diff`` (> 0 means ``a`` is better); the test is two-sided.
    correction : {"holm", "bonferroni", "none"}
        Correction over the family of all C(M, 2) pairs, see :func:`adjust_pvalues`.
        Untestable pairs (below) keep p = 1 and still count in the family, which is
        conservative.
    alpha : float
        Level of ``significant`` (on the adjusted p-value).
    zero_method : {"wilcox", "zsplit"}
        Images where both methods score the same: "wilcox" (scipy's default) drops them,
        so identical scores neither help nor hurt; "zsplit" keeps them and splits their
        ranks between the positive and negative sums, which pulls p towards 1 when many
        images tie (e.g. saturated pointing-game hits).

    Returns
    -------
    list of PairedTest
        One row per unordered pair, (a, b) in the order of ``scores``. The test uses the
        n_pairs images where both scores are finite, through ``scipy.stats.wilcoxon``
        (exact or normal approximation as scipy chooses). When n_pairs < 6 or every
        difference is 0, the test is not run: statistic NaN and p = 1.0 (no evidence of a
        difference; fewer than 6 pairs can never reach p < 0.0625).
    """
    arrays = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in scores.items()}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"all score arrays must have the same length, got {sorted(lengths)}")
    raw = []
    for a, b in combinations(arrays, 2):
        x, y = arrays[a], arrays[b]
        both = np.isfinite(x) & np.isfinite(y)
        diff = (x - y)[both] if higher_is_better else (y - x)[both]
        n_pairs = int(both.sum())
        mean_diff = float(diff.mean()) if n_pairs else float("nan")
        if n_pairs < MIN_PAIRS or not np.any(diff != 0):
            statistic, p = float("nan"), 1.0
        else:
            res = wilcoxon(diff, zero_method=zero_method, alternative="two-sided")
            statistic, p = float(res.statistic), float(res.pvalue)
        raw.append((a, b, n_pairs, mean_diff, statistic, p))
    adjusted = adjust_pvalues([r[5] for r in raw], correction)
    return [
        PairedTest(a, b, n, md, st, p, float(pa), bool(pa < alpha))
        for (a, b, n, md, st, p), pa in zip(raw, adjusted, strict=True)
    ]


def ranking(
    scores: Mapping[str, ArrayLike],
    *,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    correction: Literal["holm", "bonferroni", "none"] = "holm",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> list[RankRow]:
    """Methods ranked by mean score, with tie groups where neighbours are indistinguishable.

    The rule, exactly:

    1. Methods with at least one finite score are sorted by their mean (descending when
       ``higher_is_better``, else ascending); equal means keep the order of ``scores``.
    2. :func:`paired_tests` is run on these methods (all pairs, same ``correction``).
    3. Walking down the sorted list, a method joins the rank group of the method just
       above it when their adjusted p-value is ≥ ``alpha`` (not significantly
       different); otherwise it opens a new group. A group's rank is the 1-based position
       of its first member (competition ranking: 1, 1, 3, ...).

    Groups chain: if B ties with A and C ties with B, all three share a rank even when A
    and C differ significantly; :func:`paired_tests` gives every pairwise verdict.
    Methods without any finite score come last with rank None.

    Parameters
    ----------
    scores : mapping of method name -> array_like of shape (n,)
        Per-image scores aligned by image (see :func:`paired_tests`).
    higher_is_better : bool
    alpha : float
        Significance level for separating neighbours.
    correction : {"holm", "bonferroni", "none"}
    confidence, n_resamples, seed
        Passed to :func:`bootstrap_ci` (percentile) for each method's interval.

    Returns
    -------
    list of RankRow, best first
    """
    summary = {name: bootstrap_ci(v, confidence=confidence, n_resamples=n_resamples, seed=seed)
               for name, v in scores.items()}
    defined = [name for name in scores if np.isfinite(summary[name][0])]
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(defined, key=lambda name: sign * summary[name][0])  # sorted() is stable
    tests = paired_tests({name: scores[name] for name in order},
                         higher_is_better=higher_is_better, correction=correction, alpha=alpha)
    p_adj = {frozenset((t.a, t.b)): t.p_adjusted for t in tests}
    groups: list[list[str]] = []
    for i, name in enumerate(order):
        if i > 0 and p_adj[frozenset((order[i - 1], name))] >= alpha:
            groups[-1].append(name)
        else:
            groups.append([name])
    rows = []
    position = 1
    for group in groups:
        for name in group:
            rows.append(RankRow(position, name, *summary[name],
                                tied_with=[other for other in group if other != name]))
        position += len(group)
    rows += [RankRow(None, name, *summary[name]) for name in scores if name not in defined]
    return rows
