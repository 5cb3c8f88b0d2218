#!/usr/bin/env python3
"""Side-by-side timing of vitxai and the attribution tools people use today, against a floor.

In one process, on one model, the same images, targets and sample counts, this measures

  (a) the floor: the model's best seconds per evaluation (forward under inference_mode, and
      forward + backward to the input) over a range of batch sizes;
  (b) vitxai: LIME and KernelSHAP (one shared segmentation, timed on its own), Integrated
      Gradients, GradientSHAP, and every attention method that reads the shared ViT pass, run
      together in one BatchContext (plus the LRP methods that make their own pass);
      with --equal-error also paired LIME and KernelSHAP at the sample counts at which
      benchmarks/convergence.py found them as accurate as lime_image / captum at 1000;
  (b') tokens: paired LIME and KernelSHAP on patch tokens with removal="drop" (no
      segmentation; forwards on the kept tokens only) at the same sample count;
  (c) references: lime's ``lime_image`` (its default batch of 10 and a batch of 64), captum's
      ``Lime`` and ``KernelShap`` on the same quickshift superpixels (perturbations_per_eval 1,
      captum's default, and 64), ``IntegratedGradients`` and ``GradientShap``;
  (d) the original comparison's settings (docs/differences.md §4): lime_image 750 samples in
      batches of 10, captum KernelShap 1000 samples one per forward, captum IG defaults (all
      50 steps in one batch), captum GradientShap 50 samples;
  (e) peak memory of a streamed ``compare`` run over N and 2N images (flat = streaming works),

and prints per method: seconds per image, model evaluations per image, the floor (evaluations ×
best seconds per evaluation), the ratio to the floor, peak memory, and vitxai's speed-up over
each reference. Everything goes to a JSON file with the machine's description.

Run from the repository root (see benchmarks/README.md):

    python benchmarks/bench.py --model bundled --images 2 --samples 1000 \
        --out benchmarks/results/bundled-fp32.json
    python benchmarks/bench.py --quick          # smoke test, well under a minute

``--only lime,kernel_shap`` times just those methods; ``--device cuda`` runs on a GPU
(benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitxai.batching import default_batch_size
from vitxai.methods import METHODS, BatchContext, attribute
from vitxai.methods.base import _peak_memory_mb, _reset_peak_memory
from vitxai.methods.perturbation import SegmentationParams, shared_segments
from vitxai.models import ModelAdapter, ModelLoadError, load_model
from vitxai.models.adapter import cpu_has_native_bf16

REPO = Path(__file__).resolve().parent.parent
FALLBACK_MODEL = "deit_tiny_patch16_224"
DATA_SEED = 20240  # `vitxai compare`'s default synthetic images


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Sample counts and floor grid; ``--quick`` shrinks them all."""

    samples: int = 1000                 # LIME and KernelSHAP coalitions per image
    ig_steps: int = 50
    gs_samples: int = 50
    tuned_ppe: int = 64                 # captum's perturbations_per_eval, tuned
    lime_big_batch: int = 64            # lime_image's batch_size, tuned
    floor_sizes: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
    floor_repeats: int = 3
    repeats: int = 3                    # every timed row: best of this many runs
    floor_budget_s: float = 30.0        # stop growing the batch once one call takes longer
    original_lime_samples: int = 750
    original_ks_samples: int = 1000
    original_ig_steps: int = 50
    original_gs_samples: int = 50
    memory_images: tuple[int, int] | None = None  # (N, 8N) for the streamed-memory check
    only: frozenset[str] | None = None  # --only: the methods to time (None: all)
    equal_error: dict[str, int] = field(default_factory=dict)  # --equal-error samples
    token_grid: int | None = None  # --token-grid: the tokens section's feature cells per side
    token_samples: dict[str, int] = field(default_factory=dict)  # --token-samples
    sampling: str = "kernel"  # --sampling: KernelSHAP's coalition sampling in those rows
    lime_sampling: str = "bernoulli"  # --lime-sampling: LIME's, likewise
    surrogate: str | None = None  # --surrogate: both methods' regression adjustment there
    other_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # defaults
    memory_params: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "lime": {"n_samples": 100}, "kernel_shap": {"n_samples": 100},
        "integrated_gradients": {"steps": 10}, "gradient_shap": {"n_samples": 10}})

    def fast_options(self, method: str) -> dict[str, Any]:
        """The options of ``method``'s equal-error and tokens rows: paired coalitions, the
        run's ``--sampling`` (KernelSHAP) or ``--lime-sampling`` (LIME) unless it is the
        method's default, and ``--surrogate``."""
        sampling = self.lime_sampling if method == "lime" else self.sampling
        default = METHODS[method].make_params().sampling
        return {"paired": True, **({} if sampling == default else {"sampling": sampling}),
                **({"surrogate": self.surrogate} if self.surrogate else {})}

    @classmethod
    def quick(cls) -> Settings:
        return cls(samples=16, ig_steps=4, gs_samples=4, tuned_ppe=8, lime_big_batch=8,
                   floor_sizes=(1, 8), floor_repeats=1, repeats=1, floor_budget_s=5.0,
                   original_lime_samples=12, original_ks_samples=16, original_ig_steps=4,
                   original_gs_samples=4,
                   other_params={"rise": {"n_samples": 8}, "occlusion": {"window": 56,
                                                                       "stride": 56},
                                 "smoothgrad": {"n_samples": 2},
                                 "integrated_gradients_uniform": {"steps": 4}},
                   memory_params={"lime": {"n_samples": 8}, "kernel_shap": {"n_samples": 8},
                                  "integrated_gradients": {"steps": 2},
                                  "gradient_shap": {"n_samples": 2}})


