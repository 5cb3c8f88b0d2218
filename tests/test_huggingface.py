"""Hugging Face transformers ViTs (``hf:``): converted into the same function as a timm ViT,
so that every method gives the maps it gives on the timm original (issue 13, item 5).

All models are tiny, random and saved to temporary directories (no hub access).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

transformers = pytest.importorskip("transformers")

from vitxai.cli import main  # noqa: E402
from vitxai.data import eval_transform  # noqa: E402
from vitxai.methods import METHODS, BatchContext, attribute  # noqa: E402
from vitxai.methods.perturbation import SegmentationParams  # noqa: E402
from vitxai.models import ModelLoadError, adapt, load_model  # noqa: E402
from vitxai.models import huggingface as hf_module  # noqa: E402
from vitxai.models.huggingface import build_hf_model, check_parity  # noqa: E402
from vitxai.models.probe import LinearProbe  # noqa: E402
from vitxai.source import RunSource  # noqa: E402

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8)
#: fewer model evaluations than the defaults, same code paths
BUDGET = {
    "lime": {"n_samples": 64}, "kernel_shap": {"n_samples": 64}, "rise": {"n_samples": 64},
    "integrated_gradients": {"steps": 8}, "integrated_gradients_uniform": {"steps": 8},
    "gradient_shap": {"n_samples": 8}, "smoothgrad": {"n_samples": 4},
}
FEW = ("saliency", "chefer2021a", "attnlrp", "attention_rollout")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """HF initialises LayerNorm to identity and biases to zero; perturb every parameter so
    that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _images(n: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_logits_and_gradients(adapter, reference, images: torch.Tensor,
                               tol: float = 1e-5) -> tuple[float, float]:
    """The adapter and ``reference`` (normalised pixels → logits) agree on logits and on the
    input gradient of the predicted class; returns both relative differences."""
    x1, x2 = images.clone().requires_grad_(), images.clone().requires_grad_()
    y1, y2 = adapter.logits(x1), reference(adapter.normalize(x2))
    t = y2.argmax(1, keepdim=True)
    (g1,) = torch.autograd.grad(y1.gather(1, t).sum(), x1)
    (g2,) = torch.autograd.grad(y2.gather(1, t).sum(), x2)
    d_logits, d_grad = _rel(y1, y2), _rel(g1, g2)
    assert d_logits <= tol and d_grad <= tol, (d_logits, d_grad)
    return d_logits, d_grad


def _captured_attention_is_hf_attention(adapter, hf_dir, images, **forward) -> None:
    """The attention every method reads (captured from the timm blocks) is HF's own."""
    cls = getattr(transformers, json.loads((hf_dir / "config.json").read_text())
                  ["architectures"][0])
    hf = cls.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad(), adapter.capture() as cap:
        adapter.logits(images)
        theirs = hf(pixel_values=adapter.normalize(images), output_attentions=True,
                    **forward).attentions
    for ours, ref in zip(cap.attention_maps(), theirs, strict=True):
        assert _rel(ours, ref) <= 1e-5


def _run_methods(adapter, images, names) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        params = dict(BUDGET.get(name, {}))
        if "segments" in METHODS[name].uses:
            params["segmentation"] = SegmentationParams(algorithm="slic")
        ctx = BatchContext.for_batch(len(images), seed=0, planned=[name])
        out[name] = attribute(name, adapter, images, [1, 3], context=ctx, **params).maps
    return out


# --- ViT: a timm model, its HF twin, every method ------------------------------------------

def _timm_to_hf_checkpoint(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The timm ViT's weights under the checkpoint names of ViTForImageClassification (the
    on-disk names, which every transformers version reads)."""
    s = model.state_dict()
    out = {"vit.embeddings.cls_token": s["cls_token"],
           "vit.embeddings.position_embeddings": s["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
           "vit.layernorm.weight": s["norm.weight"], "vit.layernorm.bias": s["norm.bias"],
           "classifier.weight": s["head.weight"], "classifier.bias": s["head.bias"]}
    for i in range(len(model.blocks)):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = s[f"{b}attn.qkv.{kind}"].chunk(3)
            out |= {f"{h}attention.attention.query.{kind}": q,
                    f"{h}attention.attention.key.{kind}": k,
                    f"{h}attention.attention.value.{kind}": v,
                    f"{h}attention.output.dense.{kind}": s[f"{b}attn.proj.{kind}"],
                    f"{h}layernorm_before.{kind}": s[f"{b}norm1.{kind}"],
                    f"{h}layernorm_after.{kind}": s[f"{b}norm2.{kind}"],
                    f"{h}intermediate.dense.{kind}": s[f"{b}mlp.fc1.{kind}"],
                    f"{h}output.dense.{kind}": s[f"{b}mlp.fc2.{kind}"]}
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    """(timm ViT, directory of the same model as ViTForImageClassification)."""
    torch.manual_seed(0)
    timm_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                 mlp_ratio=2.0, num_classes=5)
    with torch.no_grad():  # LayerNorm starts at identity, biases at zero: make them matter
        for name, p in timm_vit.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTConfig(**SHAPE, intermediate_size=64, num_labels=5, layer_norm_eps=1e-6,
                           architectures=["ViTForImageClassification"]).save_pretrained(out)
    save_file(_timm_to_hf_checkpoint(timm_vit), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return timm_vit.eval(), out


def test_vit_every_method_gives_the_timm_models_maps(vit_pair):
    timm_vit, hf_dir = vit_pair
    converted = load_model(f"hf:{hf_dir}")
    original = adapt(timm_vit, "timm", converted.data_config)
    assert type(converted.model) is VisionTransformer and converted.num_classes == 5
    images = _images()
    vit_methods = sorted(m for m, spec in METHODS.items() if spec.family != "cam")  # CNN only
    ours = _run_methods(converted, images, vit_methods)
    theirs = _run_methods(original, images, vit_methods)
    worst = {name: _rel(ours[name], theirs[name]) for name in ours}
    assert max(worst.values()) <= 1e-6, worst


def test_vit_logits_and_gradients_are_the_hf_models(vit_pair):
    _, hf_dir = vit_pair
    adapter = load_model(f"hf:{hf_dir}")
    hf = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    _same_logits_and_gradients(adapter, lambda x: hf(pixel_values=x).logits, _images())
    _captured_attention_is_hf_attention(adapter, hf_dir, _images())


def test_vit_at_another_size_interpolates_like_hf(vit_pair):
    _, hf_dir = vit_pair
    adapter = load_model(f"hf:{hf_dir}", img_size=48)
    assert adapter.grid_size == (6, 6) and adapter.data_config["input_size"] == (3, 48, 48)
    hf = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    _same_logits_and_gradients(
        adapter, lambda x: hf(pixel_values=x, interpolate_pos_encoding=True).logits,
        _images(size=48))


# --- DeiT, DINOv2, CLIP -------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Directories of tiny random HF models (perturbed), by short name."""
    root = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(0)
    vision = dict(SHAPE, intermediate_size=64)
    models = {
        "deit": transformers.DeiTForImageClassification(
            transformers.DeiTConfig(**vision, num_labels=5)),
        "deit_teacher": transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**vision, num_labels=5)),
        "dinov2": transformers.Dinov2ForImageClassification(
            transformers.Dinov2Config(**SHAPE, mlp_ratio=2, num_labels=5,
                                      layerscale_value=0.5)),
        "dinov2_model": transformers.Dinov2Model(transformers.Dinov2Config(**SHAPE)),
        "vit_model": transformers.ViTModel(transformers.ViTConfig(**vision)),
        "clip_vision": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vision, projection_dim=16,
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64))),
        "bert": transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
    }
    dirs = {}
    for name, model in models.items():
        dirs[name] = root / name
        _perturbed(model).save_pretrained(dirs[name])
    return dirs


