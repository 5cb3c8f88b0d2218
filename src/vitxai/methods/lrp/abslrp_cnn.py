"""absLRP for timm VGG and ResNet CNNs (Vukadin et al., ACM TIST 2024).

The paper-era rule of docs/methods.md §7 ("On CNNs") through the layers of a timm ``VGG``
(``vgg11`` … ``vgg19``, ``_bn`` variants) or ``ResNet`` (``BasicBlock`` / ``Bottleneck``:
``resnet18``, ``resnet50``, ``resnet10t``, ``resnet26d``, …), applied explicitly to the inputs
one forward of an *unmodified* model records with forward hooks (removed on exit, also after an
error), as :mod:`.abslrp` does for ViTs. The reference code applies its generic rule to every
leaf module and a residual split to timm's blocks; here every leaf has its closed form in
:mod:`.rules`, with s = R/|y| and R_in = P⁺·N1(G⁺) + |P⁻|·N1(G⁻):

- Conv2d, y = conv(x; W) + b: G_i = Σ_j 2(x_i w_ji)⁺ s_j (:func:`~.rules.abs_conv2d_rule`);
  Linear likewise (:func:`~.rules.abs_linear_rule`).
- BatchNorm2d (eval), y = a·x + c per channel: G = 2(a·x)⁺ ⊙ s, its own layer as in the
  reference (folding it into the convolution would divide by |y| once instead of twice and give
  another map).
- ReLU: G = 2x⁺ ⊙ s, relevance passes through the active units.
- MaxPool2d: winner takes all (G = 2R at each window's argmax for inputs ≥ 0).
- AvgPool2d, AdaptiveAvgPool2d, timm's SelectAdaptivePool2d (average) and the resize timm's
  VGG ``ConvMlp`` applies to inputs smaller than its 7×7 kernel: linear maps P ≥ 0,
  G = 2x⁺ ⊙ Pᵀs.
- Residual add of a block, y = branch + shortcut: :func:`~.rules.abs_add_rule`; the block
  input forks into both, so their relevances are summed.
- Flatten, Identity and Dropout / DropPath / DropBlock2d in eval mode: identities.

The path: VGG: head.fc → global pool → ConvMlp (fc2 → ReLU → fc1 → resize) → ``features`` in
reverse. ResNet: fc → global pool → blocks in reverse (final ReLU → add → branch, shortcut) →
max pool → stem. Every rule is sign-definite where the max-pool inputs are ≥ 0, which the ReLU
before every max pool of these models guarantees: each rule conserves P⁺ and P⁻ separately, so
the method's non-negative seeds reach the pixels whole and non-negative (a signed seed keeps its
net ΣR; its streams mix at the units). A stream is dropped only where a whole layer has G± = 0
for it, e.g. when every unit carrying it owes its sign to a bias or BatchNorm shift.

Anything else (SE and other attention modules, anti-aliasing, other norms or activations,
Dropout in training mode) is refused in one line naming the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropBlock2d, DropPath, SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vgg import VGG, ConvMlp
from torch import nn

from vitxai.methods.lrp.rules import (
    abs_add_rule,
    abs_avg_pool_rule,
    abs_batchnorm_rule,
    abs_conv2d_rule,
    abs_linear_rule,
    abs_max_pool_rule,
    abs_relu_rule,
    work_dtype,
)
from vitxai.models.adapter import ModelAdapter

_BLOCKS = (BasicBlock, Bottleneck)
_EVAL_IDENTITIES = (nn.Dropout, DropPath, DropBlock2d)  # identities unless training
_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
           nn.AdaptiveAvgPool2d, SelectAdaptivePool2d, nn.Linear, nn.Flatten, nn.Identity,
           *_EVAL_IDENTITIES)


def _error(adapter: ModelAdapter, what: str) -> ValueError:
    return ValueError(
        "abslrp supports timm ViTs and timm VGG / ResNet CNNs made of Conv2d, BatchNorm2d, ReLU, "
        f"max / average pooling and Linear layers; {adapter.name!r} {what}"
    )


def _leaves(module: nn.Module) -> list[nn.Module]:
    """A module as the layers it runs, in order (nested ``nn.Sequential`` flattened)."""
    if type(module) is nn.Sequential:
        return [leaf for m in module for leaf in _leaves(m)]
    return [module]


def _branch(block: nn.Module) -> list[nn.Module]:
    """A residual block's branch in the order of timm's forward (SE, drop-path last)."""
    if type(block) is BasicBlock:
        layers = [block.conv1, block.bn1, block.drop_block, block.act1, block.aa, block.conv2,
                  block.bn2]
    else:
        layers = [block.conv1, block.bn1, block.act1, block.conv2, block.bn2, block.drop_block,
                  block.act2, block.aa, block.conv3, block.bn3]
    return layers + [m for m in (block.se, block.drop_path) if m is not None]


def _shortcut(block: nn.Module) -> list[nn.Module]:
    return [] if block.downsample is None else _leaves(block.downsample)


def _last_act(block: nn.Module) -> nn.Module:
    return block.act2 if type(block) is BasicBlock else block.act3


def _steps(model: nn.Module) -> list[nn.Module]:
    """The forward as steps: leaf layers, residual blocks and VGG's ConvMlp, in order."""
    if type(model) is VGG:
        head = model.head
        return [*_leaves(model.features), model.pre_logits, head.global_pool, head.drop,
                head.fc, head.flatten]
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
              for b in stage]
    return [*_leaves(model.conv1), model.bn1, model.act1, *_leaves(model.maxpool), *blocks,
            model.global_pool, model.fc]


