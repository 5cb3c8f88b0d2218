"""Fine-tune a classifier so that one deleted grid cell is in-domain (for IDSDS).

Single deletion on an unmodified model mixes two effects: a cell set to the baseline removes
information, and it also makes an image unlike any the model was trained on. IDSDS, the
in-domain single deletion score (Hesse, Schaub-Meyer & Roth 2024, "Benchmarking the
Attribution Quality of Vision Models", NeurIPS Datasets & Benchmarks), removes the second
effect by first fine-tuning the model on images in which, with probability ½, one uniformly
chosen cell of the grid is set to the baseline; single deletion on the fine-tuned model, with
maps computed on it, is IDSDS (``vitxai evaluate RUN --idsds --checkpoint FINETUNED``).

:func:`finetune_deletion` (``vitxai finetune-deletion``) fine-tunes any model
:class:`~vitxai.source.RunSource` loads, on any labelled data it reads, with the paper's
schedule by default (SGD, lr 1e-3, momentum 0.9, weight decay 1e-4, 30 epochs, StepLR step
10, γ 0.1, horizontal flips, cross-entropy) and keeps the checkpoint with the best clean
validation accuracy (the later epoch on ties). Its output folder holds:

* ``finetuned.safetensors``: the best checkpoint (the model's full state dict);
* ``finetuned.json`` / ``finetuned.md``: the card (base model, grid, baseline, schedule,
  clean and deleted-cell accuracy before and after, seed, time, machine);
* ``resume.pt``: model, optimizer, scheduler and position, written atomically every
  ``checkpoint_every_s`` seconds and after every epoch. Rerunning the same command continues
  from it; every random draw derives from (seed, epoch, step), so a resumed run ends with
  the same checkpoint as an uninterrupted one.

Differences from the paper: images come through the model's eval preprocessing (resize and
centre crop), so RandomResizedCrop is not applied; the "uniform" baseline is drawn per image
and epoch rather than once; the deleted-cell accuracy of the card deletes one cell per
validation image, drawn from (seed, image index) and the same before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

import vitxai
from vitxai.data.datasets import iter_batches, select_indices
from vitxai.methods.base import stable_seed
from vitxai.metrics.faithfulness import (
    _unit_masks,
    baseline_images,
    check_grid,
    idsds_baseline,
)
from vitxai.models.loading import _base_name, load_weights
from vitxai.store import RunLock, atomic_write, write_json
from vitxai.train import _cpu_name, _load_average

if TYPE_CHECKING:
    from vitxai.data.datasets import ImageDataset
    from vitxai.models.adapter import ModelAdapter
    from vitxai.source import RunSource

WEIGHTS = "finetuned.safetensors"
CARD = "finetuned.json"
CARD_MD = "finetuned.md"
RESUME = "resume.pt"
#: the card's ``kind``: what ``evaluate --idsds`` accepts as a fine-tuned checkpoint
CARD_KIND = "vitxai-finetune-deletion"
#: training images generated when the synthetic benchmark's size is not given
SYNTHETIC_TRAIN_SIZE = 2048


@dataclass(frozen=True)
class FinetuneSettings:
    """What :func:`finetune_deletion` trains; defaults are the paper's (docs/evaluation.md §2).

    Attributes:
        grid: cells per side of the deletion grid (4: 56-px cells at 224 px); the cells must
            tile the model's input.
        baseline: what a deleted cell becomes, IDSDS's names: "zeros" (the model's mean
            colour, i.e. zero of the normalised input), "uniform" (U(−1, 1) in normalised
            units) or "blur" (Gaussian blur, kernel 51, σ 41); vitxai's names "mean",
            "uniform_normalized" are accepted too.
        delete_probability: share of training images that get one deleted cell.
        flip: random horizontal flips (probability ½).
        epochs, step_size, gamma: epochs, and StepLR's step (epochs) and factor.
        lr, momentum, weight_decay: SGD.
        batch_size: training images per step (the paper: 256).
        val_size: validation images (clean and deleted-cell accuracy after each epoch).
        val_seed: seed of the validation images: a generated set's seed (default: the
            training seed + 1) or the draw of held-out images (default: ``seed``).
        seed: seeds shuffling, flips, deletions, dropout and the validation cells.
    """

    grid: int = 4
    baseline: str = "zeros"
    delete_probability: float = 0.5
    flip: bool = True
    epochs: int = 30
    step_size: int = 10
    gamma: float = 0.1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    val_size: int = 256
    val_seed: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        idsds_baseline(self.baseline)
        for name in ("grid", "epochs", "step_size", "batch_size", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.delete_probability <= 1:
            raise ValueError(f"delete_probability={self.delete_probability} is out of [0, 1]")
        if not (self.lr > 0 and self.gamma > 0 and 0 <= self.momentum < 1
                and self.weight_decay >= 0):
            raise ValueError("lr and gamma must be > 0, momentum in [0, 1), weight_decay >= 0")

    @property
    def vitxai_baseline(self) -> str:
        """The baseline in vitxai's vocabulary (docs/conventions.md)."""
        return idsds_baseline(self.baseline)


