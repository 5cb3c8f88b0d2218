"""The runner: resolve methods once, then run every method on a dataset batch by batch.

:func:`resolve_methods` turns method labels (names, aliases, variants and presets, see
:mod:`vitxai.methods.variants`) and parameter overrides into validated parameter dataclasses,
refusing ViT-only methods on other models before any work is done. :func:`run_batch` runs one
batch: one prediction pass, the targets, one :class:`~vitxai.methods.BatchContext` shared by
every method (segmentation, the attention pass), every method, and optionally the unified
masks. :func:`run_batches` streams a dataset through it. ``compare`` and ``explain`` use
them, and so can the metrics that recompute maps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from vitxai.data.datasets import Batch, ImageDataset, iter_batches
from vitxai.masks import MaskParams, unified_masks
from vitxai.methods import Attribution, BatchContext, attribute, get_method
from vitxai.methods.variants import MethodChoice, parse_choice, recorded_choices
from vitxai.models.adapter import ModelAdapter, require_vit

#: what each image's explained class is: its label where known (else the prediction), the
#: prediction, or one fixed class for every image
Target = Literal["label", "prediction"] | int

#: the six methods of the original comparison (the default of ``compare``)
SEED_METHODS: tuple[str, ...] = (
    "lime", "kernel_shap", "integrated_gradients", "gradient_shap", "attention_rollout",
    "chefer2021a",
)


def default_methods(adapter: ModelAdapter, preferred: Sequence[str] = SEED_METHODS
                    ) -> list[str]:
    """The methods to run when none are named: ``preferred`` on a ViT; on any other model
    those of ``preferred`` that are model-agnostic, or, when none is, the model-agnostic
    methods of :data:`SEED_METHODS` (LIME, KernelSHAP, Integrated Gradients, GradientSHAP).
    """
    if adapter.is_vit:
        return list(preferred)
    agnostic = [m for m in preferred if not get_method(m).vit_only]
    return agnostic or [m for m in SEED_METHODS if not get_method(m).vit_only]


class ResolvedMethod(NamedTuple):
    """One column of a run: the registry method behind its label and its validated
    parameters. :func:`~vitxai.methods.attribute` takes it in place of a method name."""

    method: str
    params: Any


def resolve_choices(adapter: ModelAdapter, choices: Sequence[MethodChoice],
                    overrides: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, ResolvedMethod]:
    """Label → :class:`ResolvedMethod`, in the order of ``choices``.

    Parameters, strongest first: the choice's own (a variant's), ``overrides`` keyed by its
    label, ``overrides`` keyed by its method (name or alias: every label of that method; a
    key that names a method is a method key).

    Raises:
        ValueError: no methods, an unknown method or parameter, a bad value, a ViT-only
            method on another model, or one label naming two configurations — before any
            work is done.
    """
    if not choices:
        raise ValueError("no methods selected")
    labels = {c.label for c in choices}
    by_label: dict[str, Mapping[str, Any]] = {}
    by_method: dict[str, Mapping[str, Any]] = {}
    for key, values in (overrides or {}).items():
        try:  # a method's name or alias: every label of that method
            by_method[get_method(key).name] = values
        except ValueError:
            if key not in labels:
                raise
            by_label[key] = values
    resolved: dict[str, ResolvedMethod] = {}
    for c in choices:
        spec = get_method(c.method)
        if spec.vit_only:
            require_vit(adapter, spec.name)
        params = spec.make_params(**{**by_method.get(spec.name, {}),
                                     **by_label.get(c.label, {}), **c.params})
        if c.label in resolved and resolved[c.label] != (spec.name, params):
            raise ValueError(f"label {c.label!r} names two different configurations; give "
                             "each variant its own label")
        resolved[c.label] = ResolvedMethod(spec.name, params)
    return resolved


def resolve_methods(adapter: ModelAdapter, names: Sequence[str],
                    overrides: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, ResolvedMethod]:
    """Label → :class:`ResolvedMethod`, in the order of ``names``.

    Args:
        adapter: the model the methods will run on (ViT-only methods need a ViT).
        names: registry names or aliases, variants ``LABEL=METHOD(NAME=VALUE, ...)`` or
            presets ``idsds:NAME`` (:mod:`vitxai.methods.variants`); a label named twice
            runs once.
        overrides: parameter overrides keyed by method name or alias, or by label, e.g.
            ``{"lime": {"n_samples": 500}}``.

    Raises:
        ValueError: see :func:`resolve_choices`.
    """
    return resolve_choices(adapter, [parse_choice(n) for n in names], overrides)


def recorded_methods(adapter: ModelAdapter, config: Mapping[str, Any]
                     ) -> dict[str, ResolvedMethod]:
    """The methods a run's ``config.json`` recorded, with their recorded parameters."""
    return resolve_choices(adapter, recorded_choices(config))


