"""Chefer et al. 2021a, "Transformer Interpretability Beyond Attention Visualization" (CVPR).

Relevance propagation runs on an *unmodified* timm ViT: the shared pass records each block's
activations with forward hooks (docs/methods.md §8), and the rules of :mod:`.rules` are applied
explicitly, batched, with every sum taken per sample (the reference sums the residual rule over
the whole batch, so its maps are only right for batch 1: Transformer-Explainability #22, #32).

Rules (docs/methods.md §3, LRP α=1, β=0):
- Linear: z⁺_ij = x⁺_i w⁺_ij + x⁻_i w⁻_ij, R_i = Σ_j z⁺_ij / Σ_i′ z⁺_i′j · R_j (bias excluded).
- Identity for LayerNorm (norm_pre of CLIP towers too), GELU, softmax, dropout, LayerScale.
- A·V and q·kᵀ: gradient × input on each operand, both halved.
- Residual y = a + b: a′ = a·R/y, b′ = b·R/y, rescaled so Σa = |Σa′|/(|Σa′| + |Σb′|)·ΣR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitxai.methods.base import (
    Attribution,
    BatchContext,
    CacheKey,
    pixel_attribution,
    register_method,
    to_patch_map,
)
from vitxai.methods.lrp.rules import (
    clone_rule,
    linear_rule,
    matmul_rule,
    patch_embedding_rule,
    residual_rule,
    token_readout_rule,
)
from vitxai.methods.vit_pass import (
    class_readout_row,
    pass_cost,
    residual_product_row,
    vit_pass,
)
from vitxai.models.adapter import ViTAdapter
from vitxai.params import block_index, check_range

RELEVANCE = CacheKey("relevance")  # (pass, layer it stopped at, relevance) of Chefer's pass


@dataclass
class RelevancePass:
    """Per-block results of one relevance pass.

    attention_relevance[l]: (B, h, N, N) halved A-operand relevance R_A of block l (None below
    the start layer); block_input_relevance[l]: (B, N, D) relevance entering block l.
    """

    attention_relevance: list[torch.Tensor | None]
    block_input_relevance: list[torch.Tensor | None]


def relevance_pass(adapter: ViTAdapter, capture, targets: torch.Tensor, stop_layer: int = 0
                   ) -> RelevancePass:
    """Propagate R = e_c (one-hot, value 1) from the head down to block ``stop_layer``.

    Args:
        capture: a :class:`~vitxai.models.adapter.Capture` with activations and attention.
        targets: (B,) classes.
    """
    model = adapter.model
    depth = adapter.depth
    head_in = capture.head_input
    if head_in is None:
        raise RuntimeError("the pass did not record the classifier input")
    heads = [model.head] + ([model.head_dist] if adapter.distilled else [])
    if adapter.probe is None and not all(isinstance(h, torch.nn.Linear) for h in heads):
        raise ValueError(f"chefer2021a needs a linear classifier head ({adapter.name!r})")
    if type(model.fc_norm).__name__ != "Identity":
        raise ValueError("chefer2021a needs the token read-out without fc_norm")
    b = head_in.shape[0]
    onehot = torch.zeros(b, adapter.num_classes, dtype=head_in.dtype, device=head_in.device)
    onehot[torch.arange(b), targets.to(head_in.device)] = 1.0
    first = capture.activations[depth - 1]["x"]
    relevance = torch.zeros_like(first)
    # the read-out sends everything to the tokens it reads; the final norm is identity
    if adapter.probe is not None:
        # a linear probe reads every token (mean patch) or the class token: one linear map
        relevance = token_readout_rule(head_in, adapter.probe.token_parts(head_in), onehot)
    elif adapter.distilled:
        # eval output = (head(CLS) + head_dist(DIST)) / 2: split R by the residual rule
        dist_in = capture.head_dist_input
        halves = (model.head(head_in) / 2, model.head_dist(dist_in) / 2)
        r_cls, r_dist = residual_rule(*halves, onehot)
        relevance[:, 0] = linear_rule(head_in, model.head.weight, r_cls)
        relevance[:, 1] = linear_rule(dist_in, model.head_dist.weight, r_dist)
    else:
        relevance[:, 0] = linear_rule(head_in, model.head.weight, onehot)
    attn_rel: list[torch.Tensor | None] = [None] * depth
    block_in: list[torch.Tensor | None] = [None] * depth
    for layer in range(depth - 1, stop_layer - 1, -1):
        blk = adapter.blocks[layer]
        act = capture.activations[layer]
        attn = blk.attn
        # MLP residual: x_out = x1 + ls2(fc2(act(fc1(norm2(x1)))))
        r_skip, r_branch = residual_rule(act["x1"], act["b2"], relevance)
        r_branch = linear_rule(act["g1"], blk.mlp.fc2.weight, r_branch)
        r_branch = linear_rule(act["h2"], blk.mlp.fc1.weight, r_branch)
        relevance = clone_rule(act["x1"], r_skip, r_branch)
        # Attention residual: x1 = x + ls1(proj(A·V))
        r_skip, r_branch = residual_rule(act["x"], act["b1"], relevance)
        r_o = linear_rule(act["o"], attn.proj.weight, r_branch)
        bsz, n, _ = r_o.shape
        h, d = attn.num_heads, attn.head_dim
        qkv = act["qkv"].reshape(bsz, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = capture.attention[layer].detach()
        r_o = r_o.reshape(bsz, n, h, d).transpose(1, 2)
        r_a, r_v = matmul_rule(a, v, r_o)
        attn_rel[layer] = r_a
        r_q, r_kt = matmul_rule(q, k.transpose(-2, -1), r_a)  # softmax: identity
        r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v])  # (3, B, h, N, d)
        r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(bsz, n, 3 * h * d)
        r_branch = linear_rule(act["h1"], attn.qkv.weight, r_qkv)
        relevance = clone_rule(act["x"], r_skip, r_branch)
        block_in[layer] = relevance
    return RelevancePass(attn_rel, block_in)


def _check_supported(adapter: ViTAdapter) -> None:
    for i, blk in enumerate(adapter.blocks):
        attn = blk.attn
        unsupported = [
            name for name in ("q_norm", "k_norm", "norm")
            if type(getattr(attn, name, torch.nn.Identity())).__name__ != "Identity"
        ]
        if getattr(attn, "gate", None) is not None:
            unsupported.append("gate")
        if unsupported or not hasattr(blk, "mlp") or not hasattr(blk.mlp, "fc2"):
            raise ValueError(
                f"chefer2021a supports standard timm ViT blocks; block {i} of {adapter.name!r} "
                f"has {', '.join(unsupported) or 'a non-standard MLP'}"
            )


@dataclass(frozen=True)
class CheferParams:
    """Chefer 2021a transformer attribution.

    Attributes:
        start_layer: first block in the product, in [0, depth); the notebooks use 0, the
            perturbation and segmentation scripts 1.
    """

    start_layer: int = 0

    def __post_init__(self) -> None:
        check_range("start_layer", self.start_layer, 0, None)


@register_method(
    "chefer2021a",
    params=CheferParams,
    family="lrp",
    vit_only=True,
    uses={"attention", "attention_grad", "lrp"},
    aliases=("BeyondAttention", "transformer_attribution", "chefer"),
    paper="Chefer, Gur & Wolf 2021, 'Transformer Interpretability Beyond Attention "
          "Visualization', CVPR",
    summary="Rollout of (I + mean_h (∇A ⊙ R_A)⁺) with LRP relevance R_A; class-specific.",
)
def chefer2021a(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                p: CheferParams, context: BatchContext) -> Attribution:
    """Transformer attribution: C = (I + Ā_{L−1})…(I + Ā_s), Ā = mean_h max(G ⊙ R_A, 0)."""
    vp, reused, rel = _relevance(adapter, images, targets, context, p.start_layer)
    with torch.no_grad():
        grads = vp.capture.gradient_maps()
        r = residual_product_row(
            adapter, vp, p.start_layer,
            lambda layer: (grads[layer] * rel.attention_relevance[layer]).clamp(min=0)
            .mean(dim=1))
    return _patch_attribution("chefer2021a", adapter, images, targets, r, vp, reused)


def _relevance(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
               context: BatchContext, stop_layer: int):
    """The shared pass plus one relevance pass down to ``stop_layer``: (pass, reused, rel)."""
    _check_supported(adapter)
    if not 0 <= stop_layer < adapter.depth:
        raise ValueError(f"parameter start_layer={stop_layer} must be in [0, {adapter.depth})")
    vp, reused = vit_pass(adapter, images, targets, context, gradients=True)
    # one relevance pass serves every sibling whose start layer it reached
    cached = context.cache.get(RELEVANCE)
    if cached is not None and cached[0] is vp and cached[1] <= stop_layer:
        return vp, True, cached[2]
    with torch.no_grad():
        rel = relevance_pass(adapter, vp.capture, targets, stop_layer=stop_layer)
    context.cache[RELEVANCE] = (vp, stop_layer, rel)
    return vp, reused, rel


def _lrp_cost(vp, reused: bool):
    cost = pass_cost(vp, reused)
    cost.backward += 1  # the explicit relevance pass costs about one backward
    return cost


def _patch_attribution(name: str, adapter: ViTAdapter, images: torch.Tensor,
                       targets: torch.Tensor, row: torch.Tensor, vp, reused: bool
                       ) -> Attribution:
    """A read-out row (B, N) as a patch map, with the cost of the pass and the relevance pass."""
    native, full = to_patch_map(adapter, row, images)
    return Attribution(name, full, native, "token", targets, _lrp_cost(vp, reused))


@register_method(
    "chefer_lrp_rollout",
    params=CheferParams,
    family="lrp",
    vit_only=True,
    uses={"attention", "attention_grad", "lrp"},
    aliases=("lrp_rollout",),
    paper="Chefer, Gur & Wolf 2021a (CVPR), `rollout` mode of ViT_LRP",
    summary="(I + mean_h max(R_A, 0)) product without gradients: LRP-relevance rollout.",
)
def chefer_lrp_rollout(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                       p: CheferParams, context: BatchContext) -> Attribution:
    """Same product as :func:`chefer2021a` with Ā = mean_h max(R_A, 0), unnormalised."""
    vp, reused, rel = _relevance(adapter, images, targets, context, p.start_layer)
    with torch.no_grad():
        r = residual_product_row(
            adapter, vp, p.start_layer,
            lambda layer: rel.attention_relevance[layer].clamp(min=0).mean(dim=1))
    return _patch_attribution("chefer_lrp_rollout", adapter, images, targets, r, vp, reused)


@dataclass(frozen=True)
class LastLayerParams:
    """Relevance of one block's attention (Chefer 2021a `last_layer` / `second_layer`).

    Attributes:
        layer: block index; −1 = last block (`last_layer`), 1 = `second_layer`.
        ablation: multiply R_A by the attention gradient before clamping (the reference's
            `is_ablation` flag).
    """

    layer: int = -1
    ablation: bool = False


@register_method(
    "chefer_last_layer",
    params=LastLayerParams,
    family="lrp",
    vit_only=True,
    uses={"attention", "attention_grad", "lrp"},
    aliases=("last_layer", "lrp_last_layer"),
    paper="Chefer, Gur & Wolf 2021a (CVPR), `last_layer` mode of ViT_LRP",
    summary="mean_h max(R_A, 0) of one block, read-out row (gradient-weighted with ablation).",
)
def chefer_last_layer(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                      p: LastLayerParams, context: BatchContext) -> Attribution:
    layer = block_index("layer", p.layer, adapter.depth)
    vp, reused, rel = _relevance(adapter, images, targets, context, layer)
    r_a = rel.attention_relevance[layer]
    if p.ablation:
        r_a = r_a * vp.capture.gradient_maps()[layer]
    abar = r_a.clamp(min=0).mean(dim=1)
    row = torch.bmm(class_readout_row(adapter, vp).unsqueeze(1), abar).squeeze(1)
    return _patch_attribution("chefer_last_layer", adapter, images, targets, row, vp, reused)


@dataclass(frozen=True)
class FullLrpParams:
    """Pixel-level LRP of Chefer 2021a (`full` mode); no parameters."""


@register_method(
    "chefer_full_lrp",
    params=FullLrpParams,
    family="lrp",
    vit_only=True,
    uses={"attention", "attention_grad", "lrp"},
    aliases=("full", "full_lrp", "lrp_full"),
    paper="Chefer, Gur & Wolf 2021a (CVPR), `full` mode of ViT_LRP (LRP to the pixels)",
    summary="LRP α1β0 through every block, the position-embedding add and the patch conv (z^B).",
)
def chefer_full_lrp(adapter: ViTAdapter, images: torch.Tensor, targets: torch.Tensor,
                    p: FullLrpParams, context: BatchContext) -> Attribution:
    model = adapter.model
    pe = model.patch_embed
    pre_norm = type(model.norm_pre).__name__ != "Identity"
    if (model.pos_embed is None
            or (pre_norm and not isinstance(model.norm_pre, torch.nn.LayerNorm))
            or type(pe.norm).__name__ != "Identity" or tuple(pe.proj.stride) != adapter.patch_size):
        raise ValueError(f"chefer_full_lrp needs a plain timm ViT embedding ({adapter.name!r})")

    vp, reused, rel = _relevance(adapter, images, targets, context, 0)
    with torch.no_grad():
        x0, r0 = vp.capture.activations[0]["x"], rel.block_input_relevance[0]
        if pre_norm:
            # CLIP towers (pre_norm): block 0 reads norm_pre(tokens + pos). Chefer's rule for
            # LayerNorm is the identity, as for norm1/norm2/norm, so R passes through unchanged
            # and the add is split at norm_pre's input, recomputed here
            x0 = model._pos_embed(pe(adapter.normalize(images).to(x0.dtype)))
        if getattr(model, "no_embed_class", False):
            # pos_embed is added to the patches only (DeiT-3, DINOv2): the prefix tokens'
            # relevance stays on them, the add splits that of the patches
            prefix = adapter.num_prefix_tokens
            x0, r0 = x0[:, prefix:], r0[:, prefix:]
        pos = model.pos_embed.expand_as(x0)
        r_tokens, _ = residual_rule(x0 - pos, pos, r0)
        gh, gw = adapter.grid_of(images)
        r_patch = r_tokens[:, -gh * gw:].transpose(1, 2)
        r_patch = r_patch.reshape(images.shape[0], -1, gh, gw)
        channels = patch_embedding_rule(adapter.normalize(images), pe.proj.weight, r_patch,
                                        adapter.patch_size)
    return pixel_attribution("chefer_full_lrp", channels, targets, _lrp_cost(vp, reused))
