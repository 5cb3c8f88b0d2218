"""Class activation maps for CNNs: Grad-CAM, Grad-CAM++, SmoothGrad-CAM++, XGrad-CAM, Layer-CAM.

Each method weights the channels of one convolutional feature map A (B, C, h, w) with the
gradient G = ∂y_c/∂A of the target's pre-softmax logit y_c. The map is the output of
``target_layer``; by default the map a timm model's ``forward_features`` returns (the last
stage before global pooling, :func:`target_layer_of`). Results: ``native`` is the (B, h, w)
CAM, ``maps`` its bilinear upsampling to the input size (``align_corners=False``, as torchcam's
``fuse_cams`` and vitxai's patch maps). Formulas per image and channel k, sums over positions
(i, j) of the map (docs/methods.md §15):

- Grad-CAM (Selvaraju et al. 2017): ReLU(Σ_k w_k A_k), w_k = mean_ij G_k.
- Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with Y = exp(S)): w_k = Σ_ij α_k ReLU(G_k),
  α_k(i, j) = G² / (2G² + (Σ_ab A_k(a, b))·G³) where G ≠ 0, else 0.
- SmoothGrad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with G, G², G³ replaced by their means
  over n noisy copies of the image; A is the clean image's map.
- XGrad-CAM (Fu et al. 2020): w_k = Σ_ij G_k A_k / Σ_ij A_k.
- Layer-CAM (Jiang et al. 2021): ReLU(Σ_k ReLU(G_k) ⊙ A_k), weights per position.

Conventions follow torchcam 0.4–0.5 (``torchcam.methods``): the same ReLU, the same 1e-8 in the
denominators, sums over all channels. vitxai never min-max scales a map (the unified mask
does), so torchcam's ``normalized=True`` map is (cam − min)/(max − min + 1e-8) of ``native``.
Where torchcam departs from the papers, ``legacy=True`` reproduces it (Grad-CAM++ and
SmoothGrad-CAM++, see their parameter classes).

Grad-CAM, Grad-CAM++, XGrad-CAM and Layer-CAM read one shared pass per batch and layer
(:func:`cam_pass`): running all four costs one forward and one backward. The backward stops at
the feature map: the hook hands the rest of the network a copy of a detached leaf, so nothing
upstream is differentiated and in-place operations after the layer (``x += shortcut``) leave
the recorded map alone. Every hook is removed on exit, also after an error.
"""

from __future__ import annotations

import difflib
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitxai.batching import default_batch_size, run_chunked
from vitxai.methods.base import Attribution, BatchContext, CacheKey, Cost, register_method
from vitxai.models.adapter import ModelAdapter
from vitxai.params import check_batch_size, check_range

#: torchcam's epsilon in the denominators of XGrad-CAM and Grad-CAM++ (torchcam.methods.gradient)
EPS = 1e-8
#: SmoothGrad-CAM++'s default noise in normalised units (torchcam's ``std=0.3`` on its input)
SMOOTH_SIGMA = 0.3
#: the generator purpose of SmoothGrad-CAM++'s noise
NOISE_PURPOSE = "smoothgrad_cam_pp"


# --- parameters -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CamParams:
    """Parameters shared by the CNN class activation maps.

    Attributes:
        target_layer: path of the module whose (B, C, h, w) output is explained, as in
            ``model.get_submodule`` (e.g. "layer4", "stages.3", "bn2"); None: the map that a
            timm model's ``forward_features`` returns (:func:`target_layer_of`).
        batch_size: images per forward and backward, ≥ 1; None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
    """

    target_layer: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.target_layer is not None and (
                not isinstance(self.target_layer, str) or not self.target_layer):
            raise ValueError(f"parameter target_layer={self.target_layer!r} must be a module "
                             "path such as 'layer4', or null for the default")
        check_batch_size("batch_size", self.batch_size)


@dataclass(frozen=True)
class GradCamPlusPlusParams(CamParams):
    """Grad-CAM++ (Chattopadhay et al. 2018).

    Attributes:
        legacy: reproduce torchcam 0.4–0.5's ``GradCAMpp`` exactly. Its division of α is a
            no-op (``alpha[mask].div_(...)`` divides a copy made by boolean indexing), so α = G²
            and w_k = Σ_ij ReLU(G_k)³; the unused denominator also sums A·G³ over positions
            instead of ΣA times G³ (eq. 19).
    """

    legacy: bool = False