def choose_targets(labels: torch.Tensor, predictions: torch.Tensor, target: Target
                   ) -> torch.Tensor:
    """The class explained per image (see :data:`Target`); labels < 0 mean unknown."""
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full_like(predictions, target)
    if target not in ("label", "prediction"):
        raise ValueError(f"target={target!r} is not 'label', 'prediction' or a class index")
    use_label = labels >= 0
    if target == "prediction":
        use_label = torch.zeros_like(use_label)
    return torch.where(use_label, labels, predictions)


@dataclass
class BatchRun:
    """One batch run through every method.

    Attributes:
        batch: the decoded batch (images on the CPU, labels, truth masks, skipped items).
        probs: (B, C) softmax of the logits, float32 on the CPU.
        predictions: (B,) predicted classes.
        targets: (B,) explained classes.
        results: label → its :class:`~vitxai.methods.Attribution`, in run order.
        masks: label → (B, H, W) unified bool masks; empty when no mask was asked for.
        started: ``time.perf_counter()`` when the batch arrived (for per-batch timings).
    """

    batch: Batch
    probs: torch.Tensor
    predictions: torch.Tensor
    targets: torch.Tensor
    results: dict[str, Attribution]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    started: float = 0.0

    @property
    def names(self) -> list[str]:
        return list(self.results)


def run_batch(adapter: ModelAdapter, batch: Batch, params: Mapping[str, Any], *,
              seed: int = 0, target: Target = "label", mask: MaskParams | None = None,
              predict_batch_size: int = 64, measure_memory: bool = False,
              started: float | None = None) -> BatchRun:
    """Predict, choose the targets, and run every method of ``params`` on one batch.

    Args:
        batch: a non-empty batch from :func:`~vitxai.data.datasets.iter_batches`.
        params: from :func:`resolve_methods`; methods run in its order and share one
            :class:`~vitxai.methods.BatchContext` (seeded by ``seed`` and the image indices).
        target: see :data:`Target`.
        mask: the unified mask parameters; None = no masks.
        predict_batch_size: images per model call of the prediction pass.
        measure_memory: record each method's peak memory (resets the process's statistics).
    """
    started = time.perf_counter() if started is None else started
    names = list(params)
    x = batch.images.to(adapter.device, adapter.dtype)
    logits = adapter.predict(x, batch_size=predict_batch_size).float().cpu()
    probs, predictions = logits.softmax(-1), logits.argmax(-1)
    targets = choose_targets(batch.labels, predictions, target)
    if not isinstance(target, int) and len(batch.targets) == len(batch):
        # classes the dataset names per image (a targets file) win over the target rule
        targets = torch.where(batch.targets >= 0, batch.targets, targets)
    ctx = BatchContext.for_batch(len(batch), seed, batch.indices,
                                 planned=[params[n].method for n in names])
    results, masks = {}, {}
    for name in names:
        r = attribute(params[name], adapter, x, targets, context=ctx,
                      measure_memory=measure_memory)
        results[name] = r
        if mask is not None:
            masks[name] = unified_masks(r.channels if r.channels is not None else r.maps, mask)
    return BatchRun(batch, probs, predictions, targets, results, masks, started)


def run_batches(adapter: ModelAdapter, dataset: ImageDataset, indices: Sequence[int],
                params: Mapping[str, Any], *, batch_size: int, seed: int = 0,
                target: Target = "label", mask: MaskParams | None = None,
                predict_batch_size: int | None = None, measure_memory: bool = False
                ) -> Iterator[tuple[Batch, BatchRun | None]]:
    """Decode ``indices`` of ``dataset`` ``batch_size`` at a time and run each batch.

    Yields ``(batch, run)``; ``run`` is None for a batch whose images were all unreadable
    (``batch.skipped`` lists them). ``predict_batch_size`` defaults to ``batch_size``; the
    other arguments are those of :func:`run_batch`.
    """
    for batch in iter_batches(dataset, indices, batch_size):
        started = time.perf_counter()
        if len(batch) == 0:
            yield batch, None
            continue
        yield batch, run_batch(adapter, batch, params, seed=seed, target=target, mask=mask,
                               predict_batch_size=predict_batch_size or batch_size,
                               measure_memory=measure_memory, started=started)
