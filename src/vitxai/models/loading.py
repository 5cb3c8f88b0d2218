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
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitxai.models.adapter import ModelAdapter, ViTAdapter, is_timm_vit
from vitxai.models.probe import LinearProbe, attach_probe, probe_from

HUB_HOST = "huggingface.co"


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says what to do."""


class _ModelArgumentError(ValueError):
    """A keyword of ``timm.create_model`` that the model does not take."""


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


#: entries under which training scripts nest the weights, tried in this order (timm, DeiT,
#: Lightning, DDP wrappers); EMA weights only when no plain weights are there
NESTING_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module",
                "model_ema", "state_dict_ema", "ema")
#: key prefixes that wrappers add (DataParallel, Lightning modules, torch.compile, detection
#: and self-supervised backbones); stripped only where the stripped keys fit the model
KEY_PREFIXES = ("module.model.", "module.", "model.", "backbone.", "_orig_mod.", "encoder.")
#: metadata entries naming the architecture a checkpoint was saved from
_ARCH_KEYS = ("arch", "architecture", "model_name")


def _is_state(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _entries(value: Any) -> str:
    keys = [str(k) for k in value] if isinstance(value, dict) else []
    return ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "none"


def read_checkpoint(path: str | Path, key: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors or torch checkpoint, read safely
    (``weights_only=True``, never pickle).

    Args:
        key: the entry that holds the weights (dots descend into nested entries, e.g.
            "model_ema" or "state.model"); None = a plain state dict, or the first of
            :data:`NESTING_KEYS` that holds one.

    Returns:
        The tensors by name (prefixes are kept; :func:`load_weights` strips them), and the
        string metadata of the file (safetensors metadata, or the top-level strings of a
        torch checkpoint such as timm's ``arch``).
    """
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is a directory; pass the weights file in it "
                             "(.safetensors or torch file)")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
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
    if isinstance(state, dict):
        metadata |= {str(k): v for k, v in state.items() if isinstance(v, str)}
    if key is not None:
        for part in [key] if isinstance(state, dict) and key in state else key.split("."):
            if not isinstance(state, dict) or part not in state:
                raise ModelLoadError(f"checkpoint {path} has no entry {key!r}; its entries: "
                                     f"{_entries(state)}")
            state = state[part]
        if not _is_state(state):
            raise ModelLoadError(f"entry {key!r} of checkpoint {path} is not a state dict of "
                                 f"tensors; its entries: {_entries(state)}")
    while not _is_state(state) and isinstance(state, dict):
        inner = next((state[k] for k in NESTING_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not _is_state(state):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors (its "
                             f"entries: {_entries(state)}); name the entry that does with "
                             "checkpoint_key=KEY")
    return state, metadata


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint safely (``weights_only=True``, never pickle).

    Accepts a plain state dict or one nested under "state_dict", "model", "model_ema", ...
    (:data:`NESTING_KEYS`), or under ``key``; a "module." prefix (DataParallel) is removed.
    """
    state = read_checkpoint(path, key)[0]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]
                    ) -> dict[str, torch.Tensor]:
    """``state`` with the wrapper prefix (:data:`KEY_PREFIXES`) whose removal makes the most
    keys fit ``expected``; unchanged when none makes more fit."""
    best, fit = state, len(expected & set(state))
    for prefix in KEY_PREFIXES:
        if not any(k.startswith(prefix) for k in state):
            continue
        stripped = {k.removeprefix(prefix): v for k, v in state.items()}
        if len(stripped) == len(state) and len(expected & set(stripped)) > fit:
            best, fit = stripped, len(expected & set(stripped))
    return best


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def key_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """How ``state`` differs from ``model``'s state dict, in one line, or None when it fits:
    "12 missing, 3 unexpected, 1 of another shape; first missing: a, b, c; ..."."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(missing)} missing, {len(unexpected)} unexpected"
             + (f", {len(shapes)} of another shape" if shapes else "")
             + f" of the model's {len(own)} keys"]
    if missing:
        parts.append(f"first missing: {_first(missing)}")
    if unexpected:
        parts.append(f"first unexpected: {_first(unexpected)}")
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {'x'.join(map(str, state[k].shape))} in the checkpoint, "
                     f"{'x'.join(map(str, own[k].shape))} in the model")
    return "; ".join(parts)


def _base_name(name: str) -> str:
    return name.split(".")[0].rsplit("/", 1)[-1]


