"""AttnLRP / CP-LRP: rules as undoable instance patches, forward invariance, conservation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CFG, images_for, tiny_vit
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from vitxai.methods import attribute, get_method
from vitxai.methods.lrp.attnlrp import grad_scale, lrp_relevance, lrp_rules
from vitxai.models import adapt

MODES = ("attnlrp", "cplrp")
METHOD = {"attnlrp": "attnlrp", "cplrp": "cp_lrp"}


def tiny_deit(seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny distilled DeiT ([CLS, DIST, patches], head averages two heads), perturbed like
    conftest's ViTs."""
    torch.manual_seed(seed)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2, mlp_ratio=2.0, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name == "dist_token":
                p.add_(0.1 * torch.randn_like(p))
    return adapt(model.to(dtype), name="tiny_deit", config=dict(TINY_CFG))


MODELS = {
    "plain": lambda: tiny_vit(dtype=torch.float64),
    "registers": lambda: tiny_vit(dtype=torch.float64, reg_tokens=2),
    "distilled": tiny_deit,
}


def zero_constant_terms(adapter, prefix: bool) -> None:
    """Zero every bias (Linear, patch conv, LayerNorm β); with ``prefix`` also pos_embed and the
    prefix tokens, the remaining inputs of the network that are not the image."""
    with torch.no_grad():
        for m in adapter.model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.LayerNorm) and m.bias is not None:
                m.bias.zero_()
        if prefix:
            for name in ("pos_embed", "cls_token", "reg_token", "dist_token"):
                p = getattr(adapter.model, name, None)
                if p is not None:
                    p.zero_()