def _leaf_problem(module: nn.Module) -> str | None:
    """Why ``module`` has no leaf rule here, or None when it has one."""
    kind = type(module)
    if kind not in _LEAVES:
        return kind.__name__
    if kind is nn.Conv2d and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return f"Conv2d with padding {module.padding!r} / {module.padding_mode!r}"
    if kind is nn.BatchNorm2d and (module.training or module.running_var is None):
        return "BatchNorm2d using batch statistics"
    if kind is SelectAdaptivePool2d and type(module.pool) not in (nn.AdaptiveAvgPool2d,
                                                                   FastAdaptiveAvgPool):
        return f"SelectAdaptivePool2d(pool_type={module.pool_type!r})"
    if kind in _EVAL_IDENTITIES and module.training:
        return f"{kind.__name__} in training mode"
    return None


def check_supported(adapter: ModelAdapter) -> list[nn.Module]:
    """The steps of a supported timm VGG or ResNet (:func:`_steps`); else a one-line
    ValueError naming abslrp and the first module without a rule."""
    model = adapter.model
    if type(model) not in (VGG, ResNet):
        raise _error(adapter, f"is a {type(model).__name__}, not a timm VGG or ResNet")
    if type(model) is VGG:
        if type(model.head) is not ClassifierHead:
            raise _error(adapter, f"has a {type(model.head).__name__} as head")
        if type(model.pre_logits) is not ConvMlp:
            raise _error(adapter, f"has a {type(model.pre_logits).__name__} as pre_logits")
    elif model.training and model.drop_rate:
        raise _error(adapter, "is in training mode (head dropout)")
    steps = _steps(model)
    layers: list[nn.Module] = []
    for step in steps:
        if type(step) is ConvMlp:
            layers += [step.fc1, step.act1, step.drop, step.fc2, step.act2]
        elif type(step) in _BLOCKS:
            layers += [*_branch(step), *_shortcut(step), _last_act(step)]
        else:
            layers.append(step)
    names = {m: name for name, m in model.named_modules()}
    for layer in layers:
        problem = _leaf_problem(layer)
        if problem is not None:
            raise _error(adapter, f"has {names.get(layer, '?')} ({problem})")
    return steps


@dataclass
class Recording:
    """What one forward recorded: every step's and layer's input, and the add operands.

    ``inputs[m]`` is module m's first input, detached, in the working dtype (no copy: the
    pass keeps no more than the forward made). timm's in-place operations change only inputs
    whose rules do not mind: an in-place ReLU's (to its output, which its rule accepts) and
    those of the identity layers before a ReLU or the add (their rules read only the shape).
    ``outputs`` holds copies of the last branch and shortcut layers' outputs of each residual
    block, taken before timm's in-place ``x += shortcut``.
    """

    inputs: dict[nn.Module, torch.Tensor]
    outputs: dict[nn.Module, torch.Tensor]