# ---------------------------------------------------------------------------------------------
# the augmentation


def random_cells(n: int, grid: int, generator: torch.Generator,
                 probability: float = 0.5) -> torch.Tensor:
    """The cell each of ``n`` images loses: (n,) long, a row-major cell index in
    [0, grid²) with probability ``probability``, else −1 (the image stays clean)."""
    chosen = torch.rand(n, generator=generator) < probability
    cells = torch.randint(grid * grid, (n,), generator=generator)
    return torch.where(chosen, cells, torch.full_like(cells, -1))


def delete_cells(images: torch.Tensor, baselines: torch.Tensor, cells: torch.Tensor,
                 grid: int) -> torch.Tensor:
    """``images`` (B, 3, H, W) with cell ``cells[b]`` of image b replaced by the same cell of
    ``baselines[b]`` (cells row-major on a ``grid`` × ``grid`` lattice; −1 = none).

    Raises:
        ValueError: the grid does not tile the images.
    """
    cell = check_grid(grid, images.shape[2:])
    n = grid * grid
    one_hot = F.one_hot(cells.clamp(min=0), n).bool() & (cells >= 0)[:, None]
    mask = _unit_masks(one_hot.to(images.device), (grid, grid), cell)
    return torch.where(mask, baselines, images)


def _validation_cells(indices: list[int], grid: int, seed: int) -> torch.Tensor:
    """One cell per validation image, drawn from (seed, image index): the same cells before
    and after fine-tuning, so the two accuracies are paired."""
    return torch.tensor([int(torch.randint(grid * grid, (1,), generator=torch.Generator()
                                           .manual_seed(stable_seed(seed, "val cell", i))))
                         for i in indices])


# ---------------------------------------------------------------------------------------------
# data


def _datasets(source: RunSource, adapter: ModelAdapter, s: FinetuneSettings
              ) -> tuple[ImageDataset, list[int], ImageDataset, list[int]]:
    """(training set, its indices, validation set, its indices).

    Generated synthetic data: a second set from ``val_seed``. Imagenette: split "train" (or
    the one asked for) for training, ``val_size`` images of "val" for validation. A folder:
    ``val_size`` images held out at random (``val_seed``), the rest for training.
    """
    if source.data == "synthetic":
        val_seed = source.data_seed + 1 if s.val_seed is None else s.val_seed
        if val_seed == source.data_seed:
            raise ValueError("val_seed must differ from the training data_seed (the "
                             "validation images must be unseen)")
        train = source.load_dataset(adapter)
        val = dataclasses.replace(source, data_seed=val_seed,
                                  n_images=s.val_size).load_dataset(adapter)
        return train, list(range(len(train))), val, list(range(len(val)))
    seed = s.seed if s.val_seed is None else s.val_seed
    if source.data == "imagenette":
        split = source.split or "train"
        if split == "val":
            raise ValueError("Imagenette's val split validates the fine-tuning; train on "
                             "split train")
        train = dataclasses.replace(source, split=split).load_dataset(adapter)
        val = dataclasses.replace(source, split="val").load_dataset(adapter)
        return (train, list(range(len(train))), val,
                select_indices(len(val), min(s.val_size, len(val)), seed))
    data = source.load_dataset(adapter)
    if len(data) <= s.val_size:
        raise ValueError(f"{source.data} has {len(data)} images; hold out val_size="
                         f"{s.val_size} for validation and keep some for training")
    held = select_indices(len(data), s.val_size, seed)
    rest = sorted(set(range(len(data))) - set(held))
    return data, rest, data, held


# ---------------------------------------------------------------------------------------------
# training and validation


