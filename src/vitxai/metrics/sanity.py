"""Sanity checks for attribution methods (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps", NeurIPS).

A method that explains the *model* must produce different maps when the model's learned weights
are destroyed. :func:`model_randomisation` re-initialises the layers of a deep copy of the
model, from the output down (cascading) or one at a time (independent), and measures how
similar each new map is to the original one; :func:`random_logit` compares the map for the
target class with the map for a random other class (Sixt, Granz & Landgraf 2020, "When
Explanations Lie", ICML; Quantus's RandomLogit). High similarity is the failure: an edge
detector, which ignores the model, scores 1 everywhere.

``method`` is a registry name (run through :func:`vitxai.methods.attribute` with the given
parameters and ``seed``, so stochastic methods draw the same noise for every model) or a plain
callable ``method(adapter, images, targets) -> maps`` ((B, H, W) or (B, C, H, W) tensor, or an
:class:`~vitxai.methods.base.Attribution`), which needs no registration. Maps with channels are
reduced to their channel sum before comparison.

The caller's adapter and model are never modified: randomisation happens on a deep copy, with
CPU generators (the global RNG is left untouched).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitxai.methods.base import Attribution, attribute, resolve_targets, stable_seed
from vitxai.metrics.faithfulness import one_channel, pearson, spearman
from vitxai.models.adapter import ModelAdapter

Method = str | Callable[[ModelAdapter, torch.Tensor, torch.Tensor], Any]
Similarity = Literal["spearman", "ssim", "pearson_abs"]
Targets = torch.Tensor | Sequence[int] | int | None

__all__ = [
    "default_layers",
    "map_similarity",
    "model_randomisation",
    "random_logit",
    "randomise_module",
    "ssim",
]


# ---------------------------------------------------------------------------------------------
# similarity of maps


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, sigma: float = 1.5,
         window: int = 11) -> torch.Tensor:
    """Mean structural similarity of each pair of (B, H, W) images (Wang et al. 2004, IEEE TIP).

    Gaussian-weighted local statistics (σ = 1.5, an 11×11 window), population covariances,
    K1 = 0.01, K2 = 0.03, averaged over the positions where the window fits inside the image;
    equal to ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)``. Maps smaller than the window use the
    largest odd window that fits.

    Returns:
        (B,) float64 in [−1, 1]; 1 for identical inputs (constant ones included, the constants
        C1, C2 keep the ratio defined).
    """
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double().to(a.device)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim needs two equal (B, H, W) shapes, got {a.shape} and {b.shape}")
    size = min(window, min(a.shape[1:]) - (1 - min(a.shape[1:]) % 2))
    g = _gaussian_window(size, sigma).to(a.device)
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x[:, None], kernel)[:, 0]  # "valid": only windows inside the image

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ua, ub = blur(a), blur(b)
    va, vb = blur(a * a) - ua * ua, blur(b * b) - ub * ub
    cov = blur(a * b) - ua * ub
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return s.mean((1, 2))


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - lo
    # a constant map has no structure to scale; it becomes all zeros
    return torch.where(span > 0, (maps - lo) / span.clamp(min=torch.finfo(maps.dtype).tiny),
                       torch.zeros_like(maps))


def map_similarity(a: torch.Tensor, b: torch.Tensor, similarity: Similarity = "spearman"
                   ) -> torch.Tensor:
    """Similarity of two batches of maps, per image.

    * "spearman": Spearman ρ of the signed maps over all pixels (average ranks).
    * "pearson_abs": Pearson r of |a| and |b|.
    * "ssim": :func:`ssim` of the maps, each min–max scaled to [0, 1] (a constant map → zeros),
      with data range 1 — the normalised-map SSIM of Adebayo et al.

    Args:
        a, b: (B, H, W) or (B, C, H, W) maps (channels summed).

    Returns:
        (B,) float64 in [−1, 1]. "spearman" and "pearson_abs" are NaN where a map is constant
        (a correlation is undefined; skip those images); "ssim" is always defined.
    """
    a = one_channel(a).double()
    b = one_channel(b).double().to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"maps {tuple(a.shape)} and {tuple(b.shape)} differ")
    if similarity == "spearman":
        return spearman(a.flatten(1), b.flatten(1))
    if similarity == "pearson_abs":
        return pearson(a.flatten(1).abs(), b.flatten(1).abs())
    if similarity == "ssim":
        return ssim(_min_max(a), _min_max(b))
    raise ValueError(f"similarity must be 'spearman', 'ssim' or 'pearson_abs', got {similarity!r}")


# ---------------------------------------------------------------------------------------------
# model randomisation


def default_layers(model: nn.Module) -> list[str]:
    """The model's top-level blocks with parameters, from the output down.

    Top-level children that hold parameters, in reverse registration order, with module
    containers (``nn.Sequential``/``nn.ModuleList``, e.g. timm's ``blocks``) expanded into their
    items. For a timm ViT: ``head``, ``norm``, ``blocks.{L−1}``, …, ``blocks.0``,
    ``patch_embed`` (parameters held by the model itself, such as ``cls_token`` and
    ``pos_embed``, belong to no layer and are never randomised by default).
    """
    names: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            names += [f"{name}.{i}" for i, c in child.named_children()
                      if any(True for _ in c.parameters())]
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names[::-1]


@torch.no_grad()
def randomise_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` in place, reproducibly.

    Each parameter p is replaced by draws from U(−1/√f, 1/√f), f = the product of p's
    trailing dimensions for tensors of rank ≥ 2 (PyTorch's default for Linear and Conv
    weights) and f = p.numel() for vectors. Norm scales, biases and layer scales are drawn
    too rather than reset to constants, so no layer keeps a near-trained function. Draws come
    from a CPU generator seeded with (``seed``, parameter name), so results do not depend on
    the device or the global RNG.
    """
    for name, p in module.named_parameters():
        fan_in = p[0].numel() if p.ndim >= 2 else p.numel()
        bound = fan_in ** -0.5
        g = torch.Generator().manual_seed(stable_seed(seed, name))
        u = torch.rand(p.shape, generator=g, dtype=torch.float64)
        p.copy_(((2 * u - 1) * bound).to(p))


def _run_method(method: Method, adapter: ModelAdapter, images: torch.Tensor,
                targets: torch.Tensor, seed: int, params: dict[str, Any]) -> torch.Tensor:
    if isinstance(method, str):
        maps = attribute(method, adapter, images, targets, seed=seed, **params).maps
    elif callable(method):
        if params:
            raise ValueError("method parameters are only accepted with a registry name; "
                             "bind them into the callable instead")
        maps = method(adapter, images, targets)
        if isinstance(maps, Attribution):
            maps = maps.maps
    else:
        raise TypeError(f"method must be a registry name or a callable, got {type(method)}")
    return one_channel(torch.as_tensor(maps).detach()).to("cpu", torch.float64)


def model_randomisation(
    adapter: ModelAdapter,
    method: Method,
    images: torch.Tensor,
    targets: Targets = None,
    *,
    mode: Literal["cascading", "independent"] = "cascading",
    layers: Sequence[str] | None = None,
    similarity: Similarity = "spearman",
    seed: int = 0,
    **method_params: Any,
) -> dict[str, torch.Tensor]:
    """Model-parameter randomisation test (Adebayo et al. 2018, NeurIPS).

    The original maps are computed on the unmodified model. Then, on a deep copy of the
    adapter, each layer in ``layers`` is re-initialised with :func:`randomise_module` (seeded by
    ``seed`` and the layer name) and the maps are recomputed for the same targets:

    * "cascading": layers are randomised one after another and stay randomised, so the entry of
      layer l reflects l and every layer listed before it (from the output down by default);
    * "independent": only layer l is randomised (it is restored before the next one).

    Args:
        adapter: the model; neither it nor its model is modified.
        method: registry name or callable ``(adapter, images, targets) -> maps``.
        images: (B, 3, H, W) unnormalised, in [0, 1].
        targets: class per image; None = the original model's prediction, kept for every
            randomised model.
        mode: "cascading" or "independent".
        layers: dotted module names (``model.get_submodule``); default :func:`default_layers`.
        similarity: see :func:`map_similarity`.
        seed: seeds the randomisation and, for registry methods, the method's own draws (the
            same for every model, so sampling noise is not mistaken for sensitivity).
        **method_params: parameters of a registry method.

    Returns:
        ``{layer name: (B,) float64 similarity to the original maps}`` in randomisation order.
        Low values mean the method is sensitive to the model (passes the check).
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    images = torch.as_tensor(images).to(adapter.device, adapter.dtype)
    t = resolve_targets(adapter, images, targets)
    names = list(default_layers(adapter.model) if layers is None else layers)
    original = _run_method(method, adapter, images, t, seed, method_params)
    # a deep copy of the adapter copies the model once and keeps the adapter's references into
    # it (a ViT adapter's ``blocks``) pointing at the copy
    work = copy.deepcopy(adapter)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = work.model.get_submodule(name)
        saved = None
        if mode == "independent":
            saved = {k: v.clone() for k, v in module.state_dict().items()}
        randomise_module(module, stable_seed(seed, name))
        maps = _run_method(method, work, images, t, seed, method_params)
        out[name] = map_similarity(original, maps, similarity)
        if saved is not None:
            module.load_state_dict(saved)
    return out


def random_logit(
    adapter: ModelAdapter,
    method: Method,
    images: torch.Tensor,
    targets: Targets = None,
    *,
    seed: int = 0,
    similarity: Similarity = "ssim",
    **method_params: Any,
) -> torch.Tensor:
    """Random-logit test: similarity of the map for the target and for a random other class.

    The other class is drawn uniformly from the ``num_classes − 1`` classes other than the
    target, per image, from a CPU generator seeded with (``seed``, position in the batch).

    Args:
        adapter, method, images, targets, method_params: as in :func:`model_randomisation`.
        seed: seeds the class draw and the method's own draws.
        similarity: see :func:`map_similarity`; "ssim" by default (as Quantus's RandomLogit).

    Returns:
        (B,) float64 similarity; low values mean class-sensitive maps.

    Raises:
        ValueError: when the model has fewer than two classes.
    """
    images = torch.as_tensor(images).to(adapter.device, adapter.dtype)
    t = resolve_targets(adapter, images, targets)
    n = adapter.num_classes or int(adapter.predict(images[:1]).shape[1])
    if n < 2:
        raise ValueError("random_logit needs a model with at least two classes")
    draws = torch.stack([
        torch.randint(n - 1, (), generator=torch.Generator().manual_seed(
            stable_seed(seed, i, "random_logit")))
        for i in range(t.numel())
    ])
    other = draws + (draws >= t).long()  # skip the target: uniform over the other classes
    a = _run_method(method, adapter, images, t, seed, method_params)
    b = _run_method(method, adapter, images, other, seed, method_params)
    return map_similarity(a, b, similarity)