def _hf(dirs, name):
    cls = getattr(transformers, json.loads((dirs[name] / "config.json").read_text())
                  ["architectures"][0])
    return cls.from_pretrained(dirs[name]).eval()


@pytest.mark.parametrize("name, timm_class, distilled", [
    ("deit_teacher", "VisionTransformerDistilled", True),  # mean of CLS and DIST heads
    ("deit", "VisionTransformer", False),  # the distillation token as a register
])
def test_deit_is_hfs_function(hf_dirs, name, timm_class, distilled):
    adapter = load_model(f"hf:{hf_dirs[name]}")
    assert type(adapter.model).__name__ == timm_class
    assert adapter.num_prefix_tokens == 2 and adapter.distilled == distilled
    hf = _hf(hf_dirs, name)
    _same_logits_and_gradients(adapter, lambda x: hf(pixel_values=x).logits, _images())
    _captured_attention_is_hf_attention(adapter, hf_dirs[name], _images())
    for maps in _run_methods(adapter, _images(), FEW).values():
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_dinov2_classifier_at_another_size_is_hfs_function(hf_dirs):
    """Config 32 px (4×4 grid), built at 48 px: HF interpolates its position embeddings at
    every forward, the conversion once, by HF's own function."""
    adapter = load_model(f"hf:{hf_dirs['dinov2']}", img_size=48)
    assert adapter.grid_size == (6, 6)
    assert adapter.model.head.readout == "cls+mean_patch"
    hf = _hf(hf_dirs, "dinov2")
    _same_logits_and_gradients(adapter, lambda x: hf(pixel_values=x).logits, _images(size=48))
    _captured_attention_is_hf_attention(adapter, hf_dirs["dinov2"], _images(size=48))
    for maps in _run_methods(adapter, _images(size=48), FEW).values():
        assert maps.shape == (2, 48, 48) and torch.isfinite(maps).all() and maps.abs().sum() > 0


