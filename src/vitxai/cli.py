"""The ``vitxai`` command: a thin layer over the library.

Sub-commands: ``compare`` (the comparison, default on the bundled benchmark), ``methods``
(the registry), ``data imagenette`` (download), ``train-benchmark`` (retrain the bundled ViT),
``finetune-deletion`` (fine-tune a model with deleted grid cells, for ``evaluate --idsds``).
Errors the user can fix are printed as one line (``vitxai: error: ...``) with exit code 2,
errors of the environment (full disk, read-only or misplaced paths, corrupt files) as one line
naming the file with exit code 1, and Ctrl-C as one line with exit code 130.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import io
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitxai.source import DEFAULT_IMAGENET_MODEL, SYNTHETIC_DEFAULT_SIZE, RunSource

#: integer options and their least value (argparse accepts any int)
COUNT_OPTIONS = {"n_images": 1, "sample_size": 1, "batch_size": 1, "steps": 1,
                 "sanity_images": 0, "img_size": 1, "num_classes": 1, "grid": 1,
                 "id_steps": 1, "epochs": 1, "step_size": 1, "val_size": 1,
                 "gae_steps": 2, "workers": 1, "cpus_per_worker": 1}
#: errnos that only a write can cause
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT})
#: the library names its parameters ("device='cuda'", "save_attr_maps=True"); errors on the
#: command line name the options instead: parameters that take a value → option ...
VALUE_OPTIONS = {"device": "--device", "checkpoint": "--checkpoint",
                 "checkpoint_key": "--checkpoint-key",
                 "idx_sample_img": "--idx_sample_img", "precision": "--precision",
                 "crop_pct": "--crop-pct", "resize": "--resize",
                 "interpolation": "--interpolation", "img_size": "--img-size",
                 "num_classes": "--num-classes", "probe": "--probe", "labels": "--labels"}
#: set by the SIGINT handler that ``main`` installs, cleared when ``main`` starts
_INTERRUPTED = threading.Event()
_VALUE_PARAMETER = re.compile(r"(?<![\w.])(" + "|".join(VALUE_OPTIONS)
                              + r")=(?:'([^']*)'|([^\s:;,)']+))")
#: ... switches, and other library wording → command-line wording
OPTION_WORDING: tuple[tuple[str, str], ...] = (
    (r"\bsave_attr_maps=True\b", "--save_attr_maps"),
    (r"\bno_crop=True\b", "--no-crop"),
    (r"\ballow_missing=True\b", "--allow-missing"),
    (r"\bpretrained=False\b", "--random-weights"),
    (r"vitxai\.data\.download_imagenette\(root='([^']*)', variant='([^']*)'\)",
     r"vitxai data imagenette --variant \2 --root \1"),
    (r"(needs a ViT \(timm VisionTransformer\); model '[^']*' is not one: choose a "
     r"model-agnostic method)", r"\1 (drop it with --methods)"),
)


def _parse_assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    """["a.b=1", "c=x"] → {"a.b": 1, "c": "x"}: JSON values, else Python literals (the
    ``True``/``None`` that ``vitxai methods`` prints), else the raw string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} must look like NAME=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                out[key] = raw
    return out


def _check_counts(args: argparse.Namespace) -> None:
    """One-line ValueError for an integer option below its least value."""
    for name, low in COUNT_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}; got {value}")


def _method_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from vitxai.methods import get_method
    from vitxai.methods.variants import parse_choice

    labels = {parse_choice(m).label for m in _method_labels(args) if "=" in m or ":" in m}
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in _parse_assignments(args.param, "--param").items():
        method, dot, name = key.partition(".")
        if not dot:
            raise ValueError(f"--param {key!r} must look like METHOD.PARAMETER=VALUE")
        if name == "segmentation" or name.startswith("segmentation."):
            raise ValueError("set segmentation with --segmentation, not --param")
        key = method if method in labels else get_method(method).name
        overrides.setdefault(key, {})[name] = value
    for name, value in (("head_fusion", args.head_fusion), ("discard_ratio", args.discard_ratio)):
        if value is not None:
            overrides.setdefault("attention_rollout", {})[name] = value
    return overrides


def _segmentation_overrides(args: argparse.Namespace, methods: Sequence[str],
                            overrides: dict[str, dict[str, Any]]) -> None:
    if not args.segmentation:
        return
    from vitxai.methods import get_method
    from vitxai.methods.perturbation import SegmentationParams
    from vitxai.methods.variants import parse_choice
    from vitxai.params import build

    seg = build(SegmentationParams, _parse_assignments(args.segmentation, "--segmentation"),
                "--segmentation")
    for m in methods:
        spec = get_method(parse_choice(m).method)
        if "segments" in spec.uses:
            overrides.setdefault(spec.name, {})["segmentation"] = seg


def _cli_wording(message: str) -> str:
    """A library error message in command-line terms (see :data:`OPTION_WORDING`)."""
    message = _VALUE_PARAMETER.sub(
        lambda m: f"{VALUE_OPTIONS[m[1]]} {m[2] if m[2] is not None else m[3]}", message)
    for pattern, replacement in OPTION_WORDING:
        message = re.sub(pattern, replacement, message)
    return message


def _source(args: argparse.Namespace) -> RunSource:
    """The model and data that ``--model``/``--data`` (and their options) describe."""
    return RunSource.from_values(vars(args))


