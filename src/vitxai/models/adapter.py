"""Model adapters: one object that knows how to feed a model and, for ViTs, its token layout.

A :class:`ModelAdapter` wraps any classifier taking normalised (B, 3, H, W) input; it owns the
normalisation, so methods work on unnormalised [0, 1] images. A :class:`ViTAdapter` adds the
token layout of a timm ``VisionTransformer`` (prefix tokens, patch grid) and
:meth:`ViTAdapter.capture`, a context manager that records attention probabilities, their
gradients and the block activations that relevance propagation needs. Capturing switches timm's
fused attention off only for its duration (fused SDPA never materialises the attention matrix)
and always restores the model and removes its hooks, even on error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vitxai.models.probe import LinearProbe, attached_probe

Precision = Literal["fp32", "bf16"]


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); None if unknown.

    Without either, torch emulates bfloat16 matrix products and bf16 autocast is several times
    *slower* than float32 (DeiT-tiny, AVX2-only AMD EPYC: 5.5× slower).
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in other torch versions
        return None


def auto_precision(device: torch.device | str, dtype: torch.dtype = torch.float32) -> Precision:
    """``precision="auto"``: "bf16" where bfloat16 is native (a CUDA device that supports
    it, a CPU with AVX512-BF16 or AMX, :func:`cpu_has_native_bf16`) for a float32 model,
    else "fp32" (emulated bfloat16 is several times slower; docs/environment.md §5)."""
    device = torch.device(device)
    if dtype != torch.float32:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


_PRECISIONS: dict[str, Precision] = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16",
                                     "bfloat16": "bf16"}


def check_classifier_head(model: nn.Module, name: str) -> None:
    """Refuse a model that declares ``num_classes == 0`` (a timm backbone without head).

    Such models (DINOv2, MAE, any timm model built with ``num_classes=0``) output pooled
    features: explaining "class" k of them would explain embedding dimension k. Models that
    do not declare ``num_classes`` at all (plain ``nn.Module`` classifiers) are accepted.

    Raises:
        ValueError: one line saying how to get a classifier.
    """
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(
            f"model {name!r} has no classifier head (num_classes=0): its outputs are features, "
            "not classes; train a linear probe with `vitxai probe` and attach it with "
            "probe=FILE, or load weights with a head"
        )


def require_vit(adapter: ModelAdapter, method: str) -> None:
    """Refuse a ViT-only ``method`` on a model that is not a ViT: the one wording of this
    check (the method registry, the runner and ``attribute`` all raise it).

    Raises:
        ValueError: one line naming the method and the model.
    """
    if not adapter.is_vit:
        raise ValueError(
            f"method {method!r} needs a ViT (timm VisionTransformer); model "
            f"{adapter.name!r} is not one: choose a model-agnostic method"
        )


class ModelAdapter:
    """Any image classifier: normalisation plus a model mapping (B, 3, H, W) to logits (B, C).

    Args:
        model: the classifier; put in eval mode and its parameters frozen (attributions only
            need gradients with respect to inputs or activations, and frozen parameters make
            backward passes about 40 % cheaper).
        mean, std: the model's own normalisation (from its timm data config).
        input_size: (H, W) the model expects.
        name: for messages and run records.
        features_only: accept a headless backbone, for feature extraction (``vitxai probe``);
            explaining its "classes" would explain embedding dimensions.

    Attributes:
        precision: "fp32" (default) or "bf16", the arithmetic of the model's forward passes
            (:meth:`set_precision`); ``dtype`` stays the parameters' and inputs' dtype.

    Raises:
        ValueError: the model has no classifier head (:func:`check_classifier_head`).
    """

    is_vit = False

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_size: tuple[int, int], name: str = "model",
                 features_only: bool = False) -> None:
        if not features_only:
            check_classifier_head(model, name)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.input_size = (int(input_size[0]), int(input_size[1]))
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32
        self.mean = torch.tensor(mean, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.precision: Precision = "fp32"

    def set_precision(self, precision: str) -> ModelAdapter:
        """Run the model's forward passes in "fp32" (default) or "bf16" (returns self).

        Under "bf16", :meth:`logits` runs the model inside ``torch.autocast`` with bfloat16 on
        the adapter's device type (CPU or GPU) and returns float32 logits; inputs, gradients
        with respect to them, masks, relevance rules and solves stay float32. On CPUs with
        AMX or AVX512-BF16 this is 2–3× faster (docs/environment.md §5); on CPUs without them it is
        emulated and several times slower (a RuntimeWarning says so, see
        :func:`cpu_has_native_bf16`).
        It speeds up the methods that evaluate the model many times (perturbation and gradient
        methods); the one shared pass of the attention and LRP methods stays float32 (see
        :meth:`full_precision`). Aliases: "float32", "bfloat16". "auto" chooses "bf16" where
        the device computes it natively and "fp32" elsewhere (:func:`auto_precision`); read
        :attr:`precision` for the choice.

        Raises:
            ValueError: an unknown name, or "bf16" on a model that is not float32.
        """
        if str(precision).lower() == "auto":
            precision = auto_precision(self.device, self.dtype)
        key = _PRECISIONS.get(str(precision).lower())
        if key is None:
            raise ValueError(f"precision {precision!r} must be one of 'fp32', 'bf16', 'auto'")
        if key == "bf16" and self.dtype != torch.float32:
            raise ValueError(f"precision 'bf16' needs a float32 model; this one is {self.dtype}")
        if key == "bf16" and self.device.type == "cpu" and cpu_has_native_bf16() is False:
            warnings.warn("this CPU has neither AVX512-BF16 nor AMX: bfloat16 is emulated and "
                          "usually several times slower than fp32", RuntimeWarning, stacklevel=2)
        self.precision = key
        return self

    @contextmanager
    def full_precision(self) -> Iterator[ModelAdapter]:
        """Run :meth:`logits` in float32 inside the block, whatever :attr:`precision` says.

        The shared pass of the attention and relevance methods uses it: relevance rules divide
        by sums of activations that nearly cancel, so bf16 rounding of the activations (≈ 0.4 %)
        can change their maps completely (chefer2021a: r down to −0.3 against fp32 on small
        trained ViTs), while that pass is a single forward and backward per batch.
        """
        saved = self.precision
        self.precision = "fp32"
        try:
            yield self
        finally:
            self.precision = saved

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> ModelAdapter:
        """Move the model and normalisation constants (returns self)."""
        if dtype is not None and dtype != torch.float32 and self.precision == "bf16":
            raise ValueError(f"cannot cast a model in precision 'bf16' to {dtype}; "
                             "call set_precision('fp32') first")
        self.model.to(device=device, dtype=dtype)
        self.mean = self.mean.to(device=device, dtype=dtype)
        self.std = self.std.to(device=device, dtype=dtype)
        self.device = self.mean.device
        self.dtype = self.mean.dtype
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → the model's normalised input."""
        return (images - self.mean) / self.std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-softmax outputs (B, C) for unnormalised images; differentiable.

        Under ``precision="bf16"`` the model runs in bfloat16 autocast and the logits come back
        as float32 (see :meth:`set_precision`).
        """
        x = self.normalize(images)
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                y = self.model(x)
            return y.float()
        return self.model(x)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Logits (B, C) without autograd, in chunks of ``batch_size``."""
        images = images.to(self.device, self.dtype)
        return torch.cat([self.logits(c) for c in images.split(batch_size)])


