"""RISE, occlusion and token-space perturbation (LIME, KernelSHAP, RISE, occlusion on ViTs)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import MEAN, STD, images_for, linear_adapter, tiny_vit
from torch import nn

import vitxai.methods.perturbation as P
from vitxai.methods.base import BatchContext, attribute, get_method
from vitxai.models.adapter import ModelAdapter, ViTAdapter


@pytest.fixture(scope="module")
def vit64() -> ViTAdapter:
    """float64 tiny ViT: 32×32 images, 8-pixel patches, a 4×4 token grid."""
    return tiny_vit(dtype=torch.float64)


class RegionMean(nn.Module):
    """Logits (B, 2) = [mean of the normalised input over a fixed region, 0]."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, :, self.region].mean(dim=(1, 2))
        return torch.stack([inside, torch.zeros_like(inside)], dim=1)


def no_hooks(adapter: ViTAdapter) -> bool:
    return not adapter.model.patch_embed._forward_hooks


# ------------------------------------------------------------------------------- registry


def test_registered_with_aliases() -> None:
    for alias, name in [("RISE", "rise"), ("Occlusion", "occlusion")]:
        spec = get_method(alias)
        assert spec.name == name and spec.family == "perturbation" and not spec.vit_only
        assert spec.paper and spec.summary


@pytest.mark.parametrize(("method", "kw", "kind", "forward"), [
    ("rise", {"n_samples": 20}, "pixel", 20),
    ("rise", {"n_samples": 20, "grid": 2, "space": "token"}, "token", 20),
    ("occlusion", {}, "pixel", 10),  # windows at 0, 8, 16 per axis, plus f(x)
    ("occlusion", {"space": "token"}, "token", 10),  # 2-patch window, 1-patch step on 4×4
    ("occlusion", {"window": 12, "stride": 4, "space": "token"}, "token", 10),
    ("lime", {"n_samples": 30, "space": "token"}, "token", 30),
    ("kernel_shap", {"n_samples": 30, "space": "token"}, "token", 30),
])
def test_shapes_and_cost(vit64, method, kw, kind, forward) -> None:
    x = images_for(vit64, 2)
    r = attribute(method, vit64, x, [1, 2], **kw)
    assert r.maps.shape == (2, 32, 32) and r.native_kind == kind
    assert r.native.shape == ((2, 32, 32) if kind == "pixel" else (2, 4, 4))
    assert torch.isfinite(r.maps).all() and r.segments is None
    if kind == "token":  # each pixel carries its patch's value
        torch.testing.assert_close(r.maps, r.native.repeat_interleave(8, 1).repeat_interleave(
            8, 2))
    assert (r.cost.forward, r.cost.backward) == (forward, 0)