@torch.inference_mode()
def _validate(adapter: ModelAdapter, data: ImageDataset, indices: list[int],
              s: FinetuneSettings) -> dict[str, float]:
    """Clean and deleted-cell accuracy and cross-entropy over the labelled images."""
    adapter.model.eval()
    sums = {"clean_accuracy": 0.0, "deleted_accuracy": 0.0, "clean_loss": 0.0,
            "deleted_loss": 0.0}
    n = 0
    for batch in iter_batches(data, indices, s.batch_size):
        keep = batch.labels >= 0
        if not keep.any():
            continue
        x = batch.images[keep].to(adapter.device, adapter.dtype)
        y = batch.labels[keep].to(adapter.device)
        ids = [i for i, k in zip(batch.indices, keep.tolist(), strict=True) if k]
        base = baseline_images(adapter, x, s.vitxai_baseline, seed=s.seed, image_ids=ids)
        deleted = delete_cells(x, base, _validation_cells(ids, s.grid, s.seed), s.grid)
        for kind, images in (("clean", x), ("deleted", deleted)):
            logits = adapter.predict(images, s.batch_size).float()
            sums[f"{kind}_accuracy"] += float((logits.argmax(1) == y).sum())
            sums[f"{kind}_loss"] += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    if n == 0:
        raise ValueError("the validation images have no labels")
    return {**{k: round(v / n, 6) for k, v in sums.items()}, "images": n}


