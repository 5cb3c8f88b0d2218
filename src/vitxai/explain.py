"""Explain single images: every chosen method's map as an overlay figure, plus the maps.

For each image ``NAME`` this writes ``NAME.png`` (the image and one overlay per method) and
``NAME.safetensors`` (signed maps at input resolution, the native maps and the target), each
atomically. Overlays follow vit-explain's display: the map divided by its maximum (negatives
clipped), bilinearly at input size, JET over the image
(:func:`vitxai.report.figures.overlay`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vitxai import store
from vitxai.data.datasets import ImageDataset
from vitxai.models.adapter import ModelAdapter
from vitxai.report.figures import overlay, overlay_figure
from vitxai.runner import resolve_methods, run_batches

__all__ = ["DEFAULT_METHODS", "explain", "overlay"]

#: what ``vitxai explain`` shows when no methods are named (vit-explain's methods and
#: Chefer et al.'s); on a model other than a ViT, see :func:`vitxai.runner.default_methods`
DEFAULT_METHODS = ("attention_rollout", "grad_rollout", "chefer2021a")


def explain(adapter: ModelAdapter, dataset: ImageDataset, methods: Sequence[str],
            out: str | Path, *, targets: int | None = None,
            method_params: Mapping[str, Mapping[str, Any]] | None = None,
            batch_size: int = 4, seed: int = 0, class_names: Mapping[int, str] | None = None,
            category_index: int | None = None) -> list[Path]:
    """Write overlay figures and maps for every image of ``dataset``.

    Args:
        methods: registry names or aliases.
        targets: the class to explain for every image; None = each image's prediction.
        method_params: per-method parameter overrides.
        category_index: deprecated name of ``targets`` (vit-explain's; until vitxai 0.3).

    Returns:
        The figure paths, in dataset order.
    """
    from safetensors.torch import save_file

    params = resolve_methods(adapter, methods, method_params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = class_names or {}
    if category_index is not None:
        warnings.warn("explain(category_index=...) is deprecated; pass targets=",
                      FutureWarning, stacklevel=2)
        targets = category_index
    target = "prediction" if targets is None else int(targets)
    written: list[Path] = []
    for batch, run in run_batches(adapter, dataset, range(len(dataset)), params,
                                  batch_size=batch_size, seed=seed, target=target):
        if run is None:
            continue
        for i, path in enumerate(batch.paths):
            stem = Path(path).stem or f"image_{batch.indices[i]}"
            target_i, predicted = int(run.targets[i]), int(run.predictions[i])
            image = batch.images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            maps = {n: r.maps[i].float().numpy() for n, r in run.results.items()}
            title = (f"{Path(path).name}: explaining {names.get(target_i, target_i)} "
                     f"(predicted {names.get(predicted, predicted)})")
            figure = overlay_figure(image, maps, title, out / f"{stem}.png")
            tensors = {"target": torch.tensor([target_i])}
            for n, r in run.results.items():
                tensors[f"{n}.map"] = r.maps[i].float().contiguous().clone()
                tensors[f"{n}.native"] = r.native[i].float().contiguous().clone()
            store.atomic_write(out / f"{stem}.safetensors",
                               lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
            written.append(figure)
    return written
