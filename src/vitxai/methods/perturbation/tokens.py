"""Token space: ViT features on the patch grid, masked at the token level.

With ``space="token"`` the perturbation methods mask patch tokens instead of pixels: a forward
hook on ``patch_embed`` (:func:`token_masking`) swaps the embeddings of masked patches for a
baseline embedding, keeping the sequence length. The features then live on the patch grid and
maps are (B, gh, gw) "token" natives, nearest-upsampled by :func:`patch_map` so each pixel gets
its patch's value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter, ViTAdapter

TokenBaseline = Literal["mean", "zero"]


def token_vit(adapter: ModelAdapter, method: str) -> ViTAdapter:
    """The adapter as a ViT, for ``space="token"``; a one-line ValueError when it is not one."""
    if not adapter.is_vit:
        raise ValueError(
            f"method {method!r} with space='token' needs a ViT (timm VisionTransformer); "
            f"{adapter.name!r} is not one. Use space='pixel'."
        )
    return cast("ViTAdapter", adapter)


@dataclass
class TokenMask:
    """What the ``patch_embed`` hook of :func:`token_masking` applies to the next forward.

    Attributes:
        keep: (M, gh·gw) for the M images of the next forward: bool (True keeps the patch's
            embedding, False replaces it by the baseline embedding) or float in [0, 1] (the
            blend keep·e + (1 − keep)·baseline, for RISE's soft masks); None leaves embeddings
            alone.
    """

    keep: torch.Tensor | None = None


@contextmanager
def token_masking(adapter: ViTAdapter, size: tuple[int, int],
                  token_baseline: TokenBaseline = "mean") -> Iterator[TokenMask]:
    """Mask patch tokens of a ViT by a forward hook on ``model.patch_embed``.

    The hook replaces the embeddings of masked patches *before* the position embedding and the
    prefix tokens are added, so a masked token keeps its position and the sequence length is
    unchanged (batches stay rectangular). Set ``mask.keep`` before each forward. The hook is
    removed on exit, also when the body raises.

    Args:
        adapter: a ViT adapter.
        size: (H, W) of the images that will be fed (the baseline embedding is made at that
            size).
        token_baseline: "mean": the embedding ``patch_embed`` gives a patch of the model's mean
            colour (zero normalised input: for timm's conv PatchEmbed its bias, then its norm),
            so masking a token equals setting its pixels to baseline="mean"; "zero": the zero
            vector, so a masked token carries only its position embedding.

    Yields:
        The :class:`TokenMask` the hook reads.
    """
    pe = adapter.model.patch_embed
    if token_baseline == "mean":
        with torch.no_grad():  # before the hook exists, so it is not masked itself
            base = pe(adapter.normalize(adapter.mean.expand(1, 3, *size)))
    else:
        base = torch.zeros((), dtype=adapter.dtype, device=adapter.device)
    mask = TokenMask()

    def hook(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
        if mask.keep is None:
            return None  # output unchanged
        # (M, N, D) for flattened PatchEmbed, (M, gh, gw, D) for dynamic-size (NHWC) ones
        keep = mask.keep.to(out.device).reshape(*out.shape[:-1], 1)
        if keep.dtype == torch.bool:
            return torch.where(keep, out, base)  # kept tokens bit-identical
        keep = keep.to(out.dtype)
        return keep * out + (1 - keep) * base

    handle = pe.register_forward_hook(hook)
    try:
        yield mask
    finally:
        handle.remove()


def patch_map(native: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) patch values → (B, H, W), each pixel getting its patch's value (nearest)."""
    return F.interpolate(native[:, None], size=images.shape[-2:], mode="nearest")[:, 0]
