"""absLRP and contrastive relevance for timm ViTs (Vukadin et al., ACM TIST 2024).

"Advancing Attribution-Based Neural Network Explainability through Relative Absolute Magnitude
Layer-Wise Relevance Propagation and Multi-Component Evaluation", doi 10.1145/3649458. The
paper-era rule of docs/methods.md §7, applied explicitly and batched to activations that one
forward pass of an *unmodified* model records with forward hooks (as in :mod:`.chefer`): no
forward is patched and no twin module is built.

Every layer y = f(x) has an "absolute twin" y_abs (the same operation on magnitudes). With
s = R/|y| (sign(0) = +1, |y| := 1e-9 where y = 0) and s± its positive/negative parts,

    G± = x ⊙ Jᵀ_{y + y_abs} s±,     R_in = P⁺·N1(G⁺) + |P⁻|·N1(G⁻),

where P± are the per-sample sums of the positive/negative parts of R and N1(v) = v / Σ|v| per
sample. Each rule (``abs_*`` in :mod:`.rules`) writes x ⊙ Jᵀ_{y+y_abs} in closed form:

- Linear / patch conv, y = xWᵀ + b: G_i = Σ_j 2(x_i w_ji)⁺ s_j (the bias gets nothing).
- Product y = a·b (q·kᵀ·scale, A·V): G_a,ik = Σ_j 2(a_ik b_kj)⁺ s_ij, likewise for b.
- Residual add y = a + b: G_a = 2a⁺ ⊙ s.
- LayerScale y = γ ⊙ x: G = 2(γx)⁺ ⊙ s.
- LayerNorm, twin |(x−μ)/σ|·|γ| + |β| with μ, σ detached: G = x ⊙ (γ + |γ| sgn((x−μ)/σ))/σ ⊙ s.
- Softmax, twin y_abs = y with the max and the denominator detached: G = 2 x ⊙ y ⊙ s ∝ x ⊙ R.
- Elementwise activation (GELU), twin |f(x)|: the one rule done by local autograd, so that the
  derivative of whichever activation the block uses is exact.

Two-input operations split P⁺ (P⁻) between their inputs in proportion to each input's ΣG⁺ (ΣG⁻).
The read-out is one linear layer on the read-out tokens: the class token, or for a distilled DeiT
the class and distillation tokens, whose eval output (head(CLS) + head_dist(DIST))/2 is linear in
[CLS; DIST] (:func:`~vitxai.methods.lrp.rules.abs_readout_rule`).
The linear, product, add, LayerScale and activation rules have sign-definite G⁺ ≥ 0 ≥ G⁻, so they
conserve the positive and the negative mass separately (whenever that stream's ΣG is non-zero);
LayerNorm and softmax multiply by the signed input x, so there only each stream's L1 mass is kept
(as in the reference code). On a random tiny ViT most of the lost net relevance goes at softmax.

timm VGGs and ResNets take the pass of :mod:`.abslrp_cnn` (the registered method dispatches).

Deviation from the reference code: N1 and the split ratios divide exactly (0 for an all-zero
vector) instead of adding 1e-9, which would shrink small masses. The repository-HEAD
compatibility mode (docs/methods.md §7) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitxai.methods.base import (
    Attribution,
    BatchContext,
    Cost,
    pixel_attribution,
    register_method,
)
from vitxai.methods.lrp import abslrp_cnn
from vitxai.methods.lrp.rules import (
    abs_activation_rule,
    abs_add_rule,
    abs_layernorm_rule,
    abs_linear_rule,
    abs_matmul_rule,
    abs_patch_conv_rule,
    abs_readout_rule,
    abs_scale_rule,
    abs_softmax_rule,
    abs_token_readout_rule,
    n1,
    work_dtype,
)
from vitxai.models.adapter import Capture, ModelAdapter, ViTAdapter

# --- the pass through a timm ViT ------------------------------------------------------------

def _method_error(adapter: ModelAdapter, what: str) -> ValueError:
    return ValueError(
        "abslrp supports class-token (or distilled) timm ViTs with linear heads and standard "
        f"blocks; {adapter.name!r} {what}"
    )


def _is(module: nn.Module | None, *names: str) -> bool:
    return module is not None and type(module).__name__ in names


def _heads(adapter: ViTAdapter) -> list[nn.Module]:
    """The heads reading tokens 0, 1, …: [head], or [head, head_dist] for a distilled DeiT."""
    model = adapter.model
    return [model.head, model.head_dist] if adapter.distilled else [model.head]


def _prefix_tokens(model: nn.Module) -> list[torch.Tensor]:
    """The learned prefix tokens in timm's order: CLS, then DIST (DeiT) or the registers."""
    names = ("cls_token", "dist_token", "reg_token")
    return [t for t in (getattr(model, n, None) for n in names) if t is not None]


