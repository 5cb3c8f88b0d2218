"""The bundled benchmark ViT: it loads, matches its card on fresh data, fails clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from vitxai.models import ModelLoadError, ViTAdapter
from vitxai.models.bundled import (
    BUNDLED_CARD,
    BUNDLED_WEIGHTS,
    TRAIN_COMMAND,
    benchmark_accuracy,
    build_benchmark_vit,
    bundled_model_card,
    load_bundled_model,
    pair_metrics,
)


@pytest.fixture(scope="module")
def card():
    return bundled_model_card()


def test_card_describes_a_small_real_vit(card):
    kw = card["model"]["kwargs"]
    assert kw["img_size"] == 224 and kw["patch_size"] == 16 and kw["num_classes"] == 10
    assert kw["class_token"] and kw["global_pool"] == "token"
    assert card["command"].startswith(TRAIN_COMMAND)
    assert card["test"]["accuracy"] >= 0.97 and card["test"]["size"] >= 2000
    assert card["test"]["seed"] != card["seed"]
    assert BUNDLED_WEIGHTS.stat().st_size == card["weights"]["bytes"] <= 10 * 2**20
    for key in ("wall_time_s", "machine"):
        assert key in card["training"]
    assert card["data_config"]["crop_pct"] == 1.0
    assert isinstance(build_benchmark_vit(card), VisionTransformer)


def test_bundled_model_reaches_its_card_accuracy_on_new_images(card):
    adapter = load_bundled_model()
    assert isinstance(adapter, ViTAdapter) and adapter.name == "vitxai-benchmark-vit"
    assert adapter.grid_size == (14, 14) and adapter.patch_size == (16, 16)
    assert adapter.data_config["input_size"] == (3, 224, 224)
    seed = 4242  # neither the training nor the card's test seed
    assert seed not in (card["seed"], card["test"]["seed"])
    n = 400  # binomial sd at 97 %: 0.009
    assert benchmark_accuracy(adapter, n, seed) >= card["test"]["accuracy"] - 0.03
    # the card's pair figures hold on new pair images too (sd <= 0.035 at n = 200)
    pairs = pair_metrics(adapter, 200, seed)
    assert abs(pairs["top1_either"] - card["test"]["pair"]["top1_either"]) < 0.12
    assert abs(pairs["top2_both"] - card["test"]["pair"]["top2_both"]) < 0.12
    with pytest.raises(ValueError, match="pair_metrics"):
        benchmark_accuracy(adapter, 1, seed, split="pair")


def test_corrupted_weights_name_the_file_and_the_training_command(tmp_path):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 50)
    with pytest.raises(ModelLoadError, match=TRAIN_COMMAND) as err:
        load_bundled_model(weights=garbage)
    assert str(garbage) in str(err.value)
    # A damaged copy of the bundled file is caught by the card's checksum.
    shutil.copy(BUNDLED_CARD, tmp_path / BUNDLED_CARD.name)
    data = bytearray(BUNDLED_WEIGHTS.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / BUNDLED_WEIGHTS.name).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256.*" + TRAIN_COMMAND):
        load_bundled_model(card=tmp_path / BUNDLED_CARD.name)


def test_mismatched_weights_and_missing_files(tmp_path, card):
    kw = dict(card["model"]["kwargs"], depth=card["model"]["kwargs"]["depth"] + 1)
    other = tmp_path / "deeper.safetensors"
    save_file(VisionTransformer(**kw).state_dict(), str(other))
    with pytest.raises(ModelLoadError, match=f"do not match.*{TRAIN_COMMAND}"):
        load_bundled_model(weights=other)
    with pytest.raises(ModelLoadError, match=TRAIN_COMMAND):
        load_bundled_model(weights=tmp_path / "missing.safetensors")
    bad_card = tmp_path / "card.json"
    bad_card.write_text("{not json")
    with pytest.raises(ModelLoadError, match="card.json"):
        load_bundled_model(card=bad_card)


def test_training_writes_loadable_files(tmp_path):
    from vitxai.train import train_benchmark_model

    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 1, "mlp_ratio": 1.0}
    card = train_benchmark_model(tmp_path, seed=1, time_budget_s=6, batch_size=4,
                                 full_batch_size=2, test_size=8, model_kwargs=tiny,
                                 progress=False, threads=1)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"benchmark_vit.safetensors", "benchmark_vit.json", "benchmark_vit.md"}
    saved = json.loads((tmp_path / "benchmark_vit.json").read_text())
    assert saved == card and saved["test"]["seed"] != saved["seed"]
    crops, full = saved["training"]["phases"]
    assert crops["steps"] >= 1 and full["steps"] >= 1
    assert saved["training"]["command_wall_time_s"] < 30
    assert saved["command"] == f"{TRAIN_COMMAND} --out {tmp_path} --seed 1 --time-budget 6"
    adapter = load_bundled_model(card=tmp_path / "benchmark_vit.json")
    x = torch.rand(2, 3, 224, 224)
    assert adapter.predict(x).shape == (2, 10)
