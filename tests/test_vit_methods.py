"""Attention Rollout, Chefer 2021a and the ViT adapter against docs/methods.md §10."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import images_for, tiny_vit

from vitxai.methods import BatchContext, attribute
from vitxai.methods.attention import (
    RolloutParams,
    discard_lowest,
    fuse_heads,
    rollout_row,
)
from vitxai.methods.lrp.chefer import relevance_pass
from vitxai.methods.lrp.rules import linear_rule, matmul_rule, residual_rule


def e0(b: int, n: int) -> torch.Tensor:
    r = torch.zeros(b, n, dtype=torch.float64)
    r[:, 0] = 1
    return r


def random_attention(layers: int, b: int = 2, h: int = 3, n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, n, generator=g, dtype=torch.float64).softmax(-1)
            for _ in range(layers)]


# --- rollout closed forms --------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 3, 6])
def test_rollout_uniform_attention_closed_form(layers):
    n = 9
    attn = [torch.full((1, 2, n, n), 1.0 / n, dtype=torch.float64)] * layers
    row = rollout_row(attn, e0(1, n), RolloutParams())[0]
    patch = (1 - 2.0**-layers) / n
    assert torch.allclose(row[1:], torch.full((n - 1,), patch, dtype=torch.float64), atol=1e-15)
    assert row[0].item() == pytest.approx(2.0**-layers + patch, abs=1e-15)


def test_rollout_identity_attention_gives_zero_patch_map():
    n = 5
    attn = [torch.eye(n, dtype=torch.float64).expand(2, 2, n, n)] * 4
    row = rollout_row(attn, e0(2, n), RolloutParams())
    assert torch.equal(row[:, 1:], torch.zeros(2, n - 1, dtype=torch.float64))
    assert not row.isnan().any()


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one_and_are_nonnegative(fusion, ratio):
    attn = random_attention(4)
    row = rollout_row(attn, e0(2, 7), RolloutParams(head_fusion=fusion, discard_ratio=ratio))
    assert torch.allclose(row.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert (row >= 0).all()


def test_head_fusion_order():
    a = random_attention(1)[0]
    assert (fuse_heads(a, "min") <= fuse_heads(a, "mean")).all()
    assert (fuse_heads(a, "mean") <= fuse_heads(a, "max")).all()


def test_one_layer_mean_fusion_closed_form():
    a = random_attention(1, b=2)
    row = rollout_row(a, e0(2, 7), RolloutParams())
    expected = 0.5 * a[0].mean(1)[:, 0] + 0.5 * e0(2, 7)
    assert torch.allclose(row, expected, atol=1e-15)


def test_rollout_patch_permutation_permutes_map():
    attn = random_attention(3, b=1, n=7)
    perm = torch.cat([torch.tensor([0]), 1 + torch.randperm(6, generator=torch.Generator()
                                                           .manual_seed(3))])
    permuted = [a[..., perm, :][..., :, perm] for a in attn]
    for fusion in ("mean", "max"):
        p = RolloutParams(head_fusion=fusion)
        assert torch.allclose(rollout_row(permuted, e0(1, 7), p),
                              rollout_row(attn, e0(1, 7), p)[:, perm], atol=1e-14)


def test_discard_zeroes_k_smallest_per_sample_and_protects_cls_cls():
    f = torch.rand(3, 6, 6, dtype=torch.float64)
    f[:, 0, 0] = -1.0  # the smallest entry, yet protected
    out = discard_lowest(f, 0.5)
    k = int(36 * 0.5)
    for b in range(3):
        zeroed = (out[b] == 0).sum().item()
        assert zeroed == k - 1  # index 0 was among the k smallest and is kept
        assert out[b, 0, 0] == -1.0


def test_legacy_normalisation_matches_vit_explain_and_differs_only_when_rows_not_stochastic():
    attn = random_attention(3, b=1)
    # vit-explain: a = (A_fused + I)/2; a = a / a.sum(dim=-1)  (no keepdim: column j / row j)
    result = torch.eye(7, dtype=torch.float64)
    for a in attn:
        fused = discard_lowest(a.amax(1), 0.5)
        m = (fused + torch.eye(7, dtype=torch.float64)) / 2
        m = m / m.sum(dim=-1)
        result = m[0] @ result
    legacy = rollout_row(attn, e0(1, 7), RolloutParams("max", 0.5, legacy=True))
    assert torch.allclose(legacy[0], result[0], atol=1e-15)
    correct = rollout_row(attn, e0(1, 7), RolloutParams("max", 0.5))
    assert not torch.allclose(legacy, correct, atol=1e-3)
    # mean fusion without discard: rows of (A + I)/2 already sum to 1, so both agree
    same = [rollout_row(attn, e0(1, 7), RolloutParams("mean", 0.0, legacy=flag))
            for flag in (True, False)]
    assert torch.allclose(*same, atol=1e-15)


def test_rollout_parameter_errors():
    with pytest.raises(ValueError, match="discard_ratio"):
        RolloutParams(discard_ratio=1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        RolloutParams(head_fusion="median")


# --- the adapter ---------------------------------------------------------------------------

def test_capture_counts_depth_and_restores_model(vit):
    x = images_for(vit, 2)
    fused_before = [b.attn.fused_attn for b in vit.blocks]
    hooks_before = [len(b.attn.attn_drop._forward_hooks) for b in vit.blocks]
    with vit.capture(gradients=True) as cap:
        y = vit.logits(x.requires_grad_())
        y[:, 0].sum().backward()
        assert all(not b.attn.fused_attn for b in vit.blocks)
    assert len(cap.attention_maps()) == vit.depth == len(cap.gradient_maps())
    assert torch.allclose(cap.attention[0].sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    assert [b.attn.fused_attn for b in vit.blocks] == fused_before
    assert [len(b.attn.attn_drop._forward_hooks) for b in vit.blocks] == hooks_before


def test_capture_frees_its_tensors_once_dropped(vit):
    """Regression: gradient hooks that close over the capture made a cycle through autograd
    that the collector cannot see, so every batch's attention maps lived until exit (a compare
    run over 16 DeiT-tiny images grew its peak memory by 45 %)."""
    x = images_for(vit, 2)
    with vit.capture(gradients=True, activations=True) as cap:
        y = vit.logits(x.requires_grad_())
        y[:, 0].sum().backward()
    alive = [weakref.ref(t) for t in cap.attention_maps() + cap.gradient_maps()]
    assert cap.gradient_maps()[0] is not None  # the hooks fired before they were removed
    del cap, y
    gc.collect()
    assert sum(r() is not None for r in alive) == 0


def test_capture_restores_on_error(vit):
    fused_before = [b.attn.fused_attn for b in vit.blocks]
    with pytest.raises(RuntimeError, match="boom"), vit.capture(activations=True):
        raise RuntimeError("boom")
    assert [b.attn.fused_attn for b in vit.blocks] == fused_before
    assert all(len(b.attn.attn_drop._forward_hooks) == 0 for b in vit.blocks)
    assert all(len(b.norm1._forward_hooks) == 0 for b in vit.blocks)


def test_layout_registers_and_non_square_grid():
    a = tiny_vit(img_size=(32, 48), reg_tokens=2)
    assert a.num_prefix_tokens == 3 and a.grid_size == (4, 6)
    x = images_for(a, 2)
    for method in ("attention_rollout", "chefer2021a"):
        r = attribute(method, a, x, [0, 1])
        assert r.native.shape == (2, 4, 6) and r.maps.shape == (2, 32, 48)
        assert torch.isfinite(r.maps).all()


def test_vit_method_on_cnn_is_an_error():
    import timm

    from vitxai.models import adapt

    cnn = adapt(timm.create_model("resnet10t", pretrained=False, num_classes=4), name="resnet")
    with pytest.raises(ValueError, match="attention_rollout.*needs a ViT"):
        attribute("attention_rollout", cnn, torch.rand(1, 3, 32, 32), 0)


# --- Chefer 2021a ----------------------------------------------------------------------------

def test_linear_rule_matches_gradient_formulation_and_conserves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    r = torch.rand(4, 5, generator=g, dtype=torch.float64)
    # Chefer's LRP layers: C = x⁺·∂(Z₁)/∂x⁺ [S] + x⁻·∂(Z₂)/∂x⁻ [S], Z = x⁺W⁺ᵀ + x⁻W⁻ᵀ
    xp = x.clamp(min=0).requires_grad_()
    xn = x.clamp(max=0).requires_grad_()
    z1, z2 = xp @ w.clamp(min=0).T, xn @ w.clamp(max=0).T
    s = (r / (z1 + z2 + 1e-9)).detach()  # grad_outputs S, as autograd.grad(Z, x, S)
    gp, gn = torch.autograd.grad((z1 * s).sum() + (z2 * s).sum(), (xp, xn))
    expected = xp.detach() * gp + xn.detach() * gn
    assert torch.allclose(linear_rule(x, w, r), expected, atol=1e-14)
    # conserved except for outputs with no positive contribution (z⁺_j = 0 drops R_j)
    live = ((z1 + z2).detach() > 0).to(r.dtype)
    assert 0 < live.mean() < 1
    assert torch.allclose(linear_rule(x, w, r).sum(1), (r * live).sum(1), atol=1e-7)


def test_residual_and_matmul_rules_conserve_per_sample():
    g = torch.Generator().manual_seed(1)
    a, b, r = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ra, rb = residual_rule(a, b, r)
    assert torch.allclose((ra + rb).sum((1, 2)), r.sum((1, 2)), atol=1e-12)
    m1 = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)
    m2 = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)
    r2 = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)
    q, k = matmul_rule(m1, m2, r2)
    assert torch.allclose(q.sum((1, 2)), r2.sum((1, 2)) / 2, atol=1e-12)
    assert torch.allclose(k.sum((1, 2)), r2.sum((1, 2)) / 2, atol=1e-12)


def test_chefer_relevance_entering_block_zero_is_one(vit64):
    x = images_for(vit64, 3)
    targets = torch.tensor([1, 4, 7])
    with vit64.capture(gradients=True, activations=True) as cap:
        vit64.logits(x.requires_grad_()).gather(1, targets[:, None]).sum().backward()
    with torch.no_grad():
        rel = relevance_pass(vit64, cap, targets)
    totals = rel.block_input_relevance[0].sum((1, 2))
    assert torch.allclose(totals, torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert all(r is not None for r in rel.attention_relevance)


@pytest.mark.parametrize("method", ["attention_rollout", "chefer2021a"])
def test_batch_equals_per_image(method, vit64):
    x = images_for(vit64, 3)
    t = torch.tensor([2, 5, 9])
    batch = attribute(method, vit64, x, t).maps
    single = torch.cat([attribute(method, vit64, x[i:i + 1], t[i:i + 1]).maps for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-10)


def test_chefer_is_class_specific_and_rollout_is_not(vit64):
    x = images_for(vit64, 1)
    c = [attribute("chefer2021a", vit64, x, t).maps for t in (0, 3)]
    r = [attribute("attention_rollout", vit64, x, t).maps for t in (0, 3)]
    assert not torch.allclose(c[0], c[1])
    assert torch.equal(r[0], r[1])


def test_attention_methods_share_one_pass(vit, monkeypatch):
    x = images_for(vit, 2)
    calls = []
    original = vit.logits
    monkeypatch.setattr(vit, "logits", lambda im: calls.append(1) or original(im))
    ctx = BatchContext.for_batch(2, planned=["attention_rollout", "chefer2021a"])
    a = attribute("attention_rollout", vit, x, [0, 1], context=ctx)
    b = attribute("chefer2021a", vit, x, [0, 1], context=ctx)
    assert len(calls) == 1
    assert b.cost.shared and not a.cost.shared


# --- the rest of the attention family --------------------------------------------------------

@pytest.mark.parametrize("method", ["raw_attention", "grad_rollout", "chefer2021b",
                                    "attention_gradcam"])
def test_more_attention_methods_batch_equals_per_image(method, vit64):
    x = images_for(vit64, 3)
    t = torch.tensor([2, 5, 9])
    batch = attribute(method, vit64, x, t)
    single = torch.cat([attribute(method, vit64, x[i:i + 1], t[i:i + 1]).maps for i in range(3)])
    assert batch.native.shape == (3, 4, 4)
    assert torch.allclose(batch.maps, single, atol=1e-10)


def _captured(adapter, x, t):
    with adapter.capture(gradients=True) as cap:
        adapter.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    return [a.detach() for a in cap.attention_maps()], cap.gradient_maps()


def test_raw_attention_and_chefer2021b_closed_forms(vit64):
    x = images_for(vit64, 2)
    t = torch.tensor([1, 3])
    attn, grads = _captured(vit64, x, t)
    raw = attribute("raw_attention", vit64, x, t).native
    assert torch.allclose(raw, attn[-1].mean(1)[:, 0, 1:].reshape(2, 4, 4), atol=1e-12)
    head = attribute("raw_attention", vit64, x, t, head=1, layer=0).native
    assert torch.allclose(head, attn[0][:, 1, 0, 1:].reshape(2, 4, 4), atol=1e-12)
    # 2021b: full matrix product (I + Ā_{L−1})…(I + Ā_0), row 0, patch columns
    eye = torch.eye(17, dtype=torch.float64)
    prod = eye.expand(2, 17, 17)
    for a, g in zip(attn, grads, strict=True):
        prod = (eye + (g * a).clamp(min=0).mean(1)) @ prod
    ours = attribute("chefer2021b", vit64, x, t).native
    assert torch.allclose(ours, prod[:, 0, 1:].reshape(2, 4, 4), atol=1e-12)


def test_grad_rollout_legacy_reproduces_the_three_quirks(vit64):
    x = images_for(vit64, 1)
    t = torch.tensor([4])
    attn, grads = _captured(vit64, x, t)
    # vit-explain, literally: pre-softmax gradient, reversed pairing, no keepdim, /max
    pre_softmax = [a * (g - (a * g).sum(-1, keepdim=True)) for a, g in zip(attn, grads,
                                                                          strict=True)]
    result = torch.eye(17, dtype=torch.float64)
    for a, g in zip(attn, pre_softmax[::-1], strict=True):
        fused = (a * g).mean(1).clamp(min=0)
        flat = fused.view(1, -1)
        idx = flat.topk(int(flat.size(-1) * 0.9), -1, False).indices
        flat[0, idx] = 0
        m = (fused + torch.eye(17, dtype=torch.float64)) / 2
        m = m / m.sum(dim=-1)
        result = m[0] @ result
    expected = result[0, 1:] / result[0, 1:].max()
    legacy = attribute("grad_rollout", vit64, x, t, legacy=True).native.reshape(-1)
    assert torch.allclose(legacy.double(), expected, atol=1e-12)
    correct = attribute("grad_rollout", vit64, x, t).native.reshape(-1)
    assert not torch.allclose(legacy, correct, atol=1e-3)
    assert correct.max() == pytest.approx(1.0)


def test_attention_gradcam_is_nonnegative_and_class_specific(vit64):
    x = images_for(vit64, 1)
    maps = [attribute("attention_gradcam", vit64, x, t).maps for t in (0, 5)]
    assert all((m >= 0).all() for m in maps)
    assert not torch.allclose(maps[0], maps[1])


# --- Chefer 2021a siblings, distilled read-out -----------------------------------------------

def tiny_distilled(dtype=torch.float64):
    from conftest import TINY_CFG
    from timm.models.deit import VisionTransformerDistilled

    from vitxai.models import adapt

    torch.manual_seed(5)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2, mlp_ratio=2.0, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapt(model.to(dtype), name="tiny_distilled", config=TINY_CFG)


def test_chefer_on_distilled_conserves_and_batches():
    a = tiny_distilled()
    x = images_for(a, 3)
    t = torch.tensor([1, 2, 3])
    with a.capture(gradients=True, activations=True) as cap:
        a.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    with torch.no_grad():
        rel = relevance_pass(a, cap, t)
    assert torch.allclose(rel.block_input_relevance[0].sum((1, 2)),
                          torch.ones(3, dtype=torch.float64), atol=1e-6)
    batch = attribute("chefer2021a", a, x, t).maps
    single = torch.cat([attribute("chefer2021a", a, x[i:i + 1], t[i:i + 1]).maps
                        for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-10)
    assert attribute("attention_rollout", a, x, t).native.shape == (3, 4, 4)


@pytest.mark.parametrize("method", ["chefer_lrp_rollout", "chefer_last_layer",
                                    "chefer_full_lrp"])
def test_chefer_siblings_batch_equals_per_image(method, vit64):
    x = images_for(vit64, 3)
    t = torch.tensor([0, 4, 8])
    batch = attribute(method, vit64, x, t).maps
    single = torch.cat([attribute(method, vit64, x[i:i + 1], t[i:i + 1]).maps
                        for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-10)


def test_chefer_last_layer_closed_form_and_shared_relevance(vit64):
    x = images_for(vit64, 2)
    t = torch.tensor([3, 5])
    with vit64.capture(gradients=True, activations=True) as cap:
        vit64.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    with torch.no_grad():
        rel = relevance_pass(vit64, cap, t)
    expected = rel.attention_relevance[-1].clamp(min=0).mean(1)[:, 0, 1:].reshape(2, 4, 4)
    ctx = BatchContext.for_batch(2, planned=["chefer2021a", "chefer_last_layer"])
    first = attribute("chefer2021a", vit64, x, t, context=ctx)
    last = attribute("chefer_last_layer", vit64, x, t, context=ctx)
    assert torch.allclose(last.native, expected, atol=1e-12)
    assert last.cost.shared and not first.cost.shared


def test_patch_embedding_rule_conserves():
    from vitxai.methods.lrp.rules import patch_embedding_rule

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    r = torch.rand(2, 5, 2, 2, generator=g, dtype=torch.float64)
    out = patch_embedding_rule(x, w, r, (8, 8))
    assert out.shape == x.shape
    assert torch.allclose(out.sum((1, 2, 3)), r.sum((1, 2, 3)), rtol=1e-6)


def test_full_lrp_pixel_relevance_is_bounded_by_the_total(vit64):
    x = images_for(vit64, 2)
    r = attribute("chefer_full_lrp", vit64, x, [1, 2])
    assert r.maps.shape == (2, 32, 32) and r.channels.shape == (2, 3, 32, 32)
    # the patch tokens' share of the unit relevance entering block 0
    assert ((r.maps.sum((1, 2)) > 0) & (r.maps.sum((1, 2)) < 1 + 1e-6)).all()


def test_token_gradcam_closed_form(vit64):
    x = images_for(vit64, 2)
    t = torch.tensor([2, 7])
    tokens = {}

    def keep(_m, _i, out):
        out.retain_grad()
        tokens["h"] = out

    handle = vit64.blocks[-1].norm1.register_forward_hook(keep)
    try:
        vit64.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    finally:
        handle.remove()
    h, g = tokens["h"].detach()[:, 1:], tokens["h"].grad[:, 1:]
    expected = (h * g.mean(1, keepdim=True)).sum(-1).clamp(min=0).reshape(2, 4, 4)
    ours = attribute("gradcam", vit64, x, t)
    assert torch.allclose(ours.native, expected, atol=1e-12)
