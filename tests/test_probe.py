"""Linear probes as classifiers: read-outs, every method through them, conservation, files."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY_CFG, images_for
from test_abslrp import conservative_vit
from test_attnlrp import zero_constant_terms
from timm.models.vision_transformer import VisionTransformer

from vitxai.methods import METHODS, BatchContext, attribute
from vitxai.methods.lrp import abslrp as abslrp_module
from vitxai.methods.lrp.chefer import relevance_pass
from vitxai.methods.lrp.rules import (
    abs_linear_rule,
    abs_token_readout_rule,
    linear_rule,
    token_readout_rule,
)
from vitxai.methods.vit_pass import readout_row
from vitxai.models import adapt
from vitxai.models.probe import (
    READOUTS,
    LinearProbe,
    ProbeError,
    attach_probe,
    load_probe,
    save_probe,
)

DT = torch.float64
#: small budgets so every method runs in a test
BUDGETS = {"lime": {"n_samples": 48}, "kernel_shap": {"n_samples": 48},
           "rise": {"n_samples": 32}, "integrated_gradients": {"steps": 8},
           "integrated_gradients_uniform": {"steps": 8}, "gradient_shap": {"n_samples": 8},
           "smoothgrad": {"n_samples": 4}}


#: every method that runs on a ViT (the CAMs need a CNN feature map)
VIT_METHODS = [m for m, spec in METHODS.items() if spec.family != "cam"]
#: methods whose maps are clamped at zero, so may vanish on a random tiny model
RELU_METHODS = ("attention_gradcam", "gradcam")


def headless(seed: int = 0, reg_tokens: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=0, reg_tokens=reg_tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(DT)


def probe_for(model: VisionTransformer, readout: str, seed: int = 5, classes: int = 6
              ) -> LinearProbe:
    torch.manual_seed(seed)
    probe = LinearProbe(readout, model.embed_dim, classes, model.num_prefix_tokens)
    with torch.no_grad():
        probe.linear.weight.normal_(0, 0.3)
        probe.linear.bias.normal_(0, 0.1)
    return probe.to(DT)


def probed(readout: str, reg_tokens: int = 0, probe: LinearProbe | None = None):
    model = headless(reg_tokens=reg_tokens)
    attach_probe(model, probe if probe is not None else probe_for(model, readout))
    return adapt(model, name="tiny_probed", config=TINY_CFG)


# --- the read-outs ----------------------------------------------------------------------------

@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_readouts_are_their_definitions(reg_tokens):
    adapter = {r: probed(r, reg_tokens) for r in READOUTS}
    x = images_for(adapter["cls"], 3).to(DT)
    tokens = adapter["cls"].model.forward_features(adapter["cls"].normalize(x))
    p = 1 + reg_tokens
    features = {"cls": tokens[:, 0], "mean_patch": tokens[:, p:].mean(1),
                "cls+mean_patch": torch.cat([tokens[:, 0], tokens[:, p:].mean(1)], 1)}
    for readout, a in adapter.items():
        w, b = a.probe.linear.weight, a.probe.linear.bias
        torch.testing.assert_close(a.predict(x), features[readout] @ w.T + b, rtol=1e-12,
                                   atol=1e-12)
        row = readout_row(a, tokens.shape[1], 3, DT, x.device)
        expected = {"cls": torch.eye(tokens.shape[1], dtype=DT)[0],
                    "mean_patch": torch.cat([torch.zeros(p, dtype=DT),
                                             torch.full((16,), 1 / 16, dtype=DT)])}
        expected["cls+mean_patch"] = (expected["cls"] + expected["mean_patch"]) / 2
        assert torch.equal(row, expected[readout].expand(3, -1))


def test_headless_model_without_probe_names_vitxai_probe():
    with pytest.raises(ValueError, match=r"no classifier head.*`vitxai probe`.*probe=FILE"):
        adapt(headless(), name="dinov2ish", config=TINY_CFG)


# --- every method explains the probed class ---------------------------------------------------

def _every_method(adapter, x, t, methods=None, ids=None):
    ids = list(range(len(x))) if ids is None else ids
    return {m: attribute(m, adapter, x, t, **BUDGETS.get(m, {}),
                         context=BatchContext.for_batch(len(x), 0, ids, planned=[m])).maps
            for m in (methods or VIT_METHODS)}


@pytest.mark.parametrize("readout", READOUTS)
def test_every_method_runs_and_batch_equals_per_image(readout):
    adapter = probed(readout, reg_tokens=1)
    x, t = images_for(adapter, 2).to(DT), torch.tensor([1, 4])
    batch = _every_method(adapter, x, t)
    single = [_every_method(adapter, x[i:i + 1], t[i:i + 1], ids=[i]) for i in range(2)]
    for m, maps in batch.items():
        assert torch.isfinite(maps).all(), m
        assert maps.abs().sum() > 0 or m in RELU_METHODS, m
        per_image = torch.cat([s[m] for s in single])
        torch.testing.assert_close(maps, per_image, rtol=1e-9, atol=1e-12, msg=m)


def test_patch_half_zeroed_equals_the_cls_probe_exactly():
    """cls+mean_patch with W = [W_cls, 0] is the cls probe W_cls: every method's map is equal
    bit for bit (the probe adds its parts one by one, so a zero part adds exact zeros)."""
    model = headless()
    cls = probe_for(model, "cls")
    both = LinearProbe("cls+mean_patch", model.embed_dim, 6, 1).to(DT)
    with torch.no_grad():
        both.linear.weight.zero_()
        both.linear.weight[:, :model.embed_dim] = cls.linear.weight
        both.linear.bias.copy_(cls.linear.bias)
    a_cls, a_both = probed("cls", probe=cls), probed("cls+mean_patch", probe=both)
    x, t = images_for(a_cls, 2).to(DT), torch.tensor([0, 5])
    class_specific = [m for m, spec in METHODS.items() if spec.family not in ("attention", "cam")
                      or m in ("attention_gradcam", "gradcam")]
    one, other = _every_method(a_cls, x, t, class_specific), _every_method(a_both, x, t,
                                                                          class_specific)
    for m in class_specific:
        assert torch.equal(one[m], other[m]), m


def test_mean_patch_relevance_reaches_every_patch():
    """The cls read-out sends the head's relevance to the class token only, the mean read-out to
    every patch token, never to the class token or registers."""
    for readout in ("cls", "mean_patch"):
        adapter = probed(readout, reg_tokens=2)
        x, t = images_for(adapter, 2).to(DT), torch.tensor([2, 3])
        with adapter.capture(activations=True) as cap:
            adapter.logits(x)
        r = token_readout_rule(cap.head_input, adapter.probe.token_parts(cap.head_input),
                               torch.nn.functional.one_hot(t, 6).to(DT))
        per_token = r.abs().sum(-1)
        if readout == "cls":
            assert (per_token[:, 1:] == 0).all() and (per_token[:, 0] > 0).all()
        else:
            assert (per_token[:, :3] == 0).all() and (per_token[:, 3:] > 0).all()


# --- the rules are the linear rules of the whole read-out map -------------------------------

def _flat_weight(probe: LinearProbe, n_tokens: int) -> torch.Tensor:
    """The probe as an explicit (C, N·D) weight on the flattened tokens."""
    omega = probe.token_weights(n_tokens, DT, torch.device("cpu"))
    return sum(omega[k][None, :, None] * w[:, None, :]
               for k, w in enumerate(probe.weights())).reshape(probe.num_classes, -1)


@pytest.mark.parametrize("readout", READOUTS)
def test_token_rules_equal_the_linear_rules_on_the_flattened_map(readout):
    model = headless(reg_tokens=1)
    probe = probe_for(model, readout)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 18, 32, generator=g, dtype=DT)
    relevance = torch.randn(3, 6, generator=g, dtype=DT)
    w = _flat_weight(probe, 18)
    flat = tokens.reshape(3, -1)
    torch.testing.assert_close(flat @ w.T + probe.linear.bias, probe(tokens))
    ours = token_readout_rule(tokens, probe.token_parts(tokens), relevance)
    torch.testing.assert_close(ours.reshape(3, -1), linear_rule(flat, w, relevance))
    ours = abs_token_readout_rule(tokens, probe.token_parts(tokens), probe.linear.bias,
                                  relevance)
    torch.testing.assert_close(ours.reshape(3, -1),
                               abs_linear_rule(flat, w, probe.linear.bias, relevance))


@pytest.mark.parametrize("readout", READOUTS)
def test_chefer_relevance_pass_conserves_through_the_probe(readout):
    adapter = probed(readout, reg_tokens=1)
    x, t = images_for(adapter, 3).to(DT), torch.tensor([1, 2, 3])
    with adapter.capture(gradients=True, activations=True) as cap:
        adapter.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    with torch.no_grad():
        rel = relevance_pass(adapter, cap, t)
    torch.testing.assert_close(rel.block_input_relevance[0].sum((1, 2)),
                               torch.ones(3, dtype=DT), rtol=0, atol=1e-6)


@pytest.mark.parametrize("readout", READOUTS)
def test_abslrp_whole_pass_conserves_through_the_probe(readout):
    adapter = conservative_vit()
    model = adapter.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach_probe(model, probe_for(model, readout))
    adapter = adapt(model, name="tiny_probed", config=TINY_CFG)
    x = images_for(adapter, 3)
    seed = torch.nn.functional.one_hot(torch.tensor([0, 2, 4]), 6).to(DT)
    (result,) = abslrp_module.relevance_pass(adapter, x, [seed])
    ones = torch.ones(3, dtype=DT)
    for r in result.block_input:
        torch.testing.assert_close(r.sum((1, 2)), ones, rtol=0, atol=1e-12)
        assert (r >= 0).all()


@pytest.mark.parametrize("readout", READOUTS)
def test_cp_lrp_conserves_the_probed_logit(readout):
    """With every constant term zero (probe bias included) the network is linear in its frozen
    factors: Σ x ⊙ ∂̃y = y_c through any read-out."""
    adapter = probed(readout)
    zero_constant_terms(adapter, prefix=True)
    with torch.no_grad():
        adapter.probe.linear.bias.zero_()
    x, t = images_for(adapter, 3).to(DT), torch.tensor([0, 1, 5])
    y = adapter.predict(x).gather(1, t[:, None])[:, 0]
    maps = attribute("cp_lrp", adapter, x, t).maps
    torch.testing.assert_close(maps.sum((1, 2)), y, rtol=1e-9, atol=0.0)


# --- attaching and files ----------------------------------------------------------------------

def test_probe_on_a_model_with_a_head_replaces_it_with_a_note():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=10)
    notes = attach_probe(model, LinearProbe("cls", 32, 3, 1))
    assert notes == ["the probe replaces 'model''s own 10-class head"]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3) and model.num_classes == 3


def test_avg_pool_model_normalises_every_token_for_the_probe():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=0, global_pool="avg")
    norm = model.fc_norm
    attach_probe(model, LinearProbe("mean_patch", 32, 3, 1))
    assert model.norm is norm and isinstance(model.fc_norm, torch.nn.Identity)


@pytest.mark.parametrize(("probe", "match"), [
    (LinearProbe("cls", 48, 3, 1), "reads 48-dimensional tokens but 'model' has 32"),
    (LinearProbe("cls", 32, 3, 5), "expects 5 prefix token"),
])
def test_probe_that_does_not_fit_is_one_line(probe, match):
    with pytest.raises(ProbeError, match=match):
        attach_probe(headless(), probe)


def test_unknown_readout_is_one_line():
    with pytest.raises(ValueError, match="readout='avg' must be one of cls, mean_patch"):
        LinearProbe("avg", 32, 3)


def test_probe_file_round_trip_and_bad_files(tmp_path):
    probe = probe_for(headless(), "cls+mean_patch").float()
    path = tmp_path / "probe.safetensors"
    save_probe(path, probe, {"backbone": "tiny", "classes": ["a", "b"]})
    again, card = load_probe(path)
    assert card == {"backbone": "tiny", "classes": ["a", "b"]}
    assert again.readout == "cls+mean_patch" and torch.equal(again.linear.weight,
                                                             probe.linear.weight)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ProbeError, match="not a safetensors file"):
        load_probe(junk)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ProbeError, match="not a vitxai probe"):
        load_probe(other)
    with pytest.raises(ProbeError, match="does not exist; train one with `vitxai probe`"):
        load_probe(tmp_path / "missing.safetensors")
