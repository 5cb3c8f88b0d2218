"""AttnLRP and CP-LRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-Wise
Relevance Propagation for Transformers"; reference code LXT) on an unmodified timm ViT.

Relevance of a tensor t is R_t = t ⊙ ∂̃y_c/∂t, where ∂̃ is ordinary backprop of the pre-softmax
logit y_c with the LRP rules of docs/methods.md §5 in the backward pass. :func:`lrp_rules` is a
zennit-style context manager that installs them by replacing ``forward`` on individual module
*instances* (never on classes, never on torch functions) and restores every instance on exit,
also when the body raises. Under the rules the forward VALUE is unchanged; only gradients change:

- LayerNorm (timm ``LayerNorm``, ``nn.LayerNorm``: norm1/norm2/norm/fc_norm/norm_pre, q/k norms):
  σ is detached, y = (x − μ)/σ̄ · w + β, so the centring stays linear and only 1/σ is frozen.
- GELU, GELU-tanh, QuickGELU: identity rule, gradient = upstream · f(x)/x (the limit f′(0) = ½
  at x = 0; the ratio is computed in at least fp32, LXT #29-#32).
- timm ``Attention``: an explicit (non-fused) forward of the same value. ``"attnlrp"`` applies
  the uniform rule of bilinear products, which halves the gradient into each operand: ×½ into q
  and k at q·kᵀ and ×½ into A and v at A·V. Softmax keeps its plain gradient (its LRP rule is
  gradient × input), and softmax's backward is linear in its upstream gradient, so the ½ on A
  passes unchanged to the scores: q and k end up with ×¼ of the plain gradient through the
  attention path, v with ×½ (docs/methods.md §5; the tests check this against SDPA with exactly
  those scalings). ``"cplrp"`` detaches q and k (A is a constant) and leaves v unscaled.
- Linear, ``gamma`` > 0: the γ-rule of docs/methods.md §5 (w′ = w + γw⁺, w″ = w + γw⁻, bias
  b + γb^±, chosen by the sign of z); ``gamma`` = 0 is the plain gradient (ε-rule, ε → 0).
  The patch-embedding Conv2d always keeps the plain gradient.
- Residual adds, LayerScale, the read-out and the head: plain gradient.

Conservation: with CP-LRP every frozen factor (A, 1/σ, f(x)/x, γ ratios) makes the network
linear in its inputs plus constant terms (biases, LayerNorm β, pos_embed, prefix tokens), so
Σ x ⊙ ∂̃y = y_c − (constant terms); with those zeroed, relevance on the model's input plus on
the prefix tokens sums to y_c. Full AttnLRP is not conservative (softmax has a bias term).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import (
    GELU,
    DropPath,
    GELUTanh,
    LayerScale,
    Mlp,
    PatchDropout,
    PatchEmbed,
    QuickGELU,
)
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block
from torch import nn

from vitxai.methods.base import (
    Attribution,
    BatchContext,
    Cost,
    pixel_attribution,
    register_method,
    to_patch_map,
)
from vitxai.models.adapter import ViTAdapter
from vitxai.models.probe import LinearProbe
from vitxai.params import check_choice, check_range

Mode = Literal["attnlrp", "cplrp"]

_GELUS = (nn.GELU, GELU, GELUTanh, QuickGELU)  # all satisfy f(x)/x → ½ as x → 0
_GELU_SLOPE_AT_ZERO = 0.5
# modules whose plain gradient is already the rule (linear maps, eval-mode identities) ...
# (a linear probe is one linear map of the tokens; the γ-rule does not reach inside it)
_PLAIN = (nn.Linear, nn.Conv2d, nn.Dropout, nn.Identity, DropPath, LayerScale, PatchDropout,
          LinearProbe)
# ... and containers whose own forward only wires children with adds, reshapes and concats
_CONTAINERS = (nn.ModuleList, nn.Sequential, Block, Mlp, PatchEmbed)


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient × ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value; its gradient is multiplied by ``factor``."""
    return _GradScale.apply(x, factor)


