"""The seed's models by their names and sizes: ``img_size`` / ``num_classes`` (library, run
source, CLI), the seed's method names as aliases, and ``full`` (chefer_full_lrp) on CLIP-style
pre-norm ViTs (issue 13, item 3)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import images_for, tiny_vit
from PIL import Image
from safetensors.torch import load_file

from vitxai.cli import main
from vitxai.methods import METHODS, attribute, get_method
from vitxai.methods.attention import RawAttentionParams
from vitxai.methods.base import _ALIASES, _key
from vitxai.methods.lrp.chefer import relevance_pass
from vitxai.models import load_model
from vitxai.source import RunSource

DT = torch.float64


# --- aliases -------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, name", [
    ("transformer_attribution", "chefer2021a"),
    ("rollout", "attention_rollout"),
    ("full", "chefer_full_lrp"),
    ("last_layer", "chefer_last_layer"),
    ("last_layer_attn", "raw_attention"),
    ("Last-Layer-Attn", "raw_attention"),
])
def test_seed_method_names_resolve(alias, name):
    assert get_method(alias).name == name


def test_last_layer_attn_defaults_are_the_last_block_mean_over_heads():
    """Chefer's `last_layer_attn`: the last block's attention, mean over heads, read-out row."""
    p = RawAttentionParams()
    assert p.layer == -1 and p.head is None


def test_aliases_do_not_shadow_method_names():
    for name in METHODS:
        assert _ALIASES[_key(name)] == name


def test_colliding_alias_is_refused():
    from vitxai.methods.base import register_method

    with pytest.raises(ValueError, match="already names 'chefer_full_lrp'"):
        register_method("seed_models_probe", params=RawAttentionParams, family="attention",
                        paper="-", summary="-", aliases=("FULL",))(lambda *a: None)
    assert "seed_models_probe" not in METHODS


# --- img_size / num_classes in the library -------------------------------------------------

def test_img_size_and_num_classes_build_the_model_and_its_preprocessing():
    adapter = load_model("vit_tiny_patch16_224", pretrained=False, img_size=160,
                         num_classes=7)
    assert adapter.grid_size == (10, 10)
    assert tuple(adapter.input_size) == (160, 160)
    assert tuple(adapter.data_config["input_size"]) == (3, 160, 160)
    with torch.no_grad():
        assert adapter.model(torch.rand(2, 3, 160, 160)).shape == (2, 7)
    assert adapter.num_classes == 7
    again = load_model("vit_tiny_patch16_224", pretrained=False, img_size=160, num_classes=7)
    for (k, v), w in zip(adapter.model.state_dict().items(),
                         again.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_dinov2_with_registers_at_224_has_a_16_by_16_grid():
    start = time.perf_counter()
    adapter = load_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224,
                         num_classes=7)
    assert time.perf_counter() - start < 30  # ~2 s on a CPU
    assert adapter.grid_size == (16, 16)
    assert tuple(adapter.data_config["input_size"]) == (3, 224, 224)
    assert adapter.num_prefix_tokens == 5
    x = torch.rand(1, 3, 224, 224)
    r = attribute("rollout", adapter, x, [3])
    assert r.native.shape == (1, 16, 16) and r.maps.shape == (1, 224, 224)


@pytest.mark.parametrize("kwargs, match", [
    ({"img_size": 0}, "img_size=0 must be a positive"),
    ({"img_size": -32}, "img_size=-32 must be a positive"),
    ({"img_size": 170}, "img_size=170 is not a multiple of the patch size 16×16"),
    ({"num_classes": -1}, "num_classes=-1 must be an int ≥ 1"),
    ({"num_classes": 0}, r"no classifier head \(num_classes=0\)"),
])
def test_nonsense_sizes_are_one_line_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


def test_a_model_without_img_size_says_so():
    with pytest.raises(ValueError, match="'resnet18' does not take img_size=160"):
        load_model("resnet18", pretrained=False, img_size=160)


# --- the run source ------------------------------------------------------------------------

def test_default_source_records_no_size_keys():
    record = RunSource(data="x", model="vit_tiny_patch16_224", random_weights=True).record()
    assert "img_size" not in record and "num_classes" not in record


def test_recorded_source_rebuilds_the_same_model():
    source = RunSource(data="x", model="vit_tiny_patch16_224", random_weights=True,
                       img_size=160, num_classes=7)
    record = source.record()
    assert record["img_size"] == 160 and record["num_classes"] == 7
    rebuilt = RunSource.from_config({"source": json.loads(json.dumps(record))})
    assert rebuilt == source
    (a, notes), (b, _) = source.load_model(), rebuilt.load_model()
    assert any("img_size=160 (10×10 patch grid)" in n for n in notes)
    assert a.grid_size == b.grid_size == (10, 10) and b.num_classes == 7
    for v, w in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(v, w)


def test_sizes_need_a_timm_model_and_synthetic_needs_224():
    with pytest.raises(ValueError, match="img_size needs a timm model name"):
        RunSource(img_size=224).load_model()
    with pytest.raises(ValueError, match="synthetic benchmark's images are 224×224"):
        RunSource(model="vit_tiny_patch16_224", random_weights=True, img_size=160).load()


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(root / f"p{i}.png")
    return root


def test_compare_records_the_sizes_and_preprocesses_at_them(photos, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", "--data", str(photos), "--model", "vit_tiny_patch16_224",
                 "--random-weights", "--img-size", "160", "--num-classes", "7",
                 "--methods", "rollout", "full", "--no-crop", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["img_size"] == 160 and config["source"]["num_classes"] == 7
    adapter, dataset, _ = RunSource.from_config(config).load()
    assert adapter.grid_size == (10, 10)
    assert tuple(dataset.load(0).image.shape) == (3, 160, 160)


def test_explain_takes_the_sizes_and_refuses_nonsense(photos, tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["explain", "--image", str(photos / "p0.png"), "--model",
                 "vit_tiny_patch16_224", "--random-weights", "--img-size", "160",
                 "--num-classes", "7", "--methods", "transformer_attribution",
                 "--category-index", "6", "--out", str(out)]) == 0
    saved = load_file(str(out / "p0.safetensors"))
    assert saved["chefer2021a.map"].shape == (160, 160)
    assert saved["chefer2021a.native"].shape == (10, 10)
    capsys.readouterr()
    assert main(["explain", "--image", str(photos / "p0.png"), "--model",
                 "vit_tiny_patch16_224", "--random-weights", "--img-size", "170",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vitxai: error: --img-size 170 is not a multiple of the patch size 16×16 "
                   "of 'vit_tiny_patch16_224'; use e.g. --img-size 176"]


# --- full (chefer_full_lrp) on CLIP-style pre-norm ViTs ------------------------------------

def test_full_lrp_on_a_pre_norm_vit_conserves_through_norm_pre():
    """norm_pre takes Chefer's LayerNorm rule (identity): the relevance entering block 0 is
    split at norm_pre's *input* (class token + patch embeddings, + pos_embed) by the residual
    rule, and the patch tokens' share reaches the pixels whole (z^B conserves)."""
    from vitxai.methods.lrp.rules import residual_rule

    adapter = tiny_vit(depth=2, pre_norm=True, dtype=DT)
    model = adapter.model
    assert type(model.norm_pre).__name__ == "LayerNorm"
    x, t = images_for(adapter, 2), torch.tensor([3, 8])
    with adapter.capture(gradients=True, activations=True) as cap:
        adapter.logits(x.clone().requires_grad_()).gather(1, t[:, None]).sum().backward()
    with torch.no_grad():
        r0 = relevance_pass(adapter, cap, t).block_input_relevance[0]
        patches = model.patch_embed(adapter.normalize(x))
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1)
        pos = model.pos_embed.expand_as(tokens)
        # block 0 reads norm_pre(tokens + pos), not tokens + pos
        torch.testing.assert_close(model.norm_pre(tokens + pos), cap.activations[0]["x"])
        r_tokens, r_pos = residual_rule(tokens, pos, r0)
    torch.testing.assert_close(r0.sum((1, 2)), torch.ones(2, dtype=DT), rtol=0, atol=1e-6)
    torch.testing.assert_close(r_tokens.sum((1, 2)) + r_pos.sum((1, 2)), r0.sum((1, 2)))
    result = attribute("full", adapter, x, t)
    assert result.method == "chefer_full_lrp" and result.channels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(result.maps.sum((1, 2)), r_tokens[:, 1:].sum((1, 2)),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["chefer2021a", "chefer_lrp_rollout", "chefer_last_layer",
                                    "chefer_full_lrp"])
def test_chefer_family_on_a_pre_norm_vit_batch_equals_per_image(method):
    adapter = tiny_vit(depth=2, pre_norm=True, dtype=DT)
    x, t = images_for(adapter, 3), torch.tensor([0, 4, 9])
    batch = attribute(method, adapter, x, t).maps
    single = torch.cat([attribute(method, adapter, x[i:i + 1], t[i:i + 1]).maps
                        for i in range(3)])
    assert torch.isfinite(batch).all() and batch.abs().sum() > 0
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-10)


def test_full_lrp_runs_on_a_small_clip_vision_tower():
    adapter = load_model("vit_base_patch16_clip_224", pretrained=False, depth=2, embed_dim=64,
                         num_heads=2, img_size=64, num_classes=5)
    assert type(adapter.model.norm_pre).__name__ == "LayerNorm"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    r = attribute("full", adapter, x, [1, 4])
    assert r.maps.shape == (2, 64, 64) and torch.isfinite(r.maps).all()
    single = attribute("full", adapter, x[1:], [4]).maps
    torch.testing.assert_close(r.maps[1:], single, rtol=1e-4, atol=1e-6)
