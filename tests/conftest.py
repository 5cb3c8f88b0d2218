"""Shared fixtures: tiny random timm ViTs and generated images (no network, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitxai.models import ModelAdapter, adapt

#: normalisation of the hand-built models of the perturbation tests (linear_adapter, ...)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
TINY_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def tiny_vit(seed: int = 0, img_size=32, patch_size=8, depth: int = 3, reg_tokens: int = 0,
             dtype: torch.dtype = torch.float32, **kwargs):
    """A seeded tiny timm VisionTransformer wrapped in a ViTAdapter."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32,
                              depth=depth, num_heads=2, mlp_ratio=2.0, num_classes=10,
                              reg_tokens=reg_tokens, **kwargs)
    # random init leaves LayerNorm at identity and zero biases; perturb them so tests see a
    # generic network
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    cfg = dict(TINY_CFG, input_size=(3, *size))
    return adapt(model.to(dtype), name="tiny_vit", config=cfg)


def images_for(adapter, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = adapter.input_size
    return torch.rand(n, 3, h, w, generator=g, dtype=adapter.dtype)


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def vit64():
    return tiny_vit(dtype=torch.float64)


def linear_adapter(size: int, seed: int = 1) -> ModelAdapter:
    """float64 model whose logits (4 classes) are linear in the pixels of size × size images."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 4)).double()
    return ModelAdapter(model, MEAN, STD, (size, size), "linear")


def block_images(n: int, grid: int, size: int = 32, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 3, size, size) images of grid×grid flat colour blocks plus faint noise (SLIC
    finds about one superpixel per block)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, grid, grid, generator=g)
    image = nn.functional.interpolate(colours, size=(size, size), mode="nearest")
    return (image + 0.02 * torch.rand(image.shape, generator=g)).clamp(0, 1).to(dtype)
