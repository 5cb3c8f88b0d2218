"""Hugging Face ``transformers`` ViTs, explained as the equivalent timm VisionTransformer.

``load_model("hf:ORG/NAME")`` (the hub) or ``load_model("hf:/path/to/dir")`` (a
``save_pretrained`` directory, offline) loads the transformers model, builds a timm
``VisionTransformer`` of the same shape (``VisionTransformerDistilled`` for DeiT with a
distillation head), copies every weight into it and checks on a seeded random input that both
compute the same outputs (:func:`check_parity`). Every vitxai method (hooks on timm blocks, the
explicit relevance passes and their rule checks) then runs unchanged on the same function.

Supported architectures (``config.architectures[0]``): see :data:`ARCHITECTURES`.

Weight map, transformers module → timm (D = hidden size; transformers 5 names, then those of
transformers 4 where they differ; whichever the installed version has is used):

- ``embeddings.cls_token`` (CLIP: ``class_embedding``) → ``cls_token`` (1, 1, D)
- ``embeddings.distillation_token`` (DeiT) → ``dist_token`` with the teacher head, else
  ``reg_token`` (a token no head reads)
- ``patch_embeddings.projection`` (CLIP: ``patch_embedding``, no bias) → ``patch_embed.proj``
- the position embedding at the input size, by the HF module's own
  ``interpolate_pos_encoding`` (the stored one at the config's size) → ``pos_embed``
  (1, prefix + gh·gw, D)
- ``pre_layrnorm`` (CLIP) → ``norm_pre``
- per layer: ``layernorm_before`` / ``norm1`` / ``layer_norm1`` → ``norm1``; the q, k, v
  projections (``attention.q_proj`` / ``attention.attention.query`` / ``self_attn.q_proj``)
  → the fused ``attn.qkv`` (3D, D), rows q, k, v; the output projection (``attention.o_proj``
  / ``attention.output.dense`` / ``self_attn.out_proj``) → ``attn.proj``; ``layer_scale1/2``
  (DINOv2) → ``ls1/ls2``; ``layernorm_after`` / ``norm2`` / ``layer_norm2`` → ``norm2``;
  ``mlp.fc1/fc2`` (``intermediate.dense`` / ``output.dense``) → ``mlp.fc1/fc2``
- ``layernorm`` (CLIP: ``post_layernorm``) → ``norm``
- ``classifier`` (ViT, DeiT) → ``head``; ``cls_classifier`` and ``distillation_classifier``
  → ``head`` and ``head_dist`` (timm's eval logits are their mean, as HF's); DINOv2's
  ``classifier`` on concat(CLS, mean patch token) → an attached
  ``LinearProbe("cls+mean_patch")``

Not converted: ViTModel's pooler (dense + tanh on CLS; the probe reads tokens), DINOv2's mask
token (pre-training only). CLIP applies ``post_layernorm`` to the pooled CLS token only; timm
applies its final ``norm`` to every token, so a probe's read-outs (CLS or patch mean) read
post-normed tokens and the CLS read-out equals HF's ``pooler_output``.

Headless models (ViTModel, Dinov2Model, CLIPVisionModel, the vision tower of a CLIPModel) are
built with ``num_classes=0`` and refused by
:func:`~vitxai.models.adapter.check_classifier_head` until a probe is attached.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.data
import torch
from timm.layers import GELUTanh, QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitxai.models.adapter import ModelAdapter
from vitxai.models.loading import (
    ModelLoadError,
    _pair,
    adapt,
    hub_reachable,
    key_mismatch,
    with_probe,
)
from vitxai.models.probe import LinearProbe, attach_probe

HF_PREFIX = "hf:"
#: the relative output difference above which a conversion is refused
PARITY_TOLERANCE = 1e-4
_INSTALL = 'pip install -e ".[hf]"'


@dataclass(frozen=True)
class HFArchitecture:
    """How one transformers architecture becomes a timm ViT.

    Attributes:
        family: "vit", "deit", "dinov2" or "clip" (module names, tokens, preprocessing).
        head: "none" (headless), "cls" (a linear head on CLS), "distilled" (CLS and
            distillation heads, mean of both) or "cls+mean_patch" (DINOv2's classifier).
        load_as: the transformers class to load, when it is not the architecture itself
            (the vision tower of a full CLIPModel checkpoint).
    """

    family: str
    head: str
    load_as: str | None = None


#: the architectures ``hf:`` loads, by ``config.architectures[0]``
ARCHITECTURES: dict[str, HFArchitecture] = {
    "ViTForImageClassification": HFArchitecture("vit", "cls"),
    "ViTModel": HFArchitecture("vit", "none"),
    "DeiTForImageClassification": HFArchitecture("deit", "cls"),
    "DeiTForImageClassificationWithTeacher": HFArchitecture("deit", "distilled"),
    "Dinov2ForImageClassification": HFArchitecture("dinov2", "cls+mean_patch"),
    "Dinov2Model": HFArchitecture("dinov2", "none"),
    "CLIPVisionModel": HFArchitecture("clip", "none"),
    "CLIPModel": HFArchitecture("clip", "none", load_as="CLIPVisionModel"),
}

#: HF ``hidden_act`` → timm activation (HF's "gelu" is the exact erf GELU)
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU, "gelu_pytorch_tanh": GELUTanh, "gelu_new": GELUTanh,
    "quick_gelu": QuickGELU,
}

#: where each part of a timm block lives in a transformers layer, transformers 5 names first
_LAYER_PARTS: dict[str, tuple[str, ...]] = {
    "norm1": ("layernorm_before", "norm1", "layer_norm1"),
    "q": ("attention.q_proj", "attention.attention.query", "self_attn.q_proj"),
    "k": ("attention.k_proj", "attention.attention.key", "self_attn.k_proj"),
    "v": ("attention.v_proj", "attention.attention.value", "self_attn.v_proj"),
    "attn.proj": ("attention.o_proj", "attention.output.dense", "self_attn.out_proj"),
    "norm2": ("layernorm_after", "norm2", "layer_norm2"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}

#: preprocessing of a model without ``preprocessor_config.json``, as the family's hub
#: checkpoints ship it (ViT: ViTImageProcessor's mean/std 0.5 and squash resize; DeiT: ImageNet
#: mean/std, squash resize to 256/224 of the input, centre crop; DINOv2: ImageNet, shorter side
#: to 256/224 of the input, centre crop; CLIP: its own mean/std, shorter side to the input)
_DEFAULT_PREPROCESSING: dict[str, dict[str, Any]] = {
    "vit": {"mean": timm.data.IMAGENET_INCEPTION_MEAN, "std": timm.data.IMAGENET_INCEPTION_STD,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"},
    "deit": {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD,
             "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "squash"},
    "dinov2": {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD,
               "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
    "clip": {"mean": timm.data.OPENAI_CLIP_MEAN, "std": timm.data.OPENAI_CLIP_STD,
             "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"},
}
#: PIL resampling codes of HF image processors → timm interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"hf: models need the transformers package: {_INSTALL}") from None
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' load reports and progress bars (restored afterwards): vitxai
    checks the loaded weights itself and says what is wrong in one line."""
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _source(ref: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local directory) for the text
    after ``hf:``; a path that does not exist is a one-line error, not a hub lookup."""
    if not ref:
        raise ModelLoadError("hf: needs a hub name (hf:ORG/NAME) or a local directory "
                             "(hf:/path/to/dir)")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"hf:{ref} is a file; pass the directory that "
                                 "save_pretrained wrote (config.json and weights)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"hf:{ref} has no config.json; pass a directory that "
                                 "save_pretrained wrote")
        return str(path), True
    # hub names are NAME or ORG/NAME; anything else is meant as a path
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref) or ref.startswith("."):
        raise ModelLoadError(f"hf:{ref}: no such directory")
    return ref, False


def _load_error(ref: str, offline: bool, error: Exception) -> ModelLoadError:
    if offline:
        return ModelLoadError(f"cannot load hf:{ref}: the model hub cannot be reached and no "
                              "cached copy was found; pass a local directory saved with "
                              "save_pretrained as hf:/path/to/dir")
    text = str(error).strip()
    why = text.splitlines()[0][:200] if text else type(error).__name__
    return ModelLoadError(f"cannot load hf:{ref}: {why}")


def _architecture(config: Any, ref: str) -> tuple[str, HFArchitecture]:
    names = list(getattr(config, "architectures", None) or [])
    name = names[0] if names else None
    if name not in ARCHITECTURES:
        found = name or f"none recorded (model_type {getattr(config, 'model_type', '?')!r})"
        raise ModelLoadError(f"hf:{ref}: architecture {found} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    vision = getattr(config, "vision_config", config)
    if arch.family == "dinov2" and getattr(vision, "use_swiglu_ffn", False):
        raise ModelLoadError(f"hf:{ref}: DINOv2 with a SwiGLU MLP (ViT-g) is not supported "
                             "(vitxai's relevance rules assume a fc1-GELU-fc2 MLP)")
    if getattr(vision, "num_channels", 3) != 3:
        raise ModelLoadError(f"hf:{ref}: {vision.num_channels}-channel input is not "
                             "supported (vitxai explains RGB images)")
    return name, arch


def _load_hf(transformers: Any, name: str, arch: HFArchitecture, source: str, config: Any,
             pretrained: bool, local_only: bool, ref: str) -> nn.Module:
    """The transformers model in eval mode and float32; a checkpoint that lacks weights the
    conversion reads is refused (HF would fill them with random numbers)."""
    cls = getattr(transformers, arch.load_as or name)
    if not pretrained:
        model = cls(getattr(config, "vision_config", config) if arch.load_as else config)
        return model.float().eval()
    model, info = cls.from_pretrained(source, local_files_only=local_only,
                                      output_loading_info=True)
    # unused by the conversion: ViTModel's pooler, DINOv2's pre-training mask token
    missing = [k for k in info.get("missing_keys", ())
               if "pooler" not in k and "mask_token" not in k]
    if missing:
        raise ModelLoadError(f"hf:{ref}: the checkpoint lacks {len(missing)} weights of "
                             f"{name} (first: {', '.join(sorted(missing)[:3])}); "
                             "transformers would make them up at random")
    return model.float().eval()


def _preprocessor(source: str, local: bool, local_only: bool) -> dict[str, Any] | None:
    """``preprocessor_config.json`` of the model as a dict, or None when it has none."""
    if local:
        path = Path(source) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(source, "preprocessor_config.json", local_files_only=local_only)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return json.loads(Path(path).read_text())


def _size(value: Any, square: bool) -> dict[str, int] | None:
    """An HF ``size`` / ``crop_size`` entry as a dict; an int is square for ViT and DeiT
    processors and the shorter side for CLIP and DINOv2 ones (HF's ``default_to_square``)."""
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    return value if isinstance(value, dict) else None


def _crop_pct(crop: int, resized: int) -> float:
    """crop / resized, nudged down so that timm's floor(crop / crop_pct) gives ``resized``."""
    pct = min(1.0, crop / resized)
    while pct < 1.0 and math.floor(crop / pct) < resized:
        pct = math.nextafter(pct, 0.0)
    return pct


def _geometry(pre: Mapping[str, Any], family: str
              ) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """(timm data-config geometry, (H, W) the HF processor outputs) of a preprocessor config.

    ``size`` {"height", "width"} is a squash resize, {"shortest_edge"} a resize keeping the
    aspect ratio; ``crop_size`` (when ``do_center_crop``) the centre crop after it.
    """
    size = _size(pre.get("size"), square=family in ("vit", "deit"))
    crop = _size(pre.get("crop_size"), square=True)
    if not size or not ("shortest_edge" in size or "height" in size):
        return {}, None
    squash = "shortest_edge" not in size
    resized = int(size["height"] if squash else size["shortest_edge"])
    if pre.get("do_center_crop", crop is not None) and crop and "height" in crop:
        out = (int(crop["height"]), int(crop["width"]))
    else:
        out = (resized, int(size["width"])) if squash else (resized, resized)
    geometry = {"crop_pct": _crop_pct(out[0], resized),
                "crop_mode": "squash" if squash else "center"}
    return geometry, out


def hf_data_config(pre: Mapping[str, Any] | None, family: str, input_size: tuple[int, int]
                   ) -> dict[str, Any]:
    """The timm-style data config (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode``) of an HF image processor config, or of the family's defaults
    (:data:`_DEFAULT_PREPROCESSING`) where it says nothing.

    Args:
        pre: the parsed ``preprocessor_config.json`` (None: none).
        family: "vit", "deit", "dinov2" or "clip".
        input_size: (H, W) of the model as built.
    """
    cfg = dict(_DEFAULT_PREPROCESSING[family], input_size=(3, *input_size))
    if pre:
        if pre.get("image_mean") is not None:
            cfg["mean"] = tuple(float(v) for v in pre["image_mean"])
        if pre.get("image_std") is not None:
            cfg["std"] = tuple(float(v) for v in pre["image_std"])
        if pre.get("resample") in _RESAMPLE:
            cfg["interpolation"] = _RESAMPLE[pre["resample"]]
        cfg |= _geometry(pre, family)[0]
    return cfg


def _body(model: nn.Module) -> nn.Module:
    """The transformer under a task head (``model.vit``, ``.deit``, ``.dinov2``), and CLIP's
    vision tower where it is nested (transformers 4: ``CLIPVisionModel.vision_model``)."""
    body = model.base_model
    return getattr(body, "vision_model", body)


def _part(module: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    for path in paths:
        try:
            return module.get_submodule(path)
        except AttributeError:
            continue
    raise ModelLoadError(f"cannot find {what} ({' or '.join(paths)}) in "
                         f"{type(module).__name__}; this transformers version is not supported")


def _timm_model(config: Any, arch: HFArchitecture, img_size: tuple[int, int]
                ) -> VisionTransformer:
    """An uninitialised timm ViT of the HF config's shape (every weight is loaded after)."""
    act = _ACTIVATIONS.get(config.hidden_act)
    if act is None:
        raise ModelLoadError(f"activation {config.hidden_act!r} is not supported; supported: "
                             f"{', '.join(_ACTIVATIONS)}")
    dim = config.hidden_size
    mlp_ratio = config.mlp_ratio if arch.family == "dinov2" else config.intermediate_size / dim
    kwargs: dict[str, Any] = dict(
        img_size=img_size, patch_size=_pair(config.patch_size), embed_dim=dim,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=mlp_ratio, qkv_bias=bool(getattr(config, "qkv_bias", True)),
        norm_layer=functools.partial(nn.LayerNorm, eps=config.layer_norm_eps),
        act_layer=act, num_classes=config.num_labels if arch.head in ("cls", "distilled") else 0,
        weight_init="skip",
    )
    if arch.family == "dinov2":
        kwargs["init_values"] = config.layerscale_value  # LayerScale modules; γ is loaded
    if arch.family == "clip":
        kwargs["pre_norm"] = True  # pre_layrnorm; timm then builds the patch conv without bias
    if arch.head == "distilled":
        return VisionTransformerDistilled(**kwargs)
    if arch.family == "deit":
        kwargs["reg_tokens"] = 1  # the distillation token, read by no head, as a register
    return VisionTransformer(**kwargs)


def _pos_embed(body: nn.Module, prefix: int, img_size: tuple[int, int]) -> torch.Tensor:
    """(1, prefix + gh·gw, D): HF's position embedding at ``img_size``, by the HF module's own
    ``interpolate_pos_encoding`` (the stored one at the config's size), so that the timm model
    computes exactly HF's function there (DINOv2 interpolates at every forward)."""
    emb = body.embeddings
    patch = _pair(body.config.patch_size)
    tokens = prefix + (img_size[0] // patch[0]) * (img_size[1] // patch[1])
    probe = torch.zeros(1, tokens, body.config.hidden_size)
    with torch.no_grad():
        pos = emb.interpolate_pos_encoding(probe, img_size[0], img_size[1])
    return pos.detach().clone()


def _timm_state(hf: nn.Module, arch: HFArchitecture, pos_embed: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """The timm state dict of ``hf`` (see the module's weight map)."""
    body = _body(hf)
    emb = body.embeddings
    state: dict[str, torch.Tensor] = {"pos_embed": pos_embed}

    def linear(prefix: str, module: nn.Module) -> None:
        state[f"{prefix}.weight"] = module.weight
        if getattr(module, "bias", None) is not None:
            state[f"{prefix}.bias"] = module.bias

    if arch.family == "clip":
        state["cls_token"] = emb.class_embedding.reshape(1, 1, -1)
        linear("patch_embed.proj", emb.patch_embedding)
        linear("norm_pre", body.pre_layrnorm)
    else:
        state["cls_token"] = emb.cls_token
        linear("patch_embed.proj", emb.patch_embeddings.projection)
    if arch.family == "deit":
        state["dist_token" if arch.head == "distilled" else "reg_token"] = emb.distillation_token
    layers = _part(body, ("layers", "encoder.layer", "encoder.layers"), "the layer list")
    for i, layer in enumerate(layers):
        q, k, v = (_part(layer, _LAYER_PARTS[n], f"layer {i} {n}") for n in "qkv")
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        if q.bias is not None:
            state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
        for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            linear(f"blocks.{i}.{name}", _part(layer, _LAYER_PARTS[name], f"layer {i} {name}"))
        if arch.family == "dinov2":
            state[f"blocks.{i}.ls1.gamma"] = layer.layer_scale1.lambda1
            state[f"blocks.{i}.ls2.gamma"] = layer.layer_scale2.lambda1
    linear("norm", body.post_layernorm if arch.family == "clip" else body.layernorm)
    if arch.head == "cls":
        linear("head", hf.classifier)
    elif arch.head == "distilled":
        linear("head", hf.cls_classifier)
        linear("head_dist", hf.distillation_classifier)
    return {k: v.detach() for k, v in state.items()}


def convert(hf: nn.Module, name: str, img_size: tuple[int, int] | None = None
            ) -> VisionTransformer:
    """The timm ViT computing the same function as the transformers model ``hf``.

    Args:
        hf: a model of one of :data:`ARCHITECTURES` (CLIPModel: its CLIPVisionModel).
        name: its architecture name, a key of :data:`ARCHITECTURES`.
        img_size: (H, W) input size; None = the config's ``image_size``. A multiple of the
            patch size; the position embedding is HF's own interpolation to that grid.

    Returns:
        A timm ``VisionTransformer`` (``VisionTransformerDistilled`` for DeiT with teacher)
        in eval mode; DINOv2's classifier becomes an attached ``LinearProbe`` on
        concat(CLS, mean of patch tokens), headless models have ``num_classes == 0``.

    Raises:
        ModelLoadError: a layout or shape the conversion does not know.
    """
    arch = ARCHITECTURES[name]
    config = _body(hf).config
    size = img_size or _pair(config.image_size)
    model = _timm_model(config, arch, size)
    pos = _pos_embed(_body(hf), model.num_prefix_tokens, size)
    state = _timm_state(hf, arch, pos)
    problem = key_mismatch(state, model)
    if problem is not None:
        raise ModelLoadError(f"cannot convert {name} into a timm ViT: {problem}")
    model.load_state_dict(state, strict=True)
    if arch.head == "cls+mean_patch":
        probe = LinearProbe("cls+mean_patch", config.hidden_size, config.num_labels,
                            model.num_prefix_tokens)
        with torch.no_grad():
            probe.linear.weight.copy_(hf.classifier.weight)
            probe.linear.bias.copy_(hf.classifier.bias)
        attach_probe(model, probe, name)
    return model.eval()


def _reference(hf: nn.Module, arch: HFArchitecture, x: torch.Tensor) -> torch.Tensor:
    """HF's output on normalised ``x``: logits (B, C), or for headless models the final
    normed tokens (B, N, D) (CLIP: post_layernorm of every token, as timm's ``norm``)."""
    kwargs = {} if arch.family == "dinov2" else {"interpolate_pos_encoding": True}
    out = hf(pixel_values=x, **kwargs)
    if arch.head != "none":
        return out.logits
    tokens = out.last_hidden_state
    return _body(hf).post_layernorm(tokens) if arch.family == "clip" else tokens


def check_parity(hf: nn.Module, model: nn.Module, name: str, img_size: tuple[int, int],
                 seed: int = 0, tolerance: float = PARITY_TOLERANCE) -> float:
    """Run the HF model and its conversion on one seeded random input; return the largest
    output difference relative to the output scale.

    Raises:
        ModelLoadError: one line naming the architecture and the difference, when it exceeds
            ``tolerance`` (a variant the conversion does not reproduce).
    """
    arch = ARCHITECTURES[name]
    x = torch.randn(1, 3, *img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = _reference(hf, arch, x)
        out = model(x) if arch.head != "none" else model.forward_features(x)
    diff = (out - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    if not diff <= tolerance * scale:
        raise ModelLoadError(f"the timm conversion of {name} does not reproduce the Hugging "
                             f"Face model: outputs differ by up to {diff:.3g} (max |output| "
                             f"{scale:.3g}); this variant is not supported")
    return diff / scale


def build_hf_model(name: str, *, img_size: int | tuple[int, int] | None = None,
                   pretrained: bool = True, seed: int = 0
                   ) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load an ``hf:`` model and convert it: (timm model, its data config), checked by
    :func:`check_parity`, on the CPU.

    Args:
        name: "hf:ORG/NAME" (hub; offline: from the cache) or "hf:/path/to/dir" (a
            ``save_pretrained`` directory).
        img_size: input size (a multiple of the patch size); None = the config's
            ``image_size``, for DINOv2 the size its image processor crops to (HF runs
            facebook/dinov2-* at 224 although their config says 518).
        pretrained: False = the architecture with random weights drawn from ``seed``.
        seed: seeds everything random while loading (the global torch RNG is left untouched).

    Raises:
        ModelLoadError: transformers missing, no such directory, hub unreachable without a
            cached copy, unsupported architecture or variant, incomplete checkpoint.
        ValueError: ``img_size`` not a multiple of the patch size.
    """
    transformers = _import_transformers()
    ref = name.removeprefix(HF_PREFIX)
    source, local = _source(ref)
    offline = not local and not hub_reachable()  # then from the cache only, failing fast
    with torch.random.fork_rng(devices=[]), _quiet(transformers):
        torch.manual_seed(seed)
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
            arch_name, arch = _architecture(config, ref)
            hf = _load_hf(transformers, arch_name, arch, source, config, pretrained, offline,
                          ref)
            pre = _preprocessor(source, local, offline)
        except ModelLoadError:
            raise
        except Exception as e:  # OSError (not found, offline), ValueError (unknown type)
            raise _load_error(ref, offline, e) from e
        config = _body(hf).config
        patch = _pair(config.patch_size)
        if img_size is not None:
            size = _pair(img_size)
        elif arch.family == "dinov2" and pre is not None:
            size = _geometry(pre, arch.family)[1] or _pair(config.image_size)
        else:
            size = _pair(config.image_size)
        if size[0] % patch[0] or size[1] % patch[1]:
            shown = img_size if img_size is not None else size
            raise ValueError(f"img_size={shown!r} is not a multiple of the patch size "
                             f"{patch[0]}×{patch[1]} of {name!r}; use e.g. img_size="
                             f"{max(1, round(size[0] / patch[0])) * patch[0]}")
        try:
            model = convert(hf, arch_name, size)
        except ModelLoadError as e:
            raise ModelLoadError(f"hf:{ref}: {e}") from None
    try:
        check_parity(hf, model, arch_name, size)
    except ModelLoadError as e:
        raise ModelLoadError(f"hf:{ref}: {e}") from None
    return model, hf_data_config(pre, arch.family, size)


def load_hf_model(name: str, *, pretrained: bool = True, checkpoint: Any = None,
                  checkpoint_key: str | None = None, device: torch.device | str = "cpu",
                  seed: int = 0, precision: str = "fp32",
                  probe: str | Path | LinearProbe | None = None, features_only: bool = False,
                  **model_kwargs: Any) -> ModelAdapter:
    """:func:`~vitxai.models.loading.load_model` for ``hf:`` names: :func:`build_hf_model`,
    with ``probe`` attached as its classifier (see :func:`~vitxai.models.loading.with_probe`),
    wrapped by :func:`~vitxai.models.loading.adapt` with the HF preprocessing.

    Raises:
        ValueError: ``checkpoint`` (the directory holds the weights), ``num_classes`` (the
            classifier comes with the weights) or another keyword than ``img_size``.
        ModelLoadError: see :func:`build_hf_model`.
        ProbeError: a probe file that cannot be read or does not fit the model.

    A headless model (ViTModel, Dinov2Model, CLIP) without ``probe`` is refused by ``adapt``
    (ValueError, :func:`~vitxai.models.adapter.check_classifier_head`) unless
    ``features_only`` (for ``vitxai probe``'s features).
    """
    if checkpoint is not None or checkpoint_key is not None:
        raise ValueError(f"{name!r}: checkpoint does not apply to hf: models (the directory "
                         "or hub repository holds the weights)")
    if "num_classes" in model_kwargs:
        raise ValueError(f"{name!r}: num_classes does not apply to hf: models (the classifier "
                         "comes with the weights; a headless model needs a probe)")
    other = sorted(set(model_kwargs) - {"img_size"})
    if other:
        raise ValueError(f"{name!r}: hf: models take img_size only, not {', '.join(other)}")
    model, cfg = build_hf_model(name, img_size=model_kwargs.get("img_size"),
                                pretrained=pretrained, seed=seed)
    if probe is not None:
        with_probe(model, probe, name)
    return adapt(model.to(device), name, cfg, features_only).set_precision(precision)
