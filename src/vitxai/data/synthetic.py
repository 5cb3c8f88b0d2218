"""A procedurally generated image benchmark whose class evidence is known pixel by pixel.

Every image is 224 × 224 RGB. Its class is carried by one *class object* only; everything else
is drawn from one distribution shared by all classes, so no pixel outside the object can
predict the class.

**Class object.** A silhouette (disc, square or hexagon, chosen independently of the class)
cut into two halves by a straight seam through its centre; each half is filled with one of
four two-tone textures (stripes, checkerboard, dots, grid). The class is the unordered pair
of textures of the two halves: 4 · 5 / 2 = 10 classes ("stripes+stripes",
"stripes+checker", ... see :data:`CLASS_NAMES`). Everything else about the object is random
and class-independent: position, size (bounding-circle radius 30–56 px, about 4–7 ViT patches
across), silhouette and its rotation, seam angle, which half gets which texture, each half's
texture angle and period (7–10 px), and the object colour (light tone c, dark tone 0.2 c).
Each half carries exactly one cue, so the two halves are the object's *parts*; both are needed
to name the class (one half leaves four classes possible).

**Everything else** is class-independent: a linear gradient between two muted colours, 2–6
line segments, 1–4 elongated ellipses (aspect >= 1.7) and 0–3 thin rings, all solid, in the
same colour distribution as the objects, and Gaussian pixel noise (σ 0.01–0.05) over the
whole image. Distractors never carry a texture, so they never form a class object. The class
object is drawn last, so its mask is exactly its visible pixels.

**Splits** (each its own random stream, so one seed gives unrelated images in each):

* ``"single"``: one class object; ``mask`` is its pixels.
* ``"pair"``: two objects whose classes share no texture (e.g. stripes+dots with
  checker+grid; bounding circles 30–46 px, never overlapping); ``label``/``mask`` belong to
  the first, ``other_label``/``other_mask`` to the second. Since no texture of one class is
  in the other object, an explanation for one class must land on its own object.
* ``"parts"``: like ``"single"``, plus the masks of the two halves, ``"first"`` (textured
  with ``TEXTURES[CLASS_TEXTURES[label][0]]``) and ``"second"``; ``generate(...,
  omit=("first",))`` re-renders an image without that half, for part-deletion tests.

Generation is deterministic: image ``i`` of ``(split, seed)`` depends only on
``(seed, split, i)``, never on which other images are generated with it. Speed: 500–800
images per second on one core (numpy; each element is drawn inside its bounding window, so
no pixel is visited more than a few times).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch

from vitxai.data.datasets import ImageDataset, Sample

#: Bump when the image distribution changes: the bundled model is tied to it.
GENERATOR_VERSION = 2
IMAGE_SIZE = 224
SPLITS: tuple[str, ...] = ("single", "pair", "parts")
TEXTURES: tuple[str, ...] = ("stripes", "checker", "dots", "grid")
#: label -> (texture of the first half, texture of the second), first <= second.
CLASS_TEXTURES: tuple[tuple[int, int], ...] = tuple(
    (a, b) for a in range(len(TEXTURES)) for b in range(a, len(TEXTURES)))
NUM_CLASSES = len(CLASS_TEXTURES)
CLASS_NAMES: dict[int, str] = {
    k: f"{TEXTURES[a]}+{TEXTURES[b]}" for k, (a, b) in enumerate(CLASS_TEXTURES)}
#: Class-independent outlines of the class objects.
SILHOUETTES: tuple[str, ...] = ("disc", "square", "hexagon")
PARTS: tuple[str, ...] = ("first", "second")
#: What ``generate(omit=...)`` may leave out.
OMITTABLE: tuple[str, ...] = ("target", "other", *PARTS)
#: label -> the labels sharing no texture with it (partners in the "pair" split).
DISJOINT_CLASSES: dict[int, tuple[int, ...]] = {
    k: tuple(j for j, tj in enumerate(CLASS_TEXTURES) if not set(tk) & set(tj))
    for k, tk in enumerate(CLASS_TEXTURES)}

_RADIUS = (30.0, 56.0)
_PAIR_RADIUS = (30.0, 46.0)
# Silhouettes in units of the bounding-circle radius (each fits in |p| <= 1).
_DISC = 0.95
_SQUARE = 0.68  # half side
_HEXAGON = 0.82  # apothem (circumradius 0.947)
_HALF_PERIOD = (3.5, 5.0)  # texture period 7–10 px
_NOISE_BANK = 448
# Distractors per image, [low, high): segments, ellipses, rings.
_N_LINES, _N_ELLIPSES, _N_RINGS = (2, 7), (1, 5), (0, 4)


class Generated(NamedTuple):
    """A generated batch of N images (H = W = 224).

    images: uint8 (N, 3, H, W). labels: int64 (N,). masks: bool (N, H, W), pixels of the
    target object. other_labels: int64 (N,), -1 outside the pair split. other_masks: bool
    (N, H, W) for "pair", else None. parts: bool (N, 2, H, W), the target's halves (first,
    second), or None (see ``generate(parts=...)``). circles / other_circles: float32 (N, 3),
    bounding circle (cx, cy, r) of each object in pixels (pixel (y, x) has centre
    (x + 0.5, y + 0.5)); other_circles is None outside "pair". The circles' distribution does
    not depend on the class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    other_labels: torch.Tensor
    other_masks: torch.Tensor | None
    parts: torch.Tensor | None
    circles: torch.Tensor
    other_circles: torch.Tensor | None


