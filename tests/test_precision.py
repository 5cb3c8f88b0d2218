"""Opt-in bfloat16 autocast: maps under bf16 agree with float32, every method runs under it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images_for, tiny_vit
from timm.models.vision_transformer import VisionTransformer

from vitxai.cli import build_parser
from vitxai.methods import METHODS, BatchContext, attribute
from vitxai.methods.perturbation import SegmentationParams
from vitxai.methods.vit_pass import VIT_PASS
from vitxai.models import adapt

SIZE = 32
CFG = {"input_size": (3, SIZE, SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
       "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def cell_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4×4 grids of random colours (cells = 8-pixel patches); label = the dominant channel."""
    cells = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    images = F.interpolate(cells, size=(SIZE, SIZE), mode="nearest")
    return images, cells.mean(dim=(2, 3)).argmax(dim=1)


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT after 150 Adam steps on cell images (about 2 s): its logits, attention and
    relevance are far from a random network's near-uniform ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=3,
                                  num_heads=2, mlp_ratio=2.0, num_classes=3)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        mean = torch.tensor(CFG["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(CFG["std"]).view(1, 3, 1, 1)
        for step in range(150):
            x, y = cell_images(32, 1000 + step)
            loss = F.cross_entropy(model((x - mean) / std), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return adapt(model, "trained_tiny_vit", CFG)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation over pixels of (B, H, W) maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


CASES = {
    "integrated_gradients": {"steps": 16},
    "attention_rollout": {},
    "chefer2021a": {},
    # 16 superpixels (one per cell); quickshift's defaults find 1–3 on 32-pixel images
    "lime": {"n_samples": 64, "segmentation": SegmentationParams(kernel_size=1, max_dist=4)},
    # the other methods --precision auto runs in bf16: perturbation (pixel and token space,
    # removed tokens) and gradient methods
    "kernel_shap": {"n_samples": 64, "paired": True,
                    "segmentation": SegmentationParams(kernel_size=1, max_dist=4)},
    "rise": {"n_samples": 64, "grid": 4, "p_keep": 0.5},
    "occlusion": {"window": 8, "stride": 8},
    "lime/token drop": {"n_samples": 64, "space": "token", "removal": "drop"},
    "kernel_shap/token drop grid": {"n_samples": 64, "space": "token", "removal": "drop",
                                    "grid": 2, "paired": True},
    "gradient_shap": {"n_samples": 8},
    "smoothgrad": {"n_samples": 4},
}


def test_bf16_maps_correlate_with_fp32(trained):
    images, labels = cell_images(6, 5)
    trained.set_precision("fp32")
    fp32_logits = trained.predict(images)
    assert (fp32_logits.argmax(1) == labels).float().mean() >= 0.8  # not a degenerate model
    try:
        trained.set_precision("bf16")
        bf16_logits = trained.predict(images)
        assert bf16_logits.dtype == torch.float32
        assert not torch.equal(bf16_logits, fp32_logits)  # autocast is in effect
        torch.testing.assert_close(bf16_logits, fp32_logits, rtol=0.05, atol=0.05)
        for name, params in CASES.items():
            maps = {}
            for precision in ("fp32", "bf16"):
                trained.set_precision(precision)
                method = name.split("/")[0]
                maps[precision] = attribute(method, trained, images, labels, **params).maps
            r = pearson(maps["fp32"], maps["bf16"])
            assert maps["bf16"].dtype == torch.float32
            assert (r >= 0.99).all(), f"{name}: per-image r = {r.tolist()}"
    finally:
        trained.set_precision("fp32")


SMALL = {"lime": {"n_samples": 24}, "kernel_shap": {"n_samples": 24}, "rise": {"n_samples": 16},
         "occlusion": {"window": 16, "stride": 16},
         "integrated_gradients": {"steps": 4}, "integrated_gradients_uniform": {"steps": 4},
         "gradient_shap": {"n_samples": 4}, "smoothgrad": {"n_samples": 2}}


def test_every_method_runs_under_bf16():
    adapter = tiny_vit().set_precision("bf16")
    images = images_for(adapter, 2)
    vit_methods = sorted(m for m, spec in METHODS.items() if spec.family != "cam")  # CNNs
    context = BatchContext.for_batch(2, planned=vit_methods)
    for name in vit_methods:
        result = attribute(name, adapter, images, [1, 2], context=context,
                           **SMALL.get(name, {}))
        assert result.maps.dtype == torch.float32, name
        assert torch.isfinite(result.maps).all(), name
    # the shared attention/relevance pass runs in float32 (relevance rules amplify bf16
    # rounding), so its maps equal the float32 ones exactly
    assert context.cache[VIT_PASS].capture.attention[0].dtype == torch.float32


def test_precision_settings():
    adapter = tiny_vit()
    assert adapter.precision == "fp32"
    assert adapter.set_precision("bfloat16").precision == "bf16"
    with adapter.full_precision():
        assert adapter.precision == "fp32"
    assert adapter.precision == "bf16"
    with pytest.raises(ValueError, match="must be one of"):
        adapter.set_precision("fp8")
    with pytest.raises(ValueError, match="float32 model"):
        tiny_vit(dtype=torch.float64).set_precision("bf16")
    with pytest.raises(ValueError, match="set_precision"):
        adapter.to(dtype=torch.float64)
    args = build_parser().parse_args(["compare", "--precision", "bf16"])
    assert args.precision == "bf16"
