"""absLRP on timm VGG and ResNet CNNs against docs/methods.md §7, "On CNNs" (float64)."""

from __future__ import annotations

import functools
import sys
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_CFG, images_for
from test_abslrp import bc, onehot, psum, randn
from timm.layers import SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vgg import VGG
from torch import nn

import vitxai.methods.lrp.rules as rules_module
from vitxai.methods import attribute, get_method
from vitxai.methods.lrp import abslrp_cnn
from vitxai.methods.lrp.rules import (
    abs_activation_rule,
    abs_add_rule,
    abs_avg_pool_rule,
    abs_batchnorm_rule,
    abs_conv2d_rule,
    abs_max_pool_rule,
    abs_patch_conv_rule,
    abs_relu_rule,
)
from vitxai.models import adapt

DT = torch.float64


# --- every rule against the §7 definition, via autograd of the twin sum --------------------------

def reference_rule(f, twin, inputs: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
    """§7 literally, as test_abslrp.reference_rule: G± = x ⊙ Jᵀ_{y+y_abs} s± by autograd, P±
    split by ΣG± ratios, then N1; a stream without mass or contribution gives nothing (the
    implementation's exact division, where test_abslrp's reference returns 0/0). Narrow CNN
    layers meet such streams: a few active units can all end up with one sign."""
    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / torch.where(b == 0, torch.ones_like(b), b)

    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y, y_abs = f(*xs), twin(*xs)
    s = r / torch.where(y == 0, torch.full_like(y, 1e-9), y.abs()).detach()
    out = [0.0] * len(xs)
    for s_part, mass in ((s.clamp(min=0), psum(r.clamp(min=0))),
                         (s.clamp(max=0), psum(r.clamp(max=0)).abs())):
        grads = torch.autograd.grad(y + y_abs, xs, s_part, retain_graph=True)
        gs = [x.detach() * g for x, g in zip(xs, grads, strict=True)]
        total = sum(psum(g) for g in gs)
        out = [o + bc(div(mass * psum(g), total) if len(xs) > 1 else mass, g)
               * div(g, bc(psum(g.abs()), g)) for o, g in zip(out, gs, strict=True)]
    return out


def _module(m: nn.Module, seed: int) -> nn.Module:
    """``m`` in float64 and eval mode, biases and BatchNorm statistics made generic."""
    m = m.to(DT).eval()
    with torch.no_grad():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(randn(m.num_features, seed=seed))  # signed γ
            m.bias.copy_(0.3 * randn(m.num_features, seed=seed + 1))
            m.running_mean.copy_(0.3 * randn(m.num_features, seed=seed + 2))
            m.running_var.copy_(0.5 + randn(m.num_features, seed=seed + 3).abs())
        elif m.bias is not None:
            m.bias.copy_(0.2 * randn(*m.bias.shape, seed=seed))
    return m


def twin_pair(m):
    """(f, twin) of a layer as §7 defines them: the twin is the same operation with |θ| on |x|
    (for BatchNorm the reference's copy with |γ|, |β| and the running statistics as they are)."""
    if isinstance(m, nn.Conv2d):
        geometry = (m.stride, m.padding, m.dilation, m.groups)
        bias = None if m.bias is None else m.bias.abs()
        return (lambda t: F.conv2d(t, m.weight, m.bias, *geometry),
                lambda t: F.conv2d(t.abs(), m.weight.abs(), bias, *geometry))
    if isinstance(m, nn.BatchNorm2d):
        def bn(t, w, b):
            return F.batch_norm(t, m.running_mean, m.running_var, w, b, False, 0.0, m.eps)
        return (lambda t: bn(t, m.weight, m.bias),
                lambda t: bn(t.abs(), m.weight.abs(), m.bias.abs()))
    if isinstance(m, nn.ReLU):  # never the (in-place) module itself
        return F.relu, lambda t: F.relu(t).abs()
    if isinstance(m, nn.Linear):
        return m, lambda t: F.linear(t.abs(), m.weight.abs(), m.bias.abs())
    return m, lambda t: m(t.abs())  # the poolings


CONV = _module(nn.Conv2d(3, 6, 3, stride=2, padding=1), seed=1)
CONV_DILATED = _module(nn.Conv2d(4, 6, 3, stride=(1, 2), padding=2, dilation=2, groups=2),
                       seed=2)
BN = _module(nn.BatchNorm2d(4), seed=3)
MAXPOOL = nn.MaxPool2d(3, stride=2, padding=1)  # ResNet's: overlapping windows, padding
AVGPOOL = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)  # resnet10t's shortcut
ADAPTIVE = nn.AdaptiveAvgPool2d((3, 2))  # non-divisible windows
SELECT = SelectAdaptivePool2d(pool_type="avg", flatten=True)
RESIZE = partial(F.adaptive_avg_pool2d, output_size=(7, 7))  # VGG's ConvMlp on small inputs