@dataclass(frozen=True)
class _Texture:
    kind: int  # index into TEXTURES
    light: np.ndarray  # (3,) colours
    dark: np.ndarray
    cos: float
    sin: float
    half_period: float


@dataclass(frozen=True)
class _Object:
    label: int
    cx: float
    cy: float
    r: float
    silhouette: int
    cos: float  # silhouette rotation
    sin: float
    seam_cos: float  # normal of the seam; the first half is on its positive side
    seam_sin: float
    halves: tuple[_Texture, _Texture]


@dataclass(frozen=True)
class _Clutter:
    kind: str  # "line", "ellipse", "ring"
    cx: float
    cy: float
    cos: float
    sin: float
    a: float  # line half-length / ellipse semi-major / ring outer radius
    b: float  # line half-thickness / ellipse semi-minor / ring inner radius
    colour: np.ndarray


@dataclass(frozen=True)
class _Scene:
    background: tuple[np.ndarray, np.ndarray, float, float]  # colour 0, colour 1, cos, sin
    clutter: list[_Clutter]
    objects: list[_Object]
    noise_sigma: float
    noise_offset: tuple[int, int]


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; valid splits: {', '.join(SPLITS)}")
    return SPLITS.index(split)


class _Draws:
    """The random numbers of one image: uniforms from a generator seeded by (seed, split,
    index), fetched in blocks (one numpy call per image instead of a hundred)."""

    _BLOCK = 160

    def __init__(self, seed: int, split: str, index: int) -> None:
        if seed < 0 or index < 0:
            raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
        self._rng = np.random.default_rng([int(seed), 1000 + _check_split(split), int(index)])
        self._u: list[float] = []
        self._i = 0

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if self._i == len(self._u):
            self._u, self._i = self._rng.random(self._BLOCK).tolist(), 0
        self._i += 1
        return low + (high - low) * self._u[self._i - 1]

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return min(low + int(self.uniform() * (high - low)), high - 1)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _vivid(d: _Draws) -> np.ndarray:
    """Object and distractor colours: saturated and bright, hue uniform."""
    return _hsv(d.uniform(), d.uniform(0.55, 1.0), d.uniform(0.55, 1.0))


def _object(d: _Draws, label: int, cx: float, cy: float, r: float) -> _Object:
    light = _vivid(d)
    dark = light * np.float32(0.2)  # keeps the two tones apart whatever the hue
    halves = []
    for kind in CLASS_TEXTURES[label]:
        angle = d.uniform(0, math.pi)
        halves.append(_Texture(kind, light, dark, math.cos(angle), math.sin(angle),
                               d.uniform(*_HALF_PERIOD)))
    rotation, seam = d.uniform(0, 2 * math.pi), d.uniform(0, 2 * math.pi)
    return _Object(label, cx, cy, r, d.integer(0, len(SILHOUETTES)), math.cos(rotation),
                   math.sin(rotation), math.cos(seam), math.sin(seam), (halves[0], halves[1]))


