"""The method protocol: result type, parameter dataclasses, registry and per-batch shared work.

Every attribution method is a function ``fn(adapter, images, targets, params, context)``
registered with :func:`register_method`. It returns an :class:`Attribution` whose ``maps`` are
signed float maps at input resolution. Methods never write files and never read CLI arguments.

Images are always *unnormalised* RGB in [0, 1] at the model's input size, shape (B, 3, H, W);
the adapter applies the model's own normalisation. Attributions are therefore taken with respect
to pixel values, and baselines are stated in pixel space ("mean" = the model's mean colour, which
is the zero of the normalised space that captum users pass as a zero baseline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from vitxai.models.adapter import check_classifier_head, require_vit
from vitxai.params import check_types

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter, ViTAdapter

NativeKind = Literal["token", "superpixel", "pixel", "feature"]
#: what a perturbation method reads from the model: the target's softmax probability or logit
Score = Literal["probability", "logit"]
SCORES: tuple[str, ...] = ("probability", "logit")


@dataclass
class Cost:
    """What a method spent on one batch.

    ``forward`` and ``backward`` count model passes *per image* (one image through the network
    once = 1), so they are comparable across batch sizes; ``seconds`` is the wall time of the
    whole batch; ``shared`` is true when the passes were reused from another method's call on
    the same batch (they are then not spent again); ``peak_memory_mb`` is the peak CUDA
    allocation during the call on a GPU, or on the CPU the process's peak resident memory
    during the call (model and data included; Linux only, else None).

    The peak is read from the device's or the process's high-water mark, which only ever
    rises, and :func:`attribute` leaves that mark alone by default: the value is then the
    call's exact peak when the mark rose during the call, and None (unknown: at most the
    earlier mark) when it did not. ``attribute(..., measure_memory=True)`` resets the mark
    first (``torch.cuda.reset_peak_memory_stats`` or Linux ``/proc/self/clear_refs``: global
    state of the process, so only for programs that own it, like the CLI and the benchmark)
    and always gives the call's peak.
    """

    forward: int = 0
    backward: int = 0
    seconds: float = 0.0
    shared: bool = False
    peak_memory_mb: float | None = None


@dataclass
class Attribution:
    """The result of one method on one batch.

    Attributes:
        method: registry name of the method.
        maps: (B, H, W) float32 signed attribution at input resolution.
        native: the map at the method's own resolution: (B, gh, gw) for patch methods,
            (B, S) superpixel coefficients (NaN-padded to the batch's largest S) for superpixel
            methods, (B, H, W) for pixel methods, (B, h, w) for CNN feature maps.
        native_kind: "token" (the patch-token grid), "superpixel", "pixel" or "feature"
            (a CNN feature map's (B, h, w) grid, the class activation maps).
        targets: (B,) long, the class each map explains.
        cost: passes and seconds spent.
        segments: (B, H, W) int64 superpixel labels in [0, S) when ``native_kind`` is
            "superpixel", else None.
        channels: (B, 3, H, W) per-channel attribution of pixel methods (``maps`` is its
            channel sum), so the unified mask can clip before averaging channels; else None.
        standard_error: (B,) float64, sampling methods that choose their own sample count
            (``n_samples="auto"``): the estimated standard error of each image's native map
            relative to its range, max_j SE(φ_j) / (max_j φ_j − min_j φ_j) (Covert & Lee
            2021's convergence ratio, the quantity ``tolerance`` bounds); else None.
        evaluations: (B,) int64 model evaluations spent on each image when they differ per
            image (``n_samples="auto"``); else None (``cost.forward`` says it).
    """

    method: str
    maps: torch.Tensor
    native: torch.Tensor
    native_kind: NativeKind
    targets: torch.Tensor
    cost: Cost
    segments: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    standard_error: torch.Tensor | None = None
    evaluations: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the function, its parameter dataclass and what it needs."""

    name: str
    fn: Callable[..., Attribution]
    params: type
    family: str
    vit_only: bool
    paper: str
    summary: str
    uses: frozenset[str] = frozenset()  # shared per-batch work: "segments", "attention", "lrp"
    renamed: Mapping[str, str] = field(default_factory=dict)  # old parameter name → new

    def current_names(self, values: Mapping[str, Any], *, warn: bool = True
                      ) -> dict[str, Any]:
        """``values`` with deprecated parameter names and values in today's vocabulary
        (docs/conventions.md), warning once per old name when ``warn``."""
        out = dict(values)
        for old, new in self.renamed.items():
            if old not in out:
                continue
            if new in out:
                raise ValueError(f"method {self.name!r}: pass {new} or its old name {old}, "
                                 "not both")
            out[new] = out.pop(old)
            if warn:
                warnings.warn(f"parameter {self.name}.{old} is deprecated; call it {new} "
                              "(the old name is accepted until vitxai 0.3)", FutureWarning,
                              stacklevel=4)
        for name, spellings in RENAMED_VALUES.items():
            value = out.get(name)
            if isinstance(value, str) and value in spellings:
                out[name] = spellings[value]
                if warn:
                    warnings.warn(f"{self.name}.{name}={value!r} is deprecated; use "
                                  f"{spellings[value]!r}", FutureWarning, stacklevel=4)
        return out

    def make_params(self, **overrides: Any) -> Any:
        """Build this method's parameter dataclass, rejecting unknown names and values whose
        type does not fit the field's annotation (before the dataclass's range checks).
        Deprecated names are accepted with a warning (:meth:`current_names`)."""
        overrides = self.current_names(overrides)
        names = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter {', '.join(unknown)}; "
                f"its parameters are: {', '.join(sorted(names)) or '(none)'}"
            )
        check_types(self.params, overrides, prefix=f"{self.name}.")
        return self.params(**overrides)


#: ``dataclasses.field`` metadata of a parameter added after runs were recorded: its default
#: is left out of the record (:func:`params_record`), so those runs keep their fingerprints
RECORDED_WHEN_SET = {"recorded": "when set"}


def params_record(params: Any) -> dict[str, Any]:
    """``dataclasses.asdict(params)`` without the fields marked :data:`RECORDED_WHEN_SET`
    that hold their default (the record of a run's method parameters)."""
    record = dataclasses.asdict(params)
    for f in dataclasses.fields(params):
        if f.metadata.get("recorded") == "when set" and record[f.name] == f.default:
            del record[f.name]
    return record


#: old spellings of parameter values, accepted with a warning for one release
RENAMED_VALUES: dict[str, dict[str, str]] = {"space": {"tokens": "token"}}

METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def register_method(
    name: str,
    *,
    params: type,
    family: str,
    paper: str,
    summary: str,
    vit_only: bool = False,
    uses: Iterable[str] = (),
    aliases: Sequence[str] = (),
    renamed: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Attribution]], Callable[..., Attribution]]:
    """Decorator adding a method to :data:`METHODS` (timm-registry style).

    ``aliases`` are alternative spellings accepted by :func:`get_method`, for example the
    original comparison's names (``IntegratedGradients``, ``BeyondAttention``); ``renamed``
    maps deprecated parameter names to today's (accepted with a warning for one release).
    """

    def decorate(fn: Callable[..., Attribution]) -> Callable[..., Attribution]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        for alias in (name, *aliases):  # get_method ignores case, '-' and '_'
            taken = _ALIASES.get(_key(alias), name)
            if taken != name:
                raise ValueError(f"alias {alias!r} of method {name!r} already names {taken!r}")
        METHODS[name] = MethodSpec(
            name, fn, params, family, vit_only, paper, summary, frozenset(uses),
            dict(renamed or {}),
        )
        for alias in (name, *aliases):
            _ALIASES[_key(alias)] = name
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """Look a method up by name or alias (case, '-' and '_' insensitive)."""
    canonical = _ALIASES.get(_key(name))
    if canonical is None:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
        )
    return METHODS[canonical]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class CacheKey(NamedTuple):
    """A key of :attr:`BatchContext.cache`: the kind of shared work and the settings it was
    computed with (a different setting is different work)."""

    kind: Literal["vit_pass", "relevance", "segments", "cam_pass"]
    settings: tuple[Any, ...] = ()