def _rule(rule, m):
    return lambda x, r: [rule(x, m, r)], *twin_pair(m)


def _pool(pool):
    return lambda x, r: [abs_avg_pool_rule(x, pool, r)], pool, lambda t: pool(t.abs())


# name → (our rule, f, twin, inputs, relevance shape, sign-definite)
RULES = {
    "conv_stride_padding": (*_rule(abs_conv2d_rule, CONV), [randn(2, 3, 9, 8, seed=10)],
                            (2, 6, 5, 4), True),
    "conv_dilated_grouped": (*_rule(abs_conv2d_rule, CONV_DILATED),
                             [randn(2, 4, 8, 9, seed=11)], (2, 6, 8, 5), True),
    "batchnorm": (*_rule(abs_batchnorm_rule, BN), [randn(2, 4, 5, 6, seed=12)], (2, 4, 5, 6),
                  True),
    "relu": (lambda x, r: [abs_relu_rule(x, r)], *twin_pair(nn.ReLU()),
             [randn(2, 4, 5, 6, seed=13)], (2, 4, 5, 6), True),
    "maxpool_after_relu": (*_rule(abs_max_pool_rule, MAXPOOL),
                           [randn(2, 3, 7, 8, seed=14).clamp(min=0)], (2, 3, 4, 4), True),
    "maxpool_vgg": (*_rule(abs_max_pool_rule, nn.MaxPool2d(2, 2)),
                    [randn(2, 3, 6, 8, seed=15).abs()], (2, 3, 3, 4), True),
    "maxpool_signed": (*_rule(abs_max_pool_rule, MAXPOOL), [randn(2, 3, 7, 8, seed=16)],
                       (2, 3, 4, 4), False),
    "avgpool_ceil": (*_pool(AVGPOOL), [randn(2, 3, 5, 7, seed=17)], (2, 3, 3, 4), True),
    "adaptive_avgpool": (*_pool(ADAPTIVE), [randn(2, 3, 5, 7, seed=18)], (2, 3, 3, 2), True),
    "global_avgpool": (*_pool(SELECT), [randn(2, 6, 5, 7, seed=19)], (2, 6), True),
    "convmlp_resize": (*_pool(RESIZE), [randn(2, 3, 4, 5, seed=20)], (2, 3, 7, 7), True),
    "residual_add": (lambda a, b, r: list(abs_add_rule(a, b, r)), torch.add,
                     lambda a, b: a.abs() + b.abs(),
                     [randn(2, 4, 5, 6, seed=21), randn(2, 4, 5, 6, seed=22)], (2, 4, 5, 6),
                     True),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rule_matches_twin_definition(name):
    ours, f, twin, inputs, shape, _ = RULES[name]
    r = randn(*shape, seed=30)
    with torch.no_grad():
        got = ours(*inputs, r)
    for g, e in zip(got, reference_rule(f, twin, inputs, r), strict=True):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("name", list(RULES))
def test_rule_conserves_positive_and_negative_mass(name):
    """R_in(R) = R_in(R⁺) + R_in(R⁻); sign-definite rules conserve ΣR⁺ and ΣR⁻ separately,
    max pooling of signed inputs keeps each stream's L1 mass only."""
    ours, _, _, inputs, shape, sign_definite = RULES[name]
    r = randn(*shape, seed=31)
    r_pos, r_neg = r.clamp(min=0), r.clamp(max=0)
    with torch.no_grad():
        whole, from_pos, from_neg = ours(*inputs, r), ours(*inputs, r_pos), ours(*inputs, r_neg)
    for w, p, n in zip(whole, from_pos, from_neg, strict=True):
        assert torch.allclose(w, p + n, rtol=0, atol=1e-14)
    if sign_definite:
        assert all((p >= 0).all() and (n <= 0).all() for p, n in zip(from_pos, from_neg,
                                                                       strict=True))
        assert torch.allclose(sum(psum(p) for p in from_pos), psum(r_pos), atol=1e-13)
        assert torch.allclose(sum(psum(n) for n in from_neg), psum(r_neg), atol=1e-13)
    else:
        assert torch.allclose(psum(from_pos[0].abs()), psum(r_pos), atol=1e-13)
        assert torch.allclose(psum(from_neg[0].abs()), psum(r_neg.abs()), atol=1e-13)


def test_maxpool_after_relu_is_winner_take_all():
    """For inputs ≥ 0 each window's relevance goes, unchanged, to its argmax input."""
    x, r = randn(2, 3, 7, 8, seed=32).clamp(min=0), randn(2, 3, 4, 4, seed=33)
    xg = x.clone().requires_grad_(True)
    (routed,) = torch.autograd.grad(MAXPOOL(xg), xg, r)  # Σ_{j: argmax_j = i} R_j
    assert torch.allclose(abs_max_pool_rule(x, MAXPOOL, r), routed, rtol=0, atol=1e-14)


def test_closed_forms_agree_with_the_vit_rules():
    """A stride = kernel convolution is the patch embedding; ReLU is the activation rule."""
    conv = _module(nn.Conv2d(3, 5, 4, stride=4), seed=34)
    x, r = randn(2, 3, 8, 12, seed=35), randn(2, 5, 2, 3, seed=36)
    patches = abs_patch_conv_rule(x, conv, r.flatten(2).transpose(1, 2))
    assert torch.allclose(abs_conv2d_rule(x, conv, r), patches, rtol=1e-12, atol=1e-15)
    x, r = randn(2, 4, 5, seed=37), randn(2, 4, 5, seed=38)
    assert torch.allclose(abs_relu_rule(x, r), abs_activation_rule(x, nn.ReLU(), r),
                          rtol=1e-12, atol=1e-15)


# --- tiny timm CNNs ------------------------------------------------------------------------------

def _generic(model: nn.Module, name: str, conservative: bool):
    """``model`` in float64 with every BatchNorm and bias perturbed (timm initialises BN to the
    identity and zero-inits each block's last BN, which would silence the residual branches).

    ``conservative``: zero biases, BatchNorm with γ > 0 and zero shift (β = γ·μ/σ), so every
    output is a sum of its inputs' contributions and keeps its sign through the norm: a unit with
    positive relevance is positive, so it has a positive contribution to pass it on.
    """
    for i, m in enumerate(model.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            _module(m, seed=100 + 10 * i)
        if conservative and isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.abs_()
                m.bias.copy_(m.weight * m.running_mean / (m.running_var + m.eps).sqrt())
        elif conservative and getattr(m, "bias", None) is not None:
            with torch.no_grad():
                m.bias.zero_()
    return adapt(model.to(DT), name=name, config=TINY_CFG)


@functools.cache
def tiny_cnn(kind: str, conservative: bool = False):
    torch.manual_seed(0)
    if kind == "resnet10t":  # deep tiered stem, BasicBlocks, average-pool shortcuts; narrow
        model = timm.create_model("resnet10t", pretrained=False, num_classes=5,
                                  channels=(8, 16, 16, 32), stem_width=8)
    elif kind == "bottleneck":  # grouped 3×3 convs, drop-path (identity in eval)
        model = ResNet(Bottleneck, (1, 1, 1, 1), num_classes=5, channels=(8, 8, 16, 16),
                       stem_width=8, cardinality=2, base_width=8, drop_path_rate=0.1)
    else:  # VGG: 4×4 features, pooled up to the 7×7 kernel of its ConvMlp (8 hidden channels)
        model = VGG([8, "M", 16, "M", 16, 16, "M"], num_classes=5, mlp_ratio=2 ** -9,
                    norm_layer=nn.BatchNorm2d if kind == "vgg_bn" else None)
    return _generic(model, kind, conservative)


CNNS = ["resnet10t", "bottleneck", "vgg", "vgg_bn"]


def _seeds(b: int, c: int = 5) -> list[torch.Tensor]:
    return [onehot(b, c), (1 - onehot(b, c)) / (c - 1)]


@pytest.mark.parametrize("kind", CNNS)
def test_whole_pass_conserves_relevance(kind):
    """On the conservative configuration both seeds of the method (P⁺ = 1, P⁻ = 0) reach every
    block input and the pixels whole and non-negative: every CNN rule is sign-definite once the
    max-pool inputs are ≥ 0. A signed seed keeps its net sum ΣR."""
    adapter = tiny_cnn(kind, conservative=True)
    x = images_for(adapter, 3)
    steps = abslrp_cnn.check_supported(adapter)
    rec = abslrp_cnn.record(adapter, x, steps, DT)
    pools = [m for m in rec.inputs if isinstance(m, nn.MaxPool2d)]
    assert pools and all((rec.inputs[m] >= 0).all() for m in pools)  # the premise
    ones = torch.ones(3, dtype=DT)
    for result in abslrp_cnn.relevance_pass(adapter, x, _seeds(3)):
        assert torch.allclose(psum(result.pixels), ones, rtol=0, atol=1e-12)
        assert (result.pixels >= 0).all()
        for r in result.block_input:
            assert torch.allclose(psum(r), ones, rtol=0, atol=1e-12) and (r >= 0).all()
    assert len(result.block_input) == (0 if kind.startswith("vgg") else 4)
    signed = randn(3, 5, seed=40)
    (result,) = abslrp_cnn.relevance_pass(adapter, x, [signed])
    assert torch.allclose(psum(result.pixels), signed.sum(1), rtol=0, atol=1e-12)


def test_generic_weights_lose_relevance_only_where_a_shift_takes_a_whole_stream(monkeypatch):
    """With biases and BatchNorm shifts, a layer whose positively relevant outputs all owe their
    sign to the shift (G⁺ = 0 everywhere) drops its P⁺, as the paper's rule does (§7); every
    other rule application conserves ΣR to rounding."""
    lost: dict[str, list[float]] = {}
    share = rules_module.share

    def recording_share(relevance, contributions):
        out = share(relevance, contributions)
        rule = sys._getframe(1).f_code.co_name
        total = psum(relevance)
        for gap, g_pos, mass in zip(total - sum(psum(o) for o in out),
                                    sum(psum(g) for g, _ in contributions), total, strict=True):
            if gap.abs() > 1e-13:  # the whole positive stream, and only where G⁺ vanished
                assert g_pos == 0 and gap == mass, rule
                lost.setdefault(rule, []).append(gap.item())
        return out

    monkeypatch.setattr(rules_module, "share", recording_share)
    for kind in CNNS:
        adapter = tiny_cnn(kind)
        abslrp_cnn.relevance_pass(adapter, images_for(adapter, 2), [onehot(2, 5)])
    assert set(lost) == {"abs_batchnorm_rule"}  # the bottleneck's 16-channel 1×1 last stage


# --- the pass against compositions of the reference rule -----------------------------------------

def _identity(m: nn.Module) -> bool:
    return isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten)) or type(m).__name__ == "DropPath"