def _check_supported(adapter: ModelAdapter) -> None:
    """Raise a ValueError naming abslrp unless the whole relevance path has a rule."""
    if not isinstance(adapter, ViTAdapter):
        raise _method_error(adapter, "is not a timm VisionTransformer")
    model = adapter.model
    if adapter.probe is None:  # a linear probe is one linear map of the tokens
        if getattr(model, "cls_token", None) is None or adapter.global_pool != "token" \
                or getattr(model, "attn_pool", None) is not None:
            raise _method_error(adapter, "does not read out a class token")
        if not all(isinstance(h, nn.Linear) for h in _heads(adapter)) \
                or not _is(model.fc_norm, "Identity"):
            raise _method_error(adapter, "has no plain linear head on the class token")
    if sum(t.shape[1] for t in _prefix_tokens(model)) != adapter.num_prefix_tokens:
        raise _method_error(adapter, "has prefix tokens its stem does not all prepend")
    for name in ("norm", "norm_pre"):
        norm = getattr(model, name, None)
        if not (_is(norm, "Identity") or isinstance(norm, nn.LayerNorm)):
            raise _method_error(adapter, f"has a {type(norm).__name__} as {name}")
    pe = model.patch_embed
    conv = getattr(pe, "proj", None)
    if not (isinstance(conv, nn.Conv2d) and conv.stride == conv.kernel_size
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and _is(pe.norm, "Identity") and getattr(pe, "flatten", False)
            and not getattr(pe, "dynamic_img_pad", False)
            and not getattr(model, "dynamic_img_size", False)):
        raise _method_error(adapter, "has a non-standard patch embedding")
    for i, blk in enumerate(adapter.blocks):
        attn, mlp = blk.attn, getattr(blk, "mlp", None)
        bad = [name for name in ("q_norm", "k_norm", "norm")
               if not _is(getattr(attn, name, nn.Identity()), "Identity")]
        if getattr(attn, "gate", None) is not None:
            bad.append("gate")
        if not _is(blk, "Block") or not _is(attn, "Attention"):
            bad.append(f"{type(blk).__name__}/{type(attn).__name__}")
        if not _is(mlp, "Mlp") or not _is(getattr(mlp, "norm", None), "Identity"):
            bad.append("a non-standard MLP")
        bad += [name for name in ("norm1", "norm2")
                if not isinstance(getattr(blk, name), nn.LayerNorm)]
        bad += [name for name in ("ls1", "ls2")
                if not _is(getattr(blk, name), "Identity", "LayerScale")]
        if bad:
            raise _method_error(adapter, f"block {i} has {', '.join(bad)}")