def load_weights(model: nn.Module, path: str | Path, name: str, key: str | None = None
                 ) -> None:
    """Load a checkpoint into ``model`` strictly; mismatches become one clear error.

    The weights may be nested (see :func:`read_checkpoint`, ``key``) and their names
    prefixed by a wrapper (:data:`KEY_PREFIXES`): a prefix is removed where that makes the
    names fit the model. A checkpoint that records another architecture than ``name`` (timm's
    ``arch``) loads with a warning when its weights fit.
    """
    state, metadata = read_checkpoint(path, key)
    state = _strip_prefixes(state, set(model.state_dict()))
    problem = key_mismatch(state, model)
    if problem is not None:
        raise ModelLoadError(f"checkpoint {path} does not match model {name!r}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # pragma: no cover - key_mismatch finds what torch refuses
        first = str(e).split("\n\t")[:2]
        raise ModelLoadError(
            f"checkpoint {path} does not match model {name!r}: {' '.join(first)[:300]}"
        ) from e
    arch = next((metadata[k] for k in _ARCH_KEYS if isinstance(metadata.get(k), str)), None)
    if arch and _base_name(arch) != _base_name(name):
        warnings.warn(f"checkpoint {path} records architecture {arch!r} but loads into "
                      f"model {name!r}; its weights fit, but check the model name",
                      stacklevel=2)


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's timm eval data config with the input size of the model as built."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    return cfg


def adapt(model: nn.Module, name: str = "model", config: dict[str, Any] | None = None,
          features_only: bool = False) -> ModelAdapter:
    """Wrap a built model: a :class:`ViTAdapter` for timm ViTs, else a :class:`ModelAdapter`
    (``features_only``: a headless backbone is accepted, see :class:`ModelAdapter`)."""
    cfg = config or data_config(model)
    size = tuple(cfg["input_size"][1:])
    cls = ViTAdapter if is_timm_vit(model) else ModelAdapter
    adapter = cls(model, cfg["mean"], cfg["std"], size, name, features_only)
    adapter.data_config = cfg
    return adapter


def load_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_key: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    precision: str = "fp32",
    probe: str | Path | LinearProbe | None = None,
    features_only: bool = False,
    **model_kwargs: Any,
) -> ModelAdapter:
    """Build timm model ``name`` and wrap it in an adapter.

    Args:
        name: any timm model name, e.g. "vit_base_patch16_224", "deit_tiny_distilled_patch16_224",
            "vit_small_patch14_reg4_dinov2"; or a Hugging Face transformers ViT as
            "hf:ORG/NAME" (hub) or "hf:/path/to/dir" (a save_pretrained directory), converted
            into the equivalent timm ViT (:mod:`vitxai.models.huggingface`; takes
            ``img_size`` only, and ``pretrained=False`` gives its random weights).
        pretrained: fetch the hub weights (ignored when ``checkpoint`` is given).
        checkpoint: a local .safetensors or torch file (read with ``weights_only=True``);
            weights nested in it and wrapper prefixes of their names are found by
            themselves (see :func:`load_weights`).
        checkpoint_key: the entry of ``checkpoint`` that holds the weights, e.g.
            "model_ema"; None = found by itself.
        device: where the model runs.
        seed: seeds the random initialisation of a model built without weights, so that
            random-weight runs are reproducible (the global torch RNG is left untouched).
        precision: "fp32", "bf16" (bfloat16 autocast forward passes, float32 results) or "auto"
            (bf16 where the device computes it natively, else fp32), see
            :meth:`~vitxai.models.adapter.ModelAdapter.set_precision`.
        probe: a linear probe (a file written by ``vitxai probe``, or a
            :class:`~vitxai.models.probe.LinearProbe`) attached as the classifier of a
            headless backbone (DINOv2, MAE, CLIP); it replaces a model's own head, with a
            warning.
        features_only: accept a headless backbone (for ``vitxai probe``'s features).
        **model_kwargs: passed to ``timm.create_model``: ``img_size`` (an int or (h, w); a
            ViT's position embeddings are interpolated to the new grid, e.g. DINOv2 ViT-B/14
            at 224 → 16×16, and the data config follows), ``num_classes`` (with pretrained
            weights timm replaces the head by a new one, initialised from ``seed``), ...

    Raises:
        ModelLoadError: unknown name, unreadable or mismatched checkpoint, or hub weights that
            cannot be fetched (within seconds when offline, naming ``--checkpoint``).
        ProbeError: a probe file that cannot be read or does not fit the backbone.
        ValueError: ``device`` is malformed or absent on this machine; ``img_size`` or
            ``num_classes`` below 1, ``img_size`` not a multiple of a ViT's patch size, or a
            model that does not take them.
    """
    device = resolve_device(device)
    _check_model_kwargs(model_kwargs)
    if name.startswith("hf:"):
        from vitxai.models.huggingface import load_hf_model

        return load_hf_model(name, pretrained=pretrained, checkpoint=checkpoint,
                             checkpoint_key=checkpoint_key, device=device, seed=seed,
                             precision=precision, probe=probe,
                             features_only=features_only, **model_kwargs)
    if not timm.is_model(name.split(".")[0]):
        raise ModelLoadError(
            f"unknown timm model {name!r}; see timm.list_models('*vit*') for names"
        )
    if checkpoint_key is not None and checkpoint is None:
        raise ValueError(f"checkpoint_key={checkpoint_key!r} needs a checkpoint=PATH")
    if checkpoint is not None:
        model = _create(name, False, seed, model_kwargs)
        load_weights(model, checkpoint, name, key=checkpoint_key)
    elif pretrained:
        online = hub_reachable()
        try:
            if online:
                model = _create(name, True, seed, model_kwargs)
            else:
                with _hub_offline():
                    model = _create(name, True, seed, model_kwargs)
        except _ModelArgumentError:
            raise
        except Exception as e:
            why = "the model hub cannot be reached" if not online else f"{type(e).__name__}"
            raise ModelLoadError(
                f"cannot get pretrained weights for {name!r}: {why} and no cached copy was "
                "found; pass a local weights file as checkpoint=PATH, or load random weights "
                "with pretrained=False"
            ) from e
    else:
        model = _create(name, False, seed, model_kwargs)
    config = _model_config(model, name, model_kwargs)
    if probe is not None:
        with_probe(model, probe, name)
    return adapt(model.to(device), name, config, features_only).set_precision(precision)


