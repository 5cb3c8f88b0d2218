"""Agreement between two attributions of one input: the metrics of Krishna et al. [1]_.

E_a, E_b ∈ ℝ^d are two signed attributions of the same input and target; the d features
are patches, superpixels or pixels. Importance is **magnitude** |E|. ``top_k(E)`` lists
the k features of largest |E| from most to least important; ``rank(E, i)`` is the
1-based position of i in that list; ``sign(E, i) ∈ {−1, 0, +1}``. With
S = top_k(E_a) ∩ top_k(E_b):

======================================  =======================================  =======
metric                                  definition                               range
======================================  =======================================  =======
:func:`feature_agreement` FA            |S| / k                                  [0, 1]
:func:`rank_agreement` RA               |{i ∈ S : same rank}| / k                [0, 1]
:func:`sign_agreement` SA               |{i ∈ S : same sign}| / k                [0, 1]
:func:`signed_rank_agreement` SRA       |{i ∈ S : same rank and same sign}| / k  [0, 1]
:func:`rank_correlation` RC(F)          Spearman ρ of |E_a|, |E_b| on F          [−1, 1]
:func:`pairwise_rank_agreement` PRA(F)  share of pairs of F ordered alike        [0, 1]
======================================  =======================================  =======

SRA ≤ RA ≤ FA and SRA ≤ SA ≤ FA; identical maps score 1 on every metric (RC: unless
constant, where ρ is undefined); E_b = −E_a gives FA = RA = 1 and SA = SRA = 0 (when the
top-k entries are non-zero).

Ties. Upsampled patch maps, rollout and superpixel methods have many equal |E|. The top-k
list is made deterministic by a stable sort on −|E|: among equal magnitudes the smaller
feature index comes first. This is the rule of the reference code, whose ``argsort``
breaks ties by position too. :func:`tie_fraction` reports how much of a top-k list
depends on that rule (0 means the list is the same under any rule); report it next to
FA/RA/SA/SRA, or compute agreement at the native resolution (14×14 patches,
superpixels), where ties are rare. RC uses average ranks and PRA states its tie rule
explicitly (``ties=``), so neither depends on feature order except PRA's "reference" rule.

Sign metrics are degenerate for two non-negative maps (rollout, Chefer, clipped maps):
every sign is +1 or 0, so SA = FA whenever the top-k entries are non-zero.
:func:`agreement_table` flags such pairs (``nonnegative_pair``).

Inputs are NumPy arrays or torch tensors of shape (d,) for one input, giving floats, or
(B, d) for a batch, giving arrays of shape (B,) with exactly the per-row results. Values
must be finite: a NaN attribution is an upstream bug and raises ``ValueError``. NaN in a
result means undefined (fewer than 2 features in F, or RC with a constant ranking).

References
----------
.. [1] S. Krishna, T. Han, A. Gu, S. Wu, S. Jabbari, H. Lakkaraju, "The Disagreement
       Problem in Explainable Machine Learning: A Practitioner's Perspective",
       arXiv:2202.01602, 2022; code: https://github.com/AI4LIFE-GROUP/disagreement-problem
       and OpenXAI (``openxai/metrics.py``: ``pairwise_comp``, ``rankcorr``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import combinations
from typing import TYPE_CHECKING, Literal, Union

import numpy as np
from scipy.stats import kendalltau, rankdata

if TYPE_CHECKING:
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor"]
Features = Union[Literal["all", "union_topk"], np.ndarray, "torch.Tensor"]

__all__ = [
    "agreement_table",
    "feature_agreement",
    "pairwise_rank_agreement",
    "rank_agreement",
    "rank_correlation",
    "sign_agreement",
    "signed_rank_agreement",
    "tie_fraction",
    "topk_indices",
]

# The O(d²) pair count materialises (rows, d, d) arrays; beyond this many features per
# row the O(d log d) Kendall path is both faster and the only one that fits in memory.
_PAIRS_MAX_D = 256
# Elements of one (rows, d, d) chunk of the pair count (about 16 MiB of float64).
_PAIRS_CHUNK = 2**21


def topk_indices(attribution: ArrayLike, k: int) -> np.ndarray:
    """Indices of the k features of largest magnitude, most important first.

    Parameters
    ----------
    attribution : ndarray or Tensor, shape (d,) or (B, d)
        Signed attribution(s); importance is ``|attribution|``.
    k : int
        Number of features, 1 ≤ k ≤ d.

    Returns
    -------
    ndarray of int64, shape (k,) or (B, k)
        ``top_k(E)``. Equal magnitudes are ordered by feature index (stable sort on
        −|E|), so the result never depends on the sort implementation. Use it as
        ``features=`` of :func:`rank_correlation` / :func:`pairwise_rank_agreement` to
        restrict them to the top-k of a reference method.
    """
    e, single = _as_rows(attribution, "attribution")
    top = _topk(e, _check_k(k, e.shape[1]))
    return top[0] if single else top


def tie_fraction(attribution: ArrayLike, k: int) -> float | np.ndarray:
    """Share of the top-k features whose magnitude equals that of another feature.

    A top-k feature tied with another top-k feature has a rank decided by the tie-break
    (it matters for RA/SRA); one tied with a feature outside the top k may itself be in
    or out by the tie-break (it matters for all four top-k metrics). 0 means the
    ordered top-k list is the same under every tie-breaking rule.

    Parameters
    ----------
    attribution : ndarray or Tensor, shape (d,) or (B, d)
    k : int
        1 ≤ k ≤ d.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, 1]; a multiple of 1/k. Magnitudes are compared exactly (float equality).
    """
    e, single = _as_rows(attribution, "attribution")
    k = _check_k(k, e.shape[1])
    mag = -np.sort(-np.abs(e), axis=1)  # descending
    same_as_next = mag[:, 1:] == mag[:, :-1]
    tied = np.zeros(mag.shape, dtype=bool)
    tied[:, 1:] |= same_as_next
    tied[:, :-1] |= same_as_next
    return _out(tied[:, :k].mean(axis=1), single)


def feature_agreement(e_a: ArrayLike, e_b: ArrayLike, k: int) -> float | np.ndarray:
    """Feature agreement FA = |top_k(E_a) ∩ top_k(E_b)| / k.

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
        Two signed attributions of the same input(s); equal shapes.
    k : int
        1 ≤ k ≤ d.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, 1], a multiple of 1/k. Symmetric in (E_a, E_b).
    """
    return _topk_metric(e_a, e_b, k, "feature_agreement")


def rank_agreement(e_a: ArrayLike, e_b: ArrayLike, k: int) -> float | np.ndarray:
    """Rank agreement RA = |{i ∈ S : rank(E_a, i) = rank(E_b, i)}| / k.

    Equivalently, the share of positions p = 1..k where both top-k lists hold the same
    feature (the reference code's position-by-position comparison).

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
    k : int
        1 ≤ k ≤ d.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, FA]. Tied magnitudes are ranked by feature index (see
        :func:`tie_fraction`).
    """
    return _topk_metric(e_a, e_b, k, "rank_agreement")


def sign_agreement(e_a: ArrayLike, e_b: ArrayLike, k: int) -> float | np.ndarray:
    """Sign agreement SA = |{i ∈ S : sign(E_a, i) = sign(E_b, i)}| / k.

    Signs are −1, 0, +1: an exact zero agrees only with an exact zero.

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
    k : int
        1 ≤ k ≤ d.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, FA]. Equal to FA for two non-negative maps with non-zero top-k entries,
        where it carries no information (see :func:`agreement_table`).
    """
    return _topk_metric(e_a, e_b, k, "sign_agreement")


def signed_rank_agreement(e_a: ArrayLike, e_b: ArrayLike, k: int) -> float | np.ndarray:
    """Signed rank agreement SRA = |{i ∈ S : same rank and same sign}| / k.

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
    k : int
        1 ≤ k ≤ d.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, min(RA, SA)].
    """
    return _topk_metric(e_a, e_b, k, "signed_rank_agreement")


def rank_correlation(
    e_a: ArrayLike,
    e_b: ArrayLike,
    features: Features = "all",
    k: int | None = None,
) -> float | np.ndarray:
    """Rank correlation RC(F): Spearman ρ between |E_a| and |E_b| on the features F.

    Pearson correlation of the average ranks (``scipy.stats.rankdata(method="average")``)
    of the magnitudes within F, i.e. ``scipy.stats.spearmanr(|E_a|[F], |E_b|[F])``. The
    reference code uses dense ranks, which differs from Spearman's ρ when there are ties.

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
    features : "all", "union_topk", or integer ndarray/Tensor of shape (m,) or (B, m)
        F: all d features (the reference code's choice); ``top_k(E_a) ∪ top_k(E_b)`` per
        row (needs ``k``); or explicit feature indices, shared by all rows (m,) or per row
        (B, m), e.g. ``topk_indices(E_ref, k)`` for the top-k of a reference method.
        Indices must be distinct and in [0, d).
    k : int, optional
        Required with ``features="union_topk"`` and rejected otherwise.

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [−1, 1]. NaN when |F| < 2 or when either map is constant on F (ρ undefined).
    """
    a, b, single = _as_pair(e_a, e_b)
    mask = _feature_mask(features, k, a, b)
    # Features outside F get magnitude −1, below every |E| ≥ 0: they take the lowest
    # ranks, and the ranks inside F are their within-F average ranks plus one constant
    # shift per row, which the correlation ignores. This keeps the batch vectorised
    # although |F| may differ between rows.
    ra = rankdata(np.where(mask, np.abs(a), -1.0), axis=1)
    rb = rankdata(np.where(mask, np.abs(b), -1.0), axis=1)
    m = mask.sum(axis=1)
    safe_m = np.maximum(m, 1)
    ca = np.where(mask, ra - (ra * mask).sum(axis=1, keepdims=True) / safe_m[:, None], 0.0)
    cb = np.where(mask, rb - (rb * mask).sum(axis=1, keepdims=True) / safe_m[:, None], 0.0)
    num = (ca * cb).sum(axis=1)
    den = np.sqrt((ca * ca).sum(axis=1) * (cb * cb).sum(axis=1))
    rho = np.full(len(a), np.nan)
    np.divide(num, den, out=rho, where=(den > 0) & (m >= 2))
    return _out(np.clip(rho, -1.0, 1.0), single)


def pairwise_rank_agreement(
    e_a: ArrayLike,
    e_b: ArrayLike,
    features: Features = "all",
    k: int | None = None,
    ties: Literal["strict", "reference"] = "strict",
    algorithm: Literal["auto", "pairs", "kendall"] = "auto",
) -> float | np.ndarray:
    """Pairwise rank agreement PRA(F): share of feature pairs of F that E_a, E_b order alike.

    Over the C(|F|, 2) pairs i < j of F, with magnitudes x = |E_a|, y = |E_b|:

    - ``ties="strict"``: the pair agrees when sign(x_i − x_j) = sign(y_i − y_j); a pair
      tied in one map only disagrees, a pair tied in both agrees. Symmetric in i, j.
    - ``ties="reference"``: the rule of the reference code [1]_ (``pairwise_comp``): the
      pair agrees when the booleans ``x_i > x_j`` and ``y_i > y_j`` are equal, for i < j
      in feature-index order. A pair tied in one map and ordered j above i in the other
      therefore agrees, while tied and i above j disagrees: the result depends on the
      feature order. It equals the strict rule after breaking every tie in favour of the
      larger index.

    Without ties both rules give PRA = (1 + τ) / 2, τ = Kendall's rank correlation.

    Parameters
    ----------
    e_a, e_b : ndarray or Tensor, shape (d,) or (B, d)
    features, k
        The feature set F, as in :func:`rank_correlation`. Pairs are taken in increasing
        feature index (the reference code iterates over F in its listed order).
    ties : {"strict", "reference"}
        Tie rule, see above.
    algorithm : {"auto", "pairs", "kendall"}
        How the agreeing pairs are counted; both counts are exact, so the choice only
        affects speed and memory. "pairs": vectorised O(d²) comparison of all pairs,
        chunked over rows. "kendall": O(|F| log |F|) per row from
        ``scipy.stats.kendalltau``. For "strict" the concordant minus discordant count is
        ``round(τ_b · sqrt((n0 − n1)(n0 − n2)))`` and the agreeing count is
        C + n3 = (n0 − n1 − n2 + n3 + (C − D)) / 2 + n3, with n0 = C(|F|, 2) pairs, n1, n2
        the pairs tied in x, y and n3 those tied in both (from group sizes); for
        "reference" the ties are first broken by index (ordinal ranks), leaving none.
        "auto" uses "pairs" for d ≤ 256 and "kendall" above (224×224 pixel maps have
        1.26·10⁹ pairs).

    Returns
    -------
    float or ndarray of float64, shape (B,)
        In [0, 1]; NaN when |F| < 2.
    """
    if ties not in ("strict", "reference"):
        raise ValueError(f"ties must be 'strict' or 'reference', got {ties!r}")
    if algorithm not in ("auto", "pairs", "kendall"):
        raise ValueError(f"algorithm must be 'auto', 'pairs' or 'kendall', got {algorithm!r}")
    a, b, single = _as_pair(e_a, e_b)
    mask = _feature_mask(features, k, a, b)
    x, y = np.abs(a), np.abs(b)
    if algorithm == "auto":
        algorithm = "pairs" if a.shape[1] <= _PAIRS_MAX_D else "kendall"
    count = _pra_pairs(x, y, mask, ties) if algorithm == "pairs" else _pra_kendall(x, y, mask, ties)
    m = mask.sum(axis=1)
    n_pairs = m * (m - 1) / 2
    pra = np.full(len(a), np.nan)
    np.divide(count, n_pairs, out=pra, where=n_pairs > 0)
    return _out(pra, single)


def agreement_table(
    attributions: Mapping[str, ArrayLike],
    k: int,
    *,
    features: Features = "all",
    ties: Literal["strict", "reference"] = "strict",
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """All agreement metrics for every ordered pair of methods, per input.

    Parameters
    ----------
    attributions : mapping of method name -> ndarray or Tensor, shape (B, d) or (d,)
        Attributions of the same B inputs by each method; all of one shape. A (d,) map
        is treated as B = 1.
    k : int
        Top-k size of FA/RA/SA/SRA, and of F when ``features="union_topk"``.
    features, ties
        F and the PRA tie rule, as in :func:`pairwise_rank_agreement`.

    Returns
    -------
    dict mapping (a, b) -> dict of metric name -> ndarray of shape (B,)
        One entry per ordered pair a ≠ b. Metrics: "feature_agreement",
        "rank_agreement", "sign_agreement", "signed_rank_agreement", "rank_correlation",
        "pairwise_rank_agreement" (float64), "tie_fraction_a", "tie_fraction_b"
        (:func:`tie_fraction` of each map) and "nonnegative_pair" (bool: both maps of
        that input have no negative entry, so the sign metrics are degenerate, SA = FA
        when the top-k entries are non-zero; exclude or flag them when reporting).
        Every metric is symmetric, so (b, a) holds copies of the values of (a, b) with
        the two tie fractions swapped; aggregate per input first, then over inputs.
    """
    rows = {name: _as_rows(e, name)[0] for name, e in attributions.items()}
    shapes = {r.shape for r in rows.values()}
    if len(shapes) > 1:
        raise ValueError(f"all attributions must have the same shape, got {sorted(shapes)}")
    k_features = k if isinstance(features, str) and features == "union_topk" else None
    ties_of = {name: tie_fraction(r, k) for name, r in rows.items()}
    table: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name_a, name_b in combinations(rows, 2):
        a, b = rows[name_a], rows[name_b]
        metrics = _topk_metrics(a, b, _check_k(k, a.shape[1]))
        metrics["rank_correlation"] = rank_correlation(a, b, features, k_features)
        metrics["pairwise_rank_agreement"] = pairwise_rank_agreement(
            a, b, features, k_features, ties=ties
        )
        metrics["nonnegative_pair"] = (a.min(axis=1) >= 0) & (b.min(axis=1) >= 0)
        table[name_a, name_b] = {
            **metrics, "tie_fraction_a": ties_of[name_a], "tie_fraction_b": ties_of[name_b]
        }
        # copies, so that editing one direction's arrays never changes the other's
        table[name_b, name_a] = {
            **{m: v.copy() for m, v in metrics.items()},
            "tie_fraction_a": ties_of[name_b].copy(),
            "tie_fraction_b": ties_of[name_a].copy(),
        }
    return table


def _topk_metric(e_a: ArrayLike, e_b: ArrayLike, k: int, name: str) -> float | np.ndarray:
    a, b, single = _as_pair(e_a, e_b)
    return _out(_topk_metrics(a, b, _check_k(k, a.shape[1]))[name], single)


def _topk_metrics(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """FA, RA, SA, SRA of (B, d) rows, from one top-k selection per map."""
    top_a, top_b = _topk(a, k), _topk(b, k)
    in_b = np.zeros(b.shape, dtype=bool)
    np.put_along_axis(in_b, top_b, True, axis=1)
    shared = np.take_along_axis(in_b, top_a, axis=1)  # (B, k): a's p-th feature ∈ top_k(b)
    # Signs of a's top-k features in both maps; only positions in S are counted.
    same_sign = np.take_along_axis(np.sign(a) == np.sign(b), top_a, axis=1)
    # With deterministic top-k lists, rank(a, i) = rank(b, i) means i sits at the same
    # position of both lists, which also implies i ∈ S.
    same_rank = top_a == top_b
    return {
        "feature_agreement": shared.mean(axis=1),
        "rank_agreement": same_rank.mean(axis=1),
        "sign_agreement": (shared & same_sign).mean(axis=1),
        "signed_rank_agreement": (same_rank & same_sign).mean(axis=1),
    }


def _topk(e: np.ndarray, k: int) -> np.ndarray:
    # A stable sort on −|E| orders equal magnitudes by index; argpartition would not.
    return np.argsort(-np.abs(e), axis=1, kind="stable")[:, :k]


def _pra_pairs(x: np.ndarray, y: np.ndarray, mask: np.ndarray, ties: str) -> np.ndarray:
    """Agreeing pairs i < j of F per row by comparing all pairs, O(d²) per row."""
    d = x.shape[1]
    upper = np.triu(np.ones((d, d), dtype=bool), k=1)
    count = np.zeros(len(x))
    step = max(1, _PAIRS_CHUNK // (d * d))
    for s in range(0, len(x), step):
        xs, ys, ms = x[s:s + step], y[s:s + step], mask[s:s + step]
        dx = np.sign(xs[:, :, None] - xs[:, None, :])  # [r, i, j] = sign(x_i − x_j)
        dy = np.sign(ys[:, :, None] - ys[:, None, :])
        agree = dx == dy if ties == "strict" else (dx > 0) == (dy > 0)
        valid = ms[:, :, None] & ms[:, None, :] & upper
        count[s:s + step] = (agree & valid).sum(axis=(1, 2))
    return count


def _pra_kendall(x: np.ndarray, y: np.ndarray, mask: np.ndarray, ties: str) -> np.ndarray:
    """Agreeing pairs i < j of F per row from Kendall's τ, O(|F| log |F|) per row."""
    count = np.zeros(len(x))
    for r in range(len(x)):
        xr, yr = x[r, mask[r]], y[r, mask[r]]  # boolean indexing keeps index order
        m = len(xr)
        if m < 2:
            continue
        n0 = m * (m - 1) // 2
        if ties == "reference":
            # 'i above j' for i < j is x_i > x_j, i.e. ties lose to the larger index:
            # ordinal ranks encode exactly that order, without ties, so the agreeing
            # pairs are the concordant ones, n0 · (1 + τ) / 2.
            tau = kendalltau(rankdata(xr, method="ordinal"), rankdata(yr, method="ordinal"))
            count[r] = round(n0 * (1.0 + tau.statistic) / 2.0)
            continue
        n1, n2 = _tied_pairs(xr), _tied_pairs(yr)
        n3 = _tied_pairs(np.stack([xr, yr], axis=1))
        if n1 == n0 or n2 == n0:
            c_minus_d = 0  # one map constant on F: no pair is concordant or discordant
        else:
            tau_b = kendalltau(xr, yr, variant="b").statistic
            # τ_b = (C − D) / sqrt((n0 − n1)(n0 − n2)); C − D is an integer, and the
            # float error of this product stays far below 0.5 for any feasible d.
            c_minus_d = round(tau_b * math.sqrt((n0 - n1) * (n0 - n2)))
        c_plus_d = n0 - n1 - n2 + n3  # pairs tied in neither map
        count[r] = (c_plus_d + c_minus_d) // 2 + n3
    return count


def _tied_pairs(values: np.ndarray) -> int:
    """Number of pairs with equal values (equal rows for a 2-D array)."""
    _, sizes = np.unique(values, axis=0, return_counts=True)
    return int((sizes * (sizes - 1) // 2).sum())


def _feature_mask(features: Features, k: int | None, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, d) bool mask of the feature set F."""
    n, d = a.shape
    if isinstance(features, str):
        if features not in ("all", "union_topk"):
            raise ValueError(f"features must be 'all', 'union_topk' or indices, got {features!r}")
        if features == "all":
            if k is not None:
                raise ValueError("k is only used with features='union_topk'")
            return np.ones((n, d), dtype=bool)
        if k is None:
            raise ValueError("features='union_topk' needs k")
        k = _check_k(k, d)
        mask = np.zeros((n, d), dtype=bool)
        np.put_along_axis(mask, _topk(a, k), True, axis=1)
        np.put_along_axis(mask, _topk(b, k), True, axis=1)
        return mask
    if k is not None:
        raise ValueError("k is only used with features='union_topk'")
    if hasattr(features, "detach"):  # torch.Tensor, without importing torch
        features = features.detach().cpu().numpy()
    idx = np.asarray(features)
    if idx.dtype.kind not in "iu" or idx.ndim not in (1, 2):
        raise ValueError(f"features must be integer indices of shape (m,) or (B, m), got "
                         f"{idx.dtype} {idx.shape}")
    idx = np.broadcast_to(idx, (n, idx.shape[-1])) if idx.ndim == 1 else idx
    if idx.shape[0] != n:
        raise ValueError(f"features has {idx.shape[0]} rows for {n} inputs")
    if idx.size and (idx.min() < 0 or idx.max() >= d):
        raise ValueError(f"feature indices must lie in [0, {d})")
    if idx.shape[1] > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise ValueError("feature indices must be distinct")
    mask = np.zeros((n, d), dtype=bool)
    np.put_along_axis(mask, idx.astype(np.intp), True, axis=1)
    return mask


def _check_k(k: int, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
    return int(k)


def _as_pair(e_a: ArrayLike, e_b: ArrayLike) -> tuple[np.ndarray, np.ndarray, bool]:
    a, single_a = _as_rows(e_a, "e_a")
    b, single_b = _as_rows(e_b, "e_b")
    if a.shape != b.shape or single_a != single_b:
        raise ValueError(f"e_a and e_b must have the same shape, got {tuple(np.shape(e_a))} "
                         f"and {tuple(np.shape(e_b))}")
    return a, b, single_a


def _as_rows(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """(B, d) float64 array of a (d,) or (B, d) input, and whether it was (d,)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch; bf16 has no numpy
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (d,) or (B, d) with d ≥ 1, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return (arr[None], True) if arr.ndim == 1 else (arr, False)


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values