class _IdentityRule(torch.autograd.Function):
    """y = f(x) forward; gradient = upstream · f(x)/x, in at least fp32, f′(0) at x = 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        # the ratio from the wide copy: f(x) in fp16 underflows to 0 for tiny x (ratio 0, not ½)
        ratio = torch.where(wide == 0, _GELU_SLOPE_AT_ZERO, f(wide) / wide)
        ctx.save_for_backward(ratio)
        return f(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return (grad.to(ratio.dtype) * ratio).to(grad.dtype), None


def _with_gradient_of(value: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
    """``value`` bit for bit, with the gradient of ``rule`` (value + 0, never (value + r) − r)."""
    return value.detach() + (rule - rule.detach())


def _layernorm_forward(m: nn.LayerNorm, original: Callable[[torch.Tensor], torch.Tensor]
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    dims = tuple(range(-len(m.normalized_shape), 0))

    def forward(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=dims, keepdim=True)
        sigma = (x.var(dim=dims, unbiased=False, keepdim=True) + m.eps).sqrt()
        rule = centred / sigma.detach()
        if m.weight is not None:
            rule = rule * m.weight
        if m.bias is not None:
            rule = rule + m.bias
        # the module's own output keeps the forward exact in every dtype (fast-norm kernels too)
        with torch.no_grad():
            value = original(x)
        return _with_gradient_of(value, rule)

    return forward


def _gelu_forward(original: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _IdentityRule.apply(x, original)

    return forward


def _gamma_linear_forward(m: nn.Linear, gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Linear with the γ-rule: value x Wᵀ + b, x ⊙ gradient = Σ_j (x⁺w′ + x⁻w″)_ij / d_j · R_j."""
    with torch.no_grad():
        w = m.weight.detach()
        w_up = w + gamma * w.clamp(min=0)    # w′
        w_down = w + gamma * w.clamp(max=0)  # w″
        b = m.bias.detach() if m.bias is not None else None
        b_up = b + gamma * b.clamp(min=0) if b is not None else None
        b_down = b + gamma * b.clamp(max=0) if b is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = F.linear(x, w, b)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        # z ≥ 0: d = x⁺w′ + x⁻w″ + b + γb⁺ ≥ z; z < 0: swapped, d ≤ z. So z/d ∈ [0, 1].
        d = torch.where(z >= 0, F.linear(xp, w_up, b_up) + F.linear(xn, w_down),
                        F.linear(xp, w_down, b_down) + F.linear(xn, w_up))
        dd = d.detach()  # the ratio is a constant of the backward pass
        ratio = torch.where(dd == 0, 0.0, z / torch.where(dd == 0, 1.0, dd))
        return _with_gradient_of(z, d * ratio)

    return forward


def _attention_forward(m: Attention, mode: Mode) -> Callable[..., torch.Tensor]:
    """timm 1.0 ``Attention.forward`` without SDPA, with the q/k/v/A gradient rules."""

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        if mode == "cplrp":
            q, k = q.detach(), k.detach()  # A constant: relevance flows through v only
        else:  # uniform rule: ½ into each operand of q·kᵀ, and into v here, A below (A·V)
            q, k, v = grad_scale(q, 0.5), grad_scale(k, 0.5), grad_scale(v, 0.5)
        scores = (q * m.scale) @ k.transpose(-2, -1)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(n, scores, attn_mask, is_causal))
        attn = m.attn_drop(scores.softmax(dim=-1))  # attn_drop kept so capture hooks still fire
        if mode == "attnlrp":
            attn = grad_scale(attn, 0.5)
        out = (attn @ v).transpose(1, 2).reshape(b, n, m.attn_dim)
        return m.proj_drop(m.proj(m.norm(out)))

    return forward