def _train_step(adapter: ModelAdapter, opt: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, ids: list[int], s: FinetuneSettings, epoch: int,
                step: int) -> float:
    """One SGD step on a flipped, cell-deleted batch; returns the batch's mean loss.

    Every draw derives from (seed, epoch, step), which is what makes resuming exact.
    """
    g = torch.Generator().manual_seed(stable_seed(s.seed, "augment", epoch, step))
    x = images.to(adapter.device, adapter.dtype)
    y = labels.to(adapter.device)
    if s.flip:
        flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    cells = random_cells(len(x), s.grid, g, s.delete_probability)
    # uniform noise differs per epoch, like a fresh draw
    base = baseline_images(adapter, x, s.vitxai_baseline, seed=s.seed,
                           image_ids=[(epoch, i) for i in ids])
    x = delete_cells(x, base, cells, s.grid)
    torch.manual_seed(stable_seed(s.seed, "model", epoch, step))  # dropout, drop-path
    loss = F.cross_entropy(adapter.logits(x), y, ignore_index=-1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _fingerprint(source: RunSource, s: FinetuneSettings) -> str:
    """What makes two fine-tunings the same (the device is left out: it may change)."""
    record = {k: v for k, v in source.record().items() if k != "device"}
    text = json.dumps({"source": record, "settings": dataclasses.asdict(s)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finetune_deletion(
    out_dir: str | Path,
    source: RunSource,
    settings: FinetuneSettings | None = None,
    *,
    time_budget_s: float | None = None,
    checkpoint_every_s: float = 60.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``source``'s model with cell deletions (see the module docstring); returns
    the card (also written to ``out_dir/finetuned.json``).

    Args:
        out_dir: output folder; holding a fine-tuning with the same source and settings, it
            is continued (a finished one is returned as it is).
        source: the model (bundled ViT or timm, with its weights) and the labelled data. For
            generated synthetic data ``n_images`` (default :data:`SYNTHETIC_TRAIN_SIZE`)
            and ``data_seed`` are the training set's.
        settings: the schedule and augmentation (default: the paper's).
        time_budget_s: stop (resumably) once this invocation has run this long; the step
            in progress finishes first. None = no limit.
        checkpoint_every_s: seconds between resume checkpoints (also written after every
            epoch and when stopping); 0 = after every step.
        overwrite: discard a different fine-tuning in ``out_dir``.
        progress: show a tqdm progress bar (steps).

    Returns:
        The card: ``epochs["complete"]`` says whether every epoch ran; ``weights`` is None
        until the first epoch ends.

    Raises:
        ValueError: a grid that does not tile the model's input, unlabelled data, a bad
            setting, or ``out_dir`` holding another fine-tuning (without ``overwrite``).
    """
    start = time.perf_counter()
    s = settings or FinetuneSettings()
    if source.data == "synthetic" and source.n_images is None:
        source = dataclasses.replace(source, n_images=SYNTHETIC_TRAIN_SIZE)
    adapter, _ = source.load_model()
    check_grid(s.grid, adapter.input_size)
    train, train_idx, val, val_idx = _datasets(source, adapter, s)
    if not train.has_labels:
        raise ValueError(f"fine-tuning needs labelled images; {train.name!r} has none "
                         "(give a labels file)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        return _finetune(out, source, adapter, train, train_idx, val, val_idx, s,
                         start, time_budget_s, checkpoint_every_s, overwrite, progress)


def _finetune(out: Path, source: RunSource, adapter: ModelAdapter, train: ImageDataset,
              train_idx: list[int], val: ImageDataset, val_idx: list[int],
              s: FinetuneSettings, start: float, budget: float | None, every: float,
              overwrite: bool, progress: bool) -> dict[str, Any]:
    model = adapter.model
    fingerprint = _fingerprint(source, s)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                          weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    state: dict[str, Any] | None = None
    if (out / RESUME).is_file():
        state = torch.load(out / RESUME, map_location=adapter.device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            if not overwrite:
                raise ValueError(f"{out} holds a fine-tuning with other data, model or "
                                 "settings; choose another output folder or overwrite it")
            state = None
    elif (out / CARD).is_file() and not overwrite:
        raise ValueError(f"{out} holds a fine-tuning without its {RESUME}; choose another "
                         "output folder or overwrite it")
    if state is None:
        for name in (WEIGHTS, CARD, CARD_MD, RESUME):
            (out / name).unlink(missing_ok=True)
        state = {"fingerprint": fingerprint, "epoch": 0, "step": 0, "loss_sum": 0.0,
                 "loss_steps": 0, "images_seen": 0, "best": None, "history": [],
                 "before": _validate(adapter, val, val_idx, s), "train_s": 0.0,
                 "invocations": 0}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    state["invocations"] += 1
    load_start = _load_average()
    steps_per_epoch = -(-len(train_idx) // s.batch_size)
    t0 = last_save = time.perf_counter()
    train_s = state["train_s"]

    def save() -> None:
        nonlocal last_save
        state.update(model=model.state_dict(), optimizer=opt.state_dict(),
                     scheduler=sched.state_dict(), train_s=train_s + time.perf_counter() - t0)
        atomic_write(out / RESUME, lambda tmp: torch.save(state, tmp))
        last_save = time.perf_counter()

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - start >= budget

    bar = tqdm(total=s.epochs * steps_per_epoch, initial=state["epoch"] * steps_per_epoch
               + state["step"], unit="step", desc="fine-tune with cell deletion",
               disable=not progress)
    stopped = False
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        while state["epoch"] < s.epochs and not stopped:
            epoch = state["epoch"]
            order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(
                stable_seed(s.seed, "shuffle", epoch))).tolist()
            todo = [train_idx[k] for k in order[state["step"] * s.batch_size:]]
            model.train()
            for batch in iter_batches(train, todo, s.batch_size):
                if over_budget():
                    stopped = True
                    break
                if (batch.labels >= 0).any():
                    loss = _train_step(adapter, opt, batch.images, batch.labels, batch.indices,
                                       s, epoch, state["step"])
                    state["loss_sum"] += loss
                    state["loss_steps"] += 1
                    state["images_seen"] += len(batch)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}",
                                    lr=f"{sched.get_last_lr()[0]:.2g}", refresh=False)
                state["step"] += 1
                bar.update(1)
                if time.perf_counter() - last_save >= every:
                    save()
            if stopped or over_budget():
                stopped = True
                break
            _end_epoch(out, adapter, val, val_idx, s, state, sched)
            save()
            _write_card(out, source, adapter, train, train_idx, val, val_idx, s, state,
                        budget, load_start, complete=state["epoch"] == s.epochs)
    finally:
        bar.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    save()
    return _write_card(out, source, adapter, train, train_idx, val, val_idx, s, state, budget,
                       load_start, complete=state["epoch"] == s.epochs)


def _end_epoch(out: Path, adapter: ModelAdapter, val: ImageDataset, val_idx: list[int],
               s: FinetuneSettings, state: dict[str, Any],
               sched: torch.optim.lr_scheduler.StepLR) -> None:
    """Validate, keep the checkpoint if its clean accuracy is the best so far, step the
    learning rate and move to the next epoch. A tie goes to the later epoch: clean accuracy
    saturates on easy data, and a later epoch has seen more deleted cells."""
    metrics = _validate(adapter, val, val_idx, s)
    epoch = state["epoch"] + 1
    lr = sched.get_last_lr()[0]
    state["history"].append({"epoch": epoch, "lr": lr, **metrics, "train_loss": round(
        state["loss_sum"] / max(state["loss_steps"], 1), 6)})
    best = state["best"]
    if best is None or metrics["clean_accuracy"] >= best["clean_accuracy"]:
        weights = {k: v.detach().cpu().contiguous() for k, v in
                   adapter.model.state_dict().items()}
        # one metadata entry: safetensors writes several in random order, and the bytes of
        # a resumed run must equal an uninterrupted one's (the card says the rest)
        atomic_write(out / WEIGHTS, lambda tmp: save_file(weights, str(tmp),
                                                          metadata={"format": "pt"}))
        state["best"] = {"epoch": epoch, **metrics}
    sched.step()
    state.update(epoch=epoch, step=0, loss_sum=0.0, loss_steps=0)


def _write_card(out: Path, source: RunSource, adapter: ModelAdapter, train: ImageDataset,
                train_idx: list[int], val: ImageDataset, val_idx: list[int],
                s: FinetuneSettings, state: dict[str, Any], budget: float | None,
                load_start: float | None, complete: bool) -> dict[str, Any]:
    weights = out / WEIGHTS
    best = state["best"]
    card: dict[str, Any] = {
        "kind": CARD_KIND,
        "description": "fine-tuned with one cell of a grid deleted per image with probability "
                       f"{s.delete_probability}, so that single deletion is in-domain (IDSDS, "
                       "Hesse et al. 2024, NeurIPS Datasets & Benchmarks)",
        "base_model": {"model": source.model_name, "adapter": adapter.name,
                       "checkpoint": source.checkpoint,
                       "parameters": sum(p.numel() for p in adapter.model.parameters())},
        "source": source.record(),
        "grid": s.grid,
        "cell_px": list(check_grid(s.grid, adapter.input_size)),
        "baseline": {"idsds": s.baseline, "vitxai": s.vitxai_baseline},
        "augmentation": {"delete_probability": s.delete_probability,
                         "cell": "uniform over the grid's cells", "horizontal_flip": s.flip,
                         "preprocessing": "the model's eval preprocessing (no random crops)"},
        "optimizer": {"name": "SGD", "lr": s.lr, "momentum": s.momentum,
                      "weight_decay": s.weight_decay, "batch_size": s.batch_size,
                      "schedule": f"StepLR step {s.step_size} epochs, gamma {s.gamma}",
                      "loss": "cross-entropy"},
        "epochs": {"planned": s.epochs, "done": state["epoch"],
                   "best": best["epoch"] if best else None, "complete": complete},
        "data": {"train": {**train.describe(), "images_used": len(train_idx),
                           "images_seen": state["images_seen"]},
                 "validation": {**val.describe(), "images_used": len(val_idx)}},
        "accuracy": {"before": state["before"],
                     "after": {k: v for k, v in best.items() if k != "epoch"} if best else None,
                     "deleted_cell": "one cell per validation image, drawn from (seed, "
                                     "image index), the same before and after"},
        "history": state["history"],
        "seed": s.seed,
        "settings": dataclasses.asdict(s),
        "time": {"train_wall_s": round(state["train_s"], 1), "time_budget_s": budget,
                 "invocations": state["invocations"],
                 "written": datetime.now(UTC).isoformat(timespec="seconds")},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(adapter.device),
                    "load_average_at_start": load_start,
                    "load_average_at_end": _load_average()},
        "versions": {"vitxai": vitxai.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "weights": ({"file": WEIGHTS, "bytes": weights.stat().st_size,
                     "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
                    if best else None),
    }
    write_json(out / CARD, card)
    atomic_write(out / CARD_MD, lambda tmp: tmp.write_text(_markdown(card), encoding="utf-8"))
    return card


def _pct(metrics: dict[str, Any] | None, key: str) -> str:
    return f"{metrics[key]:.1%}" if metrics else "n/a"


def _markdown(card: dict[str, Any]) -> str:
    """The human-readable card."""
    before, after = card["accuracy"]["before"], card["accuracy"]["after"]
    ep, opt, base = card["epochs"], card["optimizer"], card["base_model"]
    state = ("complete" if ep["complete"] else
             f"**incomplete**: {ep['done']} of {ep['planned']} epochs; rerun the same command "
             "to continue")
    weights = (f"`{card['weights']['file']}`, sha256 `{card['weights']['sha256'][:16]}…`"
               if card["weights"] else "none yet (no epoch finished)")
    return f"""# Cell-deletion fine-tune of {base['model']}

Fine-tuned so that single deletion is in-domain (IDSDS; Hesse et al. 2024, "Benchmarking
the Attribution Quality of Vision Models", NeurIPS Datasets & Benchmarks). Pass its folder
as the IDSDS checkpoint of `vitxai evaluate` on a run of the same base model (weights file
{card['weights']['file'] if card['weights'] else WEIGHTS}).

| | |
|---|---|
| base model | {base['model']} ({base['adapter']}, {base['parameters']:,} parameters) |
| deletion | {card['grid']}×{card['grid']} grid ({card['cell_px'][0]}×{card['cell_px'][1]} px \
cells), baseline {card['baseline']['idsds']} (vitxai: {card['baseline']['vitxai']}), \
probability {card['augmentation']['delete_probability']} per image; \
{"random horizontal flips" if card['augmentation']['horizontal_flip'] else "no flips"} |
| schedule | SGD lr {opt['lr']}, momentum {opt['momentum']}, weight decay \
{opt['weight_decay']}, batch {opt['batch_size']}, {opt['schedule']} |
| epochs | {state}; best clean accuracy at epoch {ep['best']} |
| data | {card['data']['train']['name']}: {card['data']['train']['images_used']} training \
images, {card['data']['validation']['images_used']} validation images \
({card['data']['validation']['name']}) |
| **clean accuracy** | before {_pct(before, 'clean_accuracy')}, after \
{_pct(after, 'clean_accuracy')} |
| **deleted-cell accuracy** | before {_pct(before, 'deleted_accuracy')}, after \
{_pct(after, 'deleted_accuracy')} ({card['accuracy']['deleted_cell']}) |
| seed | {card['seed']} |
| time | {card['time']['train_wall_s']:.0f} s of training in \
{card['time']['invocations']} invocation(s); {card['machine']['cores']} cores × \
{card['machine']['cpu']} ({card['machine']['device']}) |
| versions | torch {card['versions']['torch']}, timm {card['versions']['timm']}, \
vitxai {card['versions']['vitxai']} |
| weights | {weights} |
"""


# ---------------------------------------------------------------------------------------------
# loading a fine-tuned checkpoint


def read_finetune_card(checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, card) of a ``finetune-deletion`` output: its folder or its
    ``finetuned.safetensors`` (the card is the ``.json`` beside it).

    Raises:
        ValueError: no such file, no card, or a card of something else or without weights.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / WEIGHTS
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ValueError(f"checkpoint {path} has no fine-tuning card {card_path.name} beside "
                         "it; pass the output of `vitxai finetune-deletion`")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"fine-tuning card {card_path} is damaged ({type(e).__name__})") from e
    if not isinstance(card, dict) or card.get("kind") != CARD_KIND:
        raise ValueError(f"{card_path} is not a `vitxai finetune-deletion` card")
    if not card.get("weights"):
        raise ValueError(f"the fine-tuning in {path.parent} has not finished an epoch yet; "
                         "rerun its command to continue it")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return path, card


def load_finetuned(adapter: ModelAdapter, checkpoint: str | Path
                   ) -> tuple[ModelAdapter, dict[str, Any]]:
    """A copy of ``adapter`` (same preprocessing, device, precision) with the fine-tuned
    weights of ``checkpoint``, and the checkpoint's card.

    Raises:
        ValueError: see :func:`read_finetune_card`; a card naming another base model than
            ``adapter``'s, or weights that differ from the card's checksum.
        vitxai.models.ModelLoadError: weights that do not fit the model.
    """
    path, card = read_finetune_card(checkpoint)
    base = card["base_model"]["adapter"]
    if _base_name(base) != _base_name(adapter.name):
        raise ValueError(f"checkpoint {path} fine-tunes {base!r}, not this run's model "
                         f"{adapter.name!r}; fine-tune the run's model with `vitxai "
                         "finetune-deletion`")
    if hashlib.sha256(path.read_bytes()).hexdigest() != card["weights"]["sha256"]:
        raise ValueError(f"checkpoint {path} differs from its card's sha256; rerun the "
                         "fine-tuning command to rewrite it")
    tuned = copy.deepcopy(adapter)
    load_weights(tuned.model, path, adapter.name)
    return tuned, card
