"""Several configurations of one method side by side: named variants and the IDSDS presets.

A run names its methods by *labels*. A label is a registry name or alias (``lime``, ``IG``:
that method with the run's parameters), or a variant:

- ``LABEL=METHOD(NAME=VALUE, ...)``, e.g. ``ig_u=integrated_gradients(baseline=uniform)``;
  values are Python literals, bare words are strings;
- ``idsds:NAME``, one of :data:`IDSDS_PRESETS`, the named explainers of Hesse et al. 2024
  ("Benchmarking the Attribution Quality of Vision Models", NeurIPS D&B) with the
  benchmark's settings; its label is NAME (docs/conventions.md, "Method labels").

Each label is one column in every table, figure and report; a run records the method behind
each variant label (``config["variants"]``), so evaluation rebuilds the same configurations.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from vitxai.methods.base import get_method

PRESET_PREFIX = "idsds:"

#: label → (method, parameters): the benchmark's explainers. Where vitxai's defaults already
#: are the benchmark's settings (IG: 50 Gauss–Legendre points from the zero of the normalised
#: input; SmoothGrad: 4 samples, σ = 1 normalised unit; RISE: 1000 masks, s = 8, p₁ = 0.1)
#: the parameters are empty. IG-U draws one baseline for the whole run, as the benchmark's code
#: does (``draw="run"``); vitxai's own default draws one per image.
IDSDS_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "IxG": ("input_x_gradient", {}),
    "IxG-SG": ("smoothgrad", {"base": "ixg"}),
    "IxG-SG-SQ": ("smoothgrad", {"base": "ixg", "transform": "squared"}),
    "IG": ("integrated_gradients", {}),
    "IG-U": ("integrated_gradients_uniform", {"draw": "run"}),
    "IG-SG": ("smoothgrad", {"base": "ig"}),
    "IG-SG-SQ": ("smoothgrad", {"base": "ig", "transform": "squared"}),
    "RISE": ("rise", {}),
    "RISE-U": ("rise", {"baseline": "uniform_normalized"}),
    "Rollout": ("attention_rollout", {"head_fusion": "mean", "start_layer": 1}),
    "CheferLRP": ("chefer2021a", {"start_layer": 1}),
    "Grad-CAM-ViT": ("attention_gradcam", {}),
    # CNNs: the benchmark ran torchcam on the last stage (vitxai's default target layer), whose
    # Grad-CAM++ and SmoothGrad-CAM++ depart from their papers: legacy=True reproduces them
    "Grad-CAM": ("grad_cam_cnn", {}),
    "Grad-CAM++": ("grad_cam_pp", {"legacy": True}),
    "SG-CAM++": ("smoothgrad_cam_pp", {"legacy": True}),
    "XGrad-CAM": ("xgrad_cam", {}),
    "Layer-CAM": ("layer_cam", {}),
}

_VARIANT = re.compile(r"^\s*([A-Za-z_][\w.+-]*)\s*=\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$",
                      re.S)


class MethodChoice(NamedTuple):
    """One column of a run: its label, the registry method behind it, its own parameters."""

    label: str
    method: str
    params: dict[str, Any]

    @property
    def is_variant(self) -> bool:
        """Whether the label is not simply the method's registry name."""
        return self.label != self.method


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string, as on the command line


def _arguments(text: str, where: str) -> dict[str, Any]:
    """``NAME=VALUE, ...`` → dict (values: literals or bare words)."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args:
        raise ValueError(f"{where}: parameters must look like NAME=VALUE, NAME=VALUE")
    return {kw.arg: _value(ast.get_source_segment(f"f({text})", kw.value) or "")
            for kw in call.keywords if kw.arg is not None}


def parse_choice(text: str) -> MethodChoice:
    """A label as written (``lime``, ``ig_u=integrated_gradients(baseline=uniform)``,
    ``idsds:IG-U``) → :class:`MethodChoice` with the canonical method name.

    Raises:
        ValueError: malformed, an unknown method or preset — one line.
    """
    text = text.strip()
    if text.startswith(PRESET_PREFIX):
        name = text[len(PRESET_PREFIX):]
        if name not in IDSDS_PRESETS:
            raise ValueError(f"unknown preset {text!r}; the IDSDS presets are "
                             f"{', '.join(PRESET_PREFIX + n for n in IDSDS_PRESETS)}")
        method, params = IDSDS_PRESETS[name]
        return MethodChoice(name, get_method(method).name, dict(params))
    if "=" not in text:
        return MethodChoice(get_method(text).name, get_method(text).name, {})
    match = _VARIANT.match(text)
    if match is None:
        raise ValueError(f"method variant {text!r} must look like "
                         "LABEL=METHOD(NAME=VALUE, ...), e.g. "
                         "ig_u=integrated_gradients(baseline=uniform)")
    label, method, args = match.groups()
    params = _arguments(args, f"method variant {label!r}") if args else {}
    return MethodChoice(label, get_method(method).name, params)


def recorded_choices(config: Mapping[str, Any]) -> list[MethodChoice]:
    """The choices a run's ``config.json`` records: each label with its method (variants are
    in ``config["variants"]``) and its recorded parameters."""
    variants = config.get("variants") or {}
    return [MethodChoice(label, variants.get(label, label),
                         # JSON lists back to tuples; a recorded segmentation dict becomes its
                         # dataclass in the method's own parameters
                         {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
            for label, params in config["methods"].items()]