def stem_tokens(model: nn.Module, images: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rebuild timm's embedding stem: (prefix (B, P, D), patches (B, Np, D), pos_embed or None).

    ``images`` are normalised. The block-0 input is norm_pre of cat(prefix, patches) + pos
    (pos covers all N tokens) or of cat(prefix, patches + pos) with ``no_embed_class``.
    """
    conv = model.patch_embed.proj
    patches = F.conv2d(images, conv.weight.to(images.dtype),
                       None if conv.bias is None else conv.bias.to(images.dtype),
                       stride=conv.stride).flatten(2).transpose(1, 2)
    b = images.shape[0]
    prefix = [t.to(images.dtype).expand(b, -1, -1) for t in _prefix_tokens(model)]
    pos = model.pos_embed
    return (torch.cat(prefix, dim=1), patches,
            None if pos is None else pos.to(images.dtype))


@dataclass
class AbsLRPPass:
    """One absLRP pass from a seed to the pixels.

    Attributes:
        pixels: (B, 3, H, W) relevance of the model's normalised input.
        patch_tokens: (B, Np, D) relevance entering the patch conv (its output).
        prefix_tokens: (B, P, D) relevance left on the prefix tokens (class, distillation,
            registers), dropped.
        pos_embed: (B, N or Np, D) relevance the position-embedding add gave to the embedding
            itself, dropped; None for models without one.
        block_input: per block l, (B, N, D) relevance of the block's input.
    """

    pixels: torch.Tensor
    patch_tokens: torch.Tensor
    prefix_tokens: torch.Tensor
    pos_embed: torch.Tensor | None
    block_input: list[torch.Tensor]


def _block_rule(blk: nn.Module, act: dict[str, torch.Tensor], relevance: torch.Tensor
                ) -> torch.Tensor:
    """Relevance of a timm Block's input from that of its output (B, N, D)."""
    mlp, attn = blk.mlp, blk.attn
    # MLP residual: out = x1 + ls2(fc2(act(fc1(norm2(x1)))))
    r_skip, r_branch = abs_add_rule(act["x1"], act["b2"], relevance)
    if _is(blk.ls2, "LayerScale"):
        fc2_out = F.linear(act["g1"], mlp.fc2.weight.to(r_branch.dtype),
                           None if mlp.fc2.bias is None else mlp.fc2.bias.to(r_branch.dtype))
        r_branch = abs_scale_rule(fc2_out, blk.ls2.gamma, r_branch)
    r_branch = abs_linear_rule(act["g1"], mlp.fc2.weight, mlp.fc2.bias, r_branch)
    r_branch = abs_activation_rule(act["f1"], mlp.act, r_branch)
    r_branch = abs_linear_rule(act["h2"], mlp.fc1.weight, mlp.fc1.bias, r_branch)
    r_branch = abs_layernorm_rule(act["x1"], blk.norm2, r_branch)
    relevance = r_skip + r_branch  # the fork x1 → (shortcut, norm2) sums its relevances
    # attention residual: x1 = x + ls1(proj(A·V))
    r_skip, r_branch = abs_add_rule(act["x"], act["b1"], relevance)
    if _is(blk.ls1, "LayerScale"):
        proj_out = F.linear(act["o"], attn.proj.weight.to(r_branch.dtype),
                            None if attn.proj.bias is None
                            else attn.proj.bias.to(r_branch.dtype))
        r_branch = abs_scale_rule(proj_out, blk.ls1.gamma, r_branch)
    r_o = abs_linear_rule(act["o"], attn.proj.weight, attn.proj.bias, r_branch)
    b, n, _ = r_o.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = act["qkv"].reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * attn.scale
    kt = k.transpose(-2, -1)
    scores = q @ kt  # (B, h, N, N) pre-softmax, as timm's non-fused path computes it
    r_attn, r_v = abs_matmul_rule(scores.softmax(dim=-1), v,
                                  r_o.reshape(b, n, h, d).transpose(1, 2))
    r_scores = abs_softmax_rule(scores, r_attn)
    r_q, r_kt = abs_matmul_rule(q, kt, r_scores)
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v])  # (3, B, h, N, d)
    r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * d)
    r_branch = abs_linear_rule(act["h1"], attn.qkv.weight, attn.qkv.bias, r_qkv)
    r_branch = abs_layernorm_rule(act["x"], blk.norm1, r_branch)
    return r_skip + r_branch


def _propagate(adapter: ViTAdapter, cap: Capture, images: torch.Tensor, seed: torch.Tensor
               ) -> AbsLRPPass:
    """head(s) → CLS (and DIST) → final norm → blocks in reverse → norm_pre → pos-embed add →
    patch conv."""
    model = adapter.model
    dtype = images.dtype
    acts = [{name: t.to(dtype) for name, t in a.items()} for a in cap.activations]
    last = acts[-1]["x1"] + acts[-1]["b2"]  # final-norm input = last block's output
    if adapter.probe is not None:  # the probe reads the final norm's output (all tokens)
        tokens = cap.head_input.to(dtype)
        relevance = abs_token_readout_rule(tokens, adapter.probe.token_parts(tokens),
                                           adapter.probe.linear.bias.to(dtype), seed.to(dtype))
    else:
        head_inputs = [cap.head_input] + ([cap.head_dist_input] if adapter.distilled else [])
        r_readout = abs_readout_rule([x.to(dtype) for x in head_inputs], _heads(adapter),
                                     seed.to(dtype))
        relevance = torch.zeros_like(last)
        for i, r in enumerate(r_readout):  # token pooling reads CLS (and DIST) only
            relevance[:, i] = r
    if isinstance(model.norm, nn.LayerNorm):
        relevance = abs_layernorm_rule(last, model.norm, relevance)
    block_input: list[torch.Tensor] = []
    for layer in range(adapter.depth - 1, -1, -1):
        relevance = _block_rule(adapter.blocks[layer], acts[layer], relevance)
        block_input.insert(0, relevance)
    prefix, patches, pos = stem_tokens(model, images)
    p = prefix.shape[1]
    if isinstance(model.norm_pre, nn.LayerNorm):
        if pos is None:
            stem = torch.cat([prefix, patches], dim=1)
        elif model.no_embed_class:
            stem = torch.cat([prefix, patches + pos], dim=1)
        else:
            stem = torch.cat([prefix, patches], dim=1) + pos
        relevance = abs_layernorm_rule(stem, model.norm_pre, relevance)
    r_pos = None
    if pos is None:
        r_prefix, r_patches = relevance[:, :p], relevance[:, p:]
    elif model.no_embed_class:
        r_prefix = relevance[:, :p]
        r_patches, r_pos = abs_add_rule(patches, pos, relevance[:, p:])
    else:
        r_tokens, r_pos = abs_add_rule(torch.cat([prefix, patches], dim=1), pos, relevance)
        r_prefix, r_patches = r_tokens[:, :p], r_tokens[:, p:]
    pixels = abs_patch_conv_rule(images, model.patch_embed.proj, r_patches)
    return AbsLRPPass(pixels, r_patches, r_prefix, r_pos, block_input)


