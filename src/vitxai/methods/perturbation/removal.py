"""Token removal: a ViT evaluated on the patch tokens a coalition keeps, the others removed.

In token space (``space="token"``) a masked patch can leave the model in three ways
(``removal``):

- ``"blend"`` (default): its embedding becomes the ``token_baseline`` embedding (or a blend
  towards it, RISE's soft masks); the sequence keeps its length (:func:`token_masking`).
- ``"drop"``: the token is *removed* from the sequence after the position embedding, so the
  blocks run on the prefix tokens (class token, registers, distillation token, always kept)
  and the kept patches only. A forward costs what its kept tokens cost: attention is
  quadratic and the MLP linear in their number. Used by MAE's encoder, which sees only the
  visible patches (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR).
- ``"attention_mask"``: full length, but no token attends to a removed one (a boolean key
  mask, i.e. −inf added to the pre-softmax scores, in every block), the evaluation of ViTs on
  partial inputs of Covert, Kim & Lee 2023 ("Learning to Estimate Shapley Values with Vision
  Transformers", ICLR). Kept tokens then compute exactly what they compute under ``"drop"``
  (removed tokens still get outputs, which nothing reads), so both give the same scores up to
  float rounding; ``"drop"`` is the cheap one, ``"attention_mask"`` keeps batches
  rectangular and serves as its check.

The forward is written out on timm's ``VisionTransformer``: ``patch_embed`` → ``_pos_embed``
→ ``patch_drop`` / ``norm_pre`` (once per image, :func:`token_embeddings`) → keep-index gather
(or key mask) → ``blocks`` → ``norm`` → ``forward_head``. Pooled read-outs see the kept
patches only: average or max pooling and linear probes (:mod:`vitxai.models.probe`) under
"drop" by construction; under "attention_mask" the removed tokens' outputs are replaced by the
mean of the kept ones before pooling, which leaves a mean and a max over the kept tokens
unchanged.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal

import torch

from vitxai.params import check_choice

if TYPE_CHECKING:
    from vitxai.models.adapter import ViTAdapter

Removal = Literal["blend", "drop", "attention_mask"]
REMOVALS: tuple[str, ...] = ("blend", "drop", "attention_mask")


def check_removal(removal: object, space: object) -> None:
    """One-line ValueError unless ``removal`` is a :data:`Removal` that fits ``space``."""
    check_choice("removal", removal, REMOVALS)
    if removal != "blend" and space != "token":
        raise ValueError(f"parameter removal={removal!r} needs space='token' (it removes patch "
                         "tokens of a ViT); pixel space fills pixels, use removal='blend'")


def _reads_patches(adapter: ViTAdapter) -> bool:
    """Whether the classifier pools patch tokens (mean or max pooling, a mean-patch probe)
    rather than reading prefix tokens only."""
    if adapter.probe is not None:
        return "mean_patch" in adapter.probe.parts
    return getattr(adapter.model, "global_pool", "token") not in ("token", "map")


def check_token_removal(adapter: ViTAdapter, removal: Removal, method: str) -> None:
    """One-line ValueError when ``adapter``'s model cannot be evaluated with ``removal``.

    Both need timm's ``VisionTransformer`` (its forward is spelled out here) with blocks that
    take ``attn_mask`` (removed tokens, and the padding of "drop", are masked keys);
    "attention_mask" also needs a read-out that is not attention pooling (which would attend
    to the removed tokens).
    """
    if removal == "blend":
        return
    from timm.models.vision_transformer import VisionTransformer

    model = adapter.model
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"method {method!r} with removal={removal!r} needs a timm "
                         f"VisionTransformer; {adapter.name!r} is not one: use removal='blend'")
    if removal == "attention_mask" and getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"method {method!r}: removal='attention_mask' cannot mask "
                         f"{adapter.name!r}'s attention pooling; use removal='drop'")
    blocks = [type(b).forward for b in model.blocks]
    if not all("attn_mask" in inspect.signature(f).parameters for f in blocks):
        raise ValueError(f"method {method!r}: the blocks of {adapter.name!r} take no "
                         f"attn_mask, which removal={removal!r} needs; use removal='blend'")


def token_embeddings(adapter: ViTAdapter, images: torch.Tensor) -> torch.Tensor:
    """(M, P + gh·gw, D) the token sequence a timm ViT's blocks receive for ``images`` (M, 3,
    H, W) unnormalised [0, 1]: ``patch_embed`` → ``_pos_embed`` → ``patch_drop`` →
    ``norm_pre``, in the model's dtype (float32 under ``precision="bf16"``: computed once per
    image, it costs nothing to keep exact). :func:`removal_logits` removes tokens from it."""
    model = adapter.model
    return model.norm_pre(model.patch_drop(model._pos_embed(
        model.patch_embed(adapter.normalize(images)))))


def removal_logits(adapter: ViTAdapter, tokens: torch.Tensor, keep: torch.Tensor,
                   removal: Literal["drop", "attention_mask"],
                   image: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a timm ViT on token sequences with the patches ``keep`` marks, the others
    removed.

    Args:
        adapter: a ViT adapter of a timm ``VisionTransformer`` (:func:`check_token_removal`).
        tokens: (B, P + gh·gw, D) embedded sequences (:func:`token_embeddings`; the engine
            embeds each image once, so a coalition costs its blocks only).
        keep: (M, gh·gw) bool, True for the patches kept (token order).
        image: (M,) long, the sequence of ``tokens`` each row of ``keep`` reads; None: row i
            reads ``tokens[i]`` (M = B). Under "drop" only the kept tokens are gathered.
        removal: "drop" (removed tokens leave the sequence: the blocks run on the prefix
            tokens and the kept patches, in their order) or "attention_mask" (they stay, and
            no token attends to them). Under "drop" rows that keep fewer patches than the
            chunk's most are padded to its length and the padding is masked out like removed
            tokens, so a chunk of nearly equal counts (the engine sorts rows by their count)
            costs what its kept tokens cost.

    Returns:
        (M, C) logits, float32 under ``precision="bf16"`` (as :meth:`ModelAdapter.logits`).

    Raises:
        ValueError: a row keeps no patch of a model whose read-out pools patches (nothing is
            left to pool), or rows of different counts on a model with attention pooling
            (which would read the padding).
    """
    model = adapter.model
    m, prefix = keep.shape[0], adapter.num_prefix_tokens
    kept = keep.sum(1)
    if _reads_patches(adapter) and bool((kept == 0).any()):
        raise ValueError(f"a coalition keeps no patch, and {adapter.name!r} pools its patch "
                         "tokens: nothing is left to read; use removal='blend'")
    ragged = removal == "drop" and bool((kept != kept[0]).any())
    if ragged and getattr(model, "attn_pool", None) is not None:
        raise ValueError("removal='drop' on a model with attention pooling evaluates rows "
                         "keeping equally many patches together")
    bf16 = adapter.precision == "bf16"
    autocast = (torch.autocast(device_type=adapter.device.type, dtype=torch.bfloat16) if bf16
                else nullcontext())
    source = (torch.arange(m) if image is None else image).to(tokens.device)
    with autocast:
        attend = None
        if removal == "drop":
            # a stable sort puts each row's kept patches first, in ascending order
            width = int(kept.max())
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
            index = torch.cat([torch.arange(prefix, device=keep.device).expand(m, prefix),
                               order + prefix], dim=1).to(tokens.device)
            x = tokens[source[:, None], index]  # (M, P + width, D): the kept tokens only
            if ragged:  # padding: the removed patches sorted after the kept ones
                attend = torch.cat([keep.new_ones(m, prefix),
                                    torch.arange(width, device=keep.device) < kept[:, None]],
                                   dim=1).to(x.device)
        else:
            x = tokens[source]
            attend = torch.cat([keep.new_ones(m, prefix), keep], dim=1).to(x.device)
        if attend is None:
            x = model.norm(model.blocks(x))
        else:
            mask = attend[:, None, None, :]  # (M, 1, 1, N): keys; True = attended to
            for block in model.blocks:
                x = block(x, attn_mask=mask)
            x = _pool_safe(model, model.norm(x), attend, prefix)
        y = model.forward_head(x)
    return y.float() if bf16 else y


def _pool_safe(model: torch.nn.Module, x: torch.Tensor, attend: torch.Tensor,
               prefix: int) -> torch.Tensor:
    """Replace removed tokens' outputs (B, N, D) by the mean of the kept tokens the pooling
    reduces over, so that mean and max pooling (and mean-patch probes) read the kept tokens
    only, as under "drop": the mean of a set with its own mean added is unchanged, and a mean
    never exceeds the maximum."""
    pooled = attend.clone()
    if not getattr(model, "pool_include_prefix", False):
        pooled[:, :prefix] = False
    weights = pooled[..., None].to(x.dtype)
    mean = (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return torch.where(attend[..., None], x, mean)
