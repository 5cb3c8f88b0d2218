"""Attention-based methods: raw attention, rollout, gradient rollout, Chefer 2021b, GradCAM.

All of them read the batch's shared pass (:mod:`vitxai.methods.vit_pass`). Rollout keeps only
the CLS row of the product, O(L·N²) instead of O(L·N³) (docs/methods.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vitxai.methods.base import Attribution, BatchContext, Cost, register_method, to_patch_map
from vitxai.methods.vit_pass import (
    class_readout_row,
    pass_cost,
    readout_row,
    residual_product_row,
    vit_pass,
)
from vitxai.models.adapter import ViTAdapter
from vitxai.params import block_index, check_range


def fuse_heads(attention: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, h, N, N) → (B, N, N) by mean, max or min over heads."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float, protect_cls: bool = True) -> torch.Tensor:
    """Zero the ⌊N²·ratio⌋ smallest entries of each sample's (N, N) matrix (vit-explain).

    Only the flat index 0, the (CLS, CLS) entry, is protected, as in vit-explain (other CLS
    entries can be zeroed); unlike vit-explain this is done for every sample, not sample 0.
    """
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n).clone()
    idx = flat.topk(k, dim=-1, largest=False).indices
    keep0 = flat[:, 0].clone()
    flat.scatter_(1, idx, 0.0)
    if protect_cls:
        flat[:, 0] = keep0
    return flat.reshape(b, n, n)


@dataclass(frozen=True)
class RolloutParams:
    """Attention Rollout parameters.

    Attributes:
        head_fusion: "mean" (Abnar & Zuidema), "max" or "min" (vit-explain options).
        discard_ratio: share of the smallest fused entries zeroed per layer, in [0, 1).
        start_layer: first block multiplied in, in [0, depth).
        legacy: reproduce vit-explain's row normalisation without ``keepdim``, which divides
            column j by row j's sum (vit-explain issue #16); off = correct row normalisation.
    """

    head_fusion: Literal["mean", "max", "min"] = "mean"
    discard_ratio: float = 0.0
    start_layer: int = 0
    legacy: bool = False

    def __post_init__(self) -> None:
        if self.head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"parameter head_fusion={self.head_fusion!r} must be mean, max or min")
        check_range("discard_ratio", self.discard_ratio, 0.0, 1.0, high_open=True)
        check_range("start_layer", self.start_layer, 0, None)


def rollout_row(attention: list[torch.Tensor], readout: torch.Tensor, p: RolloutParams
                ) -> torch.Tensor:
    """Read-out row of the rollout product M_{L−1}·…·M_s, M = rownorm((F + I)/2).

    Args:
        attention: L tensors (B, h, N, N), post-softmax.
        readout: (B, N) read-out vector (e₀ for CLS).

    Returns:
        (B, N): readoutᵀ·M_{L−1}·…·M_s, computed right-to-left on the row only.
    """
    depth = len(attention)
    if p.start_layer >= depth:
        raise ValueError(f"parameter start_layer={p.start_layer} must be < depth {depth}")
    r = readout.to(torch.float64 if attention[0].dtype == torch.float64 else torch.float32)
    for layer in range(depth - 1, p.start_layer - 1, -1):
        fused = fuse_heads(attention[layer].to(r.dtype), p.head_fusion)
        fused = discard_lowest(fused, p.discard_ratio)
        n = fused.shape[-1]
        m = (fused + torch.eye(n, dtype=r.dtype, device=r.device)) / 2
        sums = m.sum(dim=-1)
        m = m / (sums.unsqueeze(-2) if p.legacy else sums.unsqueeze(-1))
        r = torch.bmm(r.unsqueeze(1), m).squeeze(1)
    return r


@register_method(
    "attention_rollout",
    params=RolloutParams,
    family="attention",
    vit_only=True,
    uses={"attention"},
    aliases=("AttentionRollout", "rollout"),
    paper="Abnar & Zuidema 2020, 'Quantifying Attention Flow in Transformers', ACL",
    summary="Product of head-fused, identity-mixed, row-normalised attention over layers.",
)
def attention_rollout(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                      p: RolloutParams, context: BatchContext) -> Attribution:
    """Class-agnostic Attention Rollout; ``targets`` are recorded, not used."""
    vp, reused = vit_pass(adapter, images, targets, context, gradients=False)
    attn = [a.detach() for a in vp.capture.attention_maps()]
    n = attn[0].shape[-1]
    readout = readout_row(adapter, n, images.shape[0], attn[0].dtype, attn[0].device)
    row = rollout_row(attn, readout, p)
    native, full = to_patch_map(adapter, row, images)
    return Attribution("attention_rollout", full, native, "token", targets, pass_cost(vp, reused))


def _patch_attribution(name: str, adapter: ViTAdapter, images: torch.Tensor,
                       targets: torch.Tensor, row: torch.Tensor, cost: Cost) -> Attribution:
    native, full = to_patch_map(adapter, row, images)
    return Attribution(name, full, native, "token", targets, cost)


@dataclass(frozen=True)
class RawAttentionParams:
    """Raw attention of one block (Chefer's `last_layer_attn`; DINO-style with ``head``).

    Attributes:
        layer: block index; negative counts from the end (−1 = last block).
        head: None = mean over heads, else that head's map.
    """

    layer: int = -1
    head: int | None = None


@register_method(
    "raw_attention",
    params=RawAttentionParams,
    family="attention",
    vit_only=True,
    uses={"attention"},
    aliases=("last_layer_attn", "attention"),
    paper="Caron et al. 2021, 'Emerging Properties in Self-Supervised Vision Transformers', "
          "ICCV (attention maps); Chefer et al. 2021a baseline",
    summary="Read-out row of one block's attention, mean over heads or one head.",
)
def raw_attention(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                  p: RawAttentionParams, context: BatchContext) -> Attribution:
    """Class-agnostic: readoutᵀ·A_layer (mean over heads or one head)."""
    layer = block_index("layer", p.layer, adapter.depth)
    if p.head is not None and not 0 <= p.head < adapter.num_heads:
        raise ValueError(f"parameter head={p.head} is out of range [0, {adapter.num_heads})")
    vp, reused = vit_pass(adapter, images, targets, context, gradients=False)
    a = vp.capture.attention_maps()[layer].detach()
    a = a.mean(dim=1) if p.head is None else a[:, p.head]
    readout = readout_row(adapter, a.shape[-1], a.shape[0], a.dtype, a.device)
    row = torch.bmm(readout.unsqueeze(1), a).squeeze(1)
    return _patch_attribution("raw_attention", adapter, images, targets, row,
                              pass_cost(vp, reused))


@dataclass(frozen=True)
class GradRolloutParams:
    """Gradient Attention Rollout (vit-explain), correct by default.

    Attributes:
        discard_ratio: share of the smallest fused entries zeroed per layer (nothing
            protected, as in vit-explain's gradient rollout), in [0, 1).
        start_layer: first block multiplied in.
        legacy: reproduce vit-explain exactly: the "gradient" is ∂y/∂(scaled scores) (its
            module backward hook on an eval-mode Dropout lands on the softmax backward),
            layers paired in reverse (block l gets block L−1−l's gradient), and row
            normalisation without keepdim (docs/methods.md §2).
    """

    discard_ratio: float = 0.9
    start_layer: int = 0
    legacy: bool = False

    def __post_init__(self) -> None:
        check_range("discard_ratio", self.discard_ratio, 0.0, 1.0, high_open=True)
        check_range("start_layer", self.start_layer, 0, None)


def softmax_input_gradient(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂y/∂S for A = softmax(S) given G = ∂y/∂A: A ⊙ (G − Σ_j A_ij G_ij)."""
    return a * (g - (a * g).sum(dim=-1, keepdim=True))


@register_method(
    "grad_rollout",
    params=GradRolloutParams,
    family="attention",
    vit_only=True,
    uses={"attention", "attention_grad"},
    aliases=("gradient_rollout", "GradientAttentionRollout"),
    paper="Gildenblat 2020, vit-explain 'Gradient Attention Rollout' (jacobgil/vit-explain)",
    summary="Rollout of max(mean_h(A ⊙ ∂y/∂A), 0) with discard; class-specific.",
)
def grad_rollout(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                 p: GradRolloutParams, context: BatchContext) -> Attribution:
    """F = max(mean_h(A_l ⊙ G_l), 0); M = rownorm((F + I)/2); map = readout of the product,
    divided by its maximum as in vit-explain."""
    vp, reused = vit_pass(adapter, images, targets, context, gradients=True)
    attn = [a.detach() for a in vp.capture.attention_maps()]
    grads = vp.capture.gradient_maps()
    depth = len(attn)
    if p.start_layer >= depth:
        raise ValueError(f"parameter start_layer={p.start_layer} must be < depth {depth}")
    if p.legacy:
        grads = [softmax_input_gradient(a, g) for a, g in zip(attn, grads, strict=True)]
        grads = grads[::-1]
    r = class_readout_row(adapter, vp)
    for layer in range(depth - 1, p.start_layer - 1, -1):
        fused = (attn[layer] * grads[layer]).mean(dim=1).clamp(min=0)
        fused = discard_lowest(fused, p.discard_ratio, protect_cls=False)
        n = fused.shape[-1]
        m = (fused + torch.eye(n, dtype=r.dtype, device=r.device)) / 2
        sums = m.sum(dim=-1)
        m = m / (sums.unsqueeze(-2) if p.legacy else sums.unsqueeze(-1))
        r = torch.bmm(r.unsqueeze(1), m).squeeze(1)
    patches = r[:, adapter.num_prefix_tokens:]
    peak = patches.amax(dim=1, keepdim=True)
    r = r / torch.where(peak > 0, peak, torch.ones_like(peak))
    return _patch_attribution("grad_rollout", adapter, images, targets, r,
                              pass_cost(vp, reused))


@dataclass(frozen=True)
class Chefer2021bParams:
    """Chefer et al. 2021b generic attention explainability.

    Attributes:
        start_layer: first block in the product; the CLIP notebook uses only the last block
            (start_layer = depth − 1, or −1 here).
    """

    start_layer: int = 0


@register_method(
    "chefer2021b",
    params=Chefer2021bParams,
    family="attention",
    vit_only=True,
    uses={"attention", "attention_grad"},
    aliases=("generic_attention", "GenericAttention"),
    paper="Chefer, Gur & Wolf 2021, 'Generic Attention-model Explainability for Interpreting "
          "Bi-Modal and Encoder-Decoder Transformers', ICCV",
    summary="R ← R + mean_h max(∇A ⊙ A, 0)·R from R = I; class-specific, no normalisation.",
)
def chefer2021b(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                p: Chefer2021bParams, context: BatchContext) -> Attribution:
    """Equals (I + Ā_{L−1})…(I + Ā_s) with Ā = mean_h max(G ⊙ A, 0) (docs/methods.md §4)."""
    start = block_index("start_layer", p.start_layer, adapter.depth)
    vp, reused = vit_pass(adapter, images, targets, context, gradients=True)
    attn = vp.capture.attention_maps()
    grads = vp.capture.gradient_maps()
    r = residual_product_row(
        adapter, vp, start,
        lambda layer: (grads[layer] * attn[layer].detach()).clamp(min=0).mean(dim=1))
    return _patch_attribution("chefer2021b", adapter, images, targets, r, pass_cost(vp, reused))


@dataclass(frozen=True)
class AttentionGradCamParams:
    """Attention-GradCAM on the last block (Chefer et al. 2021a baseline)."""


@register_method(
    "attention_gradcam",
    params=AttentionGradCamParams,
    family="attention",
    vit_only=True,
    uses={"attention", "attention_grad"},
    aliases=("attn_gradcam", "gradcam_attention"),
    paper="Selvaraju et al. 2017 Grad-CAM, applied to the last attention map as in Chefer et "
          "al. 2021a",
    summary="max(mean_h(w_h · A[h, cls, patches]), 0) with w_h the mean gradient of head h.",
)
def attention_gradcam(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                      p: AttentionGradCamParams, context: BatchContext) -> Attribution:
    """w_h = mean over patches j of G[h, 0, j]; map = max(mean_h(w_h·A[h, 0, P:]), 0)."""
    vp, reused = vit_pass(adapter, images, targets, context, gradients=True)
    a = vp.capture.attention_maps()[-1].detach()
    g = vp.capture.gradient_maps()[-1]
    readout = class_readout_row(adapter, vp)
    a_row = torch.einsum("bn,bhnm->bhm", readout, a)
    g_row = torch.einsum("bn,bhnm->bhm", readout, g)
    weights = g_row[:, :, adapter.num_prefix_tokens:].mean(dim=-1, keepdim=True)
    row = (weights * a_row).mean(dim=1).clamp(min=0)
    return _patch_attribution("attention_gradcam", adapter, images, targets, row,
                              pass_cost(vp, reused))


@dataclass(frozen=True)
class TokenGradCamParams:
    """Grad-CAM on the last block's tokens (no parameters)."""


@register_method(
    "gradcam",
    params=TokenGradCamParams,
    family="attention",
    vit_only=True,
    uses={"attention", "attention_grad"},
    aliases=("GradCAM", "token_gradcam"),
    paper="Selvaraju et al. 2017, 'Grad-CAM', ICCV; ViT form of pytorch-grad-cam "
          "(last block's norm1 tokens reshaped to the patch grid)",
    summary="ReLU(Σ_d w_d T_d) over the last block's patch tokens T, w_d = mean gradient.",
)
def gradcam(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
            p: TokenGradCamParams, context: BatchContext) -> Attribution:
    """Tokens T = norm1 output of the last block without prefix tokens, as a (D, gh, gw)
    feature map; channel weights w_d = mean over patches of ∂y_c/∂T_d; map = max(Σ_d w_d T_d,
    0). The original comparison's GradCAM (code only, not in its paper)."""
    vp, reused = vit_pass(adapter, images, targets, context, gradients=True)
    cap = vp.capture
    tokens = cap.activations[-1].get("h1")
    grad = cap.last_tokens_grad
    if tokens is None or grad is None:
        raise RuntimeError("the shared pass did not record the last block's tokens")
    pre = adapter.num_prefix_tokens
    tokens, grad = tokens.detach()[:, pre:], grad[:, pre:]
    weights = grad.mean(dim=1, keepdim=True)  # (B, 1, D)
    row = (tokens * weights).sum(dim=-1).clamp(min=0)  # (B, Np)
    full_row = torch.cat([torch.zeros_like(row[:, :pre]), row], dim=1)
    return _patch_attribution("gradcam", adapter, images, targets, full_row,
                              pass_cost(vp, reused))