@pytest.mark.parametrize("name", ["vit_model", "dinov2_model", "clip_vision", "clip"])
def test_headless_models_are_refused_without_a_probe(hf_dirs, name):
    with pytest.raises(ValueError, match=r"has no classifier head \(num_classes=0\)"):
        load_model(f"hf:{hf_dirs[name]}")
    backbone = load_model(f"hf:{hf_dirs[name]}", features_only=True)  # vitxai probe's input
    assert backbone.num_classes == 0 and backbone.is_vit


def test_clip_vision_with_a_probe_is_hfs_function(hf_dirs):
    """CLIP's post_layernorm becomes timm's final norm of every token: the probe's CLS half
    reads HF's pooler_output, its patch half the post-normed patch tokens."""
    torch.manual_seed(5)
    probe = LinearProbe("cls+mean_patch", 32, 4, num_prefix_tokens=1)
    adapter = load_model(f"hf:{hf_dirs['clip_vision']}", probe=probe)
    assert type(adapter.model.norm_pre).__name__ == "LayerNorm"
    assert adapter.model.patch_embed.proj.bias is None
    hf = _hf(hf_dirs, "clip_vision")
    post = getattr(hf, "vision_model", hf).post_layernorm
    w_cls, w_patch = probe.linear.weight.detach().split(32, dim=1)

    def reference(x):
        out = hf(pixel_values=x)
        patches = post(out.last_hidden_state[:, 1:]).mean(1)
        return out.pooler_output @ w_cls.T + patches @ w_patch.T + probe.linear.bias

    _same_logits_and_gradients(adapter, reference, _images())
    for maps in _run_methods(adapter, _images(), FEW).values():
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_a_full_clip_checkpoint_gives_its_vision_tower(hf_dirs):
    model, cfg = build_hf_model(f"hf:{hf_dirs['clip']}")
    clip = _hf(hf_dirs, "clip")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=x).pooler_output
        assert _rel(model.forward_features(x)[:, 0], pooled) <= 1e-5
    assert cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# --- preprocessing ------------------------------------------------------------------------