SECTIONS = ("floor", "vitxai", "tokens", "references", "original", "memory")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time vitxai against lime_image and captum on one model, images and "
                    "sample counts, relative to the model-evaluation floor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bundled",
                   help="'bundled' (vitxai's benchmark ViT; falls back to a random "
                        f"{FALLBACK_MODEL} when its weights are missing) or a timm name "
                        "(random weights unless --pretrained)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm models: load hub weights (cached copy when offline)")
    p.add_argument("--images", type=int, default=None,
                   help="images (synthetic benchmark); default 2, with --quick 1")
    p.add_argument("--samples", type=int, default=None,
                   help="LIME and KernelSHAP samples per image, all tools alike; default "
                        "1000, with --quick 16")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the model's forward passes (floor, vitxai, and the references "
                        "unless --reference-precision says otherwise)")
    p.add_argument("--reference-precision", default="same", choices=["same", "fp32", "bf16"],
                   help="precision of the lime_image and captum runs; 'fp32' with "
                        "--precision bf16 compares vitxai's bf16 mode with the tools as "
                        "people run them")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per timed row, the best one counts (default 3; --quick: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--only", default=None,
                   help="comma-separated registry names: time only these methods (vitxai, "
                        "tokens, references, original), e.g. lime,kernel_shap")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--equal-error", default=None, metavar="lime=N,kernel_shap=M",
                   help="vitxai section: also time paired LIME / KernelSHAP (superpixels) at "
                        "these sample counts, those at which benchmarks/convergence.py found "
                        "them as accurate as lime_image / captum KernelShap at 1000 samples")
    p.add_argument("--token-grid", type=int, default=None, metavar="G",
                   help="tokens section: LIME / KernelSHAP features are G × G cells of patches "
                        "(grid=G) instead of single patches")
    p.add_argument("--token-samples", default=None, metavar="lime=N,kernel_shap=M",
                   help="tokens section: also time these sample counts (those of equal error "
                        "for the token estimators, from benchmarks/convergence.py)")
    p.add_argument("--sampling", default="kernel", choices=("kernel", "leverage"),
                   help="KernelSHAP's sampling in the --equal-error and tokens rows")
    p.add_argument("--lime-sampling", default="bernoulli", choices=("bernoulli", "orthogonal"),
                   help="LIME's sampling in the --equal-error and tokens rows")
    p.add_argument("--surrogate", default=None, choices=("logistic",),
                   help="LIME's and KernelSHAP's regression adjustment in the --equal-error "
                        "and tokens rows")
    p.add_argument("--memory-images", default=None,
                   help="N,2N images for the streamed-memory check (default: --images and "
                        "twice that)")
    p.add_argument("--time-compare", action="store_true",
                   help="also time the default `vitxai compare` run (bundled model, 12 "
                        "images, six methods)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sample counts and floor grid: a smoke test, not a measurement")
    p.add_argument("--out", default=None,
                   help="JSON results (default benchmarks/results/MODEL-PRECISION-SAMPLES.json)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# machine, model, images
# --------------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    cpu, flags = platform.processor() or None, []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (None, "", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 2**20, 1)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable,
        "bf16_cpu_flags": sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16")),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": mem_total, "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {n: _version(n) for n in ("torch", "timm", "captum", "lime", "numpy",
                                              "scikit-image", "scikit-learn", "vitxai")},
        "git": commit or None,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_adapter(name: str, pretrained: bool, device: str = "cpu"
                 ) -> tuple[ModelAdapter, str]:
    """(adapter, description); the bundled model falls back to a random DeiT-tiny."""
    if name == "bundled":
        from vitxai.models.bundled import load_bundled_model

        try:
            return load_bundled_model(device=device), "bundled benchmark ViT (trained weights)"
        except ModelLoadError as e:
            print(f"note: bundled model unavailable ({str(e).splitlines()[0][:160]}); "
                  f"using a random {FALLBACK_MODEL}")
            name = FALLBACK_MODEL
            return (load_model(name, pretrained=False, device=device),
                    f"{name} with RANDOM weights (fallback: bundled weights missing)")
    if pretrained:
        return load_model(name, pretrained=True, device=device), f"{name} (pretrained)"
    return load_model(name, pretrained=False, device=device), f"{name} with RANDOM weights"


def load_images(adapter: ModelAdapter, n: int) -> torch.Tensor:
    """n synthetic benchmark images at the model's input size, (n, 3, H, W) in [0, 1]."""
    from vitxai.data.synthetic import SyntheticBenchmark

    data = SyntheticBenchmark("single", size=n, seed=DATA_SEED)
    images = torch.stack([data.load(i).image for i in range(n)])
    if tuple(images.shape[-2:]) != adapter.input_size:
        images = torch.nn.functional.interpolate(images, size=adapter.input_size,
                                                 mode="bilinear", antialias=True,
                                                 align_corners=False).clamp(0, 1)
    return images.to(adapter.device, adapter.dtype)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Passes:
    """Images through the model (forward) and backward passes that reached its input."""

    forward: int = 0
    backward: int = 0