def _default_out(args: argparse.Namespace, model: str) -> Path:
    data = Path(args.data).stem if args.data not in ("synthetic", "imagenette") else args.data
    split = args.split or ""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data}-{split}-{model}".replace("--", "-"))
    return Path("runs") / slug.strip("-")


def _print_predictions(pred: dict[str, Any] | None, random_weights: bool = False) -> None:
    """Accuracy (with labels) and mean target probability; a one-line warning when the
    predictions look like chance (see :func:`vitxai.compare.prediction_summary`)."""
    if not pred:
        return
    parts = []
    if pred.get("top1_accuracy") is not None:
        top5 = pred.get("top5_accuracy")
        parts.append(f"top-1 accuracy {pred['top1_accuracy']:.1%}"
                     + (f", top-5 {top5:.1%}" if top5 is not None else "")
                     + f" over {pred['n_labelled']} labelled images")
    if pred.get("mean_target_probability") is not None:
        parts.append(f"mean probability of the explained class "
                     f"{pred['mean_target_probability']:.3f}")
    if parts:
        print("; ".join(parts))
    if pred.get("mismatch") and not random_weights:  # random weights are chance by design
        print(f"vitxai: warning: {_cli_wording(pred['mismatch'])}", file=sys.stderr)


def _print_summary(agg: dict[str, Any], out: Path, seconds: float,
                   random_weights: bool = False) -> None:
    sub = agg["subsets"]["all"]
    names = agg["methods"]
    print(f"\n{sub['n_images']} images in {seconds:.1f} s; run directory: {out}")
    if agg.get("skipped"):
        print(f"skipped {len(agg['skipped'])} unreadable images (listed in manifest.json)")
    _print_predictions(agg.get("predictions"), random_weights)
    width = max(len(n) for n in names) + 2
    iou = sub["pairwise"]["iou"]["mean"]
    print("\nmean IoU of the binary masks (empty-vs-empty pairs excluded)")
    print(" " * width + "".join(f"{n[:10]:>11}" for n in names))
    for a, row in zip(names, iou, strict=True):
        cells = "".join(f"{'n/a' if v is None else f'{v:.2f}':>11}" for v in row)
        print(f"{a:<{width}}{cells}")
    pm = sub["per_method"]
    if any("truth_iou" in pm[n] for n in names):
        from vitxai.metrics.scores import METHOD_COLUMNS

        cols = [c for c in METHOD_COLUMNS
                if c.startswith(("truth_", "other_")) and c in pm[names[0]]]
        print("\nagreement with the ground-truth object (means over images)")
        print(" " * width + "".join(f"{c.replace('truth_', ''):>14}" for c in cols))
        for n in names:
            means = [pm[n][c]["mean"] for c in cols]
            cells = "".join(f"{'n/a' if v is None else f'{v:.3f}':>14}" for v in means)
            print(f"{n:<{width}}{cells}")
    print("\nseconds per image: " + ", ".join(
        f"{n} {pm[n]['seconds_per_image']['mean']:.2f}" for n in names))


def _default_methods(adapter, preferred: Sequence[str], notes: list[str]) -> list[str]:
    """The library's default methods for ``adapter``, with a note when a model other than a
    ViT gets fewer than ``preferred``."""
    from vitxai.runner import default_methods

    methods = default_methods(adapter, preferred)
    if list(methods) != list(preferred):
        notes.append(f"{adapter.name} is not a ViT: running the model-agnostic methods "
                     f"{', '.join(methods)} (choose others with --methods)")
    return methods


def _engine(args: argparse.Namespace):
    from vitxai.engines import EngineSettings, require_ray

    if args.engine == "local":
        return None
    require_ray()  # one line naming the extra before the model loads
    return EngineSettings("ray", address=args.address, workers=args.workers,
                          gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, ship_images=args.ship_images)


def _method_labels(args: argparse.Namespace) -> list[str]:
    """--methods plus the lines of --variants FILE (blank lines and # comments skipped)."""
    labels = list(args.methods or [])
    if getattr(args, "variants", None):
        try:
            text = Path(args.variants).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--variants {args.variants}: cannot read it "
                             f"({type(e).__name__})") from None
        labels += [line.split("#", 1)[0].strip() for line in text.splitlines()
                   if line.split("#", 1)[0].strip()]
    return labels


def cmd_compare(args: argparse.Namespace) -> int:
    from vitxai.compare import SEED_METHODS, CompareSettings, compare
    from vitxai.masks import MaskParams
    from vitxai.methods import get_method
    from vitxai.methods.variants import parse_choice
    from vitxai.params import build

    _check_counts(args)
    methods = _method_labels(args) or list(SEED_METHODS)
    overrides = _method_overrides(args)
    _segmentation_overrides(args, methods, overrides)
    for choice in map(parse_choice, methods):  # refuse before the model loads (minutes)
        get_method(choice.method).make_params(**{**overrides.get(choice.method, {}),
                                                 **overrides.get(choice.label, {}),
                                                 **choice.params})
    for name, params in overrides.items():
        if name not in {parse_choice(m).label for m in methods}:
            get_method(name).make_params(**params)
    mask = build(MaskParams, _parse_assignments(args.mask, "--mask"), "--mask")
    if args.evaluate:
        args.save_attr_maps = True
    source = _source(args)
    adapter, dataset, notes = source.load()
    if not (args.methods or args.variants):
        methods = _default_methods(adapter, SEED_METHODS, notes)
    settings = CompareSettings(
        methods=methods, method_params=overrides, mask=mask, target=args.target,
        batch_size=args.batch_size, seed=args.seed, sample_size=args.sample_size,
        idx_sample_img=args.idx_sample_img, save_attr_maps=args.save_attr_maps,
    )
    out = Path(args.out) if args.out else _default_out(args, adapter.name)
    for note in notes:
        print(f"note: {note}")
    start = time.perf_counter()
    agg = compare(adapter, dataset, out, settings, progress=not args.no_progress,
                  overwrite=args.overwrite, notes=notes, source=source.record(),
                  engine=_engine(args))
    _print_summary(agg, out, time.perf_counter() - start,
                   random_weights=args.random_weights and not args.checkpoint)
    if args.evaluate:
        _run_evaluate(out, adapter, dataset, args)
    return 0


