"""Evaluation preprocessing that follows the model's own timm data config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import timm.data
import torch
from PIL import Image


def eval_transform(data_config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The model's evaluation transform, *without* normalisation.

    Parameters
    ----------
    data_config : the model's timm data config (``timm.data.resolve_model_data_config``); read
        keys: ``input_size`` (C, H, W) (required), ``interpolation`` (default "bicubic"),
        ``crop_pct`` (default timm's 0.875) and ``crop_mode`` (default "center"). ``mean`` and
        ``std`` are ignored: the model adapter normalises, so maps, masks and perturbations
        work on displayable pixels.

    Returns
    -------
    A callable mapping an RGB PIL image to a float32 tensor (3, H, W) with values in [0, 1]
    (resize to ``H / crop_pct`` by the config's interpolation, then crop).
    """
    if "input_size" not in data_config:
        raise ValueError("data_config has no 'input_size'; pass the model's timm data config")
    size = data_config["input_size"]
    # Zero mean and unit std make timm's Normalize the identity while keeping every other
    # step (resize, crop mode, interpolation) exactly as timm evaluates the model.
    return timm.data.create_transform(
        input_size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
        is_training=False,
        interpolation=data_config.get("interpolation", "bicubic"),
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
