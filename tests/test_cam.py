"""CNN class activation maps (docs/methods.md §15) against torchcam and the papers' formulas."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from torch import nn

from vitxai.methods import BatchContext, attribute, get_method
from vitxai.methods.cam import NOISE_PURPOSE, layer_gradient, target_layer_of
from vitxai.models import adapt
from vitxai.models.adapter import ModelAdapter

torchcam = pytest.importorskip("torchcam.methods")

CAMS = ("grad_cam_cnn", "grad_cam_pp", "smoothgrad_cam_pp", "xgrad_cam", "layer_cam")
CFG = {"input_size": (3, 96, 96), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
TARGETS = torch.tensor([1, 3, 4])


@functools.cache
def resnet(dtype: torch.dtype = torch.float32) -> ModelAdapter:
    """A random timm resnet10t (3×3 feature map at 96 px)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    with torch.no_grad():  # timm zero-initialises each block's last BatchNorm: make it generic
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.1)
    return adapt(model.to(dtype), "resnet10t", CFG)


def images(adapter: ModelAdapter, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, *adapter.input_size, generator=g, dtype=adapter.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def torchcam_maps(cls, adapter: ModelAdapter, x: torch.Tensor, layer: str,
                  normalized: bool = False, **kw) -> torch.Tensor:
    """torchcam's CAMs on the model's normalised input (its intended use)."""
    with cls(adapter.model, layer, **kw) as extractor:
        scores = adapter.model(adapter.normalize(x).requires_grad_(True))
        return extractor(class_idx=TARGETS.tolist(), scores=scores, normalized=normalized)[0]


# --- parity with torchcam -------------------------------------------------------------------

@pytest.mark.parametrize(("method", "cls", "params"), [
    ("grad_cam_cnn", "GradCAM", {}),
    ("xgrad_cam", "XGradCAM", {}),
    ("layer_cam", "LayerCAM", {}),
    ("grad_cam_pp", "GradCAMpp", {"legacy": True}),
])
def test_equals_torchcam(method, cls, params):
    adapter = resnet()
    x = images(adapter)
    r = attribute(method, adapter, x, TARGETS, **params)
    ref = torchcam_maps(getattr(torchcam, cls), adapter, x, "layer4")
    assert r.native.shape == ref.shape == (3, 3, 3) and r.native_kind == "feature"
    assert rel(r.native, ref) <= 1e-6
    # upsampled as torchcam's fuse_cams does, and torchcam's min-max normalisation of ours
    up = F.interpolate(ref[:, None], size=(96, 96), mode="bilinear", align_corners=False)[:, 0]
    assert rel(r.maps, up) <= 1e-6
    low = r.native.amin(dim=(1, 2), keepdim=True)
    scaled = (r.native - low) / ((r.native - low).amax(dim=(1, 2), keepdim=True) + 1e-8)
    normalized = torchcam_maps(getattr(torchcam, cls), adapter, x, "layer4", normalized=True)
    assert (scaled - normalized).abs().max() <= 1e-6


class _Noise:
    """Stands in for torchcam's noise distribution: hands out given draws in order."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = iter(draws)

    def sample(self, _size: torch.Size) -> torch.Tensor:
        return next(self.draws)


def test_smoothgrad_cam_pp_legacy_equals_torchcam_with_the_same_noise():
    adapter, n, t = resnet(torch.float64), 2, TARGETS[:2]
    x = images(adapter, 2)
    ctx = BatchContext.for_batch(2, seed=5)
    r = attribute("smoothgrad_cam_pp", adapter, x, t, context=ctx, n_samples=n, legacy=True)
    eps = torch.stack([torch.randn(n, 3, 96, 96, generator=ctx.generator(i, NOISE_PURPOSE),
                                   dtype=torch.float64) for i in range(2)])
    # the default sigma is 0.3 normalised units: torchcam's std=0.3 on its normalised input
    with torchcam.SmoothGradCAMpp(adapter.model, "layer4", num_samples=n, std=0.3) as ext:
        ext._distrib = _Noise([0.3 * eps[:, k] for k in range(n)])
        adapter.model(adapter.normalize(x))
        ref = ext(class_idx=t.tolist(), normalized=False)[0]
    assert rel(r.native, ref) <= 1e-10
    assert rel(attribute("smoothgrad_cam_pp", adapter, x, t, context=ctx,
                         n_samples=n).native, ref) > 1e-3  # the default fixes torchcam's quirks


# --- the papers' formulas -----------------------------------------------------------------------

@functools.cache
def tiny_cnn() -> ModelAdapter:
    """float64 CNN whose logits are linear in the last ReLU's output (pool + linear)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    with torch.no_grad():
        model[6].weight.mul_(20)  # gradients far above the 1e-8 of the denominators
    cfg = {"input_size": (3, 12, 12), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return adapt(model.double(), "tiny_cnn", cfg)


def test_grad_cam_pp_is_eq_19_from_the_derivatives_of_exp_score():
    """α = ∂²Y/(2∂²Y + ΣA·∂³Y) with Y = exp(S), from autograd's diagonal derivatives; the
    paper's map is exp(S) times ours (the factor vitxai and torchcam drop)."""
    adapter = tiny_cnn()
    assert target_layer_of(adapter, (12, 12), None, "grad_cam_pp") == "3"
    x = images(adapter, 2)
    r = attribute("grad_cam_pp", adapter, x, TARGETS[:2])
    tail = adapter.model[4:]
    for i in range(2):
        c = int(TARGETS[i])
        a = adapter.model[:4](adapter.normalize(x[i:i + 1]))[0]  # (3, 3, 3)

        def y(flat: torch.Tensor, c: int = c, shape: torch.Size = a.shape) -> torch.Tensor:
            return tail(flat.view(1, *shape))[0, c].exp()

        flat = a.reshape(-1)
        d1 = torch.func.jacrev(y)(flat)
        d2 = torch.func.jacrev(torch.func.jacrev(y))(flat).diagonal()
        d3 = torch.func.jacfwd(torch.func.jacrev(torch.func.jacrev(y)))(flat)
        d3 = d3.diagonal(0, 0, 1).diagonal(0, 0, 1)
        total = a.sum(dim=(1, 2)).repeat_interleave(9)
        alpha = torch.where(d2 != 0, d2 / (2 * d2 + total * d3), torch.zeros_like(d2))
        w = (alpha * d1.clamp(min=0)).view(3, 9).sum(dim=1)
        paper = (w[:, None, None] * a).sum(dim=0).clamp(min=0)
        assert rel(r.native[i] * y(flat), paper) <= 1e-6
    legacy = attribute("grad_cam_pp", adapter, x, TARGETS[:2], legacy=True)
    assert rel(legacy.native, r.native) > 1e-2  # torchcam's α = G² is another map


def test_smoothgrad_cam_pp_means_gradient_powers_over_its_noise():
    adapter, n, sigma = tiny_cnn(), 3, 0.05
    x = images(adapter, 2)
    ctx = BatchContext.for_batch(2, seed=9, image_ids=[10, 11])
    r = attribute("smoothgrad_cam_pp", adapter, x, TARGETS[:2], context=ctx, n_samples=n,
                  sigma=sigma)
    head, tail = adapter.model[:4], adapter.model[4:]
    for i in range(2):
        eps = torch.randn(n, 3, 12, 12, generator=ctx.generator(i, NOISE_PURPOSE),
                          dtype=torch.float64)
        feats = head(adapter.normalize(x[i:i + 1] + sigma * eps)).detach().requires_grad_()
        (g,) = torch.autograd.grad(tail(feats)[:, int(TARGETS[i])].sum(), feats)
        a = head(adapter.normalize(x[i:i + 1]))[0].detach()
        g1, g2, g3 = g.mean(0), g.pow(2).mean(0), g.pow(3).mean(0)
        alpha = torch.where(g2 > 0, g2 / (2 * g2 + a.sum(dim=(1, 2))[:, None, None] * g3
                                          + 1e-8), 0.0)
        w = (alpha * g1.clamp(min=0)).sum(dim=(1, 2))
        expected = (w[:, None, None] * a).sum(0).clamp(min=0)
        assert rel(r.native[i], expected) <= 1e-10
    # without noise it is Grad-CAM++
    plain = attribute("grad_cam_pp", adapter, x, TARGETS[:2]).native
    assert rel(attribute("smoothgrad_cam_pp", adapter, x, TARGETS[:2], n_samples=2,
                         sigma=0.0).native, plain) <= 1e-12
    assert r.cost.forward == 1 + n and r.cost.backward == n


# --- batches, layers, hooks, errors ------------------------------------------------------------

@pytest.mark.parametrize("method", CAMS)
def test_batch_equals_per_image(method):
    adapter = resnet(torch.float64)
    x = images(adapter)
    kw = {"n_samples": 2} if method == "smoothgrad_cam_pp" else {}
    ctx = BatchContext.for_batch(3, seed=4, image_ids=[7, 8, 9])
    batch = attribute(method, adapter, x, TARGETS, context=ctx, batch_size=2, **kw)
    assert batch.maps.shape == (3, 96, 96) and batch.native.shape == (3, 3, 3)
    for i in range(3):
        one = BatchContext.for_batch(1, seed=4, image_ids=[7 + i])
        single = attribute(method, adapter, x[i:i + 1], TARGETS[i:i + 1], context=one, **kw)
        torch.testing.assert_close(single.native[0], batch.native[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(single.maps[0], batch.maps[i], rtol=1e-12, atol=1e-14)


def test_shared_pass_serves_the_other_cams():
    adapter = resnet()
    x = images(adapter)
    ctx = BatchContext.for_batch(3)
    first = attribute("grad_cam_cnn", adapter, x, TARGETS, context=ctx)
    others = [attribute(m, adapter, x, TARGETS, context=ctx)
              for m in ("grad_cam_pp", "xgrad_cam", "layer_cam", "grad_cam_cnn")]
    assert not first.cost.shared and all(o.cost.shared for o in others)
    assert torch.equal(others[-1].native, first.native)
    other = attribute("grad_cam_cnn", adapter, x, [0, 0, 0], context=ctx)  # other targets
    assert not other.cost.shared


@pytest.mark.parametrize(("name", "layer"), [
    ("resnet10t", "layer4"), ("efficientnet_b0", "bn2"), ("convnext_atto", "stages.3"),
    ("mobilenetv3_small_050", "blocks.5"),
])
def test_default_layer_is_the_last_stage(name, layer):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    adapter = adapt(model, name, dict(CFG, input_size=(3, 64, 64)))
    assert target_layer_of(adapter, (64, 64), None, "grad_cam_cnn") == layer
    x = images(adapter, 1)
    r = attribute("layer_cam", adapter, x, 2)
    assert r.native.shape == (1, 2, 2) and r.maps.shape == (1, 64, 64)
    assert hooks(model) == 0


def test_hooks_are_removed_after_success_and_errors(monkeypatch):
    adapter = resnet()
    x = images(adapter, 1)
    for method in CAMS:
        kw = {"n_samples": 1} if method == "smoothgrad_cam_pp" else {}
        attribute(method, adapter, x, 1, **kw)
        assert hooks(adapter.model) == 0
    with pytest.raises(ValueError, match="need a \\(B, C, h, w\\) feature map"):
        attribute("grad_cam_cnn", adapter, x, 1, target_layer="fc")  # (B, 5) output
    assert hooks(adapter.model) == 0

    def broken(batch: torch.Tensor) -> torch.Tensor:
        adapter.model(adapter.normalize(batch))  # the hooks fire, then the model fails
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "logits", broken)
    for method in CAMS:
        with pytest.raises(RuntimeError, match="boom"):
            attribute(method, adapter, x, 1)
        assert hooks(adapter.model) == 0
    monkeypatch.undo()

    def failing(_x: torch.Tensor) -> torch.Tensor:
        raise OSError("failed forward")

    cnn = tiny_cnn()  # the default layer's search hooks every module; an error undoes them
    monkeypatch.setattr(cnn.model, "forward", failing)
    with pytest.raises(OSError, match="failed forward"):
        target_layer_of(cnn, (13, 13), None, "grad_cam_cnn")
    assert hooks(cnn.model) == 0


def test_in_place_operations_after_the_layer_leave_its_map_alone():
    """timm's BasicBlock adds the shortcut into bn2's output in place, then ReLUs it in place:
    the recorded map is still bn2's output, and its gradient the gradient there."""
    adapter = resnet(torch.float64)
    x = images(adapter, 1)
    seen = []
    bn2 = adapter.model.get_submodule("layer4.0.bn2")
    handle = bn2.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    try:
        a, g = layer_gradient(adapter, x, TARGETS[:1], "layer4.0.bn2")
    finally:
        handle.remove()
    assert torch.equal(a, seen[0]) and (a < 0).any()  # before the ReLU
    # the gradient through ReLU(bn2 + shortcut) vanishes exactly where that sum is ≤ 0
    after, _ = layer_gradient(adapter, x, TARGETS[:1], "layer4")
    assert torch.equal(g == 0, after == 0)


@pytest.mark.parametrize("method", CAMS)
def test_a_vit_is_refused_in_one_line(method):
    vit = tiny_vit()
    with pytest.raises(ValueError) as e:
        attribute(method, vit, torch.rand(1, 3, 32, 32), 0)
    message = str(e.value)
    assert "\n" not in message and f"{method} needs a CNN feature map" in message
    assert "use gradcam (token Grad-CAM) for ViTs" in message
    assert hooks(vit.model) == 0


def test_parameter_errors_are_one_line():
    adapter = resnet()
    x = images(adapter, 1)
    with pytest.raises(ValueError, match="'layer5' is not a module.*did you mean 'layer4'"):
        attribute("grad_cam_cnn", adapter, x, 0, target_layer="layer5")
    for bad in ({"n_samples": 0}, {"sigma": -1.0}, {"target_layer": ""}, {"batch_size": 0}):
        with pytest.raises(ValueError) as e:
            get_method("smoothgrad_cam_pp").make_params(**bad)
        assert "\n" not in str(e.value)
    assert get_method("GradCAM++").name == "grad_cam_pp"
    assert get_method("LayerCAM").name == "layer_cam"
    assert get_method("GradCAM").name == "gradcam"  # the ViT token form keeps its name