def reference_chain(layers, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Relevance of x through layers applied in order (f, twin of :func:`twin_pair`, or a
    callable pooling), each by :func:`reference_rule` on a fresh out-of-place forward."""
    pairs = [twin_pair(m) if isinstance(m, nn.Module) else (m, lambda t, m=m: m(t.abs()))
             for m in layers if not _identity(m)]
    inputs = [x]
    with torch.no_grad():
        for f, _ in pairs:
            inputs.append(f(inputs[-1]))
    for (f, twin), inp in zip(reversed(pairs), reversed(inputs[:-1]), strict=True):
        (r,) = reference_rule(f, twin, [inp], r.reshape(f(inp).shape))
    return r.reshape(x.shape)


def _forward(layers, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for m in layers:
            if not _identity(m):
                x = twin_pair(m)[0](x)
    return x


def reference_block(blk: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """timm's BasicBlock / Bottleneck written out: out = ReLU(branch(x) + shortcut(x))."""
    branch = [blk.conv1, blk.bn1, blk.act1, blk.conv2, blk.bn2]
    if isinstance(blk, Bottleneck):
        branch += [blk.act2, blk.conv3, blk.bn3]
    shortcut = [] if blk.downsample is None else list(blk.downsample)
    a, b = _forward(branch, x), _forward(shortcut, x)
    (r,) = reference_rule(*twin_pair(nn.ReLU()), [a + b], r)
    r_a, r_b = reference_rule(torch.add, lambda p, q: p.abs() + q.abs(), [a, b], r)
    return reference_chain(branch, x, r_a) + reference_chain(shortcut, x, r_b)


@pytest.mark.parametrize("kind", ["resnet10t", "bottleneck"])
def test_block_rule_matches_reference_composition(kind):
    """Also checks the recording: timm's in-place ReLUs and ``x += shortcut`` must leave every
    input the rules read as the out-of-place forward computes it."""
    adapter = tiny_cnn(kind)
    x = images_for(adapter, 2)
    steps = abslrp_cnn.check_supported(adapter)
    rec = abslrp_cnn.record(adapter, x, steps, DT)
    blocks = [s for s in steps if isinstance(s, (BasicBlock, Bottleneck))]
    assert len(blocks) == 4
    for i, blk in enumerate(blocks):
        inp = rec.inputs[blk]
        with torch.no_grad():
            r = randn(*blk(inp.clone()).shape, seed=50 + i)
            ours = abslrp_cnn._block_rule(blk, rec, r)
        assert torch.allclose(ours, reference_block(blk, inp, r), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["vgg", "vgg_bn"])
def test_vgg_pass_matches_reference_chain(kind):
    """features → resize to 7×7 → ConvMlp → global pool → fc, one reference rule per layer."""
    adapter = tiny_cnn(kind)
    m = adapter.model
    x = images_for(adapter, 2)
    mlp = m.pre_logits
    layers = [*m.features, RESIZE, mlp.fc1, mlp.act1, mlp.fc2, mlp.act2, m.head.global_pool,
              m.head.fc]
    (ours,) = abslrp_cnn.relevance_pass(adapter, x, [randn(2, 5, seed=60)])
    expected = reference_chain(layers, adapter.normalize(x), randn(2, 5, seed=60))
    assert torch.allclose(ours.pixels, expected, rtol=1e-9, atol=1e-13)


# --- the method -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet10t", "vgg_bn"])
def test_contrastive_map_peaks_at_one_and_sums_to_zero(kind):
    """Both passes are non-negative with unit sum, so N1(target) − N1(rest) sums to 0."""
    adapter = tiny_cnn(kind, conservative=True)
    x = images_for(adapter, 2)
    res = attribute("absLRP", adapter, x, [3, 1])
    assert get_method("abslrp").vit_only is False
    assert res.native_kind == "pixel" and res.channels.shape == (2, 3, 32, 32)
    assert torch.allclose(res.maps, res.channels.sum(1))
    assert torch.equal(res.channels.abs().amax(dim=(1, 2, 3)), torch.ones(2, dtype=DT))
    assert (psum(res.channels).abs() < 1e-12 * psum(res.channels.abs())).all()
    assert (res.cost.forward, res.cost.backward) == (1, 2)
    raw = attribute("abslrp", adapter, x, [3, 1], contrastive=False)
    assert torch.allclose(psum(raw.channels), torch.ones(2, dtype=DT), rtol=0, atol=1e-12)


@pytest.mark.parametrize("contrastive", [True, False])
@pytest.mark.parametrize("kind", ["resnet10t", "vgg_bn"])
def test_batch_equals_per_image(kind, contrastive):
    adapter = tiny_cnn(kind)
    x = images_for(adapter, 3)
    batch = attribute("abslrp", adapter, x, contrastive=contrastive)
    for i in range(3):
        single = attribute("abslrp", adapter, x[i:i + 1], batch.targets[i:i + 1],
                           contrastive=contrastive)
        assert torch.allclose(single.channels[0], batch.channels[i], rtol=0, atol=1e-12)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_success_and_after_an_error():
    adapter = tiny_cnn("resnet10t")
    x = images_for(adapter, 1)
    attribute("abslrp", adapter, x)
    assert _hooks(adapter.model) == 0
    torch.manual_seed(0)
    vgg = VGG([4, "M", 4, "M"], num_classes=3, mlp_ratio=2 ** -9)
    vgg.features[4] = vgg.features[1]  # one ReLU object at two places: no single input
    shared = adapt(vgg, name="shared_relu", config=TINY_CFG)
    with pytest.raises(ValueError, match="abslrp: 'shared_relu' runs features.1 twice"):
        attribute("abslrp", shared, images_for(shared, 1))
    assert _hooks(vgg) == 0


@pytest.mark.parametrize("name, what", [
    ("seresnet18", r"has layer1\.0\.se \(SEModule\)"),
    ("mobilenetv3_small_050", "is a MobileNetV3, not a timm VGG or ResNet"),
])
def test_unsupported_cnns_are_refused_in_one_line(name, what):
    adapter = adapt(timm.create_model(name, pretrained=False, num_classes=3), name=name,
                    config=TINY_CFG)
    with pytest.raises(ValueError, match=f"^abslrp supports .*{what}$") as err:
        attribute("abslrp", adapter, images_for(adapter, 1))
    assert "\n" not in str(err.value)
    assert _hooks(adapter.model) == 0