def _check_supported(model: nn.Module) -> None:
    """Fail loudly where a module would silently keep a gradient that is not its LRP rule."""
    ruled = (nn.LayerNorm, Attention, *_GELUS, *_PLAIN, *_CONTAINERS)
    for name, module in model.named_modules():
        if isinstance(module, Attention) and module.gate is not None:
            raise ValueError(f"lrp_rules: gated attention ({name}) is not supported")
        if module is not model and not isinstance(module, ruled):
            raise ValueError(
                f"lrp_rules has no rule for {name!r} ({type(module).__name__}); supported: timm "
                "VisionTransformer blocks with Attention, Mlp, LayerNorm, GELU/QuickGELU, Linear"
            )
    if model.training:
        raise ValueError("lrp_rules needs the model in eval mode (dropout would mix in noise)")


@contextmanager
def lrp_rules(adapter: ViTAdapter, mode: Mode = "attnlrp", gamma: float = 0.0
              ) -> Iterator[nn.Module]:
    """Install the AttnLRP (``"attnlrp"``) or CP-LRP (``"cplrp"``) rules on ``adapter.model``.

    Usage::

        x = adapter.normalize(images).detach().requires_grad_(True)
        with lrp_rules(adapter, "attnlrp") as model:
            y = model(x)
            (g,) = torch.autograd.grad(y.gather(1, t[:, None]).sum(), x)
        relevance = x * g

    Args:
        adapter: a timm ViT adapter in eval mode.
        mode: "attnlrp" (uniform rule on q·kᵀ and A·V) or "cplrp" (q, k detached).
        gamma: γ of the Linear γ-rule, ≥ 0; 0 = plain gradient.

    Yields:
        ``adapter.model`` with the rules installed. On exit, even on error, every patched
        instance gets its previous ``forward`` back (the class method, or the instance attribute
        it had), so later plain gradients are exactly the unpatched ones.

    Raises:
        ValueError: unknown mode, negative gamma, a module without a rule (e.g. attention
            pooling, gated attention), or a model in training mode.
        RuntimeError: the rules are already installed on this model.
    """
    if mode not in ("attnlrp", "cplrp"):
        raise ValueError(f"mode must be 'attnlrp' or 'cplrp', got {mode!r}")
    check_range("gamma", gamma, 0.0, None)
    model = adapter.model
    if any(getattr(m.__dict__.get("forward"), "_lrp_rule", False) for m in model.modules()):
        raise RuntimeError("lrp_rules is already active on this model")
    _check_supported(model)

    saved: list[tuple[nn.Module, Callable[..., Any] | None]] = []

    def patch(module: nn.Module, forward: Callable[..., Any]) -> None:
        forward._lrp_rule = True  # type: ignore[attr-defined]
        saved.append((module, module.__dict__.get("forward")))
        module.forward = forward

    try:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                patch(module, _layernorm_forward(module, module.forward))
            elif isinstance(module, _GELUS):
                patch(module, _gelu_forward(module.forward))
            elif isinstance(module, Attention):
                patch(module, _attention_forward(module, mode))
            elif isinstance(module, nn.Linear) and gamma > 0:
                patch(module, _gamma_linear_forward(module, gamma))
        yield model
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@dataclass(frozen=True)
class AttnLRPParams:
    """AttnLRP parameters (Achtibat et al. 2024).

    Attributes:
        gamma: γ of the Linear γ-rule, ≥ 0. 0 (default) = ε-rule, i.e. the plain gradient;
            the authors tune γ per model (LXT's ViT example sweeps 0 … 1), there is no canonical
            value.
        space: "pixel": Σ over channels of x ⊙ ∂̃y_c/∂x on the normalised input, (B, H, W);
            "token": Σ over the embedding of e ⊙ ∂̃y_c/∂e at the patch-embedding output,
            (B, gh, gw), upsampled bilinearly.
    """

    gamma: float = 0.0
    space: Literal["pixel", "token"] = "pixel"

    def __post_init__(self) -> None:
        check_range("gamma", self.gamma, 0.0, None)
        check_choice("space", self.space, ("pixel", "token"))


