"""Model loading: timm names, local checkpoints, the offline hub error, data configs."""

from __future__ import annotations

import time

import pytest
import timm
import torch

from vitxai.models import ModelLoadError, ViTAdapter, data_config, load_model


def test_offline_hub_error_is_fast_and_names_checkpoint():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"vit_base_patch16_224.*checkpoint=PATH"):
        load_model("vit_base_patch16_224", pretrained=True)
    assert time.perf_counter() - start < 15


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown timm model 'not_a_model'"):
        load_model("not_a_model", pretrained=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    name = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    adapter = load_model(name, checkpoint=path, num_classes=7)
    assert isinstance(adapter, ViTAdapter)
    for (k, v), w in zip(model.state_dict().items(), adapter.model.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k


def test_bad_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("vit_tiny_patch16_224", checkpoint=garbage)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
    with pytest.raises(ModelLoadError, match="does not match model 'vit_tiny_patch16_224'"):
        load_model("vit_tiny_patch16_224", checkpoint=other)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, pickled)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("vit_tiny_patch16_224", checkpoint=pickled)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")


def test_data_config_follows_model_not_imagenet_defaults():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 112, 112)  # the built model, not the 518 of its card
    vit = timm.create_model("vit_base_patch16_224.orig_in21k_ft_in1k", pretrained=False)
    cfg = data_config(vit)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.9


@pytest.mark.parametrize("name,prefix", [
    ("deit_tiny_distilled_patch16_224", 2),
    ("vit_small_patch14_reg4_dinov2", 5),
])
def test_token_layout(name, prefix):
    # DINOv2 comes without head (refused): give it one, the layout is the backbone's
    adapter = load_model(name, pretrained=False, img_size=56, num_classes=10) \
        if "dinov2" in name else load_model(name, pretrained=False)
    assert adapter.num_prefix_tokens == prefix
    gh, gw = adapter.grid_size
    assert adapter.num_tokens == prefix + gh * gw
    x = torch.rand(1, 3, *adapter.input_size)
    with adapter.capture() as cap, torch.no_grad():
        adapter.logits(x)
    assert len(cap.attention_maps()) == adapter.depth
    assert cap.attention[0].shape[-1] == adapter.num_tokens
