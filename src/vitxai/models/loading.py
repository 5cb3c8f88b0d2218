"""Loading classifiers: timm by name (hub weights), a local checkpoint, or random weights.

Preprocessing always comes from the model's own timm data config (mean, std, interpolation,
crop); the input size comes from the built model's patch embedding, not from the pretrained
config (``img_size=224`` on a DINOv2 model must not give 518-pixel inputs).
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitxai.models.adapter import ModelAdapter, ViTAdapter, is_timm_vit

HUB_HOST = "huggingface.co"


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says what to do."""


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the model hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline() -> Any:
    """Make huggingface_hub answer from its cache only (fails in seconds instead of ~47 s)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that this machine has; a one-line ValueError otherwise
    (instead of an error deep inside the first ``.to(device)``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={str(device)!r}: not a device name; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu, ...
        if dev.type == "cpu" or not hasattr(backend, "is_available"):
            return dev
        available = backend.is_available()
        count = backend.device_count() if available else 0
    kind = "CUDA" if dev.type == "cuda" else dev.type
    if not available:
        raise ValueError(
            f"device={str(device)!r}: {kind} is not available on this machine; use "
            "device='cpu'"
        )
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device={str(device)!r}: this machine has {count} {kind} device(s); "
                         f"use one of {dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint safely (``weights_only=True``, never pickle).

    Accepts a plain state dict or one nested under "state_dict", "model" or "model_state".
    """
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is a directory; pass the weights file in it "
                             "(.safetensors or torch file)")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns about old pickle protocols
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle payload, wrong format
        text = str(e).strip()
        # torch's own message advises weights_only=False, i.e. running the file's code
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
            raise ModelLoadError(
                f"cannot read checkpoint {path}: not a torch file of plain tensors (pickled "
                "Python objects are refused, as loading them could run code); convert it to "
                "safetensors (safetensors.torch.save_file) where you trust the file"
            ) from e
        why = f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
        raise ModelLoadError(f"cannot read checkpoint {path}: {why}") from e
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a checkpoint into ``model`` strictly; mismatches become one clear error."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[:2]
        raise ModelLoadError(
            f"checkpoint {path} does not match model {name!r}: {' '.join(first)[:300]}"
        ) from e


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's timm eval data config with the input size of the model as built."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    return cfg


def adapt(model: nn.Module, name: str = "model", config: dict[str, Any] | None = None
          ) -> ModelAdapter:
    """Wrap a built model: a :class:`ViTAdapter` for timm ViTs, else a :class:`ModelAdapter`."""
    cfg = config or data_config(model)
    size = tuple(cfg["input_size"][1:])
    cls = ViTAdapter if is_timm_vit(model) else ModelAdapter
    adapter = cls(model, cfg["mean"], cfg["std"], size, name)
    adapter.data_config = cfg
    return adapter


def load_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    precision: str = "fp32",
    **model_kwargs: Any,
) -> ModelAdapter:
    """Build timm model ``name`` and wrap it in an adapter.

    Args:
        name: any timm model name, e.g. "vit_base_patch16_224", "deit_tiny_distilled_patch16_224",
            "vit_small_patch14_reg4_dinov2".
        pretrained: fetch the hub weights (ignored when ``checkpoint`` is given).
        checkpoint: a local .safetensors or torch file (read with ``weights_only=True``).
        device: where the model runs.
        seed: seeds the random initialisation of a model built without weights, so that
            random-weight runs are reproducible (the global torch RNG is left untouched).
        precision: "fp32" or "bf16" (bfloat16 autocast forward passes, float32 results), see
            :meth:`~vitxai.models.adapter.ModelAdapter.set_precision`.
        **model_kwargs: passed to ``timm.create_model`` (img_size, num_classes, ...).

    Raises:
        ModelLoadError: unknown name, unreadable or mismatched checkpoint, or hub weights that
            cannot be fetched (within seconds when offline, naming ``--checkpoint``).
        ValueError: ``device`` is malformed or absent on this machine.
    """
    device = resolve_device(device)
    if not timm.is_model(name.split(".")[0]):
        raise ModelLoadError(
            f"unknown timm model {name!r}; see timm.list_models('*vit*') for names"
        )
    if checkpoint is not None:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        load_weights(model, checkpoint, name)
    elif pretrained:
        online = hub_reachable()
        try:
            if online:
                model = timm.create_model(name, pretrained=True, **model_kwargs)
            else:
                with _hub_offline():
                    model = timm.create_model(name, pretrained=True, **model_kwargs)
        except Exception as e:
            why = "the model hub cannot be reached" if not online else f"{type(e).__name__}"
            raise ModelLoadError(
                f"cannot get pretrained weights for {name!r}: {why} and no cached copy was "
                "found; pass a local weights file as checkpoint=PATH, or load random weights "
                "with pretrained=False"
            ) from e
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **model_kwargs)
    return adapt(model.to(device), name).set_precision(precision)
