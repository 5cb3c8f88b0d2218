"""Every registered method on every token layout (issue 4, item 5; docs/methods.md §8 read-out).

Layouts: a plain class-token ViT, a distilled DeiT (read-out = ½(CLS + DIST)), a ViT with
register tokens, a non-square patch grid and a DINOv2-style ViT (LayerScale, registers,
``no_embed_class``). Every method in the registry is run on each, so a newly registered method is
covered automatically (with its default parameters unless it has a fast override below).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY_CFG, images_for, tiny_vit

from vitxai.methods import METHODS, BatchContext, attribute
from vitxai.models import adapt

DT = torch.float64
TARGETS = [3, 7]

# small parameters so that the whole matrix stays fast; methods not listed use their defaults
FAST: dict[str, dict] = {
    "lime": dict(n_samples=16, segmentation=dict(algorithm="slic", n_segments=8)),
    "kernel_shap": dict(n_samples=16, segmentation=dict(algorithm="slic", n_segments=8)),
    "integrated_gradients": dict(steps=4),
    "integrated_gradients_uniform": dict(steps=4),
    "gradient_shap": dict(n_samples=4),
    "rise": dict(n_samples=16),
    "smoothgrad": dict(n_samples=2),
    "occlusion": dict(window=16, stride=16),
}

# (method, layout) → the one-line error a method raises where it cannot support a layout
UNSUPPORTED: dict[tuple[str, str], str] = {}


def _perturb(model: torch.nn.Module) -> None:
    """Random init leaves LayerNorm at identity and biases at zero; make the network generic."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def tiny_distilled():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(5)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2, mlp_ratio=2.0, num_classes=10)
    _perturb(model)
    with torch.no_grad():  # timm zero-initialises the distillation token's embedding
        model.dist_token.normal_(std=0.5)
    return adapt(model.to(DT), name="tiny_distilled", config=TINY_CFG)


LAYOUTS = {
    "plain": lambda: tiny_vit(depth=2, dtype=DT),
    "distilled": tiny_distilled,
    "registers": lambda: tiny_vit(depth=2, reg_tokens=2, dtype=DT),
    "non_square": lambda: tiny_vit(depth=2, img_size=(32, 48), dtype=DT),
    "dinov2": lambda: tiny_vit(depth=2, reg_tokens=2, no_embed_class=True, init_values=1e-1,
                               dtype=DT),
}


# class activation maps need a CNN feature map; on a ViT they point to the token Grad-CAM
UNSUPPORTED.update({(m, name): "needs a CNN feature map" for m in METHODS
                    if METHODS[m].family == "cam" for name in LAYOUTS})


@functools.cache
def layout(name: str):
    return LAYOUTS[name]()


def test_layouts_are_what_they_claim():
    assert set(FAST) <= set(METHODS)  # a renamed method must not silently lose its override
    assert layout("plain").num_prefix_tokens == 1
    distilled = layout("distilled")
    assert distilled.distilled and distilled.num_prefix_tokens == 2
    assert layout("registers").num_prefix_tokens == 3
    assert layout("non_square").grid_size == (4, 6)
    dino = layout("dinov2")
    assert dino.num_prefix_tokens == 3 and dino.model.no_embed_class
    assert type(dino.blocks[0].ls1).__name__ == "LayerScale"


def _run(method: str, adapter, x: torch.Tensor, targets, ids: list[int]):
    ctx = BatchContext.for_batch(len(ids), seed=7, image_ids=ids, planned=[method])
    return attribute(method, adapter, x, targets, context=ctx, **FAST.get(method, {}))


def _check_native(r, b: int, size: tuple[int, int], grid: tuple[int, int]) -> None:
    if r.native_kind == "token":
        assert r.native.shape == (b, *grid)
    elif r.native_kind == "pixel":
        assert r.native.shape == (b, *size)
    elif r.native_kind == "feature":  # a CNN feature map's grid
        assert r.native.ndim == 3 and r.native.shape[0] == b and min(r.native.shape) >= 1
    else:
        assert r.native_kind == "superpixel"
        assert r.segments.shape == (b, *size) and r.native.ndim == 2
        assert r.native.shape[1] == int(r.segments.amax()) + 1


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_on_layout_and_batches(method, name):
    adapter = layout(name)
    x = images_for(adapter, 2)
    if (method, name) in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[method, name]):
            _run(method, adapter, x, TARGETS, [0, 1])
        return
    size, grid = adapter.input_size, adapter.grid_size
    batch = _run(method, adapter, x, TARGETS, [0, 1])
    assert batch.method == method and batch.maps.shape == (2, *size)
    assert batch.maps.dtype == DT and torch.isfinite(batch.maps).all()
    _check_native(batch, 2, size, grid)
    for i in range(2):
        single = _run(method, adapter, x[i:i + 1], TARGETS[i:i + 1], [i])
        torch.testing.assert_close(single.maps[0], batch.maps[i], rtol=0, atol=1e-8)
        native = single.native[0]
        torch.testing.assert_close(native, batch.native[i][tuple(slice(n) for n in native.shape)],
                                   rtol=0, atol=1e-8)