@dataclass
class BatchContext:
    """Per-batch shared state: image identities for per-image randomness, and cached work.

    One context is made per batch and passed to every method run on it, so that LIME and
    KernelSHAP share one segmentation per image and all attention methods share one
    forward (and backward) pass. ``image_ids`` identify the images (dataset indices or
    paths); every random draw for image i uses a generator seeded from
    (seed, image_ids[i], method), which is why a batch gives exactly the per-image results.
    """

    image_ids: list[Any]
    seed: int = 0
    cache: dict[CacheKey, Any] = field(default_factory=dict)
    planned: frozenset[str] = frozenset()  # names of the methods that will run on this batch

    @classmethod
    def for_batch(cls, n: int, seed: int = 0, image_ids: Sequence[Any] | None = None,
                  planned: Iterable[str] = ()) -> BatchContext:
        ids = list(range(n)) if image_ids is None else list(image_ids)
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} image ids for a batch of {n} images")
        return cls(ids, seed, {}, frozenset(planned))

    def generator(self, index: int, purpose: str) -> torch.Generator:
        """A CPU generator for image ``index`` of the batch and a named purpose."""
        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, self.image_ids[index], purpose))
        return g

    def run_generator(self, purpose: str) -> torch.Generator:
        """A CPU generator for a draw shared by the whole run (the same for every image and
        batch: it depends on the seed and ``purpose`` only)."""
        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, "whole run", purpose))
        return g

    def cached(self, key: CacheKey, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """Return (value, was_cached), computing and storing the value on first use."""
        if key in self.cache:
            return self.cache[key], True
        value = compute()
        self.cache[key] = value
        return value, False

    def plans(self, use: str) -> bool:
        """Whether any planned method declares the shared-work tag ``use``."""
        return any(use in get_method(m).uses for m in self.planned)


def pixel_attribution(name: str, channels: torch.Tensor, targets: torch.Tensor, cost: Cost
                      ) -> Attribution:
    """Wrap a (B, 3, H, W) attribution: maps = channel sum, native = maps."""
    maps = channels.sum(dim=1)
    return Attribution(name, maps, maps, "pixel", targets, cost, channels=channels)


def to_patch_map(adapter: ViTAdapter, row: torch.Tensor, images: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Drop the prefix columns of a (B, N) token row and return (native (B, gh, gw),
    bilinear upsampled map (B, H, W)), the map in at least float32 (float64 rows stay
    float64, so float64 models give exact maps)."""
    gh, gw = adapter.grid_of(images)
    native = row[:, adapter.num_prefix_tokens:].reshape(row.shape[0], gh, gw)
    wide = native[:, None].to(torch.promote_types(native.dtype, torch.float32))
    full = F.interpolate(wide, size=images.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    return native, full


Baseline = (Literal["mean", "black", "white", "uniform", "uniform_normalized", "blur",
                    "image_mean"] | float)
BASELINES: tuple[str, ...] = ("mean", "black", "white", "uniform", "uniform_normalized", "blur",
                              "image_mean")
# IDSDS's blur baseline (torchvision gaussian_blur, kernel 51, sigma 41)
BLUR_KERNEL = 51
BLUR_SIGMA = 41.0


def check_baseline(name: str, value: Any) -> None:
    """Raise a one-line ValueError unless ``value`` is a :data:`Baseline`."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number and value not in BASELINES:
        raise ValueError(
            f"parameter {name}={value!r} must be one of {', '.join(map(repr, BASELINES))} "
            "or a number"
        )


def make_baseline(adapter: ModelAdapter, images: torch.Tensor, baseline: Baseline,
                  context: BatchContext, purpose: str) -> torch.Tensor:
    """A (B, 3, H, W) baseline in pixel space.

    One vocabulary for methods and metrics (docs/conventions.md):

    - "mean": the model's mean colour, i.e. zero of the normalised input (captum's default zero
      baseline on normalised tensors, used by the original comparison, and IDSDS's "zeros");
    - "black", "white", or a float: that grey level;
    - "uniform": U(0, 1) pixel noise drawn per image from its own generator;
    - "uniform_normalized": U(−1, 1) noise in *normalised* units (IDSDS's IG-U, RISE-U and
      "uniform" deletion baseline), i.e. μ + σ·u in pixels (values may leave [0, 1]), drawn
      per image from its own generator (IDSDS draws one for the whole run; ours depends only
      on the seed and the image id);
    - "blur": each image blurred with torchvision's ``gaussian_blur``, kernel 51, σ = 41
      (IDSDS; the blur commutes with the per-channel normalisation). Images under 26 px use
      the largest odd kernel that reflection padding allows;
    - "image_mean": each image's own mean colour per channel.

    Random baselines are drawn from ``context.generator(i, purpose)``.
    """
    check_baseline("baseline", baseline)
    if isinstance(baseline, int | float):
        return torch.full_like(images, float(baseline))
    if baseline == "mean":
        return adapter.mean.expand_as(images).clone()
    if baseline == "black":
        return torch.zeros_like(images)
    if baseline == "white":
        return torch.ones_like(images)
    if baseline == "blur":
        from torchvision.transforms.functional import gaussian_blur

        # reflection padding needs kernel // 2 < min(H, W)
        k = min(BLUR_KERNEL, 2 * min(images.shape[-2:]) - 1)
        return gaussian_blur(images, [k, k], [BLUR_SIGMA, BLUR_SIGMA])
    if baseline == "image_mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if baseline == "uniform":
        return torch.stack([
            torch.rand(images.shape[1:], generator=context.generator(i, purpose))
            for i in range(images.shape[0])
        ]).to(images)
    # "uniform_normalized", the only name left after check_baseline
    u = torch.stack([
        2 * torch.rand(images.shape[1:], generator=context.generator(i, purpose),
                       dtype=torch.float64) - 1
        for i in range(images.shape[0])
    ]).to(images)
    return adapter.mean + adapter.std * u


def resolve_targets(adapter: ModelAdapter, images: torch.Tensor,
                    targets: torch.Tensor | Sequence[int] | int | None) -> torch.Tensor:
    """Targets as a (B,) long tensor; ``None`` means the model's prediction per image."""
    b = images.shape[0]
    if targets is None:
        return adapter.predict(images).argmax(dim=1).cpu()
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if t.numel() == 1 and b != 1:
        t = t.expand(b).clone()
    if t.numel() != b:
        raise ValueError(f"got {t.numel()} targets for a batch of {b} images")
    n = adapter.num_classes
    if n and ((t < 0) | (t >= n)).any():
        raise ValueError(f"target out of range [0, {n}) for this model: {t.tolist()}")
    return t.cpu()


def _reset_peak_memory(device: torch.device) -> bool:
    """Reset the high-water mark read by :func:`_peak_memory_mb`; whether that worked.

    Process-wide side effect (other code's peak statistics are lost too): called only when
    asked for (``measure_memory``) and by the benchmark, never by default.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory_mb(device: torch.device) -> float | None:
    """The high-water mark in MiB: peak CUDA allocation, or the process's VmHWM (Linux);
    None where unavailable."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def attribute(
    method: str | tuple[str, Any],
    adapter: ModelAdapter,
    images: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | int | None = None,
    /,
    *,
    context: BatchContext | None = None,
    seed: int = 0,
    method_params: Any | None = None,
    measure_memory: bool = False,
    **params: Any,
) -> Attribution:
    """Run one registered method on a batch (captum-style single verb).

    The first four arguments are positional-only, so that a method parameter of the same
    name (Integrated Gradients' ``method="riemann_left"``) reaches the method.

    Args:
        method: registry name or alias, e.g. "lime", "integrated_gradients", "chefer2021a";
            or a (method, parameter dataclass) pair such as a run's
            :class:`~vitxai.runner.ResolvedMethod` (then no other parameters).
        adapter: from :func:`vitxai.models.load_model` or :func:`vitxai.models.adapt`.
        images: (B, 3, H, W) float in [0, 1], unnormalised, at the model's input size.
        targets: class per image; None = the model's prediction.
        context: shared per-batch work; made fresh (with ``seed``) when omitted.
        method_params: a ready parameter dataclass of this method (then ``params`` must be
            empty).
        measure_memory: reset the process's (or GPU's) peak-memory statistics before the
            call so that ``cost.peak_memory_mb`` is always the call's peak; off by default,
            as it changes global state (see :class:`Cost`).
        **params: the method's parameters (see ``vitxai methods``).

    Returns:
        An :class:`Attribution` whose ``maps`` have shape (B, H, W).

    Raises:
        ValueError: unknown method or parameter, a ViT-only method on another model, a model
            without classifier head, badly shaped images or targets.
    """
    if isinstance(method, tuple):
        if method_params is not None or params:
            raise ValueError("a resolved method carries its parameters; pass no others")
        method, method_params = method
    spec = get_method(method)
    check_classifier_head(adapter.model, adapter.name)
    if spec.vit_only:
        require_vit(adapter, spec.name)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    if method_params is not None and params:
        raise ValueError("pass either method_params or keyword parameters, not both")
    p = method_params if method_params is not None else spec.make_params(**params)
    images = images.to(adapter.device, adapter.dtype)
    t = resolve_targets(adapter, images, targets)
    ctx = context or BatchContext.for_batch(images.shape[0], seed=seed, planned=[spec.name])
    reset = measure_memory and _reset_peak_memory(adapter.device)
    before = _peak_memory_mb(adapter.device)
    start = time.perf_counter()
    result = spec.fn(adapter, images, t, p, ctx)
    if not result.cost.seconds:
        result.cost.seconds = time.perf_counter() - start
    after = _peak_memory_mb(adapter.device)
    # without a reset the mark may predate the call: it is the call's peak only if it rose
    rose = before is not None and after is not None and after > before
    result.cost.peak_memory_mb = after if reset or rose else None
    # float32 results (bf16/fp16 runs included); float64 models keep float64 for exact tests
    dtype = torch.float64 if adapter.dtype == torch.float64 else torch.float32
    result.maps = result.maps.detach().to("cpu", dtype)
    result.native = result.native.detach().to("cpu", dtype)
    if result.channels is not None:
        result.channels = result.channels.detach().to("cpu", dtype)
    return result