@dataclass(frozen=True)
class SmoothGradCamPlusPlusParams(CamParams):
    """SmoothGrad-CAM++ (Omeiza et al. 2019).

    Attributes:
        n_samples: noisy copies per image, ≥ 1 (torchcam's ``num_samples``, default 4).
        sigma: noise standard deviation in pixel units of [0, 1] images, ≥ 0; None: 0.3
            normalised units, i.e. 0.3·σ_c in channel c (torchcam's ``std=0.3``, which it adds
            to the normalised input). σ = 0 gives Grad-CAM++.
        legacy: reproduce torchcam 0.4–0.5's ``SmoothGradCAMpp``: the denominator of α sums
            A·mean(G³) over positions (instead of ΣA times mean(G³)), no mask where
            mean(G²) = 0, the weights use ReLU of the *last* noisy copy's gradient instead of
            the mean gradient, and the weighted sum uses the last noisy copy's feature map
            instead of the clean image's.
    """

    n_samples: int = 4
    sigma: float | None = None
    legacy: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("n_samples", self.n_samples, 1, None)
        if self.sigma is not None:
            check_range("sigma", self.sigma, 0.0, None)


# --- the target layer ---------------------------------------------------------------------------

def _refusal(method: str, adapter: ModelAdapter, what: str) -> ValueError:
    return ValueError(
        f"{method} needs a CNN feature map (B, C, h, w); model {adapter.name!r} {what}: use "
        f"gradcam (token Grad-CAM) for ViTs, or pass {method}.target_layer=<a module with a "
        "(B, C, h, w) output>"
    )


def _check_module(model: nn.Module, layer: str, method: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"parameter {method}.target_layer={layer!r} is not a module of the "
                         f"model (see model.named_modules()){hint}")


# model → {(H, W): default layer}; weak, so that caching never keeps a model alive
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], str]] = (
    weakref.WeakKeyDictionary())


def target_layer_of(adapter: ModelAdapter, size: tuple[int, int], requested: str | None,
                    method: str) -> str:
    """The module path whose output a CAM explains.

    ``requested`` is checked and returned. The default is found by one forward of a zero
    image of ``size`` (cached per model and size), hooks on every module removed afterwards:

    - timm models: the module that returns the tensor ``forward_features`` returns, preferring
      timm's ``feature_info[-1]["module"]`` ("layer4" for ResNets, "stages.3" for ConvNeXt),
      else the last module to finish that is not an ``nn.Identity`` ("bn2" for
      EfficientNet). That tensor must be (B, C, h, w): a ViT's (B, N, D) tokens and a Swin's
      channels-last (B, h, w, C) are refused;
    - other models: torchcam's rule (``locate_candidate_layer``): the last module to finish
      whose output is 4-D with more than one position (so global pooling is skipped),
      ``nn.Identity`` excepted.

    Raises:
        ValueError: one line: an unknown ``requested`` path, a ViT, or no such feature map.
    """
    model = adapter.model
    if requested is not None:
        _check_module(model, requested, method)
        return requested
    if adapter.is_vit:
        raise _refusal(method, adapter, "is a ViT")
    cache = _DEFAULT_LAYERS.setdefault(model, {})
    if size not in cache:
        cache[size] = _locate(adapter, size, method)
    return cache[size]


def _locate(adapter: ModelAdapter, size: tuple[int, int], method: str) -> str:
    model = adapter.model
    finished: list[tuple[str, nn.Module, object]] = []  # in the order modules finish
    handles = []

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, _inp: object, out: object) -> None:
            finished.append((name, module, out))
        return hook

    timm_like = callable(getattr(model, "forward_features", None))
    x = torch.zeros(1, 3, *size, dtype=adapter.dtype, device=adapter.device)
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        with torch.no_grad():
            out = model.forward_features(x) if timm_like else model(x)
    finally:
        for h in handles:
            h.remove()
    if timm_like:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _refusal(method, adapter, f"returns features of shape {shape}")
        channels = getattr(model, "num_features", out.shape[1])
        if out.shape[1] != channels and out.shape[-1] == channels:
            raise _refusal(method, adapter,
                           f"returns channels-last features {tuple(out.shape)}")
        same = [n for n, m, o in finished if o is out and not isinstance(m, nn.Identity)]
        info = getattr(model, "feature_info", None)
        preferred = info[-1].get("module") if info else None
        if preferred in same:
            return preferred
        if same:
            return same[-1]
    for name, module, o in reversed(finished):
        if (isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[2] * o.shape[3] > 1
                and not isinstance(module, nn.Identity)):
            return name
    raise _refusal(method, adapter, "has no module with a (B, C, h, w) output")