@pytest.mark.parametrize(("method", "kw"), [
    ("rise", {"n_samples": 40, "grid": 4, "p_keep": 0.5, "batch_size": 16}),
    ("rise", {"n_samples": 40, "baseline": "uniform_normalized", "batch_size": 7}),
    ("rise", {"n_samples": 40, "grid": 2, "space": "token", "batch_size": 16}),
    ("occlusion", {"window": 12, "stride": 6, "batch_size": 5}),
    ("occlusion", {"space": "token", "token_baseline": "zero", "batch_size": 5}),
    ("lime", {"n_samples": 40, "space": "token", "batch_size": 16}),
    ("kernel_shap", {"n_samples": 40, "space": "token", "batch_size": 16}),
])
def test_batch_equals_per_image(vit64, method, kw) -> None:
    x = images_for(vit64, 3)
    t = torch.tensor([0, 4, 8])
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    together = attribute(method, vit64, x, t, context=BatchContext.for_batch(3, 7, ids), **kw)
    for i in range(3):
        alone = attribute(method, vit64, x[i:i + 1], t[i:i + 1],
                          context=BatchContext.for_batch(1, 7, ids[i:i + 1]), **kw)
        torch.testing.assert_close(together.native[i], alone.native[0], atol=1e-8, rtol=0)
        torch.testing.assert_close(together.maps[i], alone.maps[0], atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------- RISE


def test_rise_reproducible_with_seed(vit64) -> None:
    x = images_for(vit64, 2)
    runs = [attribute("rise", vit64, x, [1, 2], seed=s, n_samples=30) for s in (5, 5, 6)]
    assert torch.equal(runs[0].maps, runs[1].maps)
    assert not torch.allclose(runs[0].maps, runs[2].maps)


def test_rise_masks_follow_the_paper(monkeypatch) -> None:
    sizes: list[tuple[int, int]] = []
    original = F.interpolate

    def spy(x, size=None, **kwargs):
        sizes.append(tuple(size))
        return original(x, size=size, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    grids, shifts = P.rise_draws(BatchContext.for_batch(1), 1, 400, 8, 0.1, (224, 224))
    assert grids.shape == (1, 400, 8, 8) and shifts.shape == (1, 400, 2)
    assert 0 <= shifts.min() and shifts.max() < 28  # cell = ceil(224 / 8)
    masks = P.rise_masks(grids[0], shifts[0], (224, 224), torch.float64)
    assert sizes == [(252, 252)]  # (s + 1)·ceil(H/s), then a random-shift crop to 224
    assert masks.shape == (400, 224, 224) and masks.min() >= 0 and masks.max() <= 1
    assert masks.mean().item() == pytest.approx(0.1, abs=0.01)
    # the crop is the upsampled grid at the drawn offset
    up = original(grids[0, :3, None].double(), size=(252, 252), mode="bilinear",
                  align_corners=False)[:, 0]
    for m in range(3):
        r, c = shifts[0, m].tolist()
        assert torch.equal(masks[m], up[m, r:r + 224, c:c + 224])


def test_rise_is_score_weighted_mask_mean() -> None:
    """Saliency = Σ_i p_c(M_i ⊙ x + (1 − M_i) ⊙ x′)·M_i / (N·p1), checked by brute force."""
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[2:8, 3:10] = True
    adapter = ModelAdapter(RegionMean(region), MEAN, STD, (16, 16), "region")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = BatchContext.for_batch(1, seed=3)
    n, grid, p1 = 24, 4, 0.3
    r = attribute("rise", adapter, x, 0, context=ctx, n_samples=n, grid=grid, p_keep=p1,
                  baseline="black", batch_size=5)
    grids, shifts = P.rise_draws(ctx, 1, n, grid, p1, (16, 16))
    masks = P.rise_masks(grids[0], shifts[0], (16, 16), torch.float32)[:, None]
    probs = adapter.predict(masks * x).softmax(1)[:, 0]
    expected = (probs[:, None, None] * masks[:, 0]).sum(0) / (n * p1)
    torch.testing.assert_close(r.maps[0], expected, atol=1e-5, rtol=1e-5)


def test_rise_finds_the_region_the_model_reads() -> None:
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[4:16, 18:30] = True
    adapter = ModelAdapter(RegionMean(region), MEAN, STD, (32, 32), "region")
    white = torch.ones(1, 3, 32, 32)
    r = attribute("rise", adapter, white, 0, n_samples=500, grid=4, p_keep=0.5,
                  baseline="black", score="logit")
    saliency = r.maps[0]
    inside, outside = saliency[region], saliency[~region]
    assert inside.mean() > outside.mean() + 0.3  # ≈ 0.57 vs 0.10–0.15 over seeds
    # almost every inside pixel outranks every outside one (smooth masks blur the border)
    assert (inside[:, None] > outside[None]).double().mean() > 0.97
    assert region[saliency == saliency.max()].all()


# ------------------------------------------------------------------------------- occlusion


def test_window_starts_cover_every_position() -> None:
    assert P.window_starts(32, 16, 8) == [0, 8, 16]
    assert P.window_starts(6, 3, 2) == [0, 2, 3]  # a last window flush with the border
    assert P.window_starts(5, 9, 1) == [0]  # window clipped to the image


@pytest.mark.parametrize(("window", "stride", "baseline"), [(3, 2, 0.3), (3, 3, "mean"),
                                                            (2, 1, "black"), (9, 4, "mean")])
def test_occlusion_of_linear_model_equals_closed_form(window, stride, baseline) -> None:
    size, target = 6, 2
    adapter = linear_adapter(size)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(4),
                   dtype=torch.float64)
    r = attribute("occlusion", adapter, x, target, window=window, stride=stride,
                  baseline=baseline, score="logit")
    # a logit linear in the normalised pixels drops by Σ_window w·(x − baseline)/σ when occluded
    weight = adapter.model[1].weight[target].view(3, size, size)
    colour = P.baseline_colour(adapter, baseline)[0]
    per_pixel = (weight * (x[0] - colour) / adapter.std[0]).sum(0)
    total = torch.zeros(size, size, dtype=torch.float64)
    count = torch.zeros(size, size, dtype=torch.float64)
    w = min(window, size)
    for r0 in P.window_starts(size, window, stride):
        for c0 in P.window_starts(size, window, stride):
            total[r0:r0 + w, c0:c0 + w] += per_pixel[r0:r0 + w, c0:c0 + w].sum()
            count[r0:r0 + w, c0:c0 + w] += 1
    torch.testing.assert_close(r.maps[0], total / count, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------- token space


def test_token_masking_all_none_and_soft(vit64) -> None:
    x = images_for(vit64, 2)
    with torch.no_grad():
        plain = vit64.logits(x)
        grey = vit64.logits(vit64.mean.expand_as(x))
        with P.token_masking(vit64, (32, 32), "mean") as mask:
            mask.keep = torch.ones(2, 16, dtype=torch.bool)
            kept = vit64.logits(x)
            mask.keep = torch.zeros(2, 16, dtype=torch.bool)
            masked = vit64.logits(x)
            # a soft mask constant per patch is the pixel blend with the mean colour
            soft = torch.rand(2, 16, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)
            mask.keep = soft
            blended = vit64.logits(x)
            mask.keep = None
            untouched = vit64.logits(x)
        with P.token_masking(vit64, (32, 32), "zero") as mask:
            mask.keep = torch.zeros(2, 16, dtype=torch.bool)
            zero = vit64.logits(x)
        pixel_soft = soft.view(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
        pixel_blend = vit64.logits(pixel_soft * x + (1 - pixel_soft) * vit64.mean)
    assert torch.equal(kept, plain) and torch.equal(untouched, plain)
    assert not torch.allclose(masked, plain, atol=1e-3)
    torch.testing.assert_close(masked, grey, atol=1e-12, rtol=0)  # "mean" = mean-colour patch
    torch.testing.assert_close(blended, pixel_blend, atol=1e-12, rtol=0)
    assert not torch.allclose(zero, masked, atol=1e-3)
    assert no_hooks(vit64)


def test_token_hook_removed_on_error(vit64, monkeypatch) -> None:
    with pytest.raises(RuntimeError, match="boom"), P.token_masking(vit64, (32, 32)):
        assert not no_hooks(vit64)
        raise RuntimeError("boom")
    assert no_hooks(vit64)

    def failing(images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("model failed")

    monkeypatch.setattr(vit64, "logits", failing)
    for method in ("lime", "kernel_shap", "rise", "occlusion"):
        with pytest.raises(RuntimeError, match="model failed"):
            attribute(method, vit64, images_for(vit64, 1), 0, space="token")
        assert no_hooks(vit64)


def test_token_occlusion_equals_patch_aligned_pixel_occlusion(vit64) -> None:
    x = images_for(vit64, 2)
    tokens = attribute("occlusion", vit64, x, [3, 5], window=8, stride=8, space="token")
    pixels = attribute("occlusion", vit64, x, [3, 5], window=8, stride=8, baseline="mean")
    torch.testing.assert_close(tokens.maps, pixels.maps, atol=1e-12, rtol=0)
    zero = attribute("occlusion", vit64, x, [3, 5], window=8, stride=8, space="token",
                     token_baseline="zero")
    assert not torch.allclose(zero.maps, tokens.maps, atol=1e-6)


def test_token_kernel_shap_efficiency(vit64) -> None:
    x = images_for(vit64, 2)
    t = torch.tensor([0, 9])
    r = attribute("kernel_shap", vit64, x, t, n_samples=60, space="token")
    full = vit64.predict(x).softmax(1)
    empty = vit64.predict(vit64.mean.expand_as(x)).softmax(1)  # every token masked, "mean"
    delta = (full - empty).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(r.native.sum((1, 2)), delta, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["lime", "kernel_shap", "rise", "occlusion"])
def test_tokens_need_a_vit(method) -> None:
    adapter = linear_adapter(8)
    with pytest.raises(ValueError, match=f"method '{method}' with space='token' needs a ViT"):
        attribute(method, adapter, torch.rand(1, 3, 8, 8, dtype=torch.float64), 0,
                  space="token")


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("method", "name", "value"), [
    ("rise", "n_samples", 0),
    ("rise", "grid", 0),
    ("rise", "p_keep", 0.0),
    ("rise", "p_keep", 1.5),
    ("rise", "baseline", "noise"),
    ("rise", "batch_size", 0),
    ("rise", "score", "prob"),
    ("rise", "space", "patch"),
    ("rise", "token_baseline", "learned"),
    ("occlusion", "window", 0),
    ("occlusion", "stride", 0),
    ("occlusion", "baseline", "red"),
    ("occlusion", "batch_size", 0),
    ("occlusion", "score", "logits"),
    ("occlusion", "space", "patches"),
    ("lime", "space", "patches"),
    ("lime", "token_baseline", "black"),
    ("kernel_shap", "space", "superpixel"),
    ("kernel_shap", "token_baseline", 0.0),
])
def test_invalid_params(method, name, value) -> None:
    with pytest.raises(ValueError, match=f"parameter {name}=") as info:
        get_method(method).make_params(**{name: value})
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- old names


@pytest.mark.parametrize(("method", "old", "new"), [
    ("lime", {"fill": "black", "output": "logit", "n_samples": 20},
     {"baseline": "black", "score": "logit", "n_samples": 20}),
    ("lime", {"space": "tokens", "token_fill": "zero", "n_samples": 20},
     {"space": "token", "token_baseline": "zero", "n_samples": 20}),
    ("kernel_shap", {"fill": 0.3, "output": "logit", "n_samples": 20},
     {"baseline": 0.3, "score": "logit", "n_samples": 20}),
    ("kernel_shap", {"space": "tokens", "token_fill": "zero", "n_samples": 20},
     {"space": "token", "token_baseline": "zero", "n_samples": 20}),
    ("rise", {"n_masks": 20, "output": "logit", "baseline": "uniform_normalized"},
     {"n_samples": 20, "score": "logit", "baseline": "uniform_normalized"}),
    ("rise", {"n_masks": 20, "grid": 2, "space": "tokens", "token_fill": "zero"},
     {"n_samples": 20, "grid": 2, "space": "token", "token_baseline": "zero"}),
    ("occlusion", {"fill": "black", "output": "logit", "window": 12, "stride": 6},
     {"baseline": "black", "score": "logit", "window": 12, "stride": 6}),
    ("occlusion", {"space": "tokens", "token_fill": "zero"},
     {"space": "token", "token_baseline": "zero"}),
])
def test_deprecated_names_give_the_same_maps_with_a_warning(vit64, method, old, new) -> None:
    """Old names and values (docs/conventions.md) work for one release: bit-identical maps and
    one FutureWarning per old name or value; the new names warn about nothing."""
    x = images_for(vit64, 2)
    with pytest.warns(FutureWarning) as record:
        before = attribute(method, vit64, x, [1, 3], seed=4, **old)
    renamed = [k for k in old if k not in new]
    if old.get("space") == "tokens":
        renamed.append("space='tokens'")
    messages = [str(w.message) for w in record if w.category is FutureWarning]
    assert len(messages) == len(renamed)
    for name in renamed:
        assert any(f"{method}.{name}" in m and "deprecated" in m for m in messages), name
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        after = attribute(method, vit64, x, [1, 3], seed=4, **new)
    torch.testing.assert_close(before.maps, after.maps, atol=0, rtol=0)
    torch.testing.assert_close(before.native, after.native, atol=0, rtol=0, equal_nan=True)
    spec = get_method(method)
    assert spec.current_names(old, warn=False) == new  # how recorded runs are read back
    with pytest.warns(FutureWarning):
        assert spec.make_params(**old) == spec.make_params(**new)


@pytest.mark.parametrize(("method", "old", "new"), [
    ("lime", "fill", "baseline"), ("kernel_shap", "output", "score"),
    ("rise", "n_masks", "n_samples"), ("occlusion", "token_fill", "token_baseline"),
])
def test_old_and_new_name_together_is_an_error(method, old, new) -> None:
    value = get_method(method).make_params()
    with pytest.raises(ValueError, match="not both"):
        get_method(method).make_params(**{old: getattr(value, new), new: getattr(value, new)})