@contextlib.contextmanager
def count_passes(adapter: ModelAdapter) -> Iterator[Passes]:
    """Count rows through ``adapter.model`` and rows of gradients reaching its input.

    Token removal (``removal="drop"``) runs a ViT's parts without calling the model itself
    (and embeds each image once); its rows are counted at the first block (only outside a
    call of the model).
    """
    passes = Passes()
    inside = [0]

    def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        inside[0] += 1
        x = args[0]
        passes.forward += int(x.shape[0])
        if x.requires_grad:
            def on_grad(g: torch.Tensor) -> None:
                passes.backward += int(g.shape[0])
            x.register_hook(on_grad)

    def post(*_: Any) -> None:
        inside[0] -= 1

    def parts(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not inside[0]:
            passes.forward += int(args[0].shape[0])

    handles = [adapter.model.register_forward_pre_hook(pre),
               adapter.model.register_forward_hook(post)]
    if adapter.is_vit:
        handles.append(adapter.model.blocks[0].register_forward_pre_hook(parts))
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Record:
    """One timed run."""

    name: str
    tool: str                    # vitxai, lime_image, captum, original
    method: str                  # lime, kernel_shap, integrated_gradients, ...
    settings: dict[str, Any]
    kind: str                    # "forward" or "gradient": which floor applies
    evals_per_image: float       # model evaluations the method needs per image
    seconds: float = math.nan    # total wall time
    n_images: int = 0
    counted: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    includes_segmentation: bool = False
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def per_image(self) -> float:
        return self.seconds / self.n_images if self.n_images else math.nan


class FloorProbe:
    """Re-times the floor right before every run of a row, at section (a)'s best batch size.

    The machine is a shared VM whose speed drifts by ±20 % over minutes; a floor measured once
    at the start would turn that drift into ratios. Each row's ratio uses the fastest probe
    taken during the row (one call before each of its runs), so row and floor see the same
    machine. Probe time is not counted in the row's time.
    """

    def __init__(self, adapter: ModelAdapter, fl: dict[str, Any]) -> None:
        h, w = adapter.input_size
        g = torch.Generator().manual_seed(1)
        self.calls: dict[str, Callable[[], float]] = {}
        for kind in ("forward", "gradient"):
            bs = fl.get(kind, {}).get("batch_size")
            if bs is None:
                continue
            x = torch.rand(bs, 3, h, w, generator=g).to(adapter.device, adapter.dtype)
            self.calls[kind] = self._timer(adapter, kind, x)

    @staticmethod
    def _timer(adapter: ModelAdapter, kind: str, x: torch.Tensor) -> Callable[[], float]:
        return lambda: evaluate(adapter, kind, x) / x.shape[0]

    def __call__(self, kind: str) -> float | None:
        call = self.calls.get(kind)
        return call() if call is not None else None


PROBE: FloorProbe | None = None  # set by main() once section (a) has found the best batches


def _sync(adapter: ModelAdapter) -> None:
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)


def evaluate(adapter: ModelAdapter, kind: str, x: torch.Tensor) -> float:
    """Seconds for one floor evaluation of the batch ``x``: a forward under inference_mode
    ("forward") or a forward and a backward to the input ("gradient"), synchronised."""
    _sync(adapter)
    start = time.perf_counter()
    if kind == "forward":
        with torch.inference_mode():
            adapter.logits(x)
    else:
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(adapter.logits(xg)[:, 0].sum(), xg)
    _sync(adapter)
    return time.perf_counter() - start


def measure(record: Record, adapter: ModelAdapter, n_images: int,
            run: Callable[[], Any], repeats: int = 1) -> Record:
    """Time ``run()`` with pass counters and peak memory; errors are recorded, not raised.

    The row's time is the best of ``repeats`` runs, as the floor's is (a shared machine only
    ever adds time); every run's time is kept in ``extra["all_seconds"]``.
    """
    gc.collect()
    record.n_images = n_images
    record.precision = adapter.precision
    label = f"{record.tool}:{record.name}"
    print(f"  {label:<44}", end="", flush=True)
    try:
        times, probes, peaks, counted = [], [], [], Passes()
        for _ in range(repeats):
            if PROBE is not None and record.kind in ("forward", "gradient"):
                probes.append(PROBE(record.kind))  # outside the counters and the peak
            with count_passes(adapter) as passes:
                _reset_peak_memory(adapter.device)
                _sync(adapter)
                start = time.perf_counter()
                out = run()
                _sync(adapter)
                times.append(time.perf_counter() - start)
                peaks.append(_peak_memory_mb(adapter.device))
            counted.forward += passes.forward
            counted.backward += passes.backward
        record.peak_memory_mb = max((x for x in peaks if x is not None), default=None)
        probes = [x for x in probes if x is not None]
        if probes:
            record.extra["probe_seconds_per_eval"] = min(probes)
        record.seconds = min(times)
        record.extra["all_seconds"] = times
        record.counted = {"forward": counted.forward / (n_images * repeats),
                          "backward": counted.backward / (n_images * repeats)}
        if isinstance(out, dict):
            record.extra.update(out)
        print(f"{record.per_image:9.3f} s/image")
    except Exception as e:  # a missing package or a failing tool must not end the run
        record.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"  FAILED: {record.error}")
        if not isinstance(e, ValueError):  # ValueError: the method does not fit this model
            traceback.print_exc(limit=3, file=sys.stderr)
    return record


def floor(adapter: ModelAdapter, s: Settings) -> dict[str, Any]:
    """Best seconds per evaluation over batch sizes: forward, and forward + backward."""
    h, w = adapter.input_size
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"batch_sizes": {}, "repeats": s.floor_repeats}
    for kind in ("forward", "gradient"):
        for bs in s.floor_sizes:
            x = torch.rand(bs, 3, h, w, generator=g).to(adapter.device, adapter.dtype)
            try:
                evaluate(adapter, kind, x)  # warm-up (allocator, kernels)
                times = [evaluate(adapter, kind, x) for _ in range(s.floor_repeats)]
            except RuntimeError as e:  # out of memory at a large batch: keep the smaller ones
                out["batch_sizes"].setdefault(str(bs), {})[kind] = {"error": str(e)[:200]}
                break
            best = min(times)
            out["batch_sizes"].setdefault(str(bs), {})[kind] = {
                "seconds_per_call": best, "seconds_per_eval": best / bs, "all": times}
            print(f"  floor {kind:<8} batch {bs:>4}: {best / bs * 1e3:8.2f} ms per evaluation")
            if best > s.floor_budget_s:
                break
    for kind in ("forward", "gradient"):
        rows = [(v[kind]["seconds_per_eval"], int(k)) for k, v in out["batch_sizes"].items()
                if kind in v and "seconds_per_eval" in v[kind]]
        if rows:
            best, bs = min(rows)
            out[kind] = {"seconds_per_eval": best, "batch_size": bs}
    return out


# --------------------------------------------------------------------------------------------
# vitxai
# --------------------------------------------------------------------------------------------