def with_probe(model: nn.Module, probe: str | Path | LinearProbe, name: str) -> nn.Module:
    """Attach ``probe`` (a file or a :class:`LinearProbe`) as ``model``'s classifier, warning
    when it replaces a head or was trained on another backbone (returns ``model``)."""
    probe, notes = probe_from(probe, name)
    for note in attach_probe(model, probe, name) + notes:
        warnings.warn(note, stacklevel=3)
    return model


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _check_model_kwargs(model_kwargs: Mapping[str, Any]) -> None:
    """One-line ValueErrors for nonsense ``img_size`` / ``num_classes`` (before building)."""
    img_size = model_kwargs.get("img_size")
    if img_size is not None:
        size = _pair(img_size) if isinstance(img_size, int | tuple | list) else ()
        if (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                      for v in size) or min(size) < 1):
            raise ValueError(f"img_size={img_size!r} must be a positive number of pixels "
                             "(an int, or (height, width))")
    num_classes = model_kwargs.get("num_classes")
    # 0 (a headless backbone) is built, then refused by check_classifier_head, which says how
    # to get a classifier
    if num_classes is not None and (not isinstance(num_classes, int)
                                    or isinstance(num_classes, bool) or num_classes < 0):
        raise ValueError(f"num_classes={num_classes!r} must be an int ≥ 1 (attributions "
                         "explain a class score)")


def _create(name: str, pretrained: bool, seed: int, model_kwargs: Mapping[str, Any]
            ) -> nn.Module:
    """``timm.create_model``, with new parameters (random weights, or a head replaced for
    ``num_classes``) drawn from ``seed`` (the global torch RNG is left untouched); a model
    that does not take a keyword is a one-line ValueError."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except TypeError as e:
        bad = next((k for k in model_kwargs if repr(k) in str(e)), None)
        if bad is None:
            raise
        raise _ModelArgumentError(f"model {name!r} does not take "
                                  f"{bad}={model_kwargs[bad]!r}") from e


def _model_config(model: nn.Module, name: str, model_kwargs: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """The data config of the built model; with ``img_size``, its input size (a ViT whose
    patches do not tile it is refused: timm would drop the border pixels)."""
    cfg = data_config(model)
    img_size = model_kwargs.get("img_size")
    if img_size is None:
        return cfg
    size = _pair(img_size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"img_size={img_size!r} is not a multiple of the patch size "
                         f"{patch[0]}×{patch[1]} of {name!r}; use e.g. img_size="
                         f"{max(1, round(size[0] / patch[0])) * patch[0]}")
    if getattr(model, "patch_embed", None) is None:  # CNNs: any size, config follows
        cfg["input_size"] = (3, *size)
    return cfg