def test_preprocessing_comes_from_the_image_processor_config(hf_dirs, tmp_path):
    # DeiT's processor: squash-resize to 40×40, bilinear, centre-crop 32
    (hf_dirs["deit"] / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 2,
        "size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True}))
    try:
        cfg = load_model(f"hf:{hf_dirs['deit']}").data_config
    finally:
        (hf_dirs["deit"] / "preprocessor_config.json").unlink()
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_mode"] == "squash"
    transform = eval_transform(cfg)
    assert transform.resized_size(100, 60) == (40, 40)
    assert transform(Image.new("RGB", (100, 60))).shape == (3, 32, 32)


def test_dinov2_runs_at_the_size_its_processor_crops_to(hf_dirs):
    """HF runs facebook/dinov2-* at the processor's 224 crop, not the config's 518."""
    (hf_dirs["dinov2"] / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 55}, "crop_size": {"height": 48, "width": 48},
        "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    try:
        adapter = load_model(f"hf:{hf_dirs['dinov2']}")
        smaller = load_model(f"hf:{hf_dirs['dinov2']}", img_size=40)
    finally:
        (hf_dirs["dinov2"] / "preprocessor_config.json").unlink()
    assert adapter.input_size == (48, 48) and smaller.input_size == (40, 40)
    transform = eval_transform(adapter.data_config)
    assert transform.crop_mode == "center" and transform.resized_size(110, 55) == (55, 110)


def test_defaults_without_a_processor_config(vit_pair, hf_dirs):
    vit = load_model(f"hf:{vit_pair[1]}").data_config  # ViTImageProcessor: 0.5, squash
    assert vit["mean"] == (0.5, 0.5, 0.5) and vit["crop_mode"] == "squash"
    assert vit["crop_pct"] == 1.0 and vit["interpolation"] == "bilinear"
    dino = build_hf_model(f"hf:{hf_dirs['dinov2']}")[1]
    assert dino["mean"] == pytest.approx((0.485, 0.456, 0.406)) and dino["crop_pct"] == 0.875


# --- guards -------------------------------------------------------------------------------

def test_a_wrong_conversion_is_refused_by_the_self_check(vit_pair, monkeypatch):
    parts = dict(hf_module._LAYER_PARTS)
    parts["q"], parts["k"] = parts["k"], parts["q"]  # queries and keys swapped
    monkeypatch.setattr(hf_module, "_LAYER_PARTS", parts)
    with pytest.raises(ModelLoadError, match=r"timm conversion of ViTForImageClassification "
                       r"does not reproduce the Hugging Face model: outputs differ by up to"):
        load_model(f"hf:{vit_pair[1]}")


def test_parity_of_every_architecture_is_far_below_the_tolerance(vit_pair, hf_dirs):
    cases = {"ViTForImageClassification": vit_pair[1], "DeiTForImageClassification":
             hf_dirs["deit"], "DeiTForImageClassificationWithTeacher": hf_dirs["deit_teacher"],
             "Dinov2ForImageClassification": hf_dirs["dinov2"],
             "CLIPVisionModel": hf_dirs["clip_vision"]}
    for arch, path in cases.items():
        model, _ = build_hf_model(f"hf:{path}")
        hf = getattr(transformers, arch).from_pretrained(path).eval()
        assert check_parity(hf, model, arch, (32, 32), seed=7) <= 1e-6, arch


def test_random_weights_are_seeded(vit_pair):
    a = load_model(f"hf:{vit_pair[1]}", pretrained=False, seed=4)
    b = load_model(f"hf:{vit_pair[1]}", pretrained=False, seed=4)
    c = load_model(f"hf:{vit_pair[1]}")
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k
    assert not torch.equal(a.model.head.weight, c.model.head.weight)


def test_an_incomplete_checkpoint_is_refused(vit_pair, tmp_path):
    _, hf_dir = vit_pair
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    del state["classifier.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 weights of ViTForImageClassification "
                       r"\(first: classifier.weight\)"):
        load_model(f"hf:{broken}")


def test_swiglu_dinov2_is_refused(tmp_path):
    config = transformers.Dinov2Config(**SHAPE, use_swiglu_ffn=True,
                                       architectures=["Dinov2Model"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"DINOv2 with a SwiGLU MLP \(ViT-g\) is not"):
        load_model(f"hf:{tmp_path}", pretrained=False)


def test_unsupported_architecture_lists_the_supported_ones(hf_dirs):
    with pytest.raises(ModelLoadError) as e:
        load_model(f"hf:{hf_dirs['bert']}")
    assert str(e.value) == (
        f"hf:{hf_dirs['bert']}: architecture BertModel is not supported; supported: "
        "ViTForImageClassification, ViTModel, DeiTForImageClassification, "
        "DeiTForImageClassificationWithTeacher, Dinov2ForImageClassification, Dinov2Model, "
        "CLIPVisionModel, CLIPModel")


def test_missing_directories_and_files(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^hf:/no/such/dir: no such directory$"):
        load_model("hf:/no/such/dir")
    with pytest.raises(ModelLoadError, match="has no config.json; pass a directory that "
                       "save_pretrained wrote"):
        load_model(f"hf:{tmp_path}")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file; pass the directory"):
        load_model(f"hf:{tmp_path / 'weights.bin'}")
    with pytest.raises(ModelLoadError, match="hf: needs a hub name"):
        load_model("hf:")


def test_hub_name_offline_fails_fast_in_one_line():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("hf:vitxai-tests/no-such-model")
    assert time.perf_counter() - start < 10
    assert str(e.value) == (
        "cannot load hf:vitxai-tests/no-such-model: the model hub cannot be reached and no "
        "cached copy was found; pass a local directory saved with save_pretrained as "
        "hf:/path/to/dir")


def test_a_hub_name_loads_from_the_cache_offline(vit_pair, tmp_path):
    """A hub name resolves through the Hugging Face cache (weights and image processor
    config); a fresh process, as the hub library reads its cache location at import."""
    _, hf_dir = vit_pair
    snapshot = tmp_path / "hub" / "models--vitxai-tests--tiny-vit" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, snapshot / name)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5], "resample": 3,
         "size": {"height": 32, "width": 32}}))
    code = ("from vitxai.models import load_model; a = load_model('hf:vitxai-tests/tiny-vit'); "
            "print(a.num_classes, a.data_config['mean'], a.data_config['interpolation'])")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "5 (0.1, 0.2, 0.3) bicubic"