@dataclass(frozen=True)
class CPLRPParams(AttnLRPParams):
    """CP-LRP parameters: as :class:`AttnLRPParams`; attention is treated as constant."""


def lrp_relevance(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                  mode: Mode, gamma: float = 0.0, space: Literal["pixel", "token"] = "pixel"
                  ) -> torch.Tensor:
    """Relevance of y_{b, targets[b]} under the rules, one forward and one backward per batch.

    Args:
        images: (B, 3, H, W) unnormalised in [0, 1].
        targets: (B,) class per image.
        mode, gamma: as for :func:`lrp_rules`.
        space: "pixel" or "token", see below.

    Returns:
        "pixel": (B, 3, H, W) x ⊙ ∂̃y/∂x with x = ``adapter.normalize(images)`` (relevance lives
        on the model's input; the mean/std shift is outside the model and would act as a bias);
        "token": (B, Np) Σ_d e ⊙ ∂̃y/∂e at the patch-embedding output (before pos_embed).
    """
    x = adapter.normalize(images).detach().requires_grad_(True)
    embedded: list[torch.Tensor] = []
    with ExitStack() as stack:
        if space == "token":
            handle = adapter.model.patch_embed.register_forward_hook(
                lambda _m, _i, out: embedded.append(out))
            stack.callback(handle.remove)
        model = stack.enter_context(lrp_rules(adapter, mode, gamma))
        logits = model(x)
        y = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        wrt = x if space == "pixel" else embedded[0]
        (grad,) = torch.autograd.grad(y, wrt)
    relevance = wrt.detach() * grad
    if space == "token":
        return relevance.reshape(relevance.shape[0], -1, relevance.shape[-1]).sum(dim=-1)
    return relevance


def _lrp_attribution(name: str, adapter: ViTAdapter, images: torch.Tensor,
                     targets: torch.Tensor, p: AttnLRPParams, mode: Mode) -> Attribution:
    start = time.perf_counter()
    relevance = lrp_relevance(adapter, images, targets, mode, p.gamma, p.space)
    cost = Cost(forward=1, backward=1, seconds=time.perf_counter() - start)
    if p.space == "pixel":
        return pixel_attribution(name, relevance, targets, cost)
    row = F.pad(relevance, (adapter.num_prefix_tokens, 0))  # to_patch_map drops the prefix
    native, maps = to_patch_map(adapter, row, images)
    return Attribution(name, maps, native, "token", targets, cost)


_PAPER = ("Achtibat et al. 2024, 'AttnLRP: Attention-Aware Layer-Wise Relevance Propagation "
          "for Transformers', ICML")


@register_method(
    "attnlrp",
    params=AttnLRPParams,
    renamed={"output": "space"},
    family="lrp",
    vit_only=True,
    aliases=("AttnLRP",),
    paper=_PAPER,
    summary="x ⊙ modified gradient: LayerNorm σ detached, GELU identity rule, uniform ½ rule "
            "on q·kᵀ and A·V (q, k ×¼, v ×½), optional Linear γ-rule.",
)
def attnlrp(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
            p: AttnLRPParams, context: BatchContext) -> Attribution:
    return _lrp_attribution("attnlrp", adapter, images, targets, p, "attnlrp")


@register_method(
    "cp_lrp",
    params=CPLRPParams,
    renamed={"output": "space"},
    family="lrp",
    vit_only=True,
    aliases=("CP-LRP", "cplrp"),
    paper=_PAPER + " (CP-LRP baseline; LXT's default for torchvision ViTs)",
    summary="As AttnLRP but attention treated as constant (q, k detached, v unscaled); "
            "conservative when biases are zero.",
)
def cp_lrp(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
           p: CPLRPParams, context: BatchContext) -> Attribution:
    return _lrp_attribution("cp_lrp", adapter, images, targets, p, "cplrp")