def _evaluate_settings(args: argparse.Namespace):
    from vitxai.evaluate import EvaluateSettings
    from vitxai.metrics.faithfulness import idsds_baseline

    groups = ["faithfulness", "localization", "complexity", "agreement"]
    groups += [g for g in ("sanity", "gae", "idsds") if getattr(args, g, False)]
    # any --id-* option asks for incremental deletion
    if args.incremental_deletion or args.id_update_attribution or any(
            getattr(args, k) is not None for k in ("id_steps", "id_order", "id_baseline")):
        groups.append("incremental_deletion")
    if args.unit is not None:
        warnings.warn("--unit is deprecated; use --space token|pixel", FutureWarning,
                      stacklevel=2)
        args.space = "token" if args.unit == "patch" else args.unit
    idsds = "idsds" in groups
    # IDSDS's names (zeros, uniform, blur) → vitxai's; under --idsds only those three
    baseline = (idsds_baseline(args.baseline) if idsds or args.baseline == "zeros"
                else args.baseline)
    id_baseline = "mean" if args.id_baseline == "zeros" else args.id_baseline
    return EvaluateSettings(groups=groups, steps=args.steps, space=args.space,
                            baseline=baseline, topk=args.topk,
                            sanity_images=args.sanity_images, gae_images=args.gae_images,
                            gae_steps=args.gae_steps, gae_legacy=args.gae_schedule == "legacy",
                            seed=args.seed,
                            allow_missing=args.allow_missing, grid=args.grid,
                            transform=args.attribution_transform,
                            idsds_checkpoint=getattr(args, "finetuned", None) if idsds else None,
                            id_steps=args.id_steps or 32, id_order=args.id_order or "ascending",
                            id_baseline=id_baseline,
                            id_update_attribution=args.id_update_attribution)


def _run_evaluate(out: Path, adapter, dataset, args: argparse.Namespace) -> None:
    from vitxai.evaluate import evaluate
    from vitxai.report.html import write_report

    engine = _engine(args) if getattr(args, "command", "") == "evaluate" else None
    evaluate(out, adapter, dataset, _evaluate_settings(args), progress=not args.no_progress,
             engine=engine)
    for path in write_report(out):
        print(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vitxai.store import finished_run

    _check_counts(args)
    if args.idsds != (args.finetuned is not None):
        raise ValueError("--idsds needs --checkpoint FINETUNED (the output of `vitxai "
                         "finetune-deletion`), and --checkpoint serves --idsds only")
    out = Path(args.run_dir)
    config, _ = finished_run(out)  # refuse before loading the model
    adapter, dataset, _ = RunSource.from_config(config, out).load()
    _run_evaluate(out, adapter, dataset, args)
    return 0


def _class_names(adapter) -> dict[int, str]:
    if adapter.name == "vitxai-benchmark-vit":
        from vitxai.data.synthetic import CLASS_NAMES

        return dict(CLASS_NAMES)
    if adapter.num_classes == 1000:
        from vitxai.data.datasets import imagenet_class_name

        return {i: imagenet_class_name(i) for i in range(1000)}
    return {}


def cmd_explain(args: argparse.Namespace) -> int:
    from vitxai.explain import DEFAULT_METHODS, explain

    overrides = _method_overrides(args)
    if args.discard_ratio is not None:
        overrides.setdefault("grad_rollout", {})["discard_ratio"] = args.discard_ratio
    source = RunSource.from_values({**vars(args), "data": args.image})
    adapter, dataset, notes = source.load()
    methods = args.methods or _default_methods(adapter, DEFAULT_METHODS, notes)
    for note in notes:
        print(f"note: {note}")
    paths = explain(adapter, dataset, methods, args.out,
                    targets=args.category_index, method_params=overrides,
                    seed=args.seed,
                    class_names={**_class_names(adapter), **dataset.class_names})
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vitxai.report.html import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from vitxai.methods import METHODS

    for name, spec in sorted(METHODS.items()):
        print(f"{name}  [{spec.family}{', ViT only' if spec.vit_only else ''}]")
        print(f"    {spec.summary}")
        print(f"    paper: {spec.paper}")
        for f in dataclasses.fields(spec.params):
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())  # type: ignore[misc]
            print(f"    --param {name}.{f.name}={default!r}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vitxai.data import download_imagenette

    path = download_imagenette(root=args.root, variant=args.variant,
                               progress=not args.no_progress)
    print(f"imagenette ready in {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vitxai.train import train_benchmark_model

    card = train_benchmark_model(args.out, seed=args.seed, time_budget_s=args.time_budget)
    print(json.dumps(card, indent=2, default=str))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from vitxai.finetune import CARD, WEIGHTS, FinetuneSettings, finetune_deletion

    _check_counts(args)
    settings = FinetuneSettings(
        grid=args.grid, baseline=args.baseline, epochs=args.epochs, step_size=args.step_size,
        gamma=args.gamma, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        batch_size=args.batch_size, val_size=args.val_size, val_seed=args.val_seed,
        seed=args.seed)
    source = _source(args)
    slug = f"finetune-{Path(args.data).stem}-{source.model_name}-grid{args.grid}-{args.baseline}"
    out = Path(args.out) if args.out else Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "-", slug)
    card = finetune_deletion(out, source, settings, time_budget_s=args.time_budget,
                             checkpoint_every_s=args.checkpoint_every, overwrite=args.overwrite,
                             progress=not args.no_progress)
    ep, acc = card["epochs"], card["accuracy"]
    print(f"{ep['done']} of {ep['planned']} epochs" + (
        "" if ep["complete"] else " (time budget spent: rerun the same command to continue)"))
    if acc["after"]:
        print(f"clean accuracy {acc['before']['clean_accuracy']:.1%} -> "
              f"{acc['after']['clean_accuracy']:.1%}; deleted-cell accuracy "
              f"{acc['before']['deleted_accuracy']:.1%} -> "
              f"{acc['after']['deleted_accuracy']:.1%} (best epoch {ep['best']})")
        print(out / WEIGHTS)
    print(out / CARD)
    return 0


#: how a folder's labels, targets and class names are found (--help of compare and explain)
LABELS_HELP = ("Labels: an image in a top-level subfolder named after an ImageNet-1k WordNet id "
               "(data/n01440764/x.jpg) gets that class; --labels FILE.csv sets (or overrides) "
               "them. CSV rows are 'file,class': the image's file name or path relative to "
               "the folder, and a class index or name (names from --class-names, else "
               "ImageNet-1k's).")


def _add_engine_options(p: argparse.ArgumentParser, text: str) -> None:
    r = p.add_argument_group("scale-out", text)
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (this process, default) or ray (needs the ray extra)")
    r.add_argument("--address", help="Ray cluster: 'auto' or ray://HOST:PORT (default: start "
                                     "a local Ray instance)")
    r.add_argument("--workers", type=int, default=1, help="Ray workers (model replicas)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker (0: CPU workers)")
    r.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores per worker")
    r.add_argument("--ship-images", action="store_true",
                   help="decode images on the driver and send them to the workers (data "
                        "not on a path every node sees)")


def _add_probe_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", metavar="FILE.safetensors",
                   help="a linear probe from `vitxai probe`, attached as the classifier of a "
                        "headless backbone (DINOv2, MAE, CLIP); replaces a model's own head "
                        "with a warning")


