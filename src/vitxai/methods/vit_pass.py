"""The shared ViT pass: one captured forward (and backward) per batch, and the read-out row.

Every attention and relevance method of a batch reads one :class:`ViTPass` from its
:class:`~vitxai.methods.base.BatchContext`: a single forward that records every block's
attention and, when any planned method needs them, the block activations and one backward
for the attention gradients. The read-out row says which token rows the class score reads:
the class token, or both class and distillation tokens for distilled DeiT (docs/methods.md §8).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitxai.methods.base import BatchContext, CacheKey, Cost
from vitxai.models.adapter import Capture, ViTAdapter

VIT_PASS = CacheKey("vit_pass")


@dataclass
class ViTPass:
    """One captured pass over a batch: attention, optional gradients and activations."""

    capture: Capture
    logits: torch.Tensor
    targets: torch.Tensor
    has_gradients: bool
    seconds: float


def vit_pass(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
             context: BatchContext, *, gradients: bool) -> tuple[ViTPass, bool]:
    """The batch's shared attention pass; returns (pass, reused).

    The pass is computed once per batch, in float32 whatever the adapter's ``precision``
    (see :meth:`~vitxai.models.adapter.ModelAdapter.full_precision`). It includes gradients
    and activations when this call needs them or when any method planned for the batch
    declares ``"attention_grad"`` in its ``uses`` — so rollout followed by Chefer costs one
    forward and one backward, not two forwards.
    """
    cached = context.cache.get(VIT_PASS)
    if cached is not None and (cached.has_gradients or not gradients) and torch.equal(
        cached.targets, targets
    ):
        return cached, True
    full = gradients or context.plans("attention_grad")
    start = time.perf_counter()
    # float32 even under precision="bf16": the relevance rules amplify bf16 rounding of the
    # activations (ModelAdapter.full_precision), and this is one pass per batch
    with adapter.full_precision(), adapter.capture(gradients=full, activations=full) as cap:
        if full:
            x = images.detach().requires_grad_(True)
            logits = adapter.logits(x)
            logits.gather(1, targets.to(logits.device)[:, None]).sum().backward()
            logits = logits.detach()
        else:
            with torch.inference_mode():
                logits = adapter.logits(images)
    cap.upcast()  # a half-precision model records half tensors; every rule runs in float32
    cap.attention_maps()  # fail loudly when a block was not captured
    if full:
        cap.gradient_maps()
    result = ViTPass(cap, logits, targets.clone(), full, time.perf_counter() - start)
    context.cache[VIT_PASS] = result
    return result, False


def pass_cost(vp: ViTPass, reused: bool) -> Cost:
    """Cost of a method that read the shared pass (zero seconds when it was reused)."""
    return Cost(forward=1, backward=int(vp.has_gradients), seconds=0.0 if reused else vp.seconds,
                shared=reused)


def readout_row(adapter: ViTAdapter, n_tokens: int, batch: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The (B, N) read-out vector: e₀ (CLS), or ½(e₀ + e₁) for distilled DeiT, whose eval head
    averages the CLS and distillation heads (docs/methods.md §8), or a linear probe's token
    weights averaged over its parts (1/P on every patch for ``mean_patch``; docs/methods.md
    §13)."""
    if adapter.probe is not None:
        return adapter.probe.readout_row(n_tokens, batch, dtype, device)
    if adapter.global_pool not in ("token", "") and not adapter.distilled:
        raise ValueError(
            f"read-out for global_pool={adapter.global_pool!r} is not supported yet; "
            "attention methods need a class-token model"
        )
    r = torch.zeros(batch, n_tokens, dtype=dtype, device=device)
    if adapter.distilled:
        r[:, :2] = 0.5
    else:
        r[:, 0] = 1.0
    return r


def class_readout_row(adapter: ViTAdapter, vp: ViTPass) -> torch.Tensor:
    """The (B, N) read-out row of the class-specific methods (gradient and relevance rollouts,
    attention Grad-CAM) for the pass's targets.

    A linear probe reading several tokens weighs them by the target's relevance at the read-out:
    r_i = Σ_d R_id / Σ_(j,d) R_jd with R the LRP α1β0 relevance of the probe's linear map
    (:func:`~vitxai.methods.lrp.rules.token_readout_rule`; non-negative), so the row follows
    what the class score reads, and a ``cls+mean_patch`` probe with a zero patch half reads e₀
    exactly. Without a probe (or where no token contributes positively): :func:`readout_row`.
    """
    like = vp.capture.attention[0]
    row = readout_row(adapter, like.shape[-1], like.shape[0], like.dtype, like.device)
    if adapter.probe is None:
        return row
    # imported here: the lrp package's __init__ imports its methods, which import this module
    from vitxai.methods.lrp.rules import token_readout_rule

    tokens = vp.capture.head_input
    if tokens is None:
        raise RuntimeError("the pass did not record the probe's input tokens")
    tokens = tokens.to(like.dtype)
    onehot = torch.zeros(tokens.shape[0], adapter.num_classes, dtype=tokens.dtype,
                         device=tokens.device)
    onehot[torch.arange(tokens.shape[0]), vp.targets.to(tokens.device)] = 1.0
    relevance = token_readout_rule(tokens, adapter.probe.token_parts(tokens), onehot).sum(-1)
    total = relevance.sum(dim=1, keepdim=True)
    return torch.where(total > 0, relevance / torch.where(total > 0, total, 1.0), row)


def residual_product_row(adapter: ViTAdapter, vp: ViTPass, start: int,
                         abar_of: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Read-out row of the unnormalised product (I + Ā_{L−1})·…·(I + Ā_start).

    Shared by Chefer 2021a, its LRP-rollout sibling and Chefer 2021b, which differ only in Ā.

    Args:
        vp: the batch's pass (its targets choose the class-specific read-out row,
            :func:`class_readout_row`).
        abar_of: block index → (B, N, N) fused matrix Ā of that block.

    Returns:
        (B, N): r = readoutᵀ·(I + Ā_{L−1})·…, computed right-to-left on the row only.
    """
    r = class_readout_row(adapter, vp)
    for layer in range(adapter.depth - 1, start - 1, -1):
        r = r + torch.bmm(r.unsqueeze(1), abar_of(layer)).squeeze(1)  # r ← r·(I + Ā)
    return r