@functools.cache
def _cnn():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    return adapt(model.to(DT), name="resnet10t", config=TINY_CFG)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cnn_runs_model_agnostic_methods_and_rejects_vit_only(method):
    cnn = _cnn()
    x = images_for(cnn, 2)
    if METHODS[method].vit_only:
        with pytest.raises(ValueError, match=f"'{method}' needs a ViT"):
            _run(method, cnn, x, [1, 2], [0, 1])
        return
    r = _run(method, cnn, x, [1, 2], [0, 1])
    assert r.maps.shape == (2, 32, 32) and torch.isfinite(r.maps).all()
    _check_native(r, 2, (32, 32), (0, 0))


# --- token-space variants: features on the patch grid of each layout --------------------------

def _token_variant(method: str) -> dict | None:
    """Parameters that move a method onto the patch grid (``space="token"``: perturbation
    methods, AttnLRP, CP-LRP), or None where it has no such parameter."""
    kw = dict(FAST.get(method, {}), space="token")
    try:
        METHODS[method].make_params(**kw)
    except ValueError:
        return None
    return kw


TOKEN_METHODS = [m for m in sorted(METHODS) if _token_variant(m) is not None]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_space_variant_on_layout(method, name):
    adapter = layout(name)
    x = images_for(adapter, 2)
    kw = _token_variant(method)
    ctx = BatchContext.for_batch(2, seed=7, planned=[method])
    r = attribute(method, adapter, x, TARGETS, context=ctx, **kw)
    assert r.maps.shape == (2, *adapter.input_size) and torch.isfinite(r.maps).all()
    if r.native_kind == "superpixel":  # LIME / KernelSHAP: one feature per patch
        assert r.native.shape == (2, adapter.grid_size[0] * adapter.grid_size[1])
    else:
        assert r.native_kind == "token" and r.native.shape == (2, *adapter.grid_size)
    single = attribute(method, adapter, x[1:], TARGETS[1:],
                       context=BatchContext.for_batch(1, seed=7, image_ids=[1]), **kw)
    torch.testing.assert_close(single.maps[0], r.maps[1], rtol=0, atol=1e-8)


# --- read-outs of the relevance methods --------------------------------------------------------

def test_abslrp_distilled_readout_is_the_linear_rule_on_both_tokens():
    """(head(CLS) + head_dist(DIST))/2 is one linear layer on [CLS; DIST]: the two-token rule
    (P± split by each token's ΣG±) equals absLRP's linear rule on the concatenation."""
    from vitxai.methods.lrp.rules import abs_linear_rule, abs_readout_rule

    model = layout("distilled").model
    g = torch.Generator().manual_seed(3)
    c, d = (torch.randn(3, 32, generator=g, dtype=DT) for _ in range(2))
    seed = torch.randn(3, 10, generator=g, dtype=DT)  # signed: both streams
    r_cls, r_dist = abs_readout_rule([c, d], [model.head, model.head_dist], seed)
    weight = torch.cat([model.head.weight, model.head_dist.weight], dim=1) / 2
    bias = (model.head.bias + model.head_dist.bias) / 2
    joint = abs_linear_rule(torch.cat([c, d], dim=1), weight, bias, seed)
    torch.testing.assert_close(torch.cat([r_cls, r_dist], dim=1), joint, rtol=1e-12, atol=1e-14)
    assert r_cls.abs().sum() > 0 and r_dist.abs().sum() > 0


def test_abslrp_distilled_stem_and_readout_tokens_match_the_forward():
    from vitxai.methods.lrp.abslrp import relevance_pass, stem_tokens

    adapter = layout("distilled")
    m, x = adapter.model, images_for(adapter, 2)
    with adapter.capture(activations=True) as cap:
        adapter.logits(x)
    prefix, patches, pos = stem_tokens(m, adapter.normalize(x))
    assert prefix.shape[1] == 2  # CLS, DIST
    torch.testing.assert_close(torch.cat([prefix, patches], 1) + pos, cap.activations[0]["x"],
                               rtol=0, atol=1e-13)
    last = m.norm(cap.activations[-1]["x1"] + cap.activations[-1]["b2"])
    torch.testing.assert_close(last[:, 0], cap.head_input, rtol=0, atol=1e-13)
    torch.testing.assert_close(last[:, 1], cap.head_dist_input, rtol=0, atol=1e-13)
    onehot = torch.zeros(2, 10, dtype=DT)
    onehot[:, 4] = 1
    (result,) = relevance_pass(adapter, x, [onehot])
    top = result.block_input[-1]  # relevance entering the last block reaches past the read-out
    assert top.abs().sum((1, 2)).min() > 0 and torch.isfinite(result.pixels).all()


def test_full_lrp_without_embed_class_splits_only_the_patch_tokens():
    """no_embed_class: pos_embed is added to the patches alone, so with a zero pos_embed every
    patch token's relevance entering block 0 reaches the pixels and none of the prefix's does."""
    from vitxai.methods.lrp.chefer import relevance_pass

    adapter = tiny_vit(depth=2, reg_tokens=2, no_embed_class=True, init_values=1e-1, dtype=DT)
    with torch.no_grad():
        adapter.model.pos_embed.zero_()
    x, t = images_for(adapter, 2), torch.tensor(TARGETS)
    with adapter.capture(gradients=True, activations=True) as cap:
        adapter.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    with torch.no_grad():
        r0 = relevance_pass(adapter, cap, t).block_input_relevance[0]
    pixels = attribute("chefer_full_lrp", adapter, x, t).maps.sum((1, 2))
    torch.testing.assert_close(pixels, r0[:, adapter.num_prefix_tokens:].sum((1, 2)),
                               rtol=1e-6, atol=1e-9)