@torch.no_grad()
def relevance_pass(adapter: ViTAdapter, images: torch.Tensor, seeds: Sequence[torch.Tensor]
                   ) -> list[AbsLRPPass]:
    """One recorded forward, then one absLRP pass per seed.

    Args:
        adapter: a supported ViT (see :func:`_check_supported`).
        images: (B, 3, H, W) unnormalised in [0, 1].
        seeds: each (B, C), the relevance put on the logits (any sign).

    Returns:
        One :class:`AbsLRPPass` per seed; relevance is w.r.t. the model's normalised input.
    """
    _check_supported(adapter)
    dtype = work_dtype(adapter.dtype)
    with adapter.full_precision(), adapter.capture(activations=True) as cap:
        adapter.logits(images)  # float32 under bf16 too: the rules amplify bf16 rounding
    normalised = adapter.normalize(images).to(dtype)
    return [_propagate(adapter, cap, normalised, seed) for seed in seeds]


def contrastive_relevance(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """r = N1(positive) − N1(negative), then r / max|r| per sample (in [−1, 1]).

    The max-normalisation divides by max|r| itself: no additive epsilon, which (at the
    reference's 1e-9) leaves maps whose differences are ~1e-9 peaking far below 1. Only a
    sample whose max|r| is below the smallest normal float (an all-zero map) stays at 0.
    """
    r = n1(positive) - n1(negative)
    peak = r.reshape(r.shape[0], -1).abs().amax(dim=1)
    peak = peak.clamp(min=torch.finfo(r.dtype).tiny).reshape(-1, *([1] * (r.ndim - 1)))
    return r / peak


@dataclass(frozen=True)
class AbsLRPParams:
    """absLRP (paper-era rule, docs/methods.md §7).

    Attributes:
        contrastive: True (the paper's output): N1(absLRP(onehot(y))) − N1(absLRP(others)),
            the second pass seeded 1/(C−1) on every class ≠ y, scaled to max|r| = 1 per image.
            False: the raw single pass seeded with onehot(y), unnormalised (it sums to the
            relevance that reached the pixels).
    """

    contrastive: bool = True


@register_method(
    "abslrp",
    params=AbsLRPParams,
    family="lrp",
    aliases=("absLRP",),
    paper="Vukadin, Afrić, Šilić & Delač 2024, 'Advancing Attribution-Based Neural Network "
          "Explainability through Relative Absolute Magnitude Layer-Wise Relevance Propagation "
          "and Multi-Component Evaluation', ACM TIST",
    summary="LRP with |y|-relative absolute-twin rules, ± mass split separately; contrastive "
            "target-vs-rest map in [−1, 1] (pixel-level, w.r.t. the normalised input); timm "
            "ViTs, VGGs and ResNets.",
)
def abslrp(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor, p: AbsLRPParams,
           context: BatchContext) -> Attribution:
    """absLRP pixel relevance (B, 3, H, W); ``maps`` is its channel sum.

    A ViT takes the pass of this module, a timm VGG or ResNet that of :mod:`.abslrp_cnn`;
    any other model is refused in one line.
    """
    vit = isinstance(adapter, ViTAdapter)
    if vit:
        _check_supported(adapter)
    else:
        abslrp_cnn.check_supported(adapter)
    b, c = images.shape[0], adapter.num_classes
    if p.contrastive and c < 2:
        raise ValueError("abslrp with contrastive=True needs a model with at least 2 classes")
    onehot = torch.zeros(b, c, dtype=work_dtype(adapter.dtype), device=images.device)
    onehot[torch.arange(b), targets.to(images.device)] = 1.0
    seeds = [onehot, (1 - onehot) / (c - 1)] if p.contrastive else [onehot]
    run = relevance_pass if vit else abslrp_cnn.relevance_pass
    passes = run(adapter, images, seeds)
    channels = (contrastive_relevance(passes[0].pixels, passes[1].pixels) if p.contrastive
                else passes[0].pixels)
    return pixel_attribution("abslrp", channels, targets,
                             Cost(forward=1, backward=len(seeds)))
