"""Where a run's model and images come from, recorded so that the run can be rebuilt.

A :class:`RunSource` names the data (the bundled synthetic benchmark, Imagenette, or a folder
of images) and the model (the bundled ViT, or a timm name with hub, local or random weights,
its precision and device). ``compare`` records it in ``config["source"]``;
:meth:`RunSource.from_config` and :meth:`RunSource.load` rebuild the same model and dataset
for evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitxai.data.datasets import ImageDataset
    from vitxai.data.transforms import Preprocessing
    from vitxai.models.adapter import ModelAdapter

#: the model of non-synthetic data when none is named (the original comparison's)
DEFAULT_IMAGENET_MODEL = "vit_base_patch16_224.orig_in21k_ft_in1k"
#: images of the generated synthetic set when ``n_images`` is None
SYNTHETIC_DEFAULT_SIZE = 12
PRECISIONS = ("float32", "bf16", "float64", "auto")
#: keys recorded only when set (None / False is the default), so that runs recorded before
#: they existed keep their fingerprints
OPTIONAL_KEYS = ("crop_pct", "resize", "interpolation", "mean", "std", "no_crop", "labels",
                 "targets", "class_names", "masks", "boxes", "img_size", "num_classes", "probe")


@dataclass(frozen=True)
class RunSource:
    """How to build a run's model and dataset.

    Attributes:
        data: "synthetic" (the bundled ground-truth benchmark), "imagenette", or a folder of
            images or one image file.
        split: synthetic: "single" (default), "pair" or "parts"; imagenette: "val" (default)
            or "train".
        n_images: size of the generated synthetic set (None = :data:`SYNTHETIC_DEFAULT_SIZE`).
        data_seed: seed of the generated synthetic images.
        data_root: where Imagenette was unpacked.
        variant: Imagenette variant ("full", "320", "160").
        model: "bundled", a timm model name, or None: the bundled ViT for synthetic data,
            else :data:`DEFAULT_IMAGENET_MODEL`.
        checkpoint: local weights of a timm model (.safetensors or torch file).
        checkpoint_key: the entry of ``checkpoint`` holding the weights (None = found by
            itself); recorded only when set, so that other runs keep their fingerprints.
        random_weights: do not fetch pretrained weights.
        precision: "float32", "bf16" (bfloat16 autocast forwards), "float64", or "auto":
            bf16 where the device computes it natively, else float32; recorded resolved
            (:attr:`resolved_precision`).
        device: "cpu", "cuda", "cuda:1", ...
        crop_pct, resize, interpolation, mean, std, no_crop: preprocessing overrides
            (:class:`vitxai.data.transforms.Preprocessing`; None / False = the model's own).
        labels, targets: ``file,class`` CSVs of a folder's labels and of the classes to
            explain; class_names: a text file of class names, one per line.
        masks: a folder of PNG truth masks (same stem as the images); boxes: truth boxes
            (CSV, Pascal VOC XML, COCO JSON; :mod:`vitxai.data.annotations`).
        img_size: build the timm model at this input size (a ViT's position embeddings are
            interpolated; preprocessing follows); None = the model's own.
        num_classes: build the timm model with this many classes (with pretrained weights
            the head is replaced by a new, seeded random one); None = the model's own.
        probe: a linear probe file (``vitxai probe``) attached as the classifier.
    """

    data: str = "synthetic"
    split: str | None = None
    n_images: int | None = None
    data_seed: int = 20240
    data_root: str = "data"
    variant: str = "full"
    model: str | None = None
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    random_weights: bool = False
    precision: str = "float32"
    device: str = "cpu"
    crop_pct: float | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    no_crop: bool = False
    labels: str | None = None
    targets: str | None = None
    class_names: str | None = None
    masks: str | None = None
    boxes: str | None = None
    img_size: int | None = None
    num_classes: int | None = None
    probe: str | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The recorded fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunSource:
        """A source from a mapping (or namespace ``vars``) holding at least its keys; other
        entries are ignored."""
        return cls(**{k: values[k] for k in cls.keys() if k in values})

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: object = "the run") -> RunSource:
        """The source a run's ``config.json`` recorded; a ValueError when it records none."""
        source = config.get("source") or {}
        if not source:
            raise ValueError(f"{where} does not record its model and data; run the "
                             "comparison again to record them")
        return cls.from_values(source)

    def record(self) -> dict[str, Any]:
        """The JSON record (``config["source"]``; part of the run's fingerprint)."""
        record = dataclasses.asdict(self)
        record["precision"] = self.resolved_precision  # what ran, so "auto" reloads the same
        if record["checkpoint_key"] is None:  # recorded only when set (fingerprints hold)
            del record["checkpoint_key"]
        for key in OPTIONAL_KEYS:  # the same for the preprocessing and annotation options
            if record[key] in (None, False):
                del record[key]
            elif isinstance(record[key], tuple):
                record[key] = list(record[key])
        return record

    @property
    def resolved_precision(self) -> str:
        """``precision`` with "auto" resolved on this machine: "bf16" where
        :func:`~vitxai.models.adapter.auto_precision` chooses it for ``device``, else
        "float32"."""
        if self.precision != "auto":
            return self.precision
        import torch

        from vitxai.models.adapter import auto_precision

        device = torch.device(self.device)
        native = device.type != "cuda" or torch.cuda.is_available()
        return "bf16" if native and auto_precision(device) == "bf16" else "float32"

    @property
    def model_name(self) -> str:
        """The model actually loaded: ``model``, or the default for the data."""
        return self.model or ("bundled" if self.data == "synthetic" else DEFAULT_IMAGENET_MODEL)

    def load(self, features_only: bool = False
             ) -> tuple[ModelAdapter, ImageDataset, list[str]]:
        """(adapter, dataset, notes): the model, the dataset, and notes worth recording
        (``features_only``: a headless backbone is accepted, for ``vitxai probe``).

        Raises:
            ValueError: a checkpoint for the bundled model, an unknown precision, a bad
                device, split or variant.
            vitxai.models.ModelLoadError: the weights cannot be had.
            FileNotFoundError: the data is not there.
        """
        adapter, notes = self.load_model(features_only)
        dataset = self.load_dataset(adapter)
        transform = getattr(dataset, "transform", None)
        if hasattr(transform, "describe"):
            notes.append(f"preprocessing: {transform.describe()}")
        elif self.mean is not None or self.std is not None:
            mean, std = self.preprocessing.normalisation(adapter.data_config)
            notes.append(f"preprocessing: normalise with mean {mean} std {std}")
        return adapter, dataset, notes

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing overrides (:class:`vitxai.data.transforms.Preprocessing`)."""
        from vitxai.data.transforms import Preprocessing

        return Preprocessing.from_values(dataclasses.asdict(self))

    def load_model(self, features_only: bool = False) -> tuple[ModelAdapter, list[str]]:
        """(adapter, notes) of the model (``features_only``: see :meth:`load`)."""
        import torch

        from vitxai.models import load_model

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of "
                             f"{', '.join(map(repr, PRECISIONS))}")
        notes: list[str] = []
        preprocessing = self.preprocessing  # bad values fail before the model loads
        if self.probe is not None and self.num_classes is not None:
            raise ValueError("num_classes and probe both set: the probe decides the classes; "
                             "drop num_classes")
        name = self.model_name
        if name == "bundled":
            from vitxai.models.bundled import load_bundled_model

            if self.checkpoint or self.checkpoint_key:
                raise ValueError("checkpoint needs a timm model name (the bundled model has "
                                 "its own weights)")
            for key in ("img_size", "num_classes"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} needs a timm model name (the bundled model has "
                                     "its own input size and classes)")
            adapter = load_bundled_model(device=self.device, probe=self.probe)
            notes.append("embedded default: vitxai's bundled ViT trained on the synthetic "
                         "ground-truth benchmark (not an ImageNet model)")
        else:
            sizes = {k: getattr(self, k) for k in ("img_size", "num_classes")
                     if getattr(self, k) is not None}
            adapter = load_model(name, pretrained=not self.random_weights,
                                 checkpoint=self.checkpoint,
                                 checkpoint_key=self.checkpoint_key, device=self.device,
                                 probe=self.probe, features_only=features_only, **sizes)
            if self.random_weights and not self.checkpoint:
                notes.append(f"{name} has RANDOM weights (random_weights)")
            elif self.num_classes is not None and not self.checkpoint:
                notes.append(f"num_classes={self.num_classes}: timm replaced {name}'s "
                             "pretrained classifier head by a new, randomly initialised one "
                             "(seeded); its class scores mean nothing until it is trained")
            if self.img_size is not None:
                gh, gw = getattr(adapter, "grid_size", None) or (None, None)
                grid = f" ({gh}×{gw} patch grid)" if gh else ""
                notes.append(f"{name} built at img_size={self.img_size}{grid}")
        if self.probe is not None and adapter.probe is not None:
            notes.append(f"classifier: linear probe {self.probe} ({adapter.probe.readout} "
                         f"read-out, {adapter.probe.num_classes} classes)")
        if self.precision == "auto":
            notes.append(f"precision auto: {self.resolved_precision} on {self.device}")
        if self.resolved_precision == "float64":
            adapter.to(dtype=torch.float64)
        elif self.resolved_precision == "bf16":
            adapter.set_precision("bf16")
            notes.append("forward passes in bfloat16 autocast (precision bf16); maps, masks "
                         "and solves in float32")
        if preprocessing.mean is not None or preprocessing.std is not None:
            mean, std = preprocessing.normalisation(adapter.data_config)
            adapter.mean = torch.tensor(mean, dtype=adapter.mean.dtype,
                                        device=adapter.mean.device).view(1, 3, 1, 1)
            adapter.std = torch.tensor(std, dtype=adapter.std.dtype,
                                       device=adapter.std.device).view(1, 3, 1, 1)
            adapter.data_config = {**adapter.data_config, "mean": mean, "std": std}
        return adapter, notes

    def load_dataset(self, adapter: ModelAdapter) -> ImageDataset:
        """The dataset, preprocessed by ``adapter``'s own data config where it applies."""
        from vitxai.data import FolderDataset, Imagenette, eval_transform

        annotations = {k: getattr(self, k) for k in ("labels", "targets", "class_names",
                                                     "masks", "boxes") if getattr(self, k)}
        if annotations and self.data in ("synthetic", "imagenette"):
            raise ValueError(f"{', '.join(annotations)} need a folder of images as data, not "
                             f"{self.data!r}")
        transform = eval_transform(adapter.data_config, self.preprocessing)
        if self.data == "synthetic":
            geometry = {k: v for k, v in self.preprocessing.record().items()
                        if k not in ("mean", "std")}
            if geometry:
                raise ValueError(f"{', '.join(geometry)} do not apply to the synthetic "
                                 "benchmark (its images are generated at the input size)")
            from vitxai.data.synthetic import IMAGE_SIZE, SyntheticBenchmark

            size = tuple(getattr(adapter, "input_size", (IMAGE_SIZE, IMAGE_SIZE)))
            if size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"the synthetic benchmark's images are {IMAGE_SIZE}×"
                                 f"{IMAGE_SIZE}, but {self.model_name!r} takes "
                                 f"{size[0]}×{size[1]}; build it with img_size={IMAGE_SIZE} "
                                 "or use other data")
            return SyntheticBenchmark(split=self.split or "single",
                                      size=(SYNTHETIC_DEFAULT_SIZE if self.n_images is None
                                            else self.n_images),
                                      seed=self.data_seed)
        if self.data == "imagenette":
            return Imagenette(root=self.data_root, variant=self.variant,
                              split=self.split or "val",
                              transform=transform)
        return FolderDataset(self.data, transform=transform, **annotations)
