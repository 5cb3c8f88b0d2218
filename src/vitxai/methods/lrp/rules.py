"""The LRP rules of the explicit relevance passes (Chefer 2021a, absLRP), in one place.

Both passes record the activations of an *unmodified* timm ViT with forward hooks (docs/methods.md
§8) and apply these rules explicitly, batched, every sum taken per sample. Two families:

- LRP α1β0 and gradient × input, as Chefer et al. 2021a (docs/methods.md §3): :func:`linear_rule`,
  :func:`matmul_rule`, :func:`residual_rule`, :func:`clone_rule`, :func:`patch_embedding_rule`;
  stabiliser :func:`safe_divide` (the reference's ``+ 1e-9``).
- absLRP's relative absolute-magnitude rules (Vukadin et al. 2024, docs/methods.md §7), named
  ``abs_*``: each input's (G⁺, G⁻) contribution redistributed by :func:`share`; stabilisers
  :func:`exact_divide` and :func:`scaled` (s = R/|y|).

What is the same math lives once: :func:`per_sample_sum`, and :func:`positive_contraction`,
Σ_j (a_ik b_kj)⁺ s_ij, the backward of the positive contributions that is both α1β0's linear rule
(x⁺w⁺ + x⁻w⁻) and absLRP's G of a linear map or a product (times 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-9  # Chefer's reference stabiliser
_ZERO_OUTPUT = 1e-9  # absLRP: |y| used where y == 0 (the paper's stabiliser)

Contribution = tuple[torch.Tensor, torch.Tensor]  # absLRP: (G⁺, G⁻) of one input


# --- shared: per-sample sums, stabilisers, the positive-contribution contraction -------------

def per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over every axis but the batch, shaped to broadcast against ``t``."""
    return t.reshape(t.shape[0], -1).sum(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / (b + 1e-9), and 0 where b is exactly 0 (the reference's stabiliser)."""
    den = b + _EPS
    den = den + (den == 0).to(den.dtype) * _EPS
    return a / den * (b != 0).to(a.dtype)


def exact_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, and 0 where b == 0 (only then is a also 0 where absLRP uses it)."""
    return a / torch.where(b == 0, torch.ones_like(b), b)


def scaled(relevance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """absLRP's s = R / |y|, with |y| := 1e-9 where y == 0."""
    return relevance / torch.where(y == 0, torch.full_like(y, _ZERO_OUTPUT), y.abs())


def positive_contraction(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_j (a_ik b_kj)⁺ s_ij for the product a @ b and an upstream s shaped like a @ b.

    (ab)⁺ = a⁺b⁺ + a⁻b⁻ turns the sum into two matrix products: a⁺ ⊙ (s b⁺ᵀ) + a⁻ ⊙ (s b⁻ᵀ).
    """
    b_pos, b_neg = b.clamp(min=0), b.clamp(max=0)
    return (a.clamp(min=0) * (s @ b_pos.transpose(-2, -1))
            + a.clamp(max=0) * (s @ b_neg.transpose(-2, -1)))


# --- LRP α1β0 and gradient × input (Chefer 2021a) --------------------------------------------

def linear_rule(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """LRP α1β0 through ``y = x Wᵀ + b``: x (..., in), W (out, in), R (..., out) → (..., in).

    z⁺_ij = x⁺_i w⁺_ij + x⁻_i w⁻_ij, R_i = Σ_j z⁺_ij / Σ_i′ z⁺_i′j · R_j (bias excluded).
    """
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    s = safe_divide(relevance, xp @ wp.T + xn @ wn.T)
    return positive_contraction(x, weight.T, s)


def token_readout_rule(tokens: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       relevance: torch.Tensor) -> torch.Tensor:
    """LRP α1β0 through a linear read-out of tokens, y = Σ_k Σ_i ω_ki x_i W_kᵀ + b.

    The :func:`linear_rule` of that one linear map (a linear probe on the class token, the
    mean patch token or both; docs/methods.md §13): with ω ≥ 0,
    z⁺_(i,d),c = ω_ki (x_id w_k,cd)⁺ and Σ_(i,d) z⁺ = Σ_k (ω_kᵀX⁺) W_k⁺ᵀ + (ω_kᵀX⁻) W_k⁻ᵀ.

    Args:
        tokens: X (B, N, D).
        parts: [(ω_k (N,), W_k (C, D))].
        relevance: (B, C).

    Returns:
        (B, N, D) the relevance of every token feature.
    """
    xp, xn = tokens.clamp(min=0), tokens.clamp(max=0)
    z = sum(torch.einsum("n,bnd->bd", w, xp) @ wk.clamp(min=0).T
            + torch.einsum("n,bnd->bd", w, xn) @ wk.clamp(max=0).T for w, wk in parts)
    s = safe_divide(relevance, z)[:, None, :]
    return sum(w[None, :, None] * positive_contraction(tokens, wk.T, s) for w, wk in parts)


def residual_rule(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the relevance of y = a + b between a and b, conserving ΣR per sample.

    a′ = a·R/y, b′ = b·R/y, rescaled so Σa = |Σa′|/(|Σa′| + |Σb′|)·ΣR.
    """
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    sa, sb = per_sample_sum(ra), per_sample_sum(rb)
    total = per_sample_sum(relevance)
    denom = sa.abs() + sb.abs()
    ra = ra * safe_divide(safe_divide(sa.abs(), denom) * total, sa)
    rb = rb * safe_divide(safe_divide(sb.abs(), denom) * total, sb)
    return ra, rb


def clone_rule(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """A fork x → (x, x): the two relevances are summed (x·Σ R_i/x, as the reference)."""
    return x * (safe_divide(r1, x) + safe_divide(r2, x))


def matmul_rule(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient × input through Z = a @ b, each operand halved (both receive ΣR otherwise)."""
    s = safe_divide(relevance, a @ b)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def patch_embedding_rule(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                         stride: tuple[int, int]) -> torch.Tensor:
    """z^B rule through the patch convolution, bounds = per-sample min and max of the input.

    Args:
        x: (B, 3, H, W) the model's normalised input.
        weight: (D, 3, p, p) patch-embedding kernel (stride = kernel, no overlap).
        relevance: (B, D, gh, gw) relevance of the patch embeddings.

    Returns:
        (B, 3, H, W) pixel relevance (Montavon et al. 2017, deep Taylor z^B).
    """
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z = (F.conv2d(x, weight, stride=stride) - F.conv2d(low, wp, stride=stride)
         - F.conv2d(high, wn, stride=stride) + _EPS)
    s = relevance / z
    size = x.shape[-2:]

    def back(w: torch.Tensor) -> torch.Tensor:
        out = F.conv_transpose2d(s, w, stride=stride)
        return F.pad(out, (0, size[1] - out.shape[-1], 0, size[0] - out.shape[-2]))

    return x * back(weight) - low * back(wp) - high * back(wn)


# --- absLRP: relative absolute-magnitude rules -----------------------------------------------
# Every layer y = f(x) has an absolute twin y_abs; with s = R/|y| and s± its parts,
# G± = x ⊙ Jᵀ_{y + y_abs} s± and R_in = P⁺·N1(G⁺) + |P⁻|·N1(G⁻) (see .abslrp).

def n1(v: torch.Tensor) -> torch.Tensor:
    """N1(v) = v / Σ|v| per sample; an all-zero sample stays zero."""
    return exact_divide(v, per_sample_sum(v.abs()))


def share(relevance: torch.Tensor, contributions: Sequence[Contribution]) -> list[torch.Tensor]:
    """Redistribute R over one or more inputs from their (G⁺, G⁻).

    Input i receives P⁺·ρ⁺_i·N1(G⁺_i) + |P⁻|·ρ⁻_i·N1(G⁻_i) with ρ±_i = ΣG±_i / Σ_k ΣG±_k, so a
    single input gets R_in = P⁺·N1(G⁺) + |P⁻|·N1(G⁻). Shapes of the inputs may differ; every
    sum is per sample. A stream whose G vanishes on every input (e.g. all positive relevance on
    LayerNorm units the twin gates off) has nowhere to go and is dropped, as in the paper.
    """
    p_pos = per_sample_sum(relevance.clamp(min=0)).flatten()
    p_neg = per_sample_sum(relevance.clamp(max=0)).flatten().abs()

    def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    if len(contributions) == 1:
        ratios = [(torch.ones_like(p_pos), torch.ones_like(p_neg))]
    else:
        pos_sums = [per_sample_sum(g_pos).flatten() for g_pos, _ in contributions]
        neg_sums = [per_sample_sum(g_neg).flatten() for _, g_neg in contributions]
        pos_total, neg_total = sum(pos_sums), sum(neg_sums)
        ratios = [(exact_divide(ps, pos_total), exact_divide(ns, neg_total))
                  for ps, ns in zip(pos_sums, neg_sums, strict=True)]
    return [
        per_sample(p_pos * rp, g_pos) * n1(g_pos) + per_sample(p_neg * rn, g_neg) * n1(g_neg)
        for (g_pos, g_neg), (rp, rn) in zip(contributions, ratios, strict=True)
    ]


def _split_by_sign(make: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor
                   ) -> Contribution:
    """(G⁺, G⁻) = (make(s⁺), make(s⁻)): each input's contribution is linear in s."""
    return make(s.clamp(min=0)), make(s.clamp(max=0))


def _twin_product(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """a ⊙ Jᵀ_{y+y_abs} s for y = a @ b, y_abs = |a| @ |b|: Σ_j 2(a_ik b_kj)⁺ s_ij."""
    return 2 * positive_contraction(a, b, s)


def abs_linear_rule(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    relevance: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b: x (B, ..., in), W (out, in), R (B, ..., out) → R_in (B, ..., in).

    G_i = Σ_j 2(x_i w_ji)⁺ s_j with s = R/|y|; the bias enters |y| only.
    """
    weight = weight.to(x.dtype)
    y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    wt = weight.T
    return share(relevance, [_split_by_sign(lambda s: _twin_product(x, wt, s),
                                            scaled(relevance, y))])[0]


def abs_readout_rule(inputs: Sequence[torch.Tensor], heads: Sequence[nn.Linear],
                     relevance: torch.Tensor) -> list[torch.Tensor]:
    """The token read-out y = (1/k)·Σ_h (x_h W_hᵀ + b_h) of k linear heads on k tokens.

    One head (class token) is :func:`abs_linear_rule`. Two heads are the distilled DeiT's eval
    output (head(CLS) + head_dist(DIST))/2, a single linear map of the concatenation [CLS; DIST]
    with weight [W₁/2, W₂/2]: each token gets G_h,i = Σ_j 2(x_h,i w_h,ji / k)⁺ s_j with s = R/|y|
    of the averaged logits, and P± is split between the tokens in proportion to their ΣG± (as
    every two-input rule here; since a linear map's G± are sign-definite, this equals the linear
    rule on the concatenation, bias excluded).
    The literal composition (add rule on the two half-logits, then each head) would weigh the
    heads by the signs of the half-logits themselves: a target whose logit is negative in both
    heads would pass no positive relevance at all, where a single head's linear rule still
    passes it through the positive contributions.

    Args:
        inputs: k tensors (B, D), the inputs of the heads.
        heads: the k linear heads (out = C).
        relevance: (B, C) relevance of the read-out.

    Returns:
        k tensors (B, D), the relevance of each read-out token.
    """
    k = len(heads)
    if k == 1:
        return [abs_linear_rule(inputs[0], heads[0].weight, heads[0].bias, relevance)]
    dtype = relevance.dtype
    weights = [h.weight.to(dtype) for h in heads]
    y = sum(F.linear(x, w, None if h.bias is None else h.bias.to(dtype))
            for x, w, h in zip(inputs, weights, heads, strict=True)) / k
    s = scaled(relevance, y)
    return share(relevance, [
        _split_by_sign(lambda t, x=x, wt=w.T / k: _twin_product(x, wt, t), s)
        for x, w in zip(inputs, weights, strict=True)
    ])


def abs_token_readout_rule(tokens: torch.Tensor,
                           parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           bias: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """absLRP through a linear read-out of tokens, y = Σ_k Σ_i ω_ki x_i W_kᵀ + b.

    :func:`abs_linear_rule` of that one linear map (a linear probe; docs/methods.md §13):
    G_(i,d) = Σ_k ω_ki Σ_c 2(x_id w_k,cd)⁺ s_c with s = R/|y| (ω ≥ 0 factors out).

    Args:
        tokens: X (B, N, D); parts: [(ω_k (N,), W_k (C, D))]; bias: b (C,);
        relevance: (B, C).

    Returns:
        (B, N, D) the relevance of every token feature.
    """
    y = sum(torch.einsum("n,bnd->bd", w, tokens) @ wk.T for w, wk in parts) + bias
    return share(relevance, [_split_by_sign(
        lambda t: sum(w[None, :, None] * _twin_product(tokens, wk.T, t[:, None, :])
                      for w, wk in parts), scaled(relevance, y))])[0]


def abs_matmul_rule(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a @ b (batched, twin |a| @ |b|): R (…, n, m) → (R_a (…, n, k), R_b (…, k, m)).

    Used for q·kᵀ (a = q·scale, b = kᵀ; the positive scale factors out of x ⊙ J) and for A·V.
    """
    s = scaled(relevance, a @ b)
    at, bt = a.transpose(-2, -1), b.transpose(-2, -1)
    g_a = _split_by_sign(lambda t: _twin_product(a, b, t), s)
    g_b = _split_by_sign(lambda t: _twin_product(bt, at, t.transpose(-2, -1))
                         .transpose(-2, -1), s)
    r_a, r_b = share(relevance, [g_a, g_b])
    return r_a, r_b


def abs_add_rule(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a + b (twin |a| + |b|): G_a = 2a⁺ ⊙ s; ``b`` may broadcast against ``a``."""
    b = b.expand_as(a)
    s = scaled(relevance, a + b)
    r_a, r_b = share(relevance, [_split_by_sign(lambda t: 2 * a.clamp(min=0) * t, s),
                                 _split_by_sign(lambda t: 2 * b.clamp(min=0) * t, s)])
    return r_a, r_b


def abs_scale_rule(x: torch.Tensor, gamma: torch.Tensor, relevance: torch.Tensor
                   ) -> torch.Tensor:
    """LayerScale y = γ ⊙ x (twin |γ||x|): G = 2(γx)⁺ ⊙ s."""
    y = x * gamma.to(x.dtype)
    return share(relevance, [_split_by_sign(lambda t: 2 * y.clamp(min=0) * t,
                                            scaled(relevance, y))])[0]


def abs_layernorm_rule(x: torch.Tensor, norm: nn.LayerNorm, relevance: torch.Tensor
                       ) -> torch.Tensor:
    """LayerNorm over the last axis, twin |(x−μ)/σ|·|γ| + |β| with μ and σ detached.

    ∂(y + y_abs)/∂x = (γ + |γ|·sgn((x−μ)/σ))/σ, so G = x ⊙ that ⊙ s. G is not sign-definite
    (x, not x − μ, multiplies it), so only each stream's L1 mass is kept.
    """
    d = x.shape[-1]
    gamma = torch.ones(d, dtype=x.dtype, device=x.device) if norm.weight is None \
        else norm.weight.to(x.dtype)
    beta = None if norm.bias is None else norm.bias.to(x.dtype)
    y = F.layer_norm(x, (d,), gamma, beta, norm.eps)
    mu = x.mean(dim=-1, keepdim=True)
    sigma = (x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    slope = x * (gamma + gamma.abs() * torch.sign(x - mu)) / sigma
    return share(relevance, [_split_by_sign(lambda t: slope * t, scaled(relevance, y))])[0]


def abs_softmax_rule(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, twin y_abs = y with max and denominator detached.

    ∂(y + y_abs)/∂x = diag(2y), so G± = 2 x ⊙ y ⊙ s± = 2 x ⊙ R± (where y > 0): R_in ∝ x ⊙ R.
    """
    y = x.softmax(dim=-1)
    slope = 2 * x * y
    return share(relevance, [_split_by_sign(lambda t: slope * t, scaled(relevance, y))])[0]


def abs_activation_rule(x: torch.Tensor, act: nn.Module, relevance: torch.Tensor
                        ) -> torch.Tensor:
    """Elementwise activation y = f(x), twin |f(x)|: G = x ⊙ f′(x)(1 + sgn f(x)) ⊙ s.

    Local autograd through ``act`` on the recorded input, so GELU, tanh-GELU or QuickGELU all
    get their exact derivative.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = act(xg)
        twin_sum = y + y.abs()
        s = scaled(relevance, y.detach())
        (j_pos,) = torch.autograd.grad(twin_sum, xg, s.clamp(min=0), retain_graph=True)
        (j_neg,) = torch.autograd.grad(twin_sum, xg, s.clamp(max=0))
    return share(relevance, [(x * j_pos, x * j_neg)])[0]


def abs_patch_conv_rule(images: torch.Tensor, conv: nn.Conv2d, relevance: torch.Tensor
                        ) -> torch.Tensor:
    """The patch embedding (kernel = stride = p, no padding) as a linear map on unfolded patches.

    Args:
        images: (B, 3, H, W) the model's normalised input.
        relevance: (B, Np, D) relevance of the patch embeddings, patches row by row.

    Returns:
        (B, 3, H, W) relevance of the normalised input.
    """
    kernel = conv.kernel_size
    cols = F.unfold(images, kernel, stride=kernel).transpose(1, 2)  # (B, Np, 3·p·p)
    r_cols = abs_linear_rule(cols, conv.weight.flatten(1), conv.bias, relevance)
    return F.fold(r_cols.transpose(1, 2), images.shape[-2:], kernel, stride=kernel)


# --- absLRP on CNNs (timm VGG and ResNet; docs/methods.md §7, "On CNNs") -------------------------

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the absLRP passes run in: float64 models stay exact (tests), all others use
    float32 (the rules amplify half-precision rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def abs_conv2d_rule(x: torch.Tensor, conv: nn.Conv2d, relevance: torch.Tensor) -> torch.Tensor:
    """A Conv2d (any stride, padding, dilation, groups; zero padding), twin conv(|x|; |W|, |b|).

    The convolutional :func:`abs_linear_rule`: G_i = Σ_j 2(x_i w_ji)⁺ s_j with s = R/|y|, the
    bias entering |y| only. (xw)⁺ = x⁺w⁺ + x⁻w⁻ turns the sum into two transposed convolutions
    (the convolution's input gradient): G = 2[x⁺ ⊙ Cᵀ_{W⁺} s + x⁻ ⊙ Cᵀ_{W⁻} s].

    Args:
        x: (B, C_in, H, W) the convolution's input.
        conv: the layer (its weight and bias are cast to x's dtype).
        relevance: (B, C_out, h, w) relevance of its output.

    Returns:
        (B, C_in, H, W) relevance of the input.
    """
    weight = conv.weight.to(x.dtype)
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.conv2d(x, weight, None if conv.bias is None else conv.bias.to(x.dtype), *geometry)
    # the transposed convolutions dominate the pass: skip those of an all-zero part (x⁻ after
    # a ReLU; the empty R⁻ stream of a non-negative seed)
    parts = [(xp, weight.clamp(**bound)) for xp, bound in ((x.clamp(min=0), {"min": 0}),
                                                          (x.clamp(max=0), {"max": 0}))
             if xp.any()]

    def contribution(s: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(x)
        if s.any():
            for xp, wp in parts:
                g += 2 * xp * torch.nn.grad.conv2d_input(x.shape, wp, s, *geometry)
        return g

    return share(relevance, [_split_by_sign(contribution, scaled(relevance, y))])[0]


def abs_batchnorm_rule(x: torch.Tensor, norm: nn.BatchNorm2d, relevance: torch.Tensor
                       ) -> torch.Tensor:
    """BatchNorm2d in eval mode, the per-channel affine map y = a·x + c.

    a = γ/√(σ²_run + ε), c = β − a·μ_run; twin |a|·|x| + |c| (the reference's copy with |γ|,
    |β| on |x| has the same Jacobian |a|·sgn x): G = x ⊙ (a + |a|·sgn x) ⊙ s = 2(a·x)⁺ ⊙ s,
    the LayerScale rule with a shift that enters |y| only.

    Args:
        x: (B, C, H, W) the normalisation's input; norm: a BatchNorm2d with running
        statistics; relevance: (B, C, H, W) relevance of its output.
    """
    dtype = x.dtype
    weight = torch.ones_like(norm.running_var, dtype=dtype) if norm.weight is None \
        else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    var = norm.running_var.to(dtype)
    y = F.batch_norm(x, norm.running_mean.to(dtype), var, weight, bias, False, 0.0, norm.eps)
    ax = x * (weight / (var + norm.eps).sqrt()).view(1, -1, 1, 1)
    return share(relevance, [_split_by_sign(lambda t: 2 * ax.clamp(min=0) * t,
                                            scaled(relevance, y))])[0]


def abs_relu_rule(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """ReLU, twin |ReLU(x)|: G = x ⊙ 1[x > 0]·(1 + 1) ⊙ s = 2x⁺ ⊙ s (:func:`abs_activation_rule`
    in closed form).

    With s = R/x⁺, G± = 2R± where x > 0: relevance passes through unchanged wherever the
    unit is active (the rules above a ReLU give inactive units none, so the reference's twin
    ReLU(|x|) = |x| gives the same). The rule reads x⁺ only, so the input of an in-place ReLU,
    recorded after the call (= its output), serves as well.
    """
    y = x.clamp(min=0)
    return share(relevance, [_split_by_sign(lambda t: 2 * y * t, scaled(relevance, y))])[0]


def abs_max_pool_rule(x: torch.Tensor, pool: nn.MaxPool2d, relevance: torch.Tensor
                      ) -> torch.Tensor:
    """MaxPool2d, twin maxpool(|x|): each output passes its s to the input it selected.

    G = x ⊙ Σ_{j: i = argmax_j x} s_j + |x| ⊙ Σ_{j: i = argmax_j |x|} s_j, with torch's own
    indices (its gradient's tie-breaking). For x ≥ 0 (every max pool of a VGG or ResNet follows
    a ReLU) both argmaxes agree and G = 2y ⊙ s = 2R at the winners: winner takes all, and R± is
    conserved. Signed inputs make G sign-indefinite (only each stream's L1 mass is kept).

    Args:
        x: (B, C, H, W) the pool's input; relevance: (B, C, h, w) relevance of its output.
    """
    kwargs = dict(kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                  dilation=pool.dilation, ceil_mode=pool.ceil_mode, return_indices=True)
    y, index = F.max_pool2d(x, **kwargs)
    _, index_abs = F.max_pool2d(x.abs(), **kwargs)

    def routed(idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # Σ_{j: idx_j = i} s_j
        flat = torch.zeros_like(x).flatten(2)
        return flat.scatter_add(2, idx.flatten(2), s.flatten(2)).view_as(x)

    return share(relevance, [_split_by_sign(
        lambda t: x * routed(index, t) + x.abs() * routed(index_abs, t),
        scaled(relevance, y))])[0]


def abs_avg_pool_rule(x: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor],
                      relevance: torch.Tensor) -> torch.Tensor:
    """A linear pooling y = P·x with P ≥ 0, twin P·|x|: G = 2x⁺ ⊙ Pᵀs.

    AvgPool2d, AdaptiveAvgPool2d, global average pooling (timm's SelectAdaptivePool2d, with
    or without flatten): the :func:`abs_linear_rule` of P, whose Pᵀs is taken by autograd
    through ``pool`` itself, so any kernel, stride, padding, ``ceil_mode`` or divisor is exact.

    Args:
        x: (B, C, H, W) the pool's input; pool: the pooling (a module or function);
        relevance: relevance of its output (shaped like ``pool(x)``).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = pool(xg)
        s = scaled(relevance, y.detach())
        (pt_pos,) = torch.autograd.grad(y, xg, s.clamp(min=0), retain_graph=True)
        (pt_neg,) = torch.autograd.grad(y, xg, s.clamp(max=0))
    x2 = 2 * x.clamp(min=0)
    return share(relevance, [(x2 * pt_pos, x2 * pt_neg)])[0]