def cmd_probe(args: argparse.Namespace) -> int:
    from vitxai.probing import card_markdown, train_probe

    source = _source(args)
    out = Path(args.out) if args.out else Path("probes") / re.sub(
        r"[^A-Za-z0-9_.+-]+", "-", f"{source.model_name}-{args.readout}")
    card = train_probe(source, out, readout=args.readout, l2_grid=args.l2,
                       heldout=args.heldout, seed=args.seed, batch_size=args.batch_size,
                       cache_dir=args.cache_dir)
    for note in card["notes"]:
        print(f"note: {note}")
    print(card_markdown(card))
    print(f"probe: {out / 'probe.safetensors'} (card: {out / 'card.json'})")
    return 0


def _add_model_size_options(p: argparse.ArgumentParser) -> None:
    """``--img-size`` and ``--num-classes`` of a timm model, shared by compare and explain."""
    p.add_argument("--img-size", type=int, metavar="N",
                   help="build the timm model at N×N pixels (a multiple of the patch size; "
                        "position embeddings are interpolated, preprocessing follows), e.g. "
                        "--img-size 224 on a DINOv2 ViT-B/14 for a 16×16 grid")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="build the timm model with N classes (pretrained weights get a new, "
                        "untrained head; a --checkpoint must hold an N-class head)")


def _add_data_options(p: argparse.ArgumentParser, truth: bool = True) -> None:
    """Preprocessing and (``truth``) annotation options, shared by compare and explain."""
    from vitxai.data.transforms import INTERPOLATIONS

    g = p.add_argument_group(
        "preprocessing", "default: the model's own timm data config (e.g. resize to input "
        "size / 0.875 and centre-crop); printed at the start and recorded in config.json")
    g.add_argument("--crop-pct", type=float, help="share kept by the centre crop, in (0, 1]: "
                   "resize to input size / CROP_PCT, crop to the input size")
    g.add_argument("--resize", type=int, metavar="PIXELS",
                   help="resize the shorter side to PIXELS, then centre-crop to the input size")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="normalisation mean of the model (replaces its data config's)")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="normalisation std of the model")
    g.add_argument("--no-crop", action="store_true",
                   help="use the whole image: resize to exactly the input size, no crop")
    a = p.add_argument_group("labels and targets of a folder of images", LABELS_HELP)
    a.add_argument("--labels", metavar="FILE.csv",
                   help="'file,class' rows: labels (accuracy; the explained class by default)")
    a.add_argument("--targets", metavar="FILE.csv",
                   help="'file,class' rows: the class explained per image (wins over the "
                        "label or prediction rule; unlisted images follow it)")
    a.add_argument("--class-names", metavar="FILE.txt",
                   help="class names, one per line (index = line number from 0)")
    if not truth:
        return
    t = p.add_argument_group(
        "ground truth of a folder of images",
        "Truth masks or boxes give the localisation scores (IoU, Dice, coverage, pointing "
        "game, mass inside; evaluate's localisation metrics). They go through the image's "
        "own resize and crop. Images without truth are skipped and listed.")
    t.add_argument("--masks", metavar="DIR",
                   help="one PNG per image with the image's stem; non-zero pixels = object")
    t.add_argument("--boxes", metavar="FILE",
                   help="boxes in pixels of the original image: CSV 'file,x0,y0,x1,y1[,class]' "
                        "(x1, y1 exclusive; several rows per image), Pascal VOC XML (a file "
                        "or folder) or COCO instances JSON; boxes of the explained class where "
                        "their names match it, else all")