def run_vitxai(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
               s: Settings) -> list[Record]:
    n = images.shape[0]
    seg = SegmentationParams()
    records: list[Record] = []

    def wanted(name: str) -> bool:
        return s.only is None or name in s.only

    # LIME and KernelSHAP share one segmentation per image (one context), timed on its own
    contexts: list[BatchContext] = []

    def segmentation() -> dict[str, Any]:
        contexts.append(BatchContext.for_batch(n, planned=["lime", "kernel_shap"]))
        segments = shared_segments(contexts[-1], images, seg)  # a fresh cache every repeat
        return {"superpixels": (segments.flatten(1).amax(1) + 1).tolist()}

    records.append(measure(Record("segmentation", "vitxai", "segmentation",
                                  {"algorithm": "quickshift", "shared_by": "lime, kernel_shap"},
                                  "none", 0.0), adapter, n, segmentation, s.repeats))
    ctx = contexts[-1]

    def method(name: str, **params: Any) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            r = attribute(name, adapter, images, targets, context=ctx, **params)
            return {"cost": {"forward": r.cost.forward, "backward": r.cost.backward}}
        return run

    bs = default_batch_size(adapter.device)  # the methods' own default, recorded
    if wanted("lime"):
        records.append(measure(Record("lime", "vitxai", "lime",
                                      {"n_samples": s.samples, "batch_size": bs}, "forward",
                                      s.samples), adapter, n,
                               method("lime", n_samples=s.samples), s.repeats))
    if wanted("kernel_shap"):
        records.append(measure(Record("kernel_shap", "vitxai", "kernel_shap",
                                      {"n_samples": s.samples, "batch_size": bs}, "forward",
                                      s.samples), adapter, n,
                               method("kernel_shap", n_samples=s.samples), s.repeats))
        ks = records[-1]
        if "cost" in ks.extra:  # fewer rows when 2^S ≤ n_samples (exact enumeration)
            ks.evals_per_image = float(ks.extra["cost"]["forward"])
    for name, samples in s.equal_error.items():  # the counts of equal error (convergence.py)
        if not wanted(name):
            continue
        params = {"n_samples": samples, **s.fast_options(name)}
        records.append(measure(Record(equal_row(name, samples, s.fast_options(name)), "vitxai",
                                      name,
                                      {**params, "batch_size": bs}, "forward", samples),
                               adapter, n, method(name, **params), s.repeats))
    if wanted("integrated_gradients"):
        records.append(measure(Record("integrated_gradients", "vitxai", "integrated_gradients",
                                      {"steps": s.ig_steps, "batch_size": bs},
                                      "gradient", s.ig_steps), adapter, n,
                               method("integrated_gradients", steps=s.ig_steps), s.repeats))
    if wanted("gradient_shap"):
        records.append(measure(Record("gradient_shap", "vitxai", "gradient_shap",
                                      {"n_samples": s.gs_samples, "batch_size": bs},
                                      "gradient", s.gs_samples), adapter, n,
                               method("gradient_shap", n_samples=s.gs_samples), s.repeats))
    covered = {"lime", "kernel_shap", "integrated_gradients", "gradient_shap"}
    for name, spec in METHODS.items():  # the rest of the registry's model-agnostic methods
        if spec.family not in ("gradient", "perturbation") or name in covered or not wanted(name):
            continue
        params = s.other_params.get(name, {})
        kind = "gradient" if spec.family == "gradient" else "forward"
        r = measure(Record(name, "vitxai", name, params, kind, math.nan), adapter, n,
                    method(name, **params), s.repeats)
        if "cost" in r.extra:  # the method's own count of model evaluations per image
            cost = r.extra["cost"]
            r.kind = "gradient" if cost["backward"] else "forward"
            r.evals_per_image = float(cost["forward"])
        records.append(r)
    if adapter.is_vit:
        records.extend(run_attention(adapter, images, targets, s.repeats, s.only))
    return records


def run_attention(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                  repeats: int, only: frozenset[str] | None = None) -> list[Record]:
    """Every method on the shared ViT pass, together in one context; then the LRP methods
    that make a pass of their own, one by one (``only``: just these)."""
    n = images.shape[0]
    shared = [m for m, spec in METHODS.items() if "attention" in spec.uses
              and (only is None or m in only)]
    own = [m for m, spec in METHODS.items()
           if spec.family in ("attention", "lrp") and "attention" not in spec.uses
           and (only is None or m in only)]

    def together() -> dict[str, Any]:
        ctx = BatchContext.for_batch(n, planned=shared)
        per_method, spent = {}, {"forward": 0, "backward": 0}
        for m in shared:
            start = time.perf_counter()
            r = attribute(m, adapter, images, targets, context=ctx)
            per_method[m] = {"seconds_per_image": (time.perf_counter() - start) / n,
                             "forward": r.cost.forward, "backward": r.cost.backward,
                             "shared": r.cost.shared}
            if not r.cost.shared:
                spent["forward"] += r.cost.forward
                spent["backward"] += r.cost.backward
        return {"methods": per_method, "cost_not_shared": spent,
                "note": "cost backward counts chefer's explicit relevance pass as one backward"}

    records = [measure(Record("attention (all shared-pass methods)", "vitxai", "attention",
                              {"methods": shared}, "gradient", 1.0), adapter, n, together,
                       repeats)] if shared else []
    for m in own:
        records.append(measure(Record(m, "vitxai", m, {}, "gradient", 1.0), adapter, n,
                               lambda m=m: {"cost": vars(attribute(
                                   m, adapter, images, targets).cost)}, repeats))
    return records


def row_tag(options: dict[str, Any]) -> str:
    """A row name's suffix, e.g. ' paired leverage logistic' for paired, leverage-sampled
    KernelSHAP with the logistic surrogate."""
    return "".join(f" {v if isinstance(v, str) else k}" for k, v in options.items())


def token_row(method: str, n: int, grid: int | None, options: dict[str, Any]) -> str:
    """The tokens section's row name for ``method`` at ``n`` samples."""
    return (f"{method} token drop{row_tag(options)}"
            f"{'' if grid is None else f' grid {grid}'} n={n}")


def equal_row(method: str, n: int, options: dict[str, Any]) -> str:
    """The row name of ``method`` at its ``--equal-error`` count ``n`` (pixel space)."""
    return f"{method}{row_tag(options)} n={n} (equal error)"