def _clutter(d: _Draws) -> list[_Clutter]:
    kinds = (["line"] * d.integer(*_N_LINES) + ["ellipse"] * d.integer(*_N_ELLIPSES)
             + ["ring"] * d.integer(*_N_RINGS))
    items: list[_Clutter] = []
    for kind in sorted(kinds, key=lambda _: d.uniform()):  # random drawing order
        cx, cy, angle = d.uniform(0, IMAGE_SIZE), d.uniform(0, IMAGE_SIZE), d.uniform(0, math.pi)
        if kind == "line":
            a, b = d.uniform(12, 40), d.uniform(1.0, 2.5)
        elif kind == "ellipse":
            a = d.uniform(8, 22)
            b = a / d.uniform(1.7, 3.0)
        else:
            a = d.uniform(8, 18)
            b = a - d.uniform(2, 4)
        items.append(_Clutter(kind, cx, cy, math.cos(angle), math.sin(angle), a, b, _vivid(d)))
    return items


def _scene(seed: int, split: str, index: int) -> _Scene:
    d = _Draws(seed, split, index)
    c0 = _hsv(d.uniform(), d.uniform(0, 0.35), d.uniform(0.2, 0.8))
    c1 = _hsv(d.uniform(), d.uniform(0, 0.35), d.uniform(0.2, 0.8))
    angle = d.uniform(0, 2 * math.pi)
    background = (c0, c1, math.cos(angle), math.sin(angle))
    clutter = _clutter(d)
    if split == "pair":
        first = d.integer(0, NUM_CLASSES)
        partners = DISJOINT_CLASSES[first]
        second = partners[d.integer(0, len(partners))]
        while True:  # rejection sampling: both circles inside, apart by >= 4 px
            r1, r2 = d.uniform(*_PAIR_RADIUS), d.uniform(*_PAIR_RADIUS)
            x1, y1 = d.uniform(r1, IMAGE_SIZE - r1), d.uniform(r1, IMAGE_SIZE - r1)
            x2, y2 = d.uniform(r2, IMAGE_SIZE - r2), d.uniform(r2, IMAGE_SIZE - r2)
            if math.hypot(x1 - x2, y1 - y2) >= r1 + r2 + 4:
                break
        objects = [_object(d, first, x1, y1, r1), _object(d, second, x2, y2, r2)]
    else:
        label = d.integer(0, NUM_CLASSES)
        r = d.uniform(*_RADIUS)
        cx, cy = d.uniform(r, IMAGE_SIZE - r), d.uniform(r, IMAGE_SIZE - r)
        objects = [_object(d, label, cx, cy, r)]
    sigma = d.uniform(0.01, 0.05)
    offset = (d.integer(0, _NOISE_BANK - IMAGE_SIZE), d.integer(0, _NOISE_BANK - IMAGE_SIZE))
    return _Scene(background, clutter, objects, sigma, offset)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Fixed standard-normal field (3, 448, 448); each image reads a seeded crop of it."""
    return np.random.default_rng(20240601).standard_normal(
        (3, _NOISE_BANK, _NOISE_BANK), dtype=np.float32)


def _window(cx: float, cy: float, half: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Pixel window around (cx, cy) clipped to the image, with pixel-centre offsets.

    Returns (rows, cols, dx (1, w), dy (h, 1)); dx, dy are float32 offsets from the centre.
    """
    x0, x1 = max(0, math.floor(cx - half)), min(IMAGE_SIZE, math.ceil(cx + half) + 1)
    y0, y1 = max(0, math.floor(cy - half)), min(IMAGE_SIZE, math.ceil(cy + half) + 1)
    dx = (np.arange(x0, max(x0, x1), dtype=np.float32) + np.float32(0.5 - cx))[None, :]
    dy = (np.arange(y0, max(y0, y1), dtype=np.float32) + np.float32(0.5 - cy))[:, None]
    return slice(y0, y1), slice(x0, x1), dx, dy