def target_logits(adapter, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return adapter.predict(images).gather(1, targets[:, None])[:, 0]


def module_state(model: nn.Module) -> dict[str, tuple[tuple[str, ...], object]]:
    return {name: (tuple(sorted(m.__dict__)), m.__dict__.get("forward"))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_forward_unchanged(kind: str, mode: str) -> None:
    a = MODELS[kind]()
    x = a.normalize(images_for(a))
    plain = a.model(x)
    for gamma in (0.0, 0.5):
        with lrp_rules(a, mode, gamma), torch.no_grad():
            ruled = a.model(x)
        assert (ruled - plain).abs().max() <= 1e-12


def test_everything_restored_after_exit_and_error() -> None:
    a = tiny_vit(dtype=torch.float64)
    x = images_for(a, n=2)
    t = torch.tensor([1, 7])
    # an instance-level forward someone else installed must come back as it was
    norm1 = a.model.blocks[0].norm1
    own = norm1.forward
    norm1.forward = lambda h: own(h)
    wrapper = norm1.forward
    before = module_state(a.model)
    logits = a.logits(x)
    ig = attribute("integrated_gradients", a, x, t, steps=4).maps

    lrp = attribute("attnlrp", a, x, t, gamma=0.25).maps
    assert module_state(a.model) == before
    assert norm1.forward is wrapper
    assert torch.equal(a.logits(x), logits)
    assert torch.equal(attribute("integrated_gradients", a, x, t, steps=4).maps, ig)

    with pytest.raises(ZeroDivisionError), lrp_rules(a, "cplrp", gamma=0.5):
        assert module_state(a.model) != before
        _ = 1 / 0
    assert module_state(a.model) == before
    assert torch.equal(a.logits(x), logits)
    assert torch.equal(attribute("integrated_gradients", a, x, t, steps=4).maps, ig)
    assert torch.equal(attribute("attnlrp", a, x, t, gamma=0.25).maps, lrp)


def test_nested_rules_refused_and_outer_restored() -> None:
    a = tiny_vit(dtype=torch.float64)
    before = module_state(a.model)
    with lrp_rules(a, "attnlrp"), pytest.raises(RuntimeError, match="already active"), \
            lrp_rules(a, "cplrp"):
        pass
    assert module_state(a.model) == before


def test_unsupported_modules_fail_loudly() -> None:
    a = tiny_vit(dtype=torch.float64, global_pool="map")  # attention pooling has no rule here
    before = module_state(a.model)
    with pytest.raises(ValueError, match="attn_pool"), lrp_rules(a):
        pass
    assert module_state(a.model) == before
    b = tiny_vit(dtype=torch.float64)
    b.model.train()
    with pytest.raises(ValueError, match="eval mode"), lrp_rules(b):
        pass


@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_cplrp_conserves_logit_with_zero_constants(gamma: float) -> None:
    """CP-LRP is gradient × input of a network made linear by its frozen factors: with every
    bias, β, pos_embed and prefix token zero, Σ x_norm ⊙ ∂̃y = y_c (the γ-rule conserves too,
    its ratios z/d only redistribute)."""
    a = tiny_vit(dtype=torch.float64)
    zero_constant_terms(a, prefix=True)
    x = images_for(a, n=3)
    t = torch.tensor([0, 4, 9])
    y = target_logits(a, x, t)
    pixel = attribute("cp_lrp", a, x, t, gamma=gamma)
    torch.testing.assert_close(pixel.maps.sum(dim=(1, 2)), y, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(pixel.channels.sum(dim=(1, 2, 3)), y, rtol=1e-9, atol=0.0)
    # with the patch conv's bias zero, the token map carries the same total
    token = attribute("cp_lrp", a, x, t, gamma=gamma, space="token")
    torch.testing.assert_close(token.native.sum(dim=(1, 2)), y, rtol=1e-9, atol=0.0)
    # full AttnLRP is not conservative: only check that it gives a finite, different answer
    full = attribute("attnlrp", a, x, t, gamma=gamma).maps
    assert torch.isfinite(full).all()
    assert not torch.allclose(full.sum(dim=(1, 2)), y, rtol=1e-3)


@pytest.mark.parametrize("kind", ["registers", "distilled"])
def test_cplrp_conservation_counts_prefix_tokens_and_pos_embed(kind: str) -> None:
    """With biases and β zero but pos_embed and prefix tokens kept, per image
    Σ x_norm ⊙ ∂̃y + Σ_p p ⊙ ∂̃y/∂p = y_c over p ∈ {pos_embed, cls, registers/dist}."""
    a = MODELS[kind]()
    zero_constant_terms(a, prefix=False)
    names = [n for n in ("pos_embed", "cls_token", "reg_token", "dist_token")
             if getattr(a.model, n, None) is not None]
    params = [getattr(a.model, n) for n in names]
    images = images_for(a, n=2)
    for i, c in enumerate([3, 8]):
        x = a.normalize(images[i:i + 1]).requires_grad_(True)
        for p in params:
            p.requires_grad_(True)
        try:
            with lrp_rules(a, "cplrp"):
                y = a.model(x)[0, c]
                grads = torch.autograd.grad(y, [x, *params])
        finally:
            for p in params:
                p.requires_grad_(False)
        pixel = (x * grads[0]).sum()
        prefix = sum((p * g).sum() for p, g in zip(params, grads[1:], strict=True))
        assert abs(prefix) > 1e-3 * abs(y)  # the prefix terms matter in this check
        torch.testing.assert_close(pixel + prefix, y.detach(), rtol=1e-9, atol=0.0)


def test_layernorm_rule_in_isolation() -> None:
    """σ detached: ∂̃ = (w ⊙ g − mean(w ⊙ g))/σ, so with β = 0, Σ_i x_i ∂̃_i = Σ_j y_j g_j per
    token (relevance conserved through LayerNorm)."""
    a = tiny_vit(dtype=torch.float64)
    norm = a.model.norm
    with torch.no_grad():
        norm.bias.zero_()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 32, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    up = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    with lrp_rules(a, "attnlrp"):
        y = norm(x)
        (grad,) = torch.autograd.grad(y, x, up)
    assert torch.equal(y, F.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps))
    sigma = (x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    wg = norm.weight * up
    torch.testing.assert_close(grad, (wg - wg.mean(dim=-1, keepdim=True)) / sigma,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((x * grad).sum(-1), (y * up).sum(-1), rtol=1e-12, atol=1e-12)


def test_gelu_identity_rule_in_isolation() -> None:
    a = tiny_vit(dtype=torch.float64)
    act = a.model.blocks[0].mlp.act
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, generator=g, dtype=torch.float64) * 3
    x[::8] = 0.0
    x = x.requires_grad_(True)
    up = torch.randn(64, generator=g, dtype=torch.float64)
    with lrp_rules(a, "cplrp"):
        y = act(x)
        (grad,) = torch.autograd.grad(y, x, up)
    assert torch.equal(y, F.gelu(x))
    torch.testing.assert_close(x * grad, y * up, rtol=1e-12, atol=1e-15)
    assert torch.equal(grad[::8], 0.5 * up[::8])  # f'(0) where f(x)/x is 0/0
    # half precision: ratio taken in fp32, so zeros and tiny values give ½, never NaN or 0
    small = torch.tensor([0.0, 1e-7, -1e-7, 2.0], dtype=torch.float16, requires_grad=True)
    with lrp_rules(a, "attnlrp"):
        (grad16,) = torch.autograd.grad(act(small).sum(), small)
    assert grad16.dtype == torch.float16
    torch.testing.assert_close(grad16[:3].float(), torch.full((3,), 0.5), rtol=1e-3, atol=0)


def test_gamma_rule_in_isolation() -> None:
    """docs/methods.md §5: w′ = w + γw⁺, w″ = w + γw⁻; for z_j ≥ 0, d_j = Σ_i (x⁺w′ + x⁻w″)_ij + b_j
    + γb⁺_j and R_i = Σ_j (x⁺w′ + x⁻w″)_ij / d_j · R_j; for z_j < 0 w′ ↔ w″ and γb⁻."""
    a = tiny_vit(dtype=torch.float64)
    lin, gamma = a.model.blocks[0].mlp.fc1, 0.3
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 32, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 64, generator=g, dtype=torch.float64)
    with lrp_rules(a, "attnlrp", gamma=gamma):
        z = lin(x)
        (grad,) = torch.autograd.grad(z, x, up)
    assert torch.equal(z, F.linear(x, lin.weight, lin.bias))
    w, b = lin.weight, lin.bias
    w1, w2 = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
    xp, xn = x.detach().clamp(min=0)[:, :, None], x.detach().clamp(max=0)[:, :, None]
    pos = xp * w1.T + xn * w2.T  # (B, in, out) contributions when z ≥ 0
    neg = xp * w2.T + xn * w1.T
    contrib = torch.where(z.detach()[:, None] >= 0, pos, neg)
    d = contrib.sum(1) + torch.where(z >= 0, b + gamma * b.clamp(min=0),
                                     b + gamma * b.clamp(max=0)).detach()
    relevance_out = z.detach() * up
    expected = (contrib / d[:, None] * relevance_out[:, None]).sum(-1)
    torch.testing.assert_close(x.detach() * grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_attention_rule_equals_sdpa_with_composed_scalings(mode: str) -> None:
    """attnlrp: ½ into q, k (q·kᵀ) and ½ into A, v (A·V) compose to q, k ×¼ and v ×½ of the
    plain gradient; cplrp: q, k detached, v unscaled."""
    a = tiny_vit(dtype=torch.float64)
    m = a.model.blocks[1].attn
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 17, 32, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 17, 32, generator=g, dtype=torch.float64)
    with lrp_rules(a, mode):
        out = m(h)
        (grad,) = torch.autograd.grad(out, h, up)
    q, k, v = m.qkv(h).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    if mode == "attnlrp":
        q, k, v = grad_scale(q, 0.25), grad_scale(k, 0.25), grad_scale(v, 0.5)
    else:
        q, k = q.detach(), k.detach()
    ref = m.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 32))
    (ref_grad,) = torch.autograd.grad(ref, h, up)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_modes_differ_and_gamma_changes_map() -> None:
    a = tiny_vit(dtype=torch.float64)
    x = images_for(a, n=2)
    full = attribute("attnlrp", a, x, 2).maps
    cp = attribute("cp_lrp", a, x, 2).maps
    gamma = attribute("attnlrp", a, x, 2, gamma=0.5).maps
    assert (full - cp).abs().max() > 1e-3 * cp.abs().max()
    assert (full - gamma).abs().max() > 1e-3 * full.abs().max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("space", ["pixel", "token"])