def run_tokens(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
               s: Settings) -> list[Record]:
    """Paired LIME and KernelSHAP on patch tokens with ``removal="drop"`` (features: patches,
    or ``--token-grid`` cells) at the run's sample count and at ``--token-samples``: no
    segmentation, and each forward costs what its kept tokens cost."""
    n = images.shape[0]
    records = []
    for method in ("lime", "kernel_shap"):
        if s.only is not None and method not in s.only:
            continue
        for samples in dict.fromkeys([s.samples, s.token_samples.get(method, s.samples)]):
            params = {"space": "token", "removal": "drop", "n_samples": samples,
                      **s.fast_options(method),
                      **({} if s.token_grid is None else {"grid": s.token_grid})}

            def run(method: str = method, params: dict[str, Any] = params) -> dict[str, Any]:
                r = attribute(method, adapter, images, targets, **params)
                return {"cost": {"forward": r.cost.forward, "backward": r.cost.backward}}
            records.append(measure(Record(token_row(method, samples, s.token_grid,
                                                    s.fast_options(method)),
                                          "vitxai",
                                          method, params, "forward", samples),
                                   adapter, n, run, s.repeats))
    return records


# --------------------------------------------------------------------------------------------
# references: lime_image and captum
# --------------------------------------------------------------------------------------------


def _probabilities(adapter: ModelAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return adapter.logits(x.to(adapter.device, adapter.dtype)).float().softmax(dim=1)
    return forward


def lime_image_run(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                   num_samples: int, batch_size: int) -> Callable[[], dict[str, Any]]:
    """lime_image.explain_instance per image; its own quickshift (same parameters as ours),
    removed superpixels filled with the model's mean colour (as vitxai's baseline="mean")."""
    from lime import lime_image

    lime_image.tqdm = lambda rows, **_kw: rows  # silence its per-row progress bar only
    probabilities = _probabilities(adapter)

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        # lime_image hands (N, H, W, 3) float64 images: NHWC → NCHW (not a transpose of H, W)
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        return probabilities(x).cpu().numpy()

    hide = adapter.mean.reshape(3).float().cpu().numpy()

    def run() -> dict[str, Any]:
        explainer = lime_image.LimeImageExplainer(random_state=0)
        counts = []
        for i in range(images.shape[0]):
            image = images[i].permute(1, 2, 0).double().cpu().numpy()
            e = explainer.explain_instance(image, classifier_fn, labels=(int(targets[i]),),
                                           hide_color=hide, top_labels=None,
                                           num_samples=num_samples, batch_size=batch_size,
                                           random_seed=0)
            counts.append(int(e.segments.max()) + 1)
        return {"superpixels": counts}

    return run


def captum_perturbation_run(adapter: ModelAdapter, images: torch.Tensor,
                            targets: torch.Tensor, segments: torch.Tensor, algorithm: str,
                            n_samples: int, ppe: int) -> Callable[[], dict[str, Any]]:
    """captum Lime / KernelShap per image on our quickshift superpixels (precomputed: their
    time is not included), baseline = the model's mean colour."""
    from captum.attr import KernelShap, Lime

    cls = {"lime": Lime, "kernel_shap": KernelShap}[algorithm]
    explainer = cls(_probabilities(adapter))
    baseline = adapter.mean.reshape(1, 3, 1, 1)

    def run() -> None:
        for i in range(images.shape[0]):
            mask = segments[i].to(images.device)[None, None]
            explainer.attribute(images[i:i + 1], baselines=baseline, target=int(targets[i]),
                                feature_mask=mask, n_samples=n_samples,
                                perturbations_per_eval=ppe)

    return run


def captum_gradient_run(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                        algorithm: str, **kwargs: Any) -> Callable[[], None]:
    from captum.attr import GradientShap, IntegratedGradients

    def logits(x: torch.Tensor) -> torch.Tensor:
        return adapter.logits(x)

    mean = adapter.mean.expand(1, 3, *adapter.input_size)

    def run() -> None:
        for i in range(images.shape[0]):
            x = images[i:i + 1]
            if algorithm == "integrated_gradients":
                IntegratedGradients(logits).attribute(x, baselines=mean,
                                                      target=int(targets[i]), **kwargs)
            else:
                bases = torch.cat([mean, torch.zeros_like(mean)])  # as vitxai: mean and black
                GradientShap(logits).attribute(x, baselines=bases, target=int(targets[i]),
                                               stdevs=0.0, **kwargs)

    return run


def run_references(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                   segments: torch.Tensor, s: Settings, original: bool, references: bool
                   ) -> list[Record]:
    """(c) references and (d) the original comparison's settings; a setting that both name
    is measured once and recorded under both."""
    n = images.shape[0]
    done: dict[tuple[Any, ...], Record] = {}
    records: list[Record] = []

    def add(tool: str, impl: str, name: str, method: str, settings: dict[str, Any], kind: str,
            evals: float, make: Callable[[], Callable[[], Any]], seg: bool = False) -> None:
        if s.only is not None and method not in s.only:
            return
        key = (impl, tuple(sorted(settings.items())))
        if key in done:
            first = done[key]
            copy = Record(name, tool, method, settings, kind, evals, first.seconds, n,
                          first.counted, first.peak_memory_mb, seg, first.precision,
                          {"same_run_as": f"{first.tool}:{first.name}"}, first.error)
            records.append(copy)
            print(f"  {tool + ':' + name:<44}(same run as {first.tool}:{first.name})")
            return
        try:
            run = make()
        except ImportError as e:
            records.append(Record(name, tool, method, settings, kind, evals,
                                  error=f"not installed: {e}"))
            print(f"  {tool + ':' + name:<44}  SKIPPED: {e}")
            return
        r = measure(Record(name, tool, method, settings, kind, evals,
                           includes_segmentation=seg), adapter, n, run, s.repeats)
        done[key] = r
        records.append(r)

    N = s.samples
    if references:
        for bs in (10, s.lime_big_batch):
            add("lime_image", "lime_image", f"lime_image batch {bs}", "lime",
                {"num_samples": N, "batch_size": bs}, "forward", N,
                lambda bs=bs: lime_image_run(adapter, images, targets, N, bs), seg=True)
        for algo, label in (("lime", "Lime"), ("kernel_shap", "KernelShap")):
            for ppe in (1, s.tuned_ppe):
                add("captum", label, f"{label} ppe {ppe}", algo,
                    {"n_samples": N, "perturbations_per_eval": ppe}, "forward", N,
                    lambda algo=algo, ppe=ppe: captum_perturbation_run(
                        adapter, images, targets, segments, algo, N, ppe))
        add("captum", "IntegratedGradients", f"IntegratedGradients ibs {min(50, s.ig_steps)}",
            "integrated_gradients",
            {"n_steps": s.ig_steps, "internal_batch_size": min(50, s.ig_steps)}, "gradient",
            s.ig_steps, lambda: captum_gradient_run(
                adapter, images, targets, "integrated_gradients", n_steps=s.ig_steps,
                internal_batch_size=min(50, s.ig_steps)))
        add("captum", "GradientShap", "GradientShap", "gradient_shap",
            {"n_samples": s.gs_samples},
            "gradient", s.gs_samples, lambda: captum_gradient_run(
                adapter, images, targets, "gradient_shap", n_samples=s.gs_samples))
    if original:
        L, K = s.original_lime_samples, s.original_ks_samples
        add("original", "lime_image", f"lime_image {L} samples batch 10", "lime",
            {"num_samples": L, "batch_size": 10}, "forward", L,
            lambda: lime_image_run(adapter, images, targets, L, 10), seg=True)
        add("original", "KernelShap", f"captum KernelShap {K} samples ppe 1", "kernel_shap",
            {"n_samples": K, "perturbations_per_eval": 1}, "forward", K,
            lambda: captum_perturbation_run(adapter, images, targets, segments,
                                            "kernel_shap", K, 1))
        add("original", "IntegratedGradients",
            f"captum IntegratedGradients {s.original_ig_steps} steps, one batch",
            "integrated_gradients", {"n_steps": s.original_ig_steps,
                                     "internal_batch_size": None}, "gradient",
            s.original_ig_steps, lambda: captum_gradient_run(
                adapter, images, targets, "integrated_gradients",
                n_steps=s.original_ig_steps))
        add("original", "GradientShap", f"captum GradientShap {s.original_gs_samples} samples",
            "gradient_shap",
            {"n_samples": s.original_gs_samples}, "gradient", s.original_gs_samples,
            lambda: captum_gradient_run(adapter, images, targets, "gradient_shap",
                                        n_samples=s.original_gs_samples))
    return records


# --------------------------------------------------------------------------------------------
# (e) streamed memory and the default compare run
# --------------------------------------------------------------------------------------------


_PEAK_CHILD = (
    "import resource, sys\n"
    "from vitxai.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "import torch\n"
    "gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else -1\n"
    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu)\n"
    "sys.exit(rc)\n"
)