#: --baseline of the deletion metrics: vitxai's names, the deprecated "zero", IDSDS's "zeros"
DELETION_BASELINES = ["mean", "blur", "image_mean", "uniform_normalized", "black", "white",
                      "uniform", "zero", "zeros"]


def _add_evaluate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--steps", type=int, default=20, help="deletion/insertion steps")
    g.add_argument("--space", choices=["token", "pixel"], default="token",
                   help="what deletion/insertion removes: patch tokens (default; pixels for "
                        "non-ViTs) or pixels")
    g.add_argument("--unit", choices=["patch", "pixel"], help=argparse.SUPPRESS)  # deprecated
    g.add_argument("--baseline", default="mean", choices=DELETION_BASELINES,
                   help="what deleted units become: mean (the model's mean colour, default), "
                        "blur, image_mean, uniform_normalized, ... (docs/conventions.md; zero "
                        "is the deprecated name of mean); IDSDS's names zeros (= mean), "
                        "uniform (= uniform_normalized) and blur; --idsds takes only these")
    g.add_argument("--topk", type=float, default=0.1,
                   help="share of patches in the top-k of the rank-agreement metrics")
    g.add_argument("--sanity", action="store_true",
                   help="also run cascading model randomisation (recomputes maps)")
    g.add_argument("--gae", action="store_true", help="also compute GAE (recomputes maps): "
                   "components per method and per positive, best and worst explained images")
    g.add_argument("--gae-images", type=int, metavar="N",
                   help="images used by --gae, a multiple of 4 (default: --sanity-images)")
    g.add_argument("--gae-steps", type=int, default=10, help="GAE masking steps T (≥ 2)")
    g.add_argument("--gae-schedule", choices=["fixed", "legacy"], default="fixed",
                   help="fixed (default) or legacy: the reference's strided mosaics and MoRF "
                        "schedule (docs/evaluation.md §7)")
    g.add_argument("--allow-missing", action="store_true",
                   help="evaluate the images whose maps are readable and list the others "
                        "(default: a missing or corrupt map file is an error)")
    g.add_argument("--sanity-images", type=int, default=4,
                   help="images used by --sanity and --gae")
    g.add_argument("--grid", type=int, default=4,
                   help="cells per side of single deletion and IDSDS (default 4: 56-px cells "
                        "at 224 px)")
    g.add_argument("--attribution-transform", choices=["raw", "abs", "relu"], default="raw",
                   help="applied to each map after its channel sum by single deletion, IDSDS "
                        "and incremental deletion (default raw)")
    i = p.add_argument_group("incremental deletion (Hesse et al. 2024; any --id-* option "
                             "turns it on)")
    i.add_argument("--incremental-deletion", action="store_true",
                   help="mean softmax of the target while ever more pixels, ranked by the "
                        "saved map, are set to the baseline")
    i.add_argument("--id-steps", type=int, help="deletion steps (default 32)")
    i.add_argument("--id-order", choices=["ascending", "descending"],
                   help="least relevant pixels first (default; higher is better) or most "
                        "relevant first (lower is better)")
    i.add_argument("--id-baseline", choices=DELETION_BASELINES, help="default: --baseline")
    i.add_argument("--id-update-attribution", action="store_true",
                   help="recompute the map after every step, deleted pixels kept deleted "
                        "(costs steps × the method)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitxai",
        description="Compute, compare and evaluate attribution methods on Vision Transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compare", help="run methods over a dataset and measure their agreement",
        description="Run attribution methods over a dataset, binarise every map by the unified "
                    "scheme, and write agreement (IoU, Dice, coverage) and, where the data has "
                    "ground truth, localisation scores into a run directory. Without arguments: "
                    "the six methods of the original comparison on the bundled benchmark.")
    c.add_argument("--methods", nargs="+", help="registry names or aliases (default: the six "
                   "of the original comparison; its four model-agnostic ones on models other "
                   "than ViTs; see `vitxai methods`), variants LABEL=METHOD(NAME=VALUE,...) "
                   "side by side, e.g. 'ig_u=integrated_gradients(baseline=uniform)', or the "
                   "IDSDS benchmark's presets idsds:IxG, idsds:IG-U, ... (docs/conventions.md)")
    c.add_argument("--variants", metavar="FILE",
                   help="more method labels, one per line (# comments), as for --methods")
    c.add_argument("--data", default="synthetic",
                   help="'synthetic' (bundled ground-truth benchmark, default), 'imagenette', "
                        "or a folder of images or one image file (labels: see below)")
    c.add_argument("--split", help="synthetic: single|pair|parts; imagenette: val (default)|train")
    c.add_argument("--n-images", type=int, help="size of the generated synthetic set "
                   f"(default {SYNTHETIC_DEFAULT_SIZE})")
    c.add_argument("--data-seed", type=int, default=20240,
                   help="seed of the generated synthetic images")
    c.add_argument("--data-root", default="data", help="where `vitxai data imagenette` unpacked")
    c.add_argument("--variant", default="full", choices=["full", "320", "160"],
                   help="imagenette variant")
    c.add_argument("--model", help="'bundled' (default with --data synthetic), a timm name "
                   f"(default otherwise {DEFAULT_IMAGENET_MODEL}), or a Hugging Face ViT: "
                   "hf:ORG/NAME or hf:/path/to/dir (needs the hf extra)")
    c.add_argument("--checkpoint", help="local weights (.safetensors or torch file)")
    c.add_argument("--checkpoint-key", metavar="KEY",
                   help="the entry of --checkpoint holding the weights, e.g. model_ema "
                        "(default: found by itself)")
    c.add_argument("--random-weights", action="store_true",
                   help="do not fetch pretrained weights (for smoke tests)")
    _add_model_size_options(c)
    _add_probe_option(c)
    _add_engine_options(c, "Compute batches on Ray workers; the driver commits them into "
                        "the run directory, so resume, the lock and the results are those "
                        "of a local run.")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    c.add_argument("--precision", default="float32",
                   choices=["float32", "bf16", "float64", "auto"],
                   help="float32 (default); bf16: forward passes in bfloat16 autocast, 2-3x "
                        "faster on GPUs and CPUs with AMX/AVX512-BF16 (several times slower on "
                        "other CPUs), results in float32; auto: bf16 where it is native, else "
                        "float32 (recorded resolved); float64: exact arithmetic for tests")
    c.add_argument("--target", default="label", choices=["label", "prediction"],
                   help="explain the label where known (default) or the prediction")
    c.add_argument("--sample_size", "--sample-size", "--subset_size", dest="sample_size",
                   type=int, help="use this many images (seeded draw); default all")
    c.add_argument("--idx_sample_img", "--idx-sample-img", dest="idx_sample_img", type=int,
                   help="dataset index of the image in the sample figure (default: the first)")
    c.add_argument("--save_attr_maps", "--save-attr-maps", dest="save_attr_maps",
                   action="store_true", help="save signed maps and masks (safetensors)")
    c.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="method parameter, e.g. --param lime.n_samples=500 (repeatable)")
    c.add_argument("--segmentation", action="append", default=[], metavar="NAME=VALUE",
                   help="shared superpixels of LIME/KernelSHAP, e.g. algorithm=slic")
    c.add_argument("--head-fusion", choices=["mean", "max", "min"],
                   help="attention rollout head fusion (vit-explain's option)")
    c.add_argument("--discard-ratio", type=float, help="attention rollout discard ratio")
    c.add_argument("--mask", action="append", default=[], metavar="NAME=VALUE",
                   help="unified mask parameter, e.g. --mask component_percentile=80")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="run directory (default runs/DATA-SPLIT-MODEL); rerunning the "
                   "same command resumes it")
    _add_data_options(c)
    c.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--evaluate", action="store_true",
                   help="also score the maps (implies --save_attr_maps) and write the report")
    _add_evaluate_options(c)
    c.set_defaults(func=cmd_compare)

    ev = sub.add_parser("evaluate", help="score the maps a run saved (needs --save_attr_maps)",
                        description="Faithfulness, localization, complexity and agreement "
                                    "scores of a run's saved maps, with bootstrap intervals "
                                    "and rankings; writes evaluation.json and the report.")
    ev.add_argument("run_dir")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--seed", type=int, default=0)
    _add_evaluate_options(ev)
    _add_engine_options(ev, "Compute IDSDS (every map recomputed on the fine-tuned model) on "
                            "Ray workers; the other groups run here.")
    ev.add_argument("--idsds", action="store_true",
                    help="also IDSDS (Hesse et al. 2024): every method recomputed on the "
                         "fine-tuned --checkpoint for the ground-truth labels, then single "
                         "deletion on it (same --grid and --baseline as the fine-tuning)")
    ev.add_argument("--checkpoint", dest="finetuned", metavar="FINETUNED",
                    help="with --idsds: a `vitxai finetune-deletion` output of the run's model "
                         "(its folder or finetuned.safetensors)")
    ev.set_defaults(func=cmd_evaluate)

    e = sub.add_parser(
        "explain", help="overlay figures of chosen methods for one image or a folder",
        description="Explain one image (or every image of a folder): one figure per image with "
                    "an overlay per method, and the maps as safetensors.")
    e.add_argument("--image", required=True, help="an image file or a folder of images")
    e.add_argument("--methods", nargs="+",
                   help="registry names or aliases (default: attention_rollout grad_rollout "
                        "chefer2021a on a ViT, the model-agnostic methods of the original "
                        "comparison on other models)")
    e.add_argument("--category-index", "--category_index", dest="category_index", type=int,
                   help="class to explain (default: the prediction)")
    e.add_argument("--head-fusion", "--head_fusion", dest="head_fusion",
                   choices=["mean", "max", "min"], help="attention rollout head fusion")
    e.add_argument("--discard-ratio", "--discard_ratio", dest="discard_ratio", type=float,
                   help="discard ratio of attention rollout and gradient rollout")
    e.add_argument("--model", default=DEFAULT_IMAGENET_MODEL,
                   help="timm model name, 'bundled', or hf:ORG/NAME | hf:/path/to/dir")
    e.add_argument("--checkpoint", help="local weights (.safetensors or torch file)")
    e.add_argument("--checkpoint-key", metavar="KEY",
                   help="the entry of --checkpoint holding the weights, e.g. model_ema")
    e.add_argument("--random-weights", action="store_true")
    _add_model_size_options(e)
    _add_probe_option(e)
    e.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="explanations", help="output folder")
    _add_data_options(e, truth=False)
    e.set_defaults(func=cmd_explain)

    r = sub.add_parser("report", help="write report.html (self-contained) and report.md of a run")
    r.add_argument("run_dir", help="a run directory written by `vitxai compare`")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("methods", help="list every method with its parameters and paper")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("data", help="download datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    imn = dsub.add_parser("imagenette", help="download and unpack Imagenette into --root")
    imn.add_argument("--variant", default="full", choices=["full", "320", "160"])
    imn.add_argument("--root", default="data")
    imn.add_argument("--no-progress", action="store_true")
    imn.set_defaults(func=cmd_data)

    from vitxai.models.probe import READOUTS
    from vitxai.probing import L2_GRID

    pr = sub.add_parser(
        "probe", help="train a linear probe on a frozen backbone (DINOv2, MAE, CLIP, ...)",
        description="Train a linear probe (L-BFGS logistic regression, L2 chosen on a held-out "
                    "split) on a frozen timm ViT's read-out, with features extracted once and "
                    "cached. Writes probe.safetensors, card.json and card.md; use the probe "
                    "with --probe in compare, explain and evaluate.")
    pr.add_argument("--model", help="'bundled' (default with --data synthetic) or a timm "
                    "name, e.g. vit_base_patch14_dinov2.lvd142m")
    pr.add_argument("--checkpoint", help="local weights of the backbone")
    pr.add_argument("--checkpoint-key", metavar="KEY")
    pr.add_argument("--random-weights", action="store_true",
                    help="do not fetch pretrained weights (for smoke tests)")
    pr.add_argument("--img-size", type=int, metavar="N", help="build the backbone at N×N")
    pr.add_argument("--data", default="synthetic", help="'synthetic', 'imagenette', or a "
                    "folder with one subfolder per class (or --labels FILE.csv)")
    pr.add_argument("--split", help="synthetic: single|pair|parts; imagenette: train|val")
    pr.add_argument("--n-images", type=int, help="size of the generated synthetic set")
    pr.add_argument("--data-seed", type=int, default=1,
                    help="seed of the generated synthetic images (default 1: not the "
                         "comparison's images)")
    pr.add_argument("--data-root", default="data")
    pr.add_argument("--variant", default="full", choices=["full", "320", "160"])
    pr.add_argument("--readout", default="cls", choices=list(READOUTS),
                    help="cls (class token), mean_patch (mean of the patch tokens) or "
                         "cls+mean_patch (DINOv2's linear evaluation)")
    pr.add_argument("--l2", type=float, nargs="+", default=list(L2_GRID),
                    metavar="LAMBDA", help="L2 strengths to choose from on the held-out split")
    pr.add_argument("--heldout", type=float, default=0.2,
                    help="share of each class held out to choose λ (default 0.2)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--cache-dir", help="feature cache (default ~/.cache/vitxai/features)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--precision", default="float32", choices=["float32", "bf16"])
    pr.add_argument("--out", help="output folder (default probes/MODEL-READOUT)")
    _add_data_options(pr, truth=False)
    pr.set_defaults(func=cmd_probe)

    t = sub.add_parser("train-benchmark",
                       help="train the bundled ViT on the synthetic benchmark")
    t.add_argument("--out", default=str(Path(__file__).parent / "assets"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--time-budget", type=float, default=1200.0,
                   help="seconds of training at most (default 1200 = 20 min)")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser(
        "finetune-deletion", help="fine-tune a model with deleted grid cells (for IDSDS)",
        description="Fine-tune a model so that one deleted grid cell is in-domain (IDSDS, "
                    "Hesse et al. 2024): with probability 1/2 per image one uniformly chosen "
                    "cell is set to the baseline. Defaults are the paper's schedule. Keeps the "
                    "best clean-accuracy checkpoint (finetuned.safetensors) and a card; "
                    "rerunning the same command resumes. Use the result with `vitxai evaluate "
                    "RUN --idsds --checkpoint OUT`.")
    f.add_argument("--data", default="synthetic",
                   help="'synthetic' (generated, default), 'imagenette' (split train; val "
                        "validates), or a folder of labelled images (--val-size held out)")
    f.add_argument("--split", help="synthetic: single (default)|pair|parts; imagenette: train")
    f.add_argument("--n-images", type=int, help="training images generated on synthetic data "
                   "(default 2048)")
    f.add_argument("--data-seed", type=int, default=1,
                   help="seed of the generated training images (default 1; compare's 20240 "
                        "stays unseen)")
    f.add_argument("--data-root", default="data")
    f.add_argument("--variant", default="full", choices=["full", "320", "160"])
    f.add_argument("--model", help="'bundled' (default with --data synthetic) or a timm name")
    f.add_argument("--checkpoint", help="local weights of a timm model to start from")
    f.add_argument("--checkpoint-key", metavar="KEY")
    f.add_argument("--random-weights", action="store_true",
                   help="start from random weights (for smoke tests)")
    _add_model_size_options(f)
    f.add_argument("--device", default="cpu")
    f.add_argument("--precision", default="float32", choices=["float32", "bf16", "float64"])
    s = f.add_argument_group("deletion and schedule (defaults: the paper's)")
    s.add_argument("--grid", type=int, default=4, help="cells per side (default 4)")
    s.add_argument("--baseline", default="zeros", choices=["zeros", "uniform", "blur"],
                   help="zeros: the model's mean colour (zero after normalisation; default); "
                        "uniform: U(-1, 1) in normalised units; blur: Gaussian, kernel 51, "
                        "sigma 41")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--step-size", type=int, default=10, help="StepLR step in epochs")
    s.add_argument("--gamma", type=float, default=0.1, help="StepLR factor")
    s.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    s.add_argument("--momentum", type=float, default=0.9)
    s.add_argument("--weight-decay", type=float, default=1e-4)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--val-size", type=int, default=256, help="validation images")
    s.add_argument("--val-seed", type=int,
                   help="seed of the validation images (default: --data-seed + 1 on "
                        "synthetic data, else --seed)")
    s.add_argument("--seed", type=int, default=0,
                   help="shuffling, flips, deleted cells, dropout")
    f.add_argument("--time-budget", type=float,
                   help="stop after this many seconds; rerun the same command to continue")
    f.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between resume checkpoints (default 60)")
    f.add_argument("--out", help="output folder (default runs/finetune-DATA-MODEL-GRID-"
                   "BASELINE); rerunning the same command resumes it")
    f.add_argument("--overwrite", action="store_true",
                   help="replace a different fine-tuning in --out")
    f.add_argument("--no-progress", action="store_true")
    _add_data_options(f, truth=False)
    f.set_defaults(func=cmd_finetune)
    return parser


def _failed_file(e: BaseException) -> tuple[str | None, str | None]:
    """(path, open mode or None) of the file an I/O error is about.

    ``OSError.filename`` where the call set it (open, mkdir, ...); a failed ``write()`` and a
    safetensors error name no file, so then the innermost frame that holds an open file or a
    ``filename`` argument (safetensors' ``load_file``/``save_file``) says which.
    """
    if isinstance(e, OSError) and isinstance(e.filename, str | bytes | os.PathLike):
        return os.fsdecode(e.filename), None
    for frame, _ in reversed(list(traceback.walk_tb(e.__traceback__))):
        values = frame.f_locals
        for value in values.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name, getattr(value, "mode", None)
        if isinstance(values.get("filename"), str | os.PathLike):
            return os.fsdecode(values["filename"]), None
    return None, None


def _io_error_line(e: Exception) -> str:
    """One line for an OSError or a safetensors error: the operation, the file, the reason."""
    path, mode = _failed_file(e)
    if isinstance(e, OSError):
        reason = e.strerror or str(e) or type(e).__name__
        writing = e.errno in WRITE_ERRNOS or bool(mode and set(mode) & set("wax+"))
        verb = ("write" if writing else "read" if mode else
                "create" if e.errno in (errno.ENOTDIR, errno.EEXIST) else "open")
    else:  # safetensors: "Error while (de)serializing ...: REASON (os error N)"
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = re.sub(r"\s*\(os error \d+\)$", "", text.rsplit(": ", 1)[-1])
        verb = "read" if "deserializ" in text or "serializ" not in text else "write"
    return f"cannot {verb} {path}: {reason}" if path else f"{verb} failed: {reason}"


def _run(args: argparse.Namespace) -> int:
    """Run the sub-command; errors the user can fix exit 2, the environment's exit 1."""
    import torch
    from safetensors import SafetensorError

    from vitxai.data import DownloadError
    from vitxai.models import ModelLoadError
    from vitxai.store import RunDirectoryError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ModelLoadError, RunDirectoryError,
            DownloadError, torch.OutOfMemoryError) as e:  # OOM: after the batch size backed off
        if _INTERRUPTED.is_set():  # the error is what an interrupt became
            raise KeyboardInterrupt from e
        if isinstance(e, OSError) and e.errno is not None:
            message = _io_error_line(e)
        else:
            message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            message = _cli_wording(message)
        print(f"vitxai: error: {message}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # full disk, read-only or misnamed paths, ...
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt from e
        print(f"vitxai: error: {_io_error_line(e)}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT handler: raise KeyboardInterrupt as Python's does, and remember it."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitxai`` console script."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if hasattr(signal, "SIGXFSZ") and in_main_thread:
        # A write past the file-size limit (ulimit -f) first raises SIGXFSZ, whose default
        # action kills the process without a word; ignored, the write fails with
        # OSError(EFBIG), which is reported as one line like any other I/O error.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # A KeyboardInterrupt raised while a C extension imports a module (numpy's import of
    # datetime, say) comes out as that extension's ImportError, and code that catches
    # everything may swallow it; the remembered interrupt still ends the run as Ctrl-C.
    _INTERRUPTED.clear()
    previous_handler = signal.signal(signal.SIGINT, _interrupt) if in_main_thread else None
    format_warning = warnings.formatwarning
    # a warning is one line too (the default adds the source line that raised it); warnings
    # after an interrupt are its consequences (a half-imported numpy) and stay unsaid
    warnings.formatwarning = (
        lambda message, *_, **__: "" if _INTERRUPTED.is_set()
        else f"vitxai: warning: {_cli_wording(str(message))}\n")
    try:  # everything, heavy imports included, so that Ctrl-C at start-up is one line too
        args = build_parser().parse_args(argv)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        code = _run(args)
    except KeyboardInterrupt:
        _INTERRUPTED.set()
    except Exception:
        if not _INTERRUPTED.is_set():
            raise
    finally:
        warnings.formatwarning = format_warning
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    if _INTERRUPTED.is_set():
        print("vitxai: interrupted; finished batches are saved, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