@dataclass
class Capture:
    """What :meth:`ViTAdapter.capture` recorded during one forward (and backward) pass.

    ``attention[l]`` is block l's post-softmax attention (B, heads, N, N); ``attention_grad[l]``
    its gradient once a backward pass ran; ``activations[l]`` maps names to block l's tensors
    (see :data:`ACTIVATION_POINTS`); ``head_input`` is the (B, D) input of the classifier head
    and ``head_dist_input`` that of the distillation head of a distilled DeiT;
    ``last_tokens_grad`` is the gradient of the last block's ``norm1`` output (token GradCAM),
    recorded when both gradients and activations are captured.
    """

    depth: int
    attention: list[torch.Tensor | None] = field(default_factory=list)
    attention_grad: list[torch.Tensor | None] = field(default_factory=list)
    activations: list[dict[str, torch.Tensor]] = field(default_factory=list)
    head_input: torch.Tensor | None = None
    head_dist_input: torch.Tensor | None = None
    last_tokens_grad: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.attention = [None] * self.depth
        self.attention_grad = [None] * self.depth
        self.activations = [{} for _ in range(self.depth)]

    def upcast(self) -> Capture:
        """Cast every captured bfloat16/float16 tensor to float32 in place (returns self).

        Under ``precision="bf16"`` the recorded attention, gradients and activations are
        bfloat16; the relevance rules and rollouts divide and accumulate, so they run on
        float32 copies (detached: call this after the backward pass). The half-precision
        originals are dropped.
        """
        def up(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.dtype not in (torch.bfloat16, torch.float16):
                return t
            return t.detach().float()

        self.attention = [up(a) for a in self.attention]
        self.attention_grad = [up(g) for g in self.attention_grad]
        self.activations = [{k: up(v) for k, v in a.items()} for a in self.activations]
        self.head_input = up(self.head_input)
        self.head_dist_input = up(self.head_dist_input)
        self.last_tokens_grad = up(self.last_tokens_grad)
        return self

    def attention_maps(self) -> list[torch.Tensor]:
        """All blocks' attention; fails loudly when a block was not captured."""
        missing = [i for i, a in enumerate(self.attention) if a is None]
        if missing:
            raise RuntimeError(
                f"attention of blocks {missing} was not captured ({self.depth - len(missing)} "
                f"of {self.depth}); the model's attention does not go through attn.attn_drop"
            )
        return self.attention  # type: ignore[return-value]

    def gradient_maps(self) -> list[torch.Tensor]:
        """All blocks' attention gradients; fails loudly when backward did not reach one."""
        missing = [i for i, g in enumerate(self.attention_grad) if g is None]
        if missing:
            raise RuntimeError(f"no attention gradient for blocks {missing}; run backward first")
        return self.attention_grad  # type: ignore[return-value]


# (module path inside a timm Block, "input"/"output", capture name) for relevance propagation.
ACTIVATION_POINTS: tuple[tuple[str, str, str], ...] = (
    ("", "input", "x"),               # block input
    ("norm1", "output", "h1"),        # attention branch input
    ("attn.qkv", "output", "qkv"),
    ("attn.proj", "input", "o"),      # merged heads A·V (after attn.norm)
    ("ls1", "output", "b1"),          # attention branch value added to the residual
    ("norm2", "input", "x1"),         # residual after attention
    ("norm2", "output", "h2"),        # MLP input
    ("mlp.fc1", "output", "f1"),
    ("mlp.fc2", "input", "g1"),       # activation output (after act, drop, mlp.norm)
    ("ls2", "output", "b2"),          # MLP branch value added to the residual
)


class ViTAdapter(ModelAdapter):
    """A timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, DINOv2 with registers, ...).

    Token layout: ``num_prefix_tokens`` (CLS, distillation token, registers) come first, then
    the patches row by row; the grid comes from ``patch_embed.grid_size`` (never from √N, which
    breaks with registers and non-square grids). A backbone with a linear probe as its head
    (:func:`vitxai.models.probe.attach_probe`) has it in :attr:`probe`; the capture then
    records all final tokens as ``head_input`` (B, N, D).
    """

    is_vit = True

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_size: tuple[int, int], name: str = "vit",
                 features_only: bool = False) -> None:
        super().__init__(model, mean, std, input_size, name, features_only)
        blocks = getattr(model, "blocks", None)
        if blocks is None or not all(hasattr(b, "attn") for b in blocks):
            raise ValueError(f"{name!r} has no timm transformer blocks with .attn")
        self.blocks: list[nn.Module] = list(blocks)
        self.depth = len(self.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        pe = model.patch_embed
        self.grid_size = tuple(int(g) for g in pe.grid_size)
        self.patch_size = tuple(int(p) for p in pe.patch_size)
        self.num_heads = int(self.blocks[0].attn.num_heads)
        self.global_pool = getattr(model, "global_pool", "token")
        self.distilled = hasattr(model, "head_dist")
        #: the linear probe serving as classifier (vitxai.models.probe), or None
        self.probe: LinearProbe | None = attached_probe(model)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (gh, gw) for inputs of this spatial size."""
        h, w = images.shape[-2:]
        return h // self.patch_size[0], w // self.patch_size[1]

    @contextmanager
    def capture(self, gradients: bool = False, activations: bool = False) -> Iterator[Capture]:
        """Record attention (and optionally its gradient and block activations).

        Usage::

            with adapter.capture(gradients=True) as cap:
                y = adapter.logits(images.requires_grad_())
                y.gather(1, t[:, None]).sum().backward()
            A, G = cap.attention_maps(), cap.gradient_maps()

        Gradients use tensor hooks on the attention output, never module backward hooks
        (which land on the softmax backward under eval-mode dropout: docs/methods.md §2). Run the
        backward inside the block: on exit every hook is removed, tensor hooks included. A
        tensor hook that closes over the capture that holds the tensor is a reference cycle
        through autograd that Python's collector cannot see, so leaving it in place would keep
        every batch's attention maps alive for the life of the process.
        """
        cap = Capture(self.depth)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        saved_fused = [getattr(b.attn, "fused_attn", None) for b in self.blocks]

        def on_attention(layer: int):
            def hook(_m, _inp, out):
                cap.attention[layer] = out
                if gradients and out.requires_grad:
                    def store(g, layer=layer):
                        cap.attention_grad[layer] = g
                    handles.append(out.register_hook(store))
            return hook

        def on_point(layer: int, name: str, where: str):
            if where == "input":
                def hook(_m, inp, _out=None):
                    cap.activations[layer][name] = inp[0]
                return hook

            def hook_out(_m, _inp, out):
                cap.activations[layer][name] = out
                if (gradients and name == "h1" and layer == self.depth - 1
                        and out.requires_grad):
                    handles.append(out.register_hook(
                        lambda g: setattr(cap, "last_tokens_grad", g)))
            return hook_out

        try:
            for i, blk in enumerate(self.blocks):
                if saved_fused[i] is not None:
                    blk.attn.fused_attn = False
                drop = getattr(blk.attn, "attn_drop", None)
                if drop is None:
                    raise ValueError(
                        f"block {i} of {self.name!r} has no attn.attn_drop to capture attention"
                    )
                handles.append(drop.register_forward_hook(on_attention(i)))
                if activations:
                    for path, where, name in ACTIVATION_POINTS:
                        module = blk.get_submodule(path) if path else blk
                        if where == "input" and path == "":
                            handles.append(module.register_forward_pre_hook(
                                on_point(i, name, "input")))
                        elif where == "input":
                            handles.append(module.register_forward_hook(
                                on_point(i, name, "input")))
                        else:
                            handles.append(module.register_forward_hook(
                                on_point(i, name, "output")))
            if activations:
                def on_head(attr: str):
                    def hook(_m, inp, _out):
                        setattr(cap, attr, inp[0])
                    return hook
                handles.append(self.model.head.register_forward_hook(on_head("head_input")))
                if self.distilled:
                    handles.append(self.model.head_dist.register_forward_hook(
                        on_head("head_dist_input")))
            yield cap
        finally:
            for h in handles:
                h.remove()
            for blk, fused in zip(self.blocks, saved_fused, strict=True):
                if fused is not None:
                    blk.attn.fused_attn = fused


def is_timm_vit(model: nn.Module) -> bool:
    """True for timm VisionTransformer-style models (blocks with attention modules)."""
    blocks = getattr(model, "blocks", None)
    return (
        blocks is not None
        and hasattr(model, "patch_embed")
        and len(blocks) > 0
        and all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") for b in blocks)
    )