def record(adapter: ModelAdapter, images: torch.Tensor, steps: Sequence[nn.Module],
           dtype: torch.dtype) -> Recording:
    """One float32 (float64 for float64 models) forward of ``images`` (unnormalised) with
    forward hooks on every module of ``steps``, all removed on exit, after errors too."""
    rec = Recording({}, {})
    tails = {m for s in steps if type(s) in _BLOCKS for m in (_branch(s)[-1:] + _shortcut(s)[-1:])}
    names = {m: name for name, m in adapter.model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module in rec.inputs:  # one record per module: a reused module has no single input
            raise ValueError(f"abslrp: {adapter.name!r} runs {names.get(module, '?')} twice "
                             "per forward")
        rec.inputs[module] = inputs[0].detach().to(dtype)
        if module in tails:
            rec.outputs[module] = output.detach().to(dtype, copy=True)

    modules = {m for s in steps for m in s.modules()}
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        with adapter.full_precision(), torch.no_grad():
            adapter.logits(images)
    finally:
        for h in handles:
            h.remove()
    missing = [names.get(m, "?") for m in modules if m not in rec.inputs]
    if missing:
        raise ValueError(f"abslrp: the forward of {adapter.name!r} skipped {missing[0]}")
    return rec


def _leaf_rule(module: nn.Module, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance of one layer's input x from that of its output."""
    kind = type(module)
    if kind is nn.Conv2d:
        return abs_conv2d_rule(x, module, relevance)
    if kind is nn.BatchNorm2d:
        return abs_batchnorm_rule(x, module, relevance)
    if kind is nn.ReLU:
        return abs_relu_rule(x, relevance)
    if kind is nn.MaxPool2d:
        return abs_max_pool_rule(x, module, relevance)
    if kind is nn.Linear:
        return abs_linear_rule(x, module.weight, module.bias, relevance)
    if kind in (nn.AvgPool2d, nn.AdaptiveAvgPool2d, SelectAdaptivePool2d):
        return abs_avg_pool_rule(x, module, relevance)
    return relevance.reshape(x.shape)  # Flatten and the eval-mode identities


def _chain_rule(layers: Sequence[nn.Module], rec: Recording, relevance: torch.Tensor
                ) -> torch.Tensor:
    for layer in reversed(layers):
        relevance = _leaf_rule(layer, rec.inputs[layer], relevance)
    return relevance


def _block_rule(block: nn.Module, rec: Recording, relevance: torch.Tensor) -> torch.Tensor:
    """BasicBlock / Bottleneck: out = ReLU(branch(x) + shortcut(x)), relevance of x."""
    relevance = abs_relu_rule(rec.inputs[_last_act(block)], relevance)
    branch, shortcut = _branch(block), _shortcut(block)
    x = rec.inputs[block]
    b = rec.outputs[shortcut[-1]] if shortcut else x
    r_branch, r_shortcut = abs_add_rule(rec.outputs[branch[-1]], b, relevance)
    # the fork x → (branch, shortcut) sums its relevances
    return _chain_rule(branch, rec, r_branch) + _chain_rule(shortcut, rec, r_shortcut)


def _conv_mlp_rule(mlp: nn.Module, rec: Recording, relevance: torch.Tensor) -> torch.Tensor:
    """VGG's pre_logits: fc1 (7×7 conv) → ReLU → dropout → fc2 (1×1 conv) → ReLU."""
    relevance = _chain_rule([mlp.fc1, mlp.act1, mlp.drop, mlp.fc2, mlp.act2], rec, relevance)
    x = rec.inputs[mlp]
    if x.shape != relevance.shape:  # timm pools inputs below the kernel size up to it
        resize = partial(F.adaptive_avg_pool2d, output_size=relevance.shape[-2:])
        relevance = abs_avg_pool_rule(x, resize, relevance)
    return relevance


@dataclass
class CNNAbsLRPPass:
    """One absLRP pass through a CNN from a seed to the pixels.

    Attributes:
        pixels: (B, 3, H, W) relevance of the model's normalised input.
        block_input: per residual block (ResNet, forward order), (B, C, h, w) relevance of the
            block's input; empty for a VGG.
    """

    pixels: torch.Tensor
    block_input: list[torch.Tensor]


def _propagate(steps: Sequence[nn.Module], rec: Recording, seed: torch.Tensor
               ) -> CNNAbsLRPPass:
    relevance = seed
    block_input: list[torch.Tensor] = []
    for step in reversed(steps):
        if type(step) in _BLOCKS:
            relevance = _block_rule(step, rec, relevance)
            block_input.insert(0, relevance)
        elif type(step) is ConvMlp:
            relevance = _conv_mlp_rule(step, rec, relevance)
        else:
            relevance = _leaf_rule(step, rec.inputs[step], relevance)
    return CNNAbsLRPPass(relevance, block_input)


@torch.no_grad()
def relevance_pass(adapter: ModelAdapter, images: torch.Tensor, seeds: Sequence[torch.Tensor]
                   ) -> list[CNNAbsLRPPass]:
    """One recorded forward, then one absLRP pass per seed.

    Args:
        adapter: a supported timm VGG or ResNet (see :func:`check_supported`).
        images: (B, 3, H, W) unnormalised in [0, 1].
        seeds: each (B, C), the relevance put on the logits (any sign).

    Returns:
        One :class:`CNNAbsLRPPass` per seed; relevance is w.r.t. the model's normalised input.
    """
    steps = check_supported(adapter)
    dtype = work_dtype(adapter.dtype)
    rec = record(adapter, images, steps, dtype)
    return [_propagate(steps, rec, seed.to(dtype)) for seed in seeds]
