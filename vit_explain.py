"""vit-explain's entry point: ``python vit_explain.py --image_path IMG [--category_index K]``.

The flags, defaults and output files of jacobgil/vit-explain's ``vit_explain.py``: without
``--category_index``, attention rollout with ``--head_fusion`` (default max) and
``--discard_ratio`` (default 0.9); with it, gradient attention rollout for that class. Writes
``input.png`` (the image resized to the model's input) and
``attention_rollout_{discard_ratio:.3f}_{head_fusion}.png`` or
``grad_rollout_{category_index}_{discard_ratio:.3f}_{head_fusion}.png`` (the map divided by its
maximum, overlaid as vit-explain's ``show_mask_on_image`` does) into ``--out`` (default: the
current directory, as vit-explain). No windows are opened.

The rollouts are vitxai's ``attention_rollout`` and ``grad_rollout``, correct by default;
``--legacy`` reproduces vit-explain's quirks (docs/methods.md §9: its row normalisation, its
pre-softmax gradient and reversed layer pairing, and its mean = std = 0.5 normalisation). The
model is the timm ``deit_tiny_patch16_224`` (vit-explain's torch-hub DeiT) unless ``--model``
names another (a timm name, ``bundled`` or ``hf:...``); ``--checkpoint`` loads local weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from vitxai.methods import attribute
from vitxai.models import ModelLoadError
from vitxai.source import RunSource


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--use_cuda", action="store_true", help="use an NVIDIA GPU")
    parser.add_argument("--image_path", required=True, help="input image path")
    parser.add_argument("--head_fusion", default="max", choices=["mean", "max", "min"],
                        help="how attention rollout fuses the heads")
    parser.add_argument("--discard_ratio", type=float, default=0.9,
                        help="share of the lowest attention paths discarded per layer")
    parser.add_argument("--category_index", type=int, default=None,
                        help="class for gradient rollout (none: attention rollout)")
    parser.add_argument("--model", default="deit_tiny_patch16_224",
                        help="timm model name, 'bundled', or hf:ORG/NAME | hf:/path/to/dir")
    parser.add_argument("--checkpoint", help="local weights (.safetensors or torch file)")
    parser.add_argument("--legacy", action="store_true",
                        help="reproduce vit-explain's rollout quirks and 0.5 normalisation")
    parser.add_argument("--out", default=".", help="output folder")
    return parser.parse_args(argv)


def show_mask_on_image(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """vit-explain's overlay: JET of uint8(255·mask) plus the image, divided by its maximum.

    Args:
        img: (H, W, 3) uint8 RGB.
        mask: (H, W) in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB. Matplotlib's jet stands in for ``cv2.COLORMAP_JET``; an integer
        array indexes its 256-entry table, as cv2 does.
    """
    heatmap = matplotlib.colormaps["jet"](np.uint8(255 * mask))[..., :3]
    cam = heatmap + np.float32(img) / 255
    return np.uint8(255 * (cam / np.max(cam)))


def explain(args: argparse.Namespace) -> list[Path]:
    """Load model and image, run the rollout, write the two images; returns their paths."""
    device = "cuda" if args.use_cuda and torch.cuda.is_available() else "cpu"
    print("Using GPU" if device == "cuda" else "Using CPU")
    adapter, _ = RunSource(model=args.model, checkpoint=args.checkpoint,
                           device=device).load_model()
    if args.legacy:  # vit-explain normalises every model with mean = std = 0.5 (its #15)
        adapter.mean = torch.full_like(adapter.mean, 0.5)
        adapter.std = torch.full_like(adapter.std, 0.5)
    h, w = adapter.input_size
    img = np.array(Image.open(args.image_path).convert("RGB").resize((w, h)))
    images = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    if args.category_index is None:
        print("Doing Attention Rollout")
        result = attribute("attention_rollout", adapter, images, head_fusion=args.head_fusion,
                           discard_ratio=args.discard_ratio, legacy=args.legacy)
        name = f"attention_rollout_{args.discard_ratio:.3f}_{args.head_fusion}.png"
    else:
        print("Doing Gradient Attention Rollout")
        result = attribute("grad_rollout", adapter, images, args.category_index,
                           discard_ratio=args.discard_ratio, legacy=args.legacy)
        name = (f"grad_rollout_{args.category_index}_{args.discard_ratio:.3f}_"
                f"{args.head_fusion}.png")
    # vit-explain divides the patch map by its maximum, then resizes it bilinearly
    peak = float(result.native[0].max())
    mask = result.maps[0].numpy() / (peak if peak > 0 else 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out / "input.png")
    Image.fromarray(show_mask_on_image(img, mask)).save(out / name)
    return [out / "input.png", out / name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run; an error the user can fix (bad path, image, model or value) is one line, exit 2."""
    args = get_args(argv)
    try:
        for path in explain(args):
            print(path)
    except (ValueError, OSError, ModelLoadError) as e:
        print(f"vit_explain: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
