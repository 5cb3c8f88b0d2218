"""The bundled model: a small timm VisionTransformer trained on vitxai's synthetic benchmark.

It ships inside the package (``vitxai/assets/benchmark_vit.safetensors``) with a model card
(``benchmark_vit.json``: timm config, normalisation, seed, training command, test accuracy,
training time, machine; ``benchmark_vit.md`` for people). It is a real ViT (patch 16 at 224,
class token), so every ViT method and the mask pipeline see a real ViT's geometry, and its
classes are decided by objects whose pixels are known (:mod:`vitxai.data.synthetic`).
Retrain with ``vitxai train-benchmark`` (or ``python -m vitxai.train``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from vitxai.models.adapter import ModelAdapter
from vitxai.models.loading import (
    ModelLoadError,
    adapt,
    read_state_dict,
    resolve_device,
    with_probe,
)
from vitxai.models.probe import LinearProbe

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_WEIGHTS = ASSETS / "benchmark_vit.safetensors"
BUNDLED_CARD = ASSETS / "benchmark_vit.json"
BUNDLED_NAME = "vitxai-benchmark-vit"
TRAIN_COMMAND = "vitxai train-benchmark"  # also: python -m vitxai.train


def _fail(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"bundled benchmark model: {why} ({path}); rebuild the bundled files with "
        f"`{TRAIN_COMMAND}` (about 20 min on 2 CPU cores), or reinstall vitxai"
    )


def bundled_model_card(card: str | Path | None = None) -> dict[str, Any]:
    """The bundled model's card (a dict read from ``benchmark_vit.json``).

    Keys include ``model`` ({"kwargs": timm ``VisionTransformer`` kwargs}), ``data_config``
    (input_size, mean, std, interpolation, crop_pct), ``seed``, ``command``,
    ``test`` (accuracy, size, seed, split), ``training`` (wall time, images seen, machine),
    ``versions`` and ``weights`` (file name, bytes, sha256).

    Raises:
        ModelLoadError: the card is missing or not valid JSON (naming the file and
            :data:`TRAIN_COMMAND`).
    """
    path = Path(card) if card is not None else BUNDLED_CARD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "model card not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"model card unreadable: {type(e).__name__}") from e
    if not isinstance(data, dict) or "model" not in data or "data_config" not in data:
        raise _fail(path, "model card lacks the 'model' or 'data_config' entry")
    return data


def build_benchmark_vit(card: dict[str, Any] | None = None) -> VisionTransformer:
    """An untrained ``VisionTransformer`` with the card's config (default: bundled card)."""
    card = card if card is not None else bundled_model_card()
    return VisionTransformer(**card["model"]["kwargs"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_bundled_model(device: str | torch.device = "cpu", *, weights: str | Path | None = None,
                       card: str | Path | None = None, precision: str = "fp32",
                       probe: str | Path | LinearProbe | None = None) -> ModelAdapter:
    """The trained benchmark ViT, wrapped in a :class:`~vitxai.models.adapter.ViTAdapter`.

    Args:
        device: where the model runs.
        weights: a safetensors file to load instead of the bundled one (e.g. a retrained
            model); its card is ``card`` or the bundled card. Checked against the card's
            sha256 only when it is the file the card describes.
        card: a model card JSON file (default: the bundled one).
        precision: "fp32" or "bf16", see
            :meth:`~vitxai.models.adapter.ModelAdapter.set_precision`.
        probe: a linear probe on the model's frozen trunk, replacing its head (see
            :func:`vitxai.models.loading.load_model`).

    Raises:
        ModelLoadError: the weights or card are missing, corrupt (checksum or format), or do
            not match the card's architecture; the message names the file and the training
            command that rebuilds it.
        ValueError: ``device`` is malformed or absent on this machine.
    """
    device = resolve_device(device)
    card_path = Path(card) if card is not None else BUNDLED_CARD
    info = bundled_model_card(card_path)
    path = Path(weights) if weights is not None else card_path.with_name(
        info.get("weights", {}).get("file", BUNDLED_WEIGHTS.name))
    if not path.is_file():
        raise _fail(path, "weights file not found")
    expected = info.get("weights", {}).get("sha256")
    if expected and path.name == info["weights"].get("file") and _sha256(path) != expected:
        raise _fail(path, "weights file is corrupt (sha256 differs from the model card)")
    model = build_benchmark_vit(info)
    try:
        state = read_state_dict(path)
        model.load_state_dict(state, strict=True)
    except ModelLoadError as e:
        raise _fail(path, f"weights unreadable: {e}") from e
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        first = " ".join(str(e).split("\n\t")[:2])[:300]
        raise _fail(path, f"weights do not match the card's architecture: {first}") from e
    config = dict(info["data_config"])
    config["input_size"] = tuple(config["input_size"])
    if probe is not None:
        with_probe(model, probe, BUNDLED_NAME)
    return adapt(model.to(device), name=BUNDLED_NAME, config=config).set_precision(precision)


@torch.inference_mode()
def benchmark_accuracy(adapter: ModelAdapter, n: int, seed: int, split: str = "single",
                       batch_size: int = 100) -> float:
    """Top-1 accuracy of ``adapter`` on ``n`` fresh images of ``split`` ("single" or
    "parts"; for "pair" see :func:`pair_metrics`)."""
    from vitxai.data.synthetic import generate

    if split == "pair":
        raise ValueError("pair images have two classes; use pair_metrics")
    correct = 0
    for start in range(0, n, batch_size):
        g = generate(split, range(start, min(n, start + batch_size)), seed)
        pred = adapter.predict(g.images.float() / 255, batch_size=batch_size).argmax(1).cpu()
        correct += int((pred == g.labels).sum())
    return correct / max(n, 1)


@torch.inference_mode()
def pair_metrics(adapter: ModelAdapter, n: int, seed: int, batch_size: int = 100
                 ) -> dict[str, Any]:
    """How ``adapter`` reads ``n`` fresh "pair" images: ``top2_both`` is the share whose two
    highest logits are exactly the two objects' classes, ``top1_either`` the share whose
    prediction is one of them."""
    from vitxai.data.synthetic import generate

    both = either = 0
    for start in range(0, n, batch_size):
        g = generate("pair", range(start, min(n, start + batch_size)), seed)
        logits = adapter.predict(g.images.float() / 255, batch_size=batch_size).cpu()
        top = logits.topk(2, 1).indices
        truth = torch.stack([g.labels, g.other_labels], 1)
        both += int((top.sort(1).values == truth.sort(1).values).all(1).sum())
        either += int((truth == top[:, :1]).any(1).sum())
    return {"split": "pair", "seed": seed, "size": n, "top2_both": round(both / max(n, 1), 4),
            "top1_either": round(either / max(n, 1), 4)}