def test_without_transformers_the_message_names_the_extra(vit_pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ModelLoadError, match=r'^hf: models need the transformers package: '
                       r'pip install -e "\.\[hf\]"$'):
        load_model(f"hf:{vit_pair[1]}")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 7}, "num_classes does not apply to hf: models"),
    ({"checkpoint": "w.safetensors"}, "checkpoint does not apply to hf: models"),
    ({"global_pool": "avg"}, "hf: models take img_size only, not global_pool"),
    ({"img_size": 36}, r"img_size=36 is not a multiple of the patch size 8×8 .* img_size=32"),
])
def test_keywords_that_do_not_apply_are_one_line_value_errors(vit_pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(f"hf:{vit_pair[1]}", **kwargs)


# --- runs record and rebuild hf: models ---------------------------------------------------

def test_compare_records_an_hf_model_and_rebuilds_it(vit_pair, tmp_path):
    _, hf_dir = vit_pair
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(photos / f"p{i}.png")
    out = tmp_path / "run"
    assert main(["compare", "--data", str(photos), "--model", f"hf:{hf_dir}", "--methods",
                 "saliency", "attention_rollout", "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["model"] == f"hf:{hf_dir}"
    adapter, _ = RunSource.from_config(config).load_model()
    assert adapter.name == f"hf:{hf_dir}" and adapter.num_classes == 5
