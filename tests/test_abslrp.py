"""absLRP and contrastive relevance against docs/methods.md §7 and §10 item 11 (float64)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import images_for, tiny_vit
from timm.layers import SwiGLUPacked
from torch import nn

import vitxai.methods.lrp.abslrp as abslrp_module
import vitxai.methods.lrp.rules as rules_module
from vitxai.methods import attribute
from vitxai.methods.lrp.abslrp import contrastive_relevance, relevance_pass, stem_tokens
from vitxai.methods.lrp.rules import (
    abs_activation_rule,
    abs_add_rule,
    abs_layernorm_rule,
    abs_linear_rule,
    abs_matmul_rule,
    abs_patch_conv_rule,
    abs_scale_rule,
    abs_softmax_rule,
    n1,
)
from vitxai.models.adapter import ModelAdapter

DT = torch.float64


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def psum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# --- the linear rule on a hand-made case --------------------------------------------------------

def expected_linear(x: list[list[float]], w: list[list[float]], b: list[float],
                    r: list[list[float]]) -> list[list[float]]:
    """Σ_j 2(x_i w_ji)⁺ R±_j / |z_j| per sign, each normalised and scaled by P±, in plain floats."""
    out = []
    for xs, rs in zip(x, r, strict=True):
        z = [sum(xi * wji for xi, wji in zip(xs, wj, strict=True)) + bj
             for wj, bj in zip(w, b, strict=True)]
        inv = [1.0 / (abs(zj) if zj != 0 else 1e-9) for zj in z]
        g = {sign: [sum(2 * max(xs[i] * w[j][i], 0.0) * part(rs[j]) * inv[j]
                        for j in range(len(w))) for i in range(len(xs))]
             for sign, part in (("+", lambda v: max(v, 0.0)), ("-", lambda v: min(v, 0.0)))}
        mass = {"+": sum(max(v, 0.0) for v in rs), "-": abs(sum(min(v, 0.0) for v in rs))}
        row = [0.0] * len(xs)
        for sign in "+-":
            total = sum(abs(v) for v in g[sign])
            if total:
                row = [acc + mass[sign] * v / total for acc, v in zip(row, g[sign], strict=True)]
        out.append(row)
    return out


def test_linear_rule_hand_made_case():
    x = [[1.0, -2.0, 0.5], [-0.2, 0.0, 0.0]]  # sample 1 makes both outputs exactly 0
    w = [[0.5, 1.0, -1.0], [-1.0, 0.25, 2.0]]
    b = [0.1, -0.2]
    r = [[0.8, -0.3], [0.5, 0.7]]
    got = abs_linear_rule(torch.tensor(x, dtype=DT), torch.tensor(w, dtype=DT),
                          torch.tensor(b, dtype=DT), torch.tensor(r, dtype=DT))
    assert torch.allclose(got, torch.tensor(expected_linear(x, w, b, r), dtype=DT),
                          rtol=0, atol=1e-14)
    assert torch.allclose(psum(got), torch.tensor([0.5, 1.2], dtype=DT), atol=1e-14)


# --- every rule against the §7 definition, via autograd of the twin sum --------------------------

def reference_rule(f, twin, inputs: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
    """§7 literally: G± = x ⊙ Jᵀ_{y+y_abs} s± by autograd; P± split by ΣG± ratios, then N1."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y, y_abs = f(*xs), twin(*xs)
    s = r / torch.where(y == 0, torch.full_like(y, 1e-9), y.abs()).detach()
    g_pos = torch.autograd.grad(y + y_abs, xs, s.clamp(min=0), retain_graph=True)
    g_neg = torch.autograd.grad(y + y_abs, xs, s.clamp(max=0))
    contributions = [(x.detach() * gp, x.detach() * gn)
                     for x, gp, gn in zip(xs, g_pos, g_neg, strict=True)]
    p_pos, p_neg = psum(r.clamp(min=0)), psum(r.clamp(max=0)).abs()
    pos_total = sum(psum(gp) for gp, _ in contributions)
    neg_total = sum(psum(gn) for _, gn in contributions)
    out = []
    for gp, gn in contributions:
        rp = psum(gp) / pos_total if len(xs) > 1 else 1.0
        rn = psum(gn) / neg_total if len(xs) > 1 else 1.0
        out.append(bc(p_pos * rp / psum(gp.abs()), gp) * gp
                   + bc(p_neg * rn / psum(gn.abs()), gn) * gn)
    return out


