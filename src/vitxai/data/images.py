"""Reading image files as 8-bit RGB, whatever their mode.

The original code fed CMYK, RGBA and grey files to the model (docs/differences.md, defect 14); here
every file goes through :func:`load_rgb`, which either returns an RGB image or raises
:class:`UnreadableImageError` with a one-line reason.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

#: Lower-case file suffixes treated as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm"}
)

# Modes carrying an alpha channel (or a transparent palette entry, handled separately).
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_EXIF_ORIENTATION = 0x0112  # 1 = upright; 2–8 = mirrored and/or rotated


class UnreadableImageError(ValueError):
    """A file could not be decoded as an image (corrupt, truncated, not an image, ...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        # Decoder messages sometimes span lines; keep the message to one line for logs.
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"cannot read image {self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Default exception pickling would call __init__ with the message only.
        return type(self), (self.path, self.reason)


def _to_uint8(values: np.ndarray, scale_max: float) -> np.ndarray:
    """Map ``[0, scale_max]`` to ``[0, 255]`` with rounding; values outside are clipped."""
    scaled = np.rint(values.astype(np.float64) * (255.0 / scale_max))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """8-bit grey image from a 16-bit ('I;16*'), 32-bit integer ('I') or float ('F') image.

    PIL's own ``convert('L')`` clips these to 255, so a 16-bit photo would turn white.
    - 'I;16*': divided by 257 (65535 -> 255).
    - 'I': treated as 16-bit when it lies in [0, 65535] (16-bit PNG/TIFF data is commonly
      stored this way), else min-max rescaled over the image.
    - 'F': [0, 1] is scaled by 255, [0, 255] kept, anything else min-max rescaled; NaN -> 0.
    """
    a = np.asarray(img)
    if img.mode in _UINT16_MODES:
        return Image.fromarray(_to_uint8(a, 65535.0), mode="L")
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        return Image.fromarray(_to_uint8(a, 65535.0), mode="L")
    if img.mode == "F" and lo >= 0 and hi <= 1:
        return Image.fromarray(_to_uint8(a, 1.0), mode="L")
    if img.mode == "F" and lo >= 0 and hi <= 255:
        return Image.fromarray(_to_uint8(a, 255.0), mode="L")
    span = hi - lo
    return Image.fromarray(_to_uint8(a - lo, span if span > 0 else 1.0), mode="L")


def _rgba_palette(img: Image.Image) -> bool:
    """Whether a palette image stores alpha in its palette."""
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _over_white(img: Image.Image) -> Image.Image:
    """Alpha-composite an image with transparency over a white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Transparent pixels (alpha modes, palette or grey images with a transparent entry) are
    composited over white; high bit-depth images are rescaled, not clipped (see
    :func:`_high_depth_to_l`). Raises ValueError for modes PIL cannot convert.
    """
    if img.mode in _UINT16_MODES or img.mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info or _rgba_palette(img):
        return _over_white(img)
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image (first frame of multi-frame files), upright.

    An EXIF Orientation tag (cameras store the sensor's pixels and note the rotation) is
    applied, so the image is seen as photo viewers show it.
    Raises :class:`UnreadableImageError` (a ValueError) for missing, corrupt, truncated or
    non-image files and for modes that cannot be converted.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated data only fails here
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                ImageOps.exif_transpose(img, in_place=True)
            rgb = to_rgb(img)
            # Detach from the file handle, which the with-block closes.
            return rgb.copy() if rgb is img else rgb
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