def streamed_memory(model: str, pretrained: bool, precision: str, counts: tuple[int, int],
                    s: Settings) -> dict[str, Any]:
    """Peak memory of `vitxai compare` (six methods, batch 2) over two image counts, each run in
    a fresh process (so nothing the benchmark allocated before counts): its peak resident set
    (ru_maxrss) and, on a GPU, its peak CUDA allocation."""
    from vitxai.compare import SEED_METHODS

    params = [f"{m}.{k}={v}" for m, kv in s.memory_params.items() for k, v in kv.items()]
    out: dict[str, Any] = {"batch_size": 2, "methods": list(SEED_METHODS),
                           "method_params": s.memory_params, "model": model,
                           "precision": precision, "fresh_process": True, "runs": []}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-c", _PEAK_CHILD, "compare", "--n-images", str(n),
                   "--batch-size", "2", "--no-progress", "--out", str(Path(tmp) / "run"),
                   "--model", model, "--precision", "bf16" if precision == "bf16" else
                   "float32"]
            if model != "bundled" and not pretrained:
                cmd.append("--random-weights")
            for param in params:
                cmd += ["--param", param]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
        peak = next((line.split() for line in proc.stdout.splitlines()
                     if line.startswith("PEAK ")), None)
        if proc.returncode != 0 or peak is None:
            raise RuntimeError(f"compare over {n} images failed (exit {proc.returncode}): "
                               f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
        row = {"images": n, "seconds": seconds, "peak_memory_mb": float(peak[1]),
               "peak_gpu_memory_mb": float(peak[2]) if float(peak[2]) >= 0 else None}
        out["runs"].append(row)
        print(f"  compare over {n:>3} images: peak {row['peak_memory_mb']:.0f} MB resident"
              + (f", {row['peak_gpu_memory_mb']:.0f} MB GPU" if row["peak_gpu_memory_mb"]
                 is not None else "") + f", {seconds:.1f} s")
    key = "peak_gpu_memory_mb" if out["runs"][0]["peak_gpu_memory_mb"] else "peak_memory_mb"
    peaks = [r[key] for r in out["runs"]]
    if peaks[0]:
        out["peak_ratio"] = peaks[1] / peaks[0]
    return out


def time_default_compare() -> dict[str, Any]:
    """Wall time of `vitxai compare` with its defaults (fresh output directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vitxai.cli", "compare", "--out",
                               str(Path(tmp) / "run"), "--no-progress"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
    row = {"seconds": seconds, "returncode": proc.returncode,
           "stderr_tail": proc.stderr[-500:] if proc.returncode else ""}
    print(f"  default `vitxai compare`: {seconds:.1f} s (exit {proc.returncode})")
    return row


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def add_floor(records: list[Record], fl: dict[str, Any] | None) -> None:
    """Floor per row: evaluations × the best seconds per evaluation, the best of section (a)
    and of the probes taken during the row (:class:`FloorProbe`)."""
    for r in records:
        candidates = [(fl or {}).get(r.kind, {}).get("seconds_per_eval"),
                      r.extra.get("probe_seconds_per_eval")]
        candidates = [c for c in candidates if c is not None]
        if not candidates or not r.evals_per_image or not math.isfinite(r.evals_per_image):
            continue
        per_eval = min(candidates)
        r.extra["floor_seconds_per_eval"] = per_eval
        r.extra["floor_seconds_per_image"] = r.evals_per_image * per_eval
        if not r.error and r.n_images:
            r.extra["ratio_to_floor"] = r.per_image / r.extra["floor_seconds_per_image"]


def speedups(records: list[Record]) -> list[dict[str, Any]]:
    """vitxai's speed-up over each reference of the same method: reference s/img ÷ vitxai
    s/img, with vitxai's time including its segmentation when the reference's does (token
    rows segment nothing)."""
    seg = next((r for r in records if r.tool == "vitxai" and r.method == "segmentation"
                and not r.error), None)
    rows = []
    for v in records:
        if v.tool != "vitxai" or v.error or v.method == "segmentation":
            continue
        for ref in records:
            if ref.tool == "vitxai" or ref.method != v.method or ref.error:
                continue
            mine = v.per_image
            add_seg = (ref.includes_segmentation and seg is not None
                       and v.settings.get("space") != "token")
            if add_seg:
                mine += seg.per_image
            rows.append({"method": v.method, "vitxai": v.name,
                         "reference": f"{ref.tool}:{ref.name}",
                         "reference_seconds_per_image": ref.per_image,
                         "vitxai_seconds_per_image": mine,
                         "vitxai_includes_segmentation": add_seg,
                         "speedup": ref.per_image / mine if mine else math.nan})
    return rows


def goals(records: list[Record], ups: list[dict[str, Any]], s: Settings,
          compare_run: dict[str, Any] | None, quick: bool) -> dict[str, Any]:
    """The issue's goals, checked on this run's numbers (None: not measured here, or at other
    sample counts than the goals name)."""
    def rec(name: str) -> Record | None:
        return next((r for r in records if r.tool == "vitxai" and r.name == name
                     and not r.error), None)

    def up(name: str, reference: str) -> float | None:
        return next((u["speedup"] for u in ups if u["vitxai"] == name
                     and u["reference"] == reference), None)

    perturbation_ok = s.samples == 1000 and not quick
    gradient_ok = s.ig_steps == 50 and s.gs_samples == 50 and not quick
    out: dict[str, Any] = {"measured_at_1000_samples": perturbation_ok}
    for method, refs in (("lime", ("lime_image:lime_image batch 10", "captum:Lime ppe 1")),
                         ("kernel_shap", ("captum:KernelShap ppe 1",))):
        r = rec(method)
        for ref in refs:
            x = up(method, ref)
            out[f"{method} ≥5× faster than {ref}"] = (None if x is None or not perturbation_ok
                                                      else x >= 5)
        ratio = r.extra.get("ratio_to_floor") if r and perturbation_ok else None
        out[f"{method} within 1.3× of the floor"] = None if ratio is None else ratio <= 1.3
    for method in ("integrated_gradients", "gradient_shap"):
        r = rec(method)
        ratio = r.extra.get("ratio_to_floor") if r and gradient_ok else None
        out[f"{method} within 1.2× of the floor"] = None if ratio is None else ratio <= 1.2
    for method in ("lime", "kernel_shap"):  # token removal at equal samples (tokens section)
        pixel, drop = rec(method), rec(token_row(method, s.samples, s.token_grid,
                                                 s.fast_options(method)))
        if pixel is not None and drop is not None and not quick:
            speedup = pixel.per_image / drop.per_image
            out[f"{method} token drop ≥2× faster than pixel at {s.samples} samples"] = (
                speedup >= 2)
            out[f"{method} token drop speed-up over pixel"] = round(speedup, 2)
        refs = {"lime": ("lime_image:lime_image batch 10", "captum:Lime ppe 1"),
                "kernel_shap": ("captum:KernelShap ppe 1",)}[method]
        rows = ([equal_row(method, s.equal_error[method], s.fast_options(method))]
                if method in s.equal_error else [])
        if method in s.token_samples:
            rows.append(token_row(method, s.token_samples[method], s.token_grid,
                                  s.fast_options(method)))
        for row, ref in itertools.product(rows, refs if perturbation_ok else ()):
            x = up(row, ref)
            out[f"{row} ≥5× faster than {ref} at 1000"] = None if x is None else x >= 5
            if x is not None:
                out[f"{row}: equal-error speed-up over {ref}"] = round(x, 2)
    att = rec("attention (all shared-pass methods)")
    if att is not None and att.counted:
        out["attention methods together ≤ 1 forward + 1 backward (autograd, per image)"] = (
            att.counted["forward"] <= 1 + 1e-9 and att.counted["backward"] <= 1 + 1e-9)
    if compare_run is not None:
        out["default vitxai compare ≤ 180 s"] = (compare_run["returncode"] == 0
                                                 and compare_run["seconds"] <= 180)
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def print_tables(records: list[Record], ups: list[dict[str, Any]], fl: dict[str, Any] | None,
                 goal: dict[str, Any]) -> None:
    if fl:
        print("\nfloor: best seconds per evaluation "
              f"(forward {_fmt(fl.get('forward', {}).get('seconds_per_eval'), '.5f')} s at "
              f"batch {fl.get('forward', {}).get('batch_size')}, forward+backward "
              f"{_fmt(fl.get('gradient', {}).get('seconds_per_eval'), '.5f')} s at batch "
              f"{fl.get('gradient', {}).get('batch_size')})")
    head = (f"{'tool:method':<50}{'s/image':>10}{'evals/img':>11}{'counted f/b':>13}"
            f"{'floor s/img':>13}{'x floor':>9}{'peak MB':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in records:
        name = f"{r.tool}:{r.name}"
        if r.error:
            print(f"{name:<50}  {r.error[:80]}")
            continue
        counted = (f"{r.counted.get('forward', 0):.0f}/{r.counted.get('backward', 0):.0f}"
                   if r.counted else "–")
        print(f"{name[:49]:<50}{_fmt(r.per_image):>10}{_fmt(r.evals_per_image, '.0f'):>11}"
              f"{counted:>13}{_fmt(r.extra.get('floor_seconds_per_image')):>13}"
              f"{_fmt(r.extra.get('ratio_to_floor'), '.2f'):>9}"
              f"{_fmt(r.peak_memory_mb, '.0f'):>9}")
    if ups:
        print("\nvitxai speed-up over each reference (reference s/image ÷ vitxai s/image; "
              "'+seg' = vitxai's segmentation time added, as the reference segments itself)")
        for u in ups:
            tag = " +seg" if u["vitxai_includes_segmentation"] else ""
            print(f"  {u['vitxai']:<40} vs {u['reference']:<44}{u['speedup']:7.2f}×{tag}")
    print("\ngoals (this run):")
    for k, v in goal.items():
        print(f"  {k}: {'n/a' if v is None else v}")


def counts_arg(text: str) -> dict[str, int]:
    """``"lime=300,kernel_shap=420"`` → {"lime": 300, "kernel_shap": 420}."""
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"bench.py: unknown section(s) {sorted(unknown)}; valid: {SECTIONS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings.quick() if args.quick else Settings()
    if args.samples is not None:
        s.samples = args.samples
    if args.repeats is not None:
        s.repeats = max(1, args.repeats)
    if args.only:
        s.only = frozenset(m.strip() for m in args.only.split(",") if m.strip())
    if args.equal_error:
        s.equal_error = counts_arg(args.equal_error)
    if args.token_samples:
        s.token_samples = counts_arg(args.token_samples)
    s.token_grid, s.sampling, s.lime_sampling, s.surrogate = (
        args.token_grid, args.sampling, args.lime_sampling, args.surrogate)
    n = args.images or (1 if args.quick else 2)
    if args.memory_images:
        a, b = (int(v) for v in args.memory_images.split(","))
        s.memory_images = (a, b)
    else:
        s.memory_images = (1, 2) if args.quick else (n, 8 * n)

    adapter, model_note = load_adapter(args.model, args.pretrained, args.device)
    adapter.set_precision(args.precision)
    ref_precision = (args.precision if args.reference_precision == "same"
                     else args.reference_precision)
    images = load_images(adapter, n)
    targets = adapter.predict(images).argmax(dim=1).cpu()
    info = machine_info()
    print(f"model: {model_note}; {n} images {tuple(images.shape[1:])}; precision "
          f"{args.precision}; torch threads {torch.get_num_threads()}; cpu {info['cpu']}")
    if args.quick:
        print("QUICK MODE: tiny sample counts, a smoke test; the numbers mean nothing")

    # warm-up (imports, allocator, kernels), not timed: every tool once, tiny settings
    print("warm-up ...")
    warm = images[:1]
    for m, kw in (("lime", {"n_samples": 4}), ("integrated_gradients", {"steps": 2})):
        attribute(m, adapter, warm, targets[:1], **kw)
    segments = torch.stack([shared_segments(BatchContext.for_batch(1), images[i:i + 1],
                                            SegmentationParams())[0] for i in range(n)])
    if sections & {"references", "original"}:
        for make in (lambda: lime_image_run(adapter, warm, targets[:1], 10, 10),
                     lambda: captum_perturbation_run(adapter, warm, targets[:1], segments[:1],
                                                     "kernel_shap", 4, 1),
                     lambda: captum_gradient_run(adapter, warm, targets[:1],
                                                 "integrated_gradients", n_steps=2)):
            with contextlib.suppress(Exception):
                make()()

    result: dict[str, Any] = {
        "machine": info, "model": model_note, "model_name": adapter.name,
        "precision": args.precision, "reference_precision": ref_precision, "images": n,
        "image_size": list(adapter.input_size),
        "targets": targets.tolist(), "quick": args.quick, "settings": vars(s),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    fl = None
    if "floor" in sections:
        print("(a) floor")
        fl = floor(adapter, s)
        result["floor"] = fl
        global PROBE
        PROBE = FloorProbe(adapter, fl)
    records: list[Record] = []
    if "vitxai" in sections:
        print("(b) vitxai")
        records += run_vitxai(adapter, images, targets, s)
    if "tokens" in sections and adapter.is_vit:
        print("(b') vitxai on patch tokens, removed (removal='drop')")
        records += run_tokens(adapter, images, targets, s)
    if sections & {"references", "original"}:
        print(f"(c, d) references and the original comparison's settings "
              f"(precision {ref_precision})")
        adapter.set_precision(ref_precision)
        records += run_references(adapter, images, targets, segments, s,
                                  original="original" in sections,
                                  references="references" in sections)
        adapter.set_precision(args.precision)
    add_floor(records, fl)
    ups = speedups(records)
    if "memory" in sections:
        print(f"(e) streamed memory: compare over {s.memory_images} images")
        try:
            result["streamed_memory"] = streamed_memory(args.model, args.pretrained,
                                                          args.precision, s.memory_images, s)
        except Exception as e:
            result["streamed_memory"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  FAILED: {result['streamed_memory']['error']}")
    compare_run = None
    if args.time_compare:
        compare_run = time_default_compare()
        result["default_compare"] = compare_run
    goal = goals(records, ups, s, compare_run, args.quick)
    result["records"] = [{**{k: v for k, v in vars(r).items()}, "seconds_per_image": r.per_image}
                         for r in records]
    result["speedups"] = ups
    result["goals"] = goal
    print_tables(records, ups, fl, goal)
    if "streamed_memory" in result and "runs" in result["streamed_memory"]:
        sm = result["streamed_memory"]
        print("\nstreamed compare, peak resident memory: " + ", ".join(
            f"{r['images']} images {_fmt(r['peak_memory_mb'], '.0f')} MB" for r in sm["runs"])
            + f" (ratio {_fmt(sm.get('peak_ratio'), '.2f')}; flat ≈ 1)")

    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"{adapter.name}-{args.precision}-"
        f"{'quick' if args.quick else s.samples}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
