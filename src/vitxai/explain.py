"""Explain single images: every chosen method's map as an overlay figure, plus the maps.

For each image ``NAME`` this writes ``NAME.png`` (the image and one overlay per method) and
``NAME.safetensors`` (signed maps at input resolution, the native maps and the target).
Overlays follow vit-explain's display: the map divided by its maximum (negatives clipped),
bilinearly at input size, JET over the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitxai.data.datasets import ImageDataset, iter_batches
from vitxai.methods import BatchContext, attribute, get_method
from vitxai.models.adapter import ModelAdapter


def overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET overlay of max(map, 0)/max on an (H, W, 3) image in [0, 1]; returns (H, W, 3)."""
    import matplotlib

    pos = np.clip(attribution, 0, None)
    peak = pos.max()
    heat = matplotlib.colormaps["jet"](pos / peak if peak > 0 else pos)[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)


def _figure(image: np.ndarray, maps: Mapping[str, np.ndarray], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(maps) + 1
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 3.0), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (name, m) in zip(axes[0, 1:], maps.items(), strict=True):
        ax.imshow(overlay(image, m))
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explain(adapter: ModelAdapter, dataset: ImageDataset, methods: Sequence[str],
            out: str | Path, *, category_index: int | None = None,
            method_params: Mapping[str, Mapping[str, Any]] | None = None,
            batch_size: int = 4, seed: int = 0, class_names: Mapping[int, str] | None = None
            ) -> list[Path]:
    """Write overlay figures and maps for every image of ``dataset``.

    Args:
        methods: registry names or aliases.
        category_index: the class to explain; None = each image's prediction.
        method_params: per-method parameter overrides.

    Returns:
        The figure paths, in dataset order.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [get_method(m) for m in methods]
    for spec in specs:
        if spec.vit_only and not adapter.is_vit:
            raise ValueError(f"method {spec.name!r} needs a ViT; {adapter.name!r} is not one")
    overrides = {get_method(k).name: v for k, v in (method_params or {}).items()}
    params = {s.name: s.make_params(**overrides.get(s.name, {})) for s in specs}
    names = class_names or {}
    written: list[Path] = []
    for batch in iter_batches(dataset, range(len(dataset)), batch_size):
        if len(batch) == 0:
            continue
        x = batch.images.to(adapter.device, adapter.dtype)
        predictions = adapter.predict(x).argmax(-1).cpu()
        targets = predictions if category_index is None else torch.full_like(
            predictions, category_index)
        ctx = BatchContext.for_batch(len(batch), seed, batch.indices, planned=list(params))
        results = {n: attribute(n, adapter, x, targets, context=ctx, method_params=p)
                   for n, p in params.items()}
        for i, path in enumerate(batch.paths):
            stem = Path(path).stem or f"image_{batch.indices[i]}"
            target = int(targets[i])
            image = batch.images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            maps = {n: r.maps[i].float().numpy() for n, r in results.items()}
            title = (f"{Path(path).name}: explaining {names.get(target, target)} "
                     f"(predicted {names.get(int(predictions[i]), int(predictions[i]))})")
            figure = out / f"{stem}.png"
            _figure(image, maps, title, figure)
            tensors = {"target": torch.tensor([target])}
            for n, r in results.items():
                tensors[f"{n}.map"] = r.maps[i].float().contiguous().clone()
                tensors[f"{n}.native"] = r.native[i].float().contiguous().clone()
            save_file(tensors, str(out / f"{stem}.safetensors"))
            written.append(figure)
    return written
