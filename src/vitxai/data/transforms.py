"""Evaluation preprocessing: the model's own timm data config, visible and controllable.

:func:`eval_transform` maps a PIL image to the model's input (resize, crop, no
normalisation) exactly as timm evaluates the model, unless a :class:`Preprocessing` overrides
a setting. The returned :class:`EvalTransform` also applies the *same* geometry to ground-truth
masks (nearest interpolation), reports how much of an image the crop removes, and describes
itself in one line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm.data
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data.transforms import CenterCropOrPad, str_to_interp_mode

#: interpolations a :class:`Preprocessing` accepts (timm's names)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: a crop that removes more than this share of an image's area is warned about
CROP_WARN_FRACTION = 0.05


def _triple(name: str, value: Sequence[float] | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be three finite numbers (R G B); got {list(value)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """Overrides of the model's evaluation preprocessing; None / False = the model's own.

    Attributes:
        crop_pct: share of the resized image kept by the centre crop, in (0, 1]: the image is
            resized to input size / crop_pct, then cropped to the input size (timm's rule).
        resize: resize the shorter side to this many pixels, then centre-crop to the input
            size (instead of input size / crop_pct).
        interpolation: one of :data:`INTERPOLATIONS`.
        mean, std: the model adapter's normalisation (three floats each).
        no_crop: use the whole image: resize to exactly the input size, no crop (the aspect
            ratio changes unless the image has the input's).
    """

    crop_pct: float | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    no_crop: bool = False

    def __post_init__(self) -> None:
        if self.crop_pct is not None and not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"crop_pct={self.crop_pct} must lie in (0, 1]")
        if self.resize is not None and int(self.resize) < 1:
            raise ValueError(f"resize={self.resize} must be a positive number of pixels")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.no_crop and (self.crop_pct is not None or self.resize is not None):
            raise ValueError("no_crop=True excludes crop_pct and resize (it resizes to exactly "
                             "the input size)")
        if self.crop_pct is not None and self.resize is not None:
            raise ValueError("give crop_pct or resize, not both")
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        object.__setattr__(self, "std", _triple("std", self.std))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std={list(self.std)} must be positive")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Preprocessing:
        """From a mapping holding some of its keys (others ignored; None = default)."""
        kept = {k: values[k] for k in cls.keys() if values.get(k) is not None}
        return cls(**kept)

    def record(self) -> dict[str, Any]:
        """The non-default settings (JSON-ready); empty for the model's own preprocessing."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def is_default(self) -> bool:
        return not self.record()

    def normalisation(self, data_config: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        """(mean, std) the adapter applies."""
        mean = self.mean if self.mean is not None else data_config.get(
            "mean", timm.data.IMAGENET_DEFAULT_MEAN)
        std = self.std if self.std is not None else data_config.get(
            "std", timm.data.IMAGENET_DEFAULT_STD)
        return [float(v) for v in mean], [float(v) for v in std]


class EvalTransform:
    """An RGB PIL image → float32 (3, H, W) in [0, 1]; also masks, geometry and a description.

    Built by :func:`eval_transform`; see there.
    """

    def __init__(self, data_config: Mapping[str, Any],
                 preprocessing: Preprocessing | None = None) -> None:
        if "input_size" not in data_config:
            raise ValueError("data_config has no 'input_size'; pass the model's timm data "
                             "config")
        p = preprocessing or Preprocessing()
        self.preprocessing = p
        size = data_config["input_size"]
        size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.size = (int(size[-2]), int(size[-1]))  # (H, W)
        self.interpolation = p.interpolation or data_config.get("interpolation") or "bicubic"
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        self.crop_pct = float(p.crop_pct or data_config.get("crop_pct")
                              or timm.data.DEFAULT_CROP_PCT)
        self.crop_mode = data_config.get("crop_mode") or "center"
        if p.resize is not None or p.no_crop:
            self.crop_mode = "center"
        self.resize = p.resize
        self.no_crop = p.no_crop
        self.mean, self.std = p.normalisation(data_config)

    # geometry ---------------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of an image of ``width`` × ``height`` after the resize."""
        th, tw = self.size
        if self.no_crop:
            return th, tw
        if self.resize is not None:
            short, long = min(width, height), max(width, height)
            new_long = int(self.resize * long / short)
            return (new_long, self.resize) if width <= height else (self.resize, new_long)
        sh, sw = (math.floor(x / self.crop_pct) for x in self.size)
        if self.crop_mode == "squash":
            return sh, sw
        if self.crop_mode == "border" or sh != sw:  # timm's ResizeKeepRatio
            longest = 1.0 if self.crop_mode == "border" else 0.0
            rh, rw = height / sh, width / sw
            ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
            return round(height / ratio), round(width / ratio)
        short, long = min(width, height), max(width, height)  # torchvision Resize(int)
        new_long = int(sh * long / short)
        return (new_long, sh) if width <= height else (sh, new_long)

    def kept_fraction(self, width: int, height: int) -> float:
        """Share of an image's area that survives the crop (1.0 without a crop)."""
        rh, rw = self.resized_size(width, height)
        th, tw = self.size
        return min(1.0, th / rh) * min(1.0, tw / rw)

    def _geometry(self, img: Image.Image, interpolation: str, fill: Any) -> Image.Image:
        h, w = self.resized_size(*img.size)
        if (h, w) != (img.size[1], img.size[0]):
            img = F.resize(img, [h, w], interpolation=str_to_interp_mode(interpolation))
        if self.crop_mode == "border":
            return CenterCropOrPad(self.size, fill=fill)(img)
        return F.center_crop(img, list(self.size)) if (h, w) != self.size else img

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # border mode pads with black, as timm's transform with zero mean did before
        return F.to_tensor(self._geometry(img, self.interpolation, 0))

    def mask(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A bool (h, w) mask at the original image size → bool (H, W), by the image's own
        resize and crop with nearest interpolation."""
        m = np.asarray(mask).astype(bool)
        if m.ndim != 2:
            raise ValueError(f"a mask must be 2-d (H, W); got shape {m.shape}")
        img = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
        out = np.asarray(self._geometry(img, "nearest", 0))
        return torch.from_numpy(out > 127)

    # records ----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The effective preprocessing (JSON-ready)."""
        out: dict[str, Any] = {"input_size": list(self.size),
                               "interpolation": self.interpolation}
        if self.no_crop:
            out["resize"] = "exact"
        elif self.resize is not None:
            out["resize"] = self.resize
        else:
            out |= {"crop_pct": self.crop_pct, "crop_mode": self.crop_mode}
        return out | {"mean": self.mean, "std": self.std}

    def describe(self) -> str:
        """One line, e.g. "resize the shorter side to 256 px (bicubic), centre-crop 224×224
        (crop_pct 0.875); normalise with mean [...] std [...]"."""
        h, w = self.size
        if self.no_crop:
            geometry = f"resize to exactly {h}×{w} ({self.interpolation}), no crop"
        elif self.resize is not None:
            geometry = (f"resize the shorter side to {self.resize} px ({self.interpolation}), "
                        f"centre-crop {h}×{w}")
        elif self.crop_mode == "center":
            sh, sw = (math.floor(x / self.crop_pct) for x in self.size)
            side = f"{sh} px" if sh == sw else f"cover {sh}×{sw}"
            geometry = (f"resize the shorter side to {side} ({self.interpolation}), "
                        f"centre-crop {h}×{w} (crop_pct {self.crop_pct:g})")
        else:
            geometry = (f"{self.crop_mode} resize ({self.interpolation}) and crop to {h}×{w} "
                        f"(crop_pct {self.crop_pct:g})")
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"{geometry}; normalise with mean ({mean}) std ({std})"


def eval_transform(data_config: Mapping[str, Any],
                   preprocessing: Preprocessing | None = None) -> EvalTransform:
    """The model's evaluation transform, *without* normalisation.

    Parameters
    ----------
    data_config : the model's timm data config (``timm.data.resolve_model_data_config``); read
        keys: ``input_size`` (C, H, W) (required), ``interpolation`` (default "bicubic"),
        ``crop_pct`` (default timm's 0.875) and ``crop_mode`` (default "center"). ``mean`` and
        ``std`` are only described: the model adapter normalises, so maps, masks and
        perturbations work on displayable pixels.
    preprocessing : overrides (:class:`Preprocessing`); None = the model's own, which gives
        exactly timm's evaluation transform.

    Returns
    -------
    An :class:`EvalTransform`: a callable mapping an RGB PIL image to a float32 tensor
    (3, H, W) with values in [0, 1] (resize to ``H / crop_pct`` by the config's interpolation,
    then centre-crop), with :meth:`EvalTransform.mask` for ground-truth masks.
    """
    return EvalTransform(data_config, preprocessing)
