"""Linear probes: a classifier read out of a frozen ViT's tokens, attached as its head.

Self-supervised backbones (DINOv2, MAE, CLIP's image tower) have no classifier; a class-specific
map needs one. A :class:`LinearProbe` is ``y = Σ_k W_k · f_k(tokens) + b`` over the tokens the
backbone's ``forward_features`` returns (after its final norm), with one of three read-outs
(docs/methods.md §13):

- ``cls``: f = the class token (CLIP's and MAE's usual probe);
- ``mean_patch``: f = the mean of the patch tokens (registers and class token excluded);
- ``cls+mean_patch``: the concatenation [class token; mean patch token], DINOv2's linear
  evaluation (Oquab et al. 2024, §7) and ``Dinov2ForImageClassification``'s head.

Every read-out is a weighted sum of tokens, f_k = Σ_i ω_ki x_i with ω_k ≥ 0, so the probe is
one linear map of the whole token matrix. That is what the methods use: rollouts read the row
Σ_k ω_k / K (:meth:`LinearProbe.readout_row`), the explicit LRP passes apply their linear rule
to that map (:meth:`LinearProbe.token_parts`), and gradients follow it by themselves. A
``cls+mean_patch`` probe whose patch half is zero is therefore the ``cls`` probe, bit for bit.

:func:`attach_probe` makes a timm ViT feed all its tokens to the probe (``global_pool=''``)
and sets it as ``model.head``; :func:`save_probe` / :func:`load_probe` keep it as safetensors
with its card in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the read-outs, in the order the CLI lists them
READOUTS = ("cls", "mean_patch", "cls+mean_patch")
#: safetensors metadata key that marks a vitxai probe file
PROBE_FORMAT = "vitxai-linear-probe/1"


class ProbeError(ValueError):
    """A probe file that cannot be read or does not fit the backbone; one line."""


def check_readout(readout: str) -> str:
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r} must be one of {', '.join(READOUTS)}")
    return readout


class LinearProbe(nn.Module):
    """A linear classifier on a ViT's tokens: (B, N, D) tokens → (B, C) logits.

    Args:
        readout: "cls", "mean_patch" or "cls+mean_patch" (see the module docstring).
        in_features: D, the backbone's token width.
        num_classes: C.
        num_prefix_tokens: tokens before the patches (class token, registers); the class
            token is token 0.

    Attributes:
        linear: ``nn.Linear(K·D, C)`` with the K read-out parts side by side in
            :data:`READOUTS` order (class token first), as in DINOv2's and Hugging Face's
            ``cls+mean_patch`` heads.
    """

    def __init__(self, readout: str, in_features: int, num_classes: int,
                 num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.readout = check_readout(readout)
        self.parts: tuple[str, ...] = tuple(readout.split("+"))
        if num_prefix_tokens < 1 and "cls" in self.parts:
            raise ValueError("the cls read-out needs a class token (num_prefix_tokens ≥ 1)")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.linear = nn.Linear(len(self.parts) * self.in_features, self.num_classes)

    def part_features(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The K read-out vectors f_k, each (B, D), of tokens (B, N, D)."""
        return [tokens[:, 0] if part == "cls" else tokens[:, self.num_prefix_tokens:].mean(1)
                for part in self.parts]

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K·D): the probe's input, the read-out vectors side by side."""
        return torch.cat(self.part_features(tokens), dim=1)

    def weights(self) -> list[torch.Tensor]:
        """The K weight blocks W_k, each (C, D), of ``linear.weight``."""
        return list(self.linear.weight.split(self.in_features, dim=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Σ_k f_k W_kᵀ + b part by part: a zero block adds exact zeros, so cls+mean_patch with
        # its patch half zeroed gives the cls probe's logits and gradients bit for bit
        y = sum(F.linear(f, w) for f, w in zip(self.part_features(tokens), self.weights(),
                                                strict=True))
        return y + self.linear.bias

    def token_weights(self, n_tokens: int, dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
        """(K, N) the read-out weights ω_k of every token (e₀, or 1/P on the P patches)."""
        omega = torch.zeros(len(self.parts), n_tokens, dtype=dtype, device=device)
        for k, part in enumerate(self.parts):
            if part == "cls":
                omega[k, 0] = 1.0
            else:
                omega[k, self.num_prefix_tokens:] = 1.0 / (n_tokens - self.num_prefix_tokens)
        return omega

    def readout_row(self, n_tokens: int, batch: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """(B, N) the class-agnostic read-out row of the rollouts: the parts' token weights
        averaged, Σ_k ω_k / K (as distilled DeiT's ½(e₀ + e₁))."""
        row = self.token_weights(n_tokens, dtype, device).mean(0)
        return row.expand(batch, -1).clone()

    def token_parts(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(ω_k (N,), W_k (C, D))]: the probe as one linear map of the tokens,
        y = Σ_k Σ_i ω_ki x_i W_kᵀ + b, for the explicit relevance rules."""
        omega = self.token_weights(tokens.shape[1], tokens.dtype, tokens.device)
        return [(omega[k], w.to(tokens.dtype)) for k, w in enumerate(self.weights())]

    def extra_repr(self) -> str:
        return (f"readout={self.readout!r}, in_features={self.in_features}, "
                f"num_classes={self.num_classes}, num_prefix_tokens={self.num_prefix_tokens}")


def attached_probe(model: nn.Module) -> LinearProbe | None:
    """The probe attached to ``model`` (its head), or None."""
    head = getattr(model, "head", None)
    return head if isinstance(head, LinearProbe) else None


def attach_probe(model: nn.Module, probe: LinearProbe, name: str = "model") -> list[str]:
    """Make ``probe`` the classifier of the timm ViT ``model`` (in place); returns notes.

    The model then pools nothing (``global_pool=''``) and hands all tokens of
    ``forward_features`` to the probe. A model whose pooled features had their own norm
    (``fc_norm``, the ``avg``-pool ViTs) gets it applied to every token instead, so the probe
    reads normalised tokens whatever the read-out. A model with a classifier keeps its body and
    loses its head (noted).

    Raises:
        ProbeError: ``model`` is not a timm ViT with a token read-out, or the probe's token
            width or prefix tokens differ from the model's.
    """
    if not hasattr(model, "blocks") or not hasattr(model, "forward_head"):
        raise ProbeError(f"a linear probe needs a timm ViT; {name!r} is not one")
    if getattr(model, "attn_pool", None) is not None or hasattr(model, "head_dist"):
        raise ProbeError(f"{name!r} reads out by attention pooling or a distillation head; "
                         "probes attach to ViTs with plain token outputs")
    width = int(getattr(model, "num_features", getattr(model, "embed_dim", -1)))
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if probe.in_features != width:
        raise ProbeError(f"the probe reads {probe.in_features}-dimensional tokens but "
                         f"{name!r} has {width}; it was trained on another backbone")
    if probe.num_prefix_tokens != prefix:
        raise ProbeError(f"the probe expects {probe.num_prefix_tokens} prefix token(s) but "
                         f"{name!r} has {prefix} (class token and registers); it was trained "
                         "on another backbone")
    if "cls" in probe.parts and getattr(model, "cls_token", None) is None:
        raise ProbeError(f"{name!r} has no class token for the {probe.readout!r} read-out; "
                         "use readout mean_patch")
    notes = []
    had = int(getattr(model, "num_classes", 0) or 0)
    if had:
        notes.append(f"the probe replaces {name!r}'s own {had}-class head")
    if not isinstance(model.fc_norm, nn.Identity):
        if not isinstance(model.norm, nn.Identity):
            raise ProbeError(f"{name!r} normalises both its tokens and its pooled features; "
                             "probes need one final norm")
        model.norm, model.fc_norm = model.fc_norm, nn.Identity()
    model.global_pool = ""
    model.head = probe.to(next(model.parameters()).device)
    model.num_classes = probe.num_classes
    for p in probe.parameters():
        p.requires_grad_(False)
    return notes


def save_probe(path: str | Path, probe: LinearProbe, card: Mapping[str, Any]) -> None:
    """Write ``probe`` as safetensors with ``card`` (JSON-able) in its metadata, atomically."""
    from safetensors.torch import save as save_bytes

    from vitxai.store import atomic_write

    metadata = {"format": PROBE_FORMAT, "readout": probe.readout,
                "in_features": str(probe.in_features), "num_classes": str(probe.num_classes),
                "num_prefix_tokens": str(probe.num_prefix_tokens),
                "card": json.dumps(dict(card), sort_keys=True)}
    tensors = {"weight": probe.linear.weight.detach().float().contiguous().cpu(),
               "bias": probe.linear.bias.detach().float().contiguous().cpu()}
    data = save_bytes(tensors, metadata=metadata)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def load_probe(path: str | Path) -> tuple[LinearProbe, dict[str, Any]]:
    """(probe, card) of a probe file written by :func:`save_probe` (``vitxai probe``).

    Raises:
        ProbeError: the file is missing, not safetensors, not a vitxai probe, or inconsistent.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"probe {path} does not exist; train one with `vitxai probe`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbeError(f"probe {path} is not a safetensors file ({type(e).__name__}); "
                         "pass the probe.safetensors that `vitxai probe` wrote") from e
    if metadata.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{path} is safetensors but not a vitxai probe (no {PROBE_FORMAT!r} "
                         "metadata); train one with `vitxai probe`")
    try:
        readout = check_readout(metadata["readout"])
        sizes = [int(metadata[k]) for k in ("in_features", "num_classes", "num_prefix_tokens")]
        card = json.loads(metadata.get("card", "{}"))
        weight, bias = tensors["weight"], tensors["bias"]
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise ProbeError(f"probe {path} has damaged metadata or tensors ({e}); train it "
                         "again with `vitxai probe`") from None
    probe = LinearProbe(readout, *sizes)
    if tuple(weight.shape) != tuple(probe.linear.weight.shape) or tuple(bias.shape) != (
            probe.num_classes,):
        raise ProbeError(f"probe {path}: weight {tuple(weight.shape)} does not fit its "
                         f"{readout!r} read-out of {sizes[0]} features and {sizes[1]} classes")
    with torch.no_grad():
        probe.linear.weight.copy_(weight)
        probe.linear.bias.copy_(bias)
    return probe, card


def probe_from(spec: str | Path | LinearProbe, backbone: str) -> tuple[LinearProbe, list[str]]:
    """(probe, notes) from a file or an object; a note when its card names another backbone
    (worth saying only once the probe fits, see :func:`attach_probe`)."""
    if isinstance(spec, LinearProbe):
        return spec, []
    probe, card = load_probe(spec)
    notes = []
    trained_on = card.get("backbone")
    if trained_on and trained_on != backbone:
        notes.append(f"probe {spec} was trained on {trained_on!r}, not {backbone!r}; its "
                     "token width fits, but check the model")
    return probe, notes