def _ln_parts(x: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(-1, keepdim=True).detach()
    sigma = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
    h = (x - mu) / sigma
    return h * norm.weight + norm.bias, h.abs() * norm.weight.abs() + norm.bias.abs()


def _detached_softmax(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True).detach()


def _norm(d: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(d, eps=1e-6).to(DT)
    with torch.no_grad():
        norm.weight.copy_(randn(d, seed=40))  # signed γ exercises both gates
        norm.bias.copy_(0.3 * randn(d, seed=41))
    return norm


W, BIAS, GAMMA = randn(5, 7, seed=10), randn(5, seed=11), randn(7, seed=12)
CONV = nn.Conv2d(3, 6, 4, stride=4).to(DT)
NORM = _norm(16)
GELU = nn.GELU()

# name → (our rule, f, twin, inputs, relevance shape, sign-definite)
RULES = {
    "linear": (lambda x, r: [abs_linear_rule(x, W, BIAS, r)],
               lambda x: F.linear(x, W, BIAS), lambda x: F.linear(x.abs(), W.abs(), BIAS.abs()),
               [randn(2, 3, 7, seed=1)], (2, 3, 5), True),
    "patch_conv": (lambda x, r: [abs_patch_conv_rule(x, CONV, r)],
                   lambda x: CONV(x).flatten(2).transpose(1, 2),
                   lambda x: F.conv2d(x.abs(), CONV.weight.abs(), CONV.bias.abs(), stride=4)
                   .flatten(2).transpose(1, 2),
                   [randn(2, 3, 8, 12, seed=2)], (2, 6, 6), True),
    "residual_add": (lambda a, b, r: list(abs_add_rule(a, b, r)), torch.add,
                     lambda a, b: a.abs() + b.abs(),
                     [randn(2, 4, 7, seed=3), randn(2, 4, 7, seed=4)], (2, 4, 7), True),
    "qk": (lambda q, kt, r: list(abs_matmul_rule(q, kt, r)), torch.matmul,
           lambda q, kt: q.abs() @ kt.abs(),
           [randn(2, 2, 5, 3, seed=5), randn(2, 2, 3, 5, seed=6)], (2, 2, 5, 5), True),
    "attention_value": (lambda a, v, r: list(abs_matmul_rule(a, v, r)), torch.matmul,
                        lambda a, v: a.abs() @ v.abs(),
                        [randn(2, 2, 5, 5, seed=7).softmax(-1), randn(2, 2, 5, 3, seed=8)],
                        (2, 2, 5, 3), True),
    "layer_scale": (lambda x, r: [abs_scale_rule(x, GAMMA, r)], lambda x: x * GAMMA,
                    lambda x: x.abs() * GAMMA.abs(), [randn(2, 3, 7, seed=9)], (2, 3, 7), True),
    "gelu": (lambda x, r: [abs_activation_rule(x, GELU, r)], GELU, lambda x: GELU(x).abs(),
             [randn(2, 3, 7, seed=13)], (2, 3, 7), True),
    "layernorm": (lambda x, r: [abs_layernorm_rule(x, NORM, r)],
                  lambda x: _ln_parts(x, NORM)[0],
                  lambda x: _ln_parts(x, NORM)[1], [randn(2, 5, 16, seed=14) + 0.5],
                  (2, 5, 16), False),
    "softmax": (lambda x, r: [abs_softmax_rule(x, r)], _detached_softmax, _detached_softmax,
                [randn(2, 2, 5, 5, seed=15)], (2, 2, 5, 5), False),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rule_matches_twin_definition(name):
    ours, f, twin, inputs, shape, _ = RULES[name]
    r = randn(*shape, seed=20)
    with torch.no_grad():
        got = ours(*inputs, r)
    for g, e in zip(got, reference_rule(f, twin, inputs, r), strict=True):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("name", list(RULES))
def test_rule_conserves_positive_and_negative_mass(name):
    """R_in(R) = R_in(R⁺) + R_in(R⁻); sign-definite rules conserve ΣR⁺ and ΣR⁻ separately,
    LayerNorm and softmax (signed x in x ⊙ J) keep each stream's L1 mass only."""
    ours, _, _, inputs, shape, sign_definite = RULES[name]
    r = randn(*shape, seed=21)
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
        assert torch.allclose(sum(psum(w) for w in whole), psum(r), atol=1e-13)
    else:
        assert torch.allclose(psum(from_pos[0].abs()), psum(r_pos), atol=1e-13)
        assert torch.allclose(psum(from_neg[0].abs()), psum(r_neg.abs()), atol=1e-13)


def test_residual_split_follows_positive_sum_ratio():
    a, b = randn(2, 4, 7, seed=30), randn(2, 4, 7, seed=31)
    r = randn(2, 4, 7, seed=32)
    s = r / (a + b).abs()
    for part, s_part in ((r.clamp(min=0), s.clamp(min=0)), (r.clamp(max=0), s.clamp(max=0))):
        g_a, g_b = psum(2 * a.clamp(min=0) * s_part), psum(2 * b.clamp(min=0) * s_part)
        r_a, r_b = abs_add_rule(a, b, part)
        assert torch.allclose(psum(r_a), psum(part) * g_a / (g_a + g_b), atol=1e-14)
        assert torch.allclose(psum(r_b), psum(part) * g_b / (g_a + g_b), atol=1e-14)


def test_softmax_relevance_is_proportional_to_input_times_relevance():
    x, r = randn(2, 2, 5, 5, seed=33), randn(2, 2, 5, 5, seed=34).abs()
    assert torch.allclose(abs_softmax_rule(x, r), bc(psum(r), r) * n1(x * r), atol=1e-14)


# --- the whole pass -----------------------------------------------------------------------------

def _project_out(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor) -> None:
    g = gamma / gamma.norm()
    weight -= g[:, None] * (g @ weight)[None]
    if bias is not None:
        bias -= g * (g @ bias)


def conservative_vit(**kwargs):
    """A tiny ViT on which every rule is sign-definite, so the whole pass must conserve ΣR.

    Every residual write (patch conv, prefix tokens, pos-embed, γ·proj, γ·fc2) is zero-mean over
    the channels, so each LayerNorm sees μ = 0 and x ⊙ J is sign-definite; q, k > 0 makes every
    attention score positive, so the softmax rule is too.
    """
    adapter = tiny_vit(dtype=DT, **kwargs)
    m, d = adapter.model, adapter.model.embed_dim
    ones = torch.ones(d, dtype=DT)
    with torch.no_grad():
        _project_out(m.patch_embed.proj.weight.view(d, -1), m.patch_embed.proj.bias, ones)
        for i, t in enumerate((m.cls_token, m.reg_token, m.pos_embed)):
            if t is not None:
                t.copy_(0.5 * randn(*t.shape, seed=50 + i))
                t -= t.mean(-1, keepdim=True)
        for blk in m.blocks:
            for ls, lin in ((blk.ls1, blk.attn.proj), (blk.ls2, blk.mlp.fc2)):
                _project_out(lin.weight, lin.bias, getattr(ls, "gamma", ones))
            blk.attn.qkv.weight[:2 * d] *= 0.05
            blk.attn.qkv.bias[:2 * d] = 3.0
        if isinstance(m.norm_pre, nn.LayerNorm):
            m.norm_pre.weight.fill_(1.0)
            m.norm_pre.bias.zero_()
    return adapter


VARIANTS = {"plain": {}, "registers_layerscale_prenorm": dict(
    reg_tokens=2, no_embed_class=True, init_values=0.5, pre_norm=True)}


def onehot(b: int, c: int, target: int = 2) -> torch.Tensor:
    t = torch.zeros(b, c, dtype=DT)
    t[:, target] = 1
    return t


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_pass_conserves_relevance(variant):
    """Both seeds the method uses (P⁺ = 1, P⁻ = 0): every block input and the stem account for
    P⁺ exactly and stay non-negative (P⁻ stays 0). Signed seeds are covered rule by rule above:
    a rule whose G⁺ (G⁻) vanishes while P⁺ (P⁻) > 0 has nowhere to send that mass."""
    adapter = conservative_vit(**VARIANTS[variant])
    x = images_for(adapter, 3)
    d = adapter.model.embed_dim
    with adapter.capture(activations=True) as cap:
        adapter.logits(x)
    assert max(a["x"].mean(-1).abs().max() for a in cap.activations) < 1e-14  # premises
    assert min(a["qkv"][..., :2 * d].min() for a in cap.activations) > 0
    seeds = [onehot(3, 10), (1 - onehot(3, 10)) / 9]
    for result in relevance_pass(adapter, x, seeds):
        ones = torch.ones(3, dtype=DT)
        for r in result.block_input:
            assert torch.allclose(psum(r), ones, rtol=0, atol=1e-12) and (r >= 0).all()
        dropped = psum(result.prefix_tokens) + psum(result.pos_embed)
        assert torch.allclose(psum(result.patch_tokens) + dropped, ones, rtol=0, atol=1e-12)
        assert torch.allclose(psum(result.pixels), psum(result.patch_tokens), rtol=0,
                              atol=1e-13)
        assert (result.pixels >= 0).all() and (result.patch_tokens >= 0).all()


def test_generic_vit_loses_relevance_only_at_layernorm_and_softmax(monkeypatch):
    adapter = tiny_vit(dtype=DT)
    lost: dict[str, float] = {}
    share = rules_module.share

    def recording_share(relevance, contributions):
        out = share(relevance, contributions)
        rule = sys._getframe(1).f_code.co_name
        gap = (psum(relevance) - sum(psum(o) for o in out)).abs().max().item()
        lost[rule] = max(lost.get(rule, 0.0), gap)
        return out

    monkeypatch.setattr(rules_module, "share", recording_share)
    relevance_pass(adapter, images_for(adapter, 2), [onehot(2, 10)])
    assert set(lost) == {"abs_linear_rule", "abs_add_rule", "abs_matmul_rule",
                         "abs_softmax_rule", "abs_layernorm_rule", "abs_activation_rule"}
    assert all(v < 1e-13 for k, v in lost.items()
               if k not in ("abs_layernorm_rule", "abs_softmax_rule"))
    assert lost["abs_softmax_rule"] > 1e-3  # signed scores: the paper's rule is not conservative


def _linear_pair(m: nn.Linear):
    return (lambda t: F.linear(t, m.weight, m.bias),
            lambda t: F.linear(t.abs(), m.weight.abs(), m.bias.abs()))


def _route(layout, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Relevance back through a pure reshape/permute, by autograd (independent of our indexing)."""
    t = t.detach().requires_grad_(True)
    return torch.autograd.grad(layout(t), t, r)[0]


def reference_block(blk: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A timm Block's relevance composed from :func:`reference_rule`, with the forward written as
    timm writes it and every reshape routed by autograd (checks the q/k/v and head layouts)."""
    attn, mlp = blk.attn, blk.mlp
    b, n, d = x.shape
    h = attn.num_heads

    def heads(t):
        return t.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)

    def merge(t):
        return t.transpose(1, 2).reshape(b, n, d)

    with torch.no_grad():
        h1 = blk.norm1(x)
        qkv = attn.qkv(h1)
        q, k, v = heads(qkv).unbind(0)
        q = q * attn.scale
        scores = q @ k.transpose(-2, -1)
        a = scores.softmax(-1)
        o = a @ v
        x1 = x + attn.proj(merge(o))
        h2 = blk.norm2(x1)
        f1 = mlp.fc1(h2)
        g1 = mlp.act(f1)
        b2 = mlp.fc2(g1)
    add = (torch.add, lambda p, q: p.abs() + q.abs())
    matmul = (torch.matmul, lambda p, q: p.abs() @ q.abs())
    r_skip, r_b = reference_rule(*add, [x1, b2], r)
    (r_b,) = reference_rule(*_linear_pair(mlp.fc2), [g1], r_b)
    (r_b,) = reference_rule(mlp.act, lambda t: mlp.act(t).abs(), [f1], r_b)
    (r_b,) = reference_rule(*_linear_pair(mlp.fc1), [h2], r_b)
    (r_b,) = reference_rule(lambda t: _ln_parts(t, blk.norm2)[0],
                            lambda t: _ln_parts(t, blk.norm2)[1], [x1], r_b)
    r_skip, r_b = reference_rule(*add, [x, x1 - x], r_skip + r_b)
    (r_b,) = reference_rule(*_linear_pair(attn.proj), [merge(o)], r_b)
    r_a, r_v = reference_rule(*matmul, [a, v], _route(merge, o, r_b))
    (r_scores,) = reference_rule(_detached_softmax, _detached_softmax, [scores], r_a)
    r_q, r_kt = reference_rule(*matmul, [q, k.transpose(-2, -1)], r_scores)
    r_qkv = _route(heads, qkv, torch.stack([r_q, r_kt.transpose(-2, -1), r_v]))
    (r_b,) = reference_rule(*_linear_pair(attn.qkv), [h1], r_qkv)
    (r_b,) = reference_rule(lambda t: _ln_parts(t, blk.norm1)[0],
                            lambda t: _ln_parts(t, blk.norm1)[1], [x], r_b)
    return r_skip + r_b


def test_block_rule_matches_reference_composition():
    adapter = tiny_vit(dtype=DT, depth=1)
    x = images_for(adapter, 2)
    with adapter.capture(activations=True) as cap:
        adapter.logits(x)
    act = cap.activations[0]
    r = randn(*act["x"].shape, seed=80)
    blk = adapter.blocks[0]
    with torch.no_grad():
        ours = abslrp_module._block_rule(blk, act, r)
    assert torch.allclose(ours, reference_block(blk, act["x"], r), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("variant", [{}, dict(reg_tokens=2, no_embed_class=True, pre_norm=True)])
def test_rebuilt_stem_and_final_norm_match_the_forward(variant):
    adapter = tiny_vit(dtype=DT, **variant)
    m = adapter.model
    x = images_for(adapter, 2)
    with adapter.capture(activations=True) as cap:
        adapter.logits(x)
    prefix, patches, pos = stem_tokens(m, adapter.normalize(x))
    stem = (torch.cat([prefix, patches + pos], 1) if m.no_embed_class
            else torch.cat([prefix, patches], 1) + pos)
    assert torch.allclose(m.norm_pre(stem), cap.activations[0]["x"], rtol=0, atol=1e-13)
    last = cap.activations[-1]["x1"] + cap.activations[-1]["b2"]
    assert torch.allclose(m.norm(last)[:, 0], cap.head_input, rtol=0, atol=1e-13)


# --- contrastive output ---------------------------------------------------------------------------

def test_contrastive_peaks_at_one_even_below_absolute_epsilon():
    positive = randn(2, 3, 4, 4, seed=70)
    positive[1] *= 1e6  # per-sample normalisation: scale must not matter
    negative = positive * (1 + 1e-10 * randn(2, 3, 4, 4, seed=71))
    raw = n1(positive) - n1(negative)
    peak = raw.reshape(2, -1).abs().amax(1)
    assert (peak < 1e-9).all()
    assert (peak / (peak + 1e-9) < 0.3).all()  # the reference's absolute epsilon
    r = contrastive_relevance(positive, negative)
    assert torch.equal(r.reshape(2, -1).abs().amax(1), torch.ones(2, dtype=DT))
    assert torch.allclose(r, raw / bc(peak, raw), rtol=1e-12, atol=0)
    zero = contrastive_relevance(positive, positive)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_method_maps_and_costs():
    adapter = tiny_vit(img_size=(32, 48), reg_tokens=1)
    x = images_for(adapter, 2)
    res = attribute("absLRP", adapter, x, [3, 7])
    assert res.method == "abslrp" and res.native_kind == "pixel"
    assert res.channels.shape == (2, 3, 32, 48) and res.maps.shape == (2, 32, 48)
    assert torch.allclose(res.maps, res.channels.sum(1))
    assert torch.allclose(res.channels.abs().amax(dim=(1, 2, 3)), torch.ones(2))
    assert (res.cost.forward, res.cost.backward) == (1, 2)
    raw = attribute("abslrp", adapter, x, [3, 7], contrastive=False)
    assert (raw.cost.forward, raw.cost.backward) == (1, 1)
    assert raw.channels.isfinite().all() and not torch.equal(raw.channels, res.channels)


@pytest.mark.parametrize("contrastive", [True, False])
def test_batch_equals_per_image(vit64, contrastive):
    x = images_for(vit64, 3)
    batch = attribute("abslrp", vit64, x, contrastive=contrastive)
    for i in range(3):
        single = attribute("abslrp", vit64, x[i:i + 1], batch.targets[i:i + 1],
                           contrastive=contrastive)
        assert torch.allclose(single.channels[0], batch.channels[i], rtol=0, atol=1e-10)


# --- unsupported models ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, what", [
    (dict(qk_norm=True), "q_norm"),
    (dict(global_pool="avg"), "class token"),
    (dict(class_token=False, global_pool="avg"), "class token"),
    (dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU), "non-standard MLP"),
])
def test_unsupported_vits_raise(kwargs, what):
    adapter = tiny_vit(**kwargs)
    with pytest.raises(ValueError, match=f"abslrp.*{what}"):
        attribute("abslrp", adapter, images_for(adapter, 1))


def test_non_vit_raises():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    adapter = ModelAdapter(cnn, (0.5,) * 3, (0.5,) * 3, (16, 16), name="cnn")
    with pytest.raises(ValueError, match="abslrp"):
        attribute("abslrp", adapter, torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="abslrp"):
        relevance_pass(adapter, torch.rand(1, 3, 16, 16), [torch.ones(1, 5)])