def test_batch_equals_per_image(mode: str, space: str) -> None:
    a = tiny_vit(dtype=torch.float64, reg_tokens=1)
    x = images_for(a, n=3)
    t = torch.tensor([2, 5, 5])
    batch = lrp_relevance(a, x, t, mode, gamma=0.1, space=space)
    single = torch.cat([lrp_relevance(a, x[i:i + 1], t[i:i + 1], mode, gamma=0.1, space=space)
                        for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-10)


def test_attribution_shapes_cost_and_registry() -> None:
    a = tiny_vit(dtype=torch.float64)
    x = images_for(a, n=2)
    r = attribute("CP-LRP", a, x)
    assert r.method == "cp_lrp" and r.native_kind == "pixel"
    assert r.channels.shape == (2, 3, 32, 32) and r.maps.shape == (2, 32, 32)
    torch.testing.assert_close(r.maps, r.channels.sum(dim=1))
    assert (r.cost.forward, r.cost.backward) == (1, 1)
    tok = attribute("AttnLRP", a, x, space="token")
    assert tok.native.shape == (2, 4, 4) and tok.maps.shape == (2, 32, 32)
    for name in ("attnlrp", "cp_lrp", "cplrp"):
        spec = get_method(name)
        assert spec.family == "lrp" and spec.vit_only


def test_invalid_parameters_are_named() -> None:
    a = tiny_vit(dtype=torch.float64)
    x = images_for(a, n=1)
    with pytest.raises(ValueError, match="gamma"):
        attribute("attnlrp", a, x, gamma=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        attribute("cp_lrp", a, x, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"), lrp_rules(a, "attnlrp", gamma=-1.0):
        pass
    with pytest.raises(ValueError, match="space"):
        attribute("attnlrp", a, x, space="patch")
    with pytest.warns(FutureWarning, match="attnlrp.output is deprecated"):
        old = attribute("attnlrp", a, x, output="token")
    assert torch.equal(old.maps, attribute("attnlrp", a, x, space="token").maps)
    with pytest.raises(ValueError, match="mode"), lrp_rules(a, "lrp"):  # type: ignore[arg-type]
        pass