# --- hooks and passes ---------------------------------------------------------------------------

@contextmanager
def feature_hook(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Record the output of module ``layer`` on every forward inside the block.

    Each recorded tensor is a detached leaf that requires grad; the network continues from a
    copy of it, so ∂y/∂(recorded map) is the gradient at the layer, the backward stops there,
    and in-place operations downstream change neither the record nor raise on a leaf. The hook
    is removed on exit, also after an error.

    Yields:
        the list the recorded (B, C, h, w) maps are appended to.
    """
    recorded: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: object, out: object) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"target_layer {layer!r} gives {shape}; class activation maps "
                             "need a (B, C, h, w) feature map")
        leaf = out.detach().requires_grad_(True)
        recorded.append(leaf)
        return leaf.clone()

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def _single(recorded: list[torch.Tensor], layer: str) -> torch.Tensor:
    if len(recorded) != 1:
        raise ValueError(f"target_layer {layer!r} ran {len(recorded)} times in one forward "
                         "pass; choose a module that runs exactly once")
    return recorded[0]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision models), float64 kept (exact tests)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def layer_gradient(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                   layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G): the (B, C, h, w) output of ``layer`` and ∂y_t/∂A, from one forward and one
    backward of ``images`` (B, 3, H, W) in [0, 1]; samples are independent in eval mode, so
    one backward of Σ_b y_{b, t_b} gives every image's gradient."""
    with feature_hook(adapter.model, layer) as recorded, torch.enable_grad():
        logits = adapter.logits(images)
        a = _single(recorded, layer)
        score = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        (g,) = torch.autograd.grad(score, a, allow_unused=True)
    if g is None:
        raise ValueError(f"target_layer {layer!r} does not reach the model's output")
    return _wide(a), _wide(g)


def layer_output(adapter: ModelAdapter, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The (B, C, h, w) output of ``layer`` for ``images``, without gradients."""
    with feature_hook(adapter.model, layer) as recorded, torch.no_grad():
        adapter.logits(images)
        return _wide(_single(recorded, layer))


@dataclass
class CamPass:
    """One batch's feature map and its gradient at one layer (shared by the CAM methods)."""

    layer: str
    activations: torch.Tensor  # (B, C, h, w)
    gradients: torch.Tensor  # (B, C, h, w), ∂y_t/∂A
    targets: torch.Tensor
    seconds: float


def cam_pass(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor, layer: str,
             batch_size: int | None, context: BatchContext) -> tuple[CamPass, bool]:
    """The batch's (A, G) at ``layer``; returns (pass, reused).

    Computed once per batch, layer and targets, ``batch_size`` images per forward and
    backward (halved on out-of-memory errors), in float32 whatever the adapter's precision:
    Grad-CAM++ cubes the gradients, and it is one pass per batch.
    """
    key = CacheKey("cam_pass", (layer,))
    cached = context.cache.get(key)
    if cached is not None and torch.equal(cached.targets, targets):
        return cached, True
    start = time.perf_counter()
    size = default_batch_size(images.device) if batch_size is None else batch_size
    with adapter.full_precision():
        chunks = run_chunked(
            lambda lo, hi: layer_gradient(adapter, images[lo:hi], targets[lo:hi], layer),
            images.shape[0], size)
    result = CamPass(layer, torch.cat([a for a, _ in chunks]), torch.cat([g for _, g in chunks]),
                     targets.clone(), time.perf_counter() - start)
    context.cache[key] = result
    return result, False


def _attribution(name: str, cam: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                 cost: Cost) -> Attribution:
    """native = the (B, h, w) CAM; maps = bilinear upsampling to (B, H, W)."""
    full = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    return Attribution(name, full, cam, "feature", targets, cost)


def _shared(name: str, adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
            p: CamParams, context: BatchContext,
            combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Attribution:
    layer = target_layer_of(adapter, tuple(images.shape[-2:]), p.target_layer, name)
    cp, reused = cam_pass(adapter, images, targets, layer, p.batch_size, context)
    cost = Cost(forward=1, backward=1, seconds=0.0 if reused else cp.seconds, shared=reused)
    return _attribution(name, combine(cp.activations, cp.gradients), images, targets, cost)


# --- the formulas -------------------------------------------------------------------------------

def _weighted_sum(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k): (B, C) or (B, C, h, w) weights, (B, C, h, w) map → (B, h, w)."""
    if weights.ndim == 2:
        weights = weights[:, :, None, None]
    return (weights * a).sum(dim=1).clamp(min=0)


def plus_plus_weights(a: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                      g3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s channel weights (B, C), Chattopadhay et al. 2018 (α: their eq. 19).

    With Y = exp(S) the derivatives of Y are Y·G, Y·G², Y·G³ (ReLU networks, so S is piecewise
    linear in A), and α = G² / (2G² + ΣA·G³): the factor Y cancels in α; in w = Σ α·ReLU(Y·G)
    it is a positive scale per image, dropped as torchcam and pytorch-grad-cam do. ``g1``,
    ``g2``, ``g3`` are G, G², G³ (or their means over noisy copies); α = 0 where G² = 0
    (torchcam's mask), 1e-8 in the denominator as torchcam.
    """
    total = a.sum(dim=(2, 3), keepdim=True)
    alpha = torch.where(g2 > 0, g2 / (2 * g2 + total * g3 + EPS), torch.zeros_like(g2))
    return (alpha * g1.clamp(min=0)).sum(dim=(2, 3))


def grad_cam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, eq. 1–2): ReLU(Σ_k mean_ij(G_k) A_k)."""
    return _weighted_sum(g.mean(dim=(2, 3)), a)


def grad_cam_pp_map(a: torch.Tensor, g: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): ReLU(Σ_k w_k A_k) with :func:`plus_plus_weights`;
    ``legacy``: torchcam's w_k = Σ_ij G²·ReLU(G) (see :class:`GradCamPlusPlusParams`)."""
    if legacy:
        return _weighted_sum((g.pow(2) * g.clamp(min=0)).sum(dim=(2, 3)), a)
    g2 = g.pow(2)
    return _weighted_sum(plus_plus_weights(a, g, g2, g2 * g), a)


def xgrad_cam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): ReLU(Σ_k w_k A_k), w_k = Σ_ij G_k A_k / (Σ_ij A_k
    + 1e-8)."""
    return _weighted_sum((g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + EPS), a)


def layer_cam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Layer-CAM (Jiang et al. 2021): ReLU(Σ_k ReLU(G_k) ⊙ A_k), weights per
    position. (Its tanh scaling only serves to fuse several layers' maps.)"""
    return _weighted_sum(g.clamp(min=0), a)


# --- the registered methods -------------------------------------------------------------------

_GRADCAM_PAPER = ("Selvaraju et al. 2017, 'Grad-CAM: Visual Explanations from Deep Networks "
                  "via Gradient-based Localization', ICCV")


@register_method(
    "grad_cam_cnn",
    params=CamParams,
    family="cam",
    aliases=("GradCAM-CNN", "cnn_gradcam"),
    paper=_GRADCAM_PAPER,
    summary="ReLU(Σ_k w_k A_k) on a CNN feature map, w_k = mean gradient of channel k.",
)
def grad_cam_cnn(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                 p: CamParams, context: BatchContext) -> Attribution:
    """Grad-CAM on a CNN (``gradcam`` is the ViT token form, docs/methods.md §6)."""
    return _shared("grad_cam_cnn", adapter, images, targets, p, context, grad_cam_map)


@register_method(
    "grad_cam_pp",
    params=GradCamPlusPlusParams,
    family="cam",
    aliases=("GradCAM++", "GradCAMpp", "gradcam_plus_plus"),
    paper="Chattopadhay, Sarkar, Howlader & Balasubramanian 2018, 'Grad-CAM++: Improved Visual "
          "Explanations for Deep Convolutional Networks', WACV",
    summary="Grad-CAM with w_k = Σ α·ReLU(G), α = G²/(2G² + ΣA·G³) (closed form for exp(S)).",
)
def grad_cam_pp(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                p: GradCamPlusPlusParams, context: BatchContext) -> Attribution:
    """Grad-CAM++ from the shared pass."""
    return _shared("grad_cam_pp", adapter, images, targets, p, context,
                   lambda a, g: grad_cam_pp_map(a, g, p.legacy))


@register_method(
    "xgrad_cam",
    params=CamParams,
    family="cam",
    aliases=("XGradCAM", "axiom_gradcam"),
    paper="Fu, Hu, Dong, Guo, Gao & Li 2020, 'Axiom-based Grad-CAM: Towards Accurate "
          "Visualization and Explanation of CNNs', BMVC",
    summary="ReLU(Σ_k w_k A_k), w_k = Σ G_k·A_k / Σ A_k (sensitivity and conservation axioms).",
)
def xgrad_cam(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
              p: CamParams, context: BatchContext) -> Attribution:
    """XGrad-CAM from the shared pass."""
    return _shared("xgrad_cam", adapter, images, targets, p, context, xgrad_cam_map)


@register_method(
    "layer_cam",
    params=CamParams,
    family="cam",
    aliases=("LayerCAM",),
    paper="Jiang, Zhang, Hou, Cheng & Wei 2021, 'LayerCAM: Exploring Hierarchical Class "
          "Activation Maps for Localization', IEEE TIP",
    summary="ReLU(Σ_k ReLU(G_k) ⊙ A_k): positive gradients weight each position.",
)
def layer_cam(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
              p: CamParams, context: BatchContext) -> Attribution:
    """Layer-CAM from the shared pass."""
    return _shared("layer_cam", adapter, images, targets, p, context, layer_cam_map)


@register_method(
    "smoothgrad_cam_pp",
    params=SmoothGradCamPlusPlusParams,
    family="cam",
    aliases=("SmoothGradCAM++", "SmoothGradCAMpp", "SG-CAM++"),
    paper="Omeiza, Speakman, Cintas & Weldemariam 2019, 'Smooth Grad-CAM++: An Enhanced "
          "Inference Level Visualization Technique for Deep Convolutional Neural Network "
          "Models', arXiv:1908.01224",
    summary="Grad-CAM++ with G, G², G³ averaged over Gaussian-noised copies of the image.",
)
def smoothgrad_cam_pp(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                      p: SmoothGradCamPlusPlusParams, context: BatchContext) -> Attribution:
    """Noise ε ~ N(0, 1) per pixel comes from ``context.generator(i, "smoothgrad_cam_pp")``,
    n copies x + σ·ε per image; per chunk of images one clean forward (A) and one forward
    and backward per copy. α uses the mean G² and G³ and the clean ΣA, the weights ReLU of
    the mean G (Omeiza et al., with torchcam's correction of the numerator to mean G²)."""
    layer = target_layer_of(adapter, tuple(images.shape[-2:]), p.target_layer,
                            "smoothgrad_cam_pp")
    b, n = images.shape[0], p.n_samples
    noise = torch.stack([  # cast per image: B·n float64 noise images would double memory
        torch.randn(n, *images.shape[1:], generator=context.generator(i, NOISE_PURPOSE),
                    dtype=torch.float64).to(images)
        for i in range(b)
    ])
    sigma = adapter.std * SMOOTH_SIGMA if p.sigma is None else p.sigma

    def chunk(lo: int, hi: int) -> torch.Tensor:
        x, t = images[lo:hi], targets[lo:hi]
        clean = layer_output(adapter, x, layer)
        s1 = torch.zeros_like(clean)
        s2, s3 = torch.zeros_like(clean), torch.zeros_like(clean)
        for k in range(n):
            a, g = layer_gradient(adapter, x + sigma * noise[lo:hi, k], t, layer)
            s1 += g
            s2 += g.pow(2)
            s3 += g.pow(3)
        g1, g2, g3 = s1 / n, s2 / n, s3 / n
        if p.legacy:  # torchcam: index-mixed denominator, last copy's G and A
            total = (g3 * clean).sum(dim=(2, 3), keepdim=True)
            alpha = g2 / (2 * g2 + total + EPS)
            return _weighted_sum((alpha * g.clamp(min=0)).sum(dim=(2, 3)), a)
        return _weighted_sum(plus_plus_weights(clean, g1, g2, g3), clean)

    start = time.perf_counter()
    size = default_batch_size(images.device) if p.batch_size is None else p.batch_size
    with adapter.full_precision():
        cam = torch.cat(run_chunked(chunk, b, size))
    cost = Cost(forward=1 + n, backward=n, seconds=time.perf_counter() - start)
    return _attribution("smoothgrad_cam_pp", cam, images, targets, cost)
