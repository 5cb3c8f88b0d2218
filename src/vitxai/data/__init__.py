"""Images in, unnormalised (3, H, W) tensors in [0, 1] out: files, datasets, batches, downloads."""

from vitxai.data.datasets import (
    IMAGENETTE_CLASSES,
    Batch,
    FolderDataset,
    ImageDataset,
    Imagenette,
    Sample,
    iter_batches,
    select_indices,
)
from vitxai.data.imagenette import DownloadError, download_imagenette
from vitxai.data.images import IMAGE_EXTENSIONS, UnreadableImageError, load_rgb
from vitxai.data.transforms import EvalTransform, Preprocessing, eval_transform

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGE_EXTENSIONS",
    "Batch",
    "DownloadError",
    "EvalTransform",
    "FolderDataset",
    "ImageDataset",
    "Imagenette",
    "Preprocessing",
    "Sample",
    "UnreadableImageError",
    "download_imagenette",
    "eval_transform",
    "iter_batches",
    "load_rgb",
    "select_indices",
]