def _rotate(dx: np.ndarray, dy: np.ndarray, cos: float, sin: float, scale: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the element's own frame: u along its angle, v across (both / scale)."""
    c, s = np.float32(cos / scale), np.float32(sin / scale)
    return dx * c + dy * s, dy * c - dx * s


def _silhouette(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of ``SILHOUETTES[kind]`` at unit radius (mul/add/compare only: exact)."""
    if kind == 0:
        return u * u + v * v <= np.float32(_DISC**2)
    if kind == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= np.float32(_SQUARE)
    inside = np.abs(v) <= np.float32(_HEXAGON)
    for k in (1, 2):
        a = math.pi / 2 + k * math.pi / 3
        inside &= np.abs(u * np.float32(math.cos(a)) + v * np.float32(math.sin(a))) <= np.float32(
            _HEXAGON)
    return inside


def _dark(tex: _Texture, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where ``tex`` shows its dark tone, at pixel offsets dx (1, w), dy (h, 1)."""
    a, b = _rotate(dx, dy, tex.cos, tex.sin, tex.half_period)
    if tex.kind == 0:  # stripes, half-period wide
        return (np.floor(a).astype(np.int64) & 1).astype(bool)
    if tex.kind == 1:  # checkerboard
        return ((np.floor(a).astype(np.int64) + np.floor(b).astype(np.int64)) & 1).astype(bool)
    a, b = a * np.float32(0.5), b * np.float32(0.5)  # cells of one period
    fa, fb = a - np.floor(a), b - np.floor(b)
    if tex.kind == 2:  # dots of diameter 0.6 period
        fa, fb = fa - np.float32(0.5), fb - np.float32(0.5)
        return fa * fa + fb * fb < np.float32(0.09)
    return (fa < np.float32(0.25)) | (fb < np.float32(0.25))  # grid lines 0.25 period wide


def _paint(img: np.ndarray, rows: slice, cols: slice, inside: np.ndarray,
           colour: np.ndarray) -> None:
    """img[:, rows, cols] := colour where inside; img is (3, H, W), colour (3, 1, 1) or
    (3, h, w) (channels first: numpy's inner loops then run along image rows)."""
    view = img[:, rows, cols]
    view[...] = np.where(inside, colour, view)


def _draw_clutter(img: np.ndarray, c: _Clutter) -> None:
    half = c.a + c.b if c.kind == "line" else c.a
    rows, cols, dx, dy = _window(c.cx, c.cy, half)
    u, v = _rotate(dx, dy, c.cos, c.sin)
    if c.kind == "line":
        inside = (np.abs(u) <= np.float32(c.a)) & (np.abs(v) <= np.float32(c.b))
    elif c.kind == "ellipse":
        inside = (u * np.float32(1 / c.a)) ** 2 + (v * np.float32(1 / c.b)) ** 2 <= 1
    else:
        rr = u * u + v * v
        inside = (rr <= np.float32(c.a**2)) & (rr >= np.float32(c.b**2))
    _paint(img, rows, cols, inside, c.colour[:, None, None])


def _draw_object(img: np.ndarray, o: _Object, parts_out: np.ndarray, draw: tuple[bool, bool]
                 ) -> None:
    """Paint an object's halves (those with ``draw`` True) and write both halves' masks into
    the zeroed ``parts_out`` (2, H, W)."""
    rows, cols, dx, dy = _window(o.cx, o.cy, o.r)
    u, v = _rotate(dx, dy, o.cos, o.sin, o.r)
    inside = _silhouette(o.silhouette, u, v)
    side = dx * np.float32(o.seam_cos) + dy * np.float32(o.seam_sin) >= 0
    for k, (half, tex) in enumerate(zip((inside & side, inside & ~side), o.halves,
                                        strict=True)):
        if draw[k]:
            tone = np.where(_dark(tex, dx, dy), tex.dark[:, None, None], tex.light[:, None, None])
            _paint(img, rows, cols, half, tone)
        parts_out[k, rows, cols] = half


def _render(scene: _Scene, omit: frozenset[str], noise: bool, image_out: np.ndarray,
            parts_out: np.ndarray) -> None:
    """Render into ``image_out`` (3, H, W) uint8 and each object's half masks into the
    zeroed ``parts_out`` (n_objects, 2, H, W)."""
    c0, c1, cos, sin = scene.background
    half = IMAGE_SIZE / 2
    span = np.float32(1 / (IMAGE_SIZE * math.sqrt(2)))
    xs = (np.arange(IMAGE_SIZE, dtype=np.float32) + np.float32(0.5 - half))[None, :]
    ys = (np.arange(IMAGE_SIZE, dtype=np.float32) + np.float32(0.5 - half))[:, None]
    t = (xs * np.float32(cos) + ys * np.float32(sin)) * span + np.float32(0.5)
    img = c0[:, None, None] + t * (c1 - c0)[:, None, None]
    for c in scene.clutter:
        _draw_clutter(img, c)
    for k, o in enumerate(scene.objects):
        drawn = ("target" if k == 0 else "other") not in omit
        _draw_object(img, o, parts_out[k], tuple(drawn and p not in omit for p in PARTS))
    if noise:
        y, x = scene.noise_offset
        img += np.float32(scene.noise_sigma) * _noise_bank()[:, y:y + IMAGE_SIZE, x:x + IMAGE_SIZE]
    img *= np.float32(255)
    img += np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    image_out[...] = img  # truncation after +0.5: round half up


def generate(split: str, indices: Iterable[int], seed: int, *, omit: Sequence[str] = (),
             noise: bool = True, parts: bool | None = None) -> Generated:
    """Generate images ``indices`` of ``split`` for ``seed`` (see the module docstring).

    Args:
        split: "single", "pair" or "parts".
        indices: non-negative image numbers; image i is the same whatever else is asked for.
        seed: non-negative; each (seed, split) is an independent, endless stream of images.
        omit: re-render without some elements, for deletion tests and checks: "target" or
            "other" (a whole object), "first" or "second" (that half of every object; the
            background shows through). Masks, labels and circles still describe the full
            scene.
        noise: add the pixel noise (False gives exact, noise-free colours for tests).
        parts: return the target's half masks (default: for the "parts" split only).

    Raises:
        ValueError: unknown split (the message lists the splits), unknown ``omit`` name, or
            a negative seed or index.
    """
    _check_split(split)
    unknown = set(omit) - set(OMITTABLE)
    if unknown:
        raise ValueError(f"cannot omit {sorted(unknown)}; valid: {', '.join(OMITTABLE)}")
    skip = frozenset(omit)
    idx = [int(i) for i in indices]
    n, size = len(idx), IMAGE_SIZE
    n_obj = 2 if split == "pair" else 1
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    obj_parts = np.zeros((n, n_obj, len(PARTS), size, size), dtype=bool)
    labels = np.full((n, 2), -1, dtype=np.int64)
    circles = np.zeros((n, 2, 3), dtype=np.float32)
    for j, i in enumerate(idx):
        scene = _scene(seed, split, i)
        _render(scene, skip, noise, images[j], obj_parts[j])
        for k, o in enumerate(scene.objects):
            labels[j, k], circles[j, k] = o.label, (o.cx, o.cy, o.r)
    masks = torch.from_numpy(obj_parts[:, :, 0] | obj_parts[:, :, 1])
    pair = n_obj == 2
    want_parts = split == "parts" if parts is None else parts
    return Generated(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels[:, 0].copy()),
        masks=masks[:, 0].contiguous(),
        other_labels=torch.from_numpy(labels[:, 1].copy()),
        other_masks=masks[:, 1].contiguous() if pair else None,
        parts=torch.from_numpy(obj_parts[:, 0]) if want_parts else None,
        circles=torch.from_numpy(circles[:, 0].copy()),
        other_circles=torch.from_numpy(circles[:, 1].copy()) if pair else None,
    )


@dataclass
class SyntheticSample(Sample):
    """A :class:`Sample` with the class object's part masks (``"parts"`` split only).

    parts: name ("first", "second") -> bool (H, W) mask of that half; their union is
    ``mask``; "first" carries texture ``TEXTURES[CLASS_TEXTURES[label][0]]``.
    """

    parts: dict[str, torch.Tensor] | None = None


class SyntheticBenchmark(ImageDataset):
    """``size`` generated images of one split; image i is ``generate(split, [i], seed)``.

    Labels are benchmark classes 0–9 (:data:`CLASS_NAMES`), not ImageNet indices, so only a
    model trained on the benchmark (``vitxai.models.bundled``) should be explained on it.

    Raises:
        ValueError: unknown split (the message lists :data:`SPLITS`), negative size or seed.
    """

    has_labels = True
    has_masks = True

    def __init__(self, split: str = "single", size: int = 500, seed: int = 0) -> None:
        _check_split(split)
        if size < 0 or seed < 0:
            raise ValueError(f"size and seed must be >= 0, got size={size}, seed={seed}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.name = f"synthetic-{split}"
        self.class_names = dict(CLASS_NAMES)

    def __len__(self) -> int:
        return self.size

    def load(self, i: int) -> SyntheticSample:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} images")
        g = generate(self.split, [i], self.seed)
        other = g.other_masks[0] if g.other_masks is not None else None
        parts = (dict(zip(PARTS, g.parts[0], strict=True)) if g.parts is not None else None)
        return SyntheticSample(
            index=i, image=g.images[0].float() / 255, label=int(g.labels[0]),
            path=f"synthetic://{self.split}/seed{self.seed}/{i}", mask=g.masks[0],
            other_label=int(g.other_labels[0]), other_mask=other, parts=parts,
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split": self.split, "seed": self.seed,
                "generator_version": GENERATOR_VERSION, "image_size": IMAGE_SIZE}
