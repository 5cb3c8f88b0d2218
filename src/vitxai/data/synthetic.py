"""A procedurally generated image benchmark whose class evidence is known pixel by pixel.

Every image is 224 × 224 RGB. Its class is carried by one *class object* only; everything else
is drawn from one distribution shared by all classes, so no pixel outside the object can
predict the class.

Classes (10) = 5 body shapes × 2 badge textures. A class object is a solid **body** (disc,
square, triangle, five-pointed star or plus-shaped cross) with a round **badge** at its centre
filled with a two-tone texture (stripes or checkerboard). The object is placed at a random
position, scale (bounding-circle radius 30–56 px, i.e. about 4–7 ViT patches across) and
rotation; body and badge colours, texture period and texture angle are random and
class-independent. Label = 2 · shape + texture (see :data:`CLASS_NAMES`).

Everything else is class-independent: a linear colour gradient of two muted colours, 2–6 line
segments, 1–4 elongated ellipses (aspect ≥ 1.7, never a disc) and 0–3 thin rings, in the same
colour distribution as the objects; a third of the ellipses and rings carry one of the two
badge textures, so "stripes somewhere in the image" is not enough to name the class. Gaussian
pixel noise (σ 0.01–0.05) covers the whole image. The distractor family (segments, elongated
ellipses, rings, no badge) never forms a class object. The class object is drawn last, so its
mask is exactly its visible pixels.

Splits (each its own random stream, so the same seed gives unrelated images in each):

* ``"single"``: one class object; ``mask`` is its pixels.
* ``"pair"``: two objects of two different classes (bounding circles 30–46 px, never
  overlapping); ``label``/``mask`` belong to the first, ``other_label``/``other_mask`` to the
  second: an explanation for one class must land on its own object.
* ``"parts"``: like ``"single"``, plus the object's two part masks, ``"body"`` (the shape
  cue) and ``"badge"`` (the texture cue). Each part holds exactly one of the two cues, so
  FunnyBirds-style part importance can be tested; ``generate(..., omit=("badge",))``
  re-renders an image with a part removed (background shows through).

Generation is deterministic: image ``i`` of ``(split, seed)`` depends only on
``(seed, split, i)``, never on which other images are generated with it. Speed is about
1–2 thousand images per second per core (numpy, each element drawn in its bounding window).
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
GENERATOR_VERSION = 1
IMAGE_SIZE = 224
SPLITS: tuple[str, ...] = ("single", "pair", "parts")
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "star", "cross")
TEXTURES: tuple[str, ...] = ("stripes", "checker")
NUM_CLASSES = len(SHAPES) * len(TEXTURES)
#: label -> "shape-texture"; label = 2 * shape index + texture index.
CLASS_NAMES: dict[int, str] = {
    2 * s + t: f"{shape}-{texture}"
    for s, shape in enumerate(SHAPES) for t, texture in enumerate(TEXTURES)
}
PARTS: tuple[str, ...] = ("body", "badge")
#: What ``generate(omit=...)`` may leave out.
OMITTABLE: tuple[str, ...] = ("target", "other", "body", "badge")

# Object geometry, in units of the bounding-circle radius R (every shape fits in |p| <= 1).
_RADIUS = (30.0, 56.0)
_PAIR_RADIUS = (30.0, 46.0)
_BADGE = 0.34  # badge radius; fits inside every body (cross arm half-width, star core)
_SQUARE = 0.68  # half side
_TRIANGLE = 0.48  # inradius (circumradius 0.96)
_STAR_OUT = 0.98  # tip radius of the pentagram; its edge lines lie at 0.309 · tip radius
_CROSS = (0.34, 0.94)  # arm half-width, arm half-length
_DISC = 0.9
_NOISE_BANK = 448
# Distractors per image: [low, high) counts of segments, ellipses, rings; share textured.
_N_LINES, _N_ELLIPSES, _N_RINGS = (2, 7), (1, 5), (0, 4)
_P_TEXTURED = 1 / 3


class Generated(NamedTuple):
    """A generated batch of N images (H = W = 224).

    images: uint8 (N, 3, H, W). labels: int64 (N,). masks: bool (N, H, W), pixels of the
    target object. other_labels: int64 (N,), -1 outside the pair split. other_masks: bool
    (N, H, W) for "pair", else None. parts: bool (N, 2, H, W), the target's (body, badge) for
    "parts", else None. circles / other_circles: float32 (N, 3) bounding circle (cx, cy, r)
    of each object in pixels (pixel (y, x) has centre (x + 0.5, y + 0.5)); other_circles is
    None outside "pair". The bounding-circle radius distribution does not depend on the class.
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
    kind: int  # 0 stripes, 1 checker; -1 solid
    colours: tuple[np.ndarray, np.ndarray]
    cos: float = 1.0
    sin: float = 0.0
    half_period: float = 4.0


@dataclass(frozen=True)
class _Object:
    label: int
    cx: float
    cy: float
    r: float
    cos: float
    sin: float
    body_colour: np.ndarray
    badge: _Texture


@dataclass(frozen=True)
class _Clutter:
    kind: str  # "line", "ellipse", "ring"
    cx: float
    cy: float
    cos: float
    sin: float
    a: float  # line half-length / ellipse semi-major / ring outer radius
    b: float  # line half-thickness / ellipse semi-minor / ring inner radius
    fill: _Texture


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


def _texture(d: _Draws, kind: int) -> _Texture:
    c = _vivid(d)
    angle = d.uniform(0, math.pi)
    # Dark partner colour keeps the two tones apart whatever the hue.
    return _Texture(kind, (c, c * np.float32(0.2)), math.cos(angle), math.sin(angle),
                    d.uniform(3.0, 4.5))


def _object(d: _Draws, label: int, cx: float, cy: float, r: float) -> _Object:
    angle = d.uniform(0, 2 * math.pi)
    return _Object(label, cx, cy, r, math.cos(angle), math.sin(angle), _vivid(d),
                   _texture(d, label % 2))


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
        if kind != "line" and d.uniform() < _P_TEXTURED:
            fill = _texture(d, d.integer(0, 2))
        else:
            colour = _vivid(d)
            fill = _Texture(-1, (colour, colour))
        items.append(_Clutter(kind, cx, cy, math.cos(angle), math.sin(angle), a, b, fill))
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
        second = (first + d.integer(1, NUM_CLASSES)) % NUM_CLASSES
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


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of the unit-radius body ``SHAPES[shape]`` (only mul/add/compare: exact)."""
    if shape == 0:
        return u * u + v * v <= np.float32(_DISC**2)
    if shape == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= np.float32(_SQUARE)
    if shape == 2:
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * np.float32(math.cos(a)) + v * np.float32(math.sin(a)) <= np.float32(
                _TRIANGLE)
        return inside
    if shape == 3:
        # A filled pentagram is where at most one of its five edge half-planes is violated.
        outside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.uint8)
        d = np.float32(_STAR_OUT * math.cos(2 * math.pi / 5))
        for k in range(5):
            a = math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5
            outside += (u * np.float32(math.cos(a)) + v * np.float32(math.sin(a)) > d)
        return outside <= 1
    w, length = np.float32(_CROSS[0]), np.float32(_CROSS[1])
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= length)) | ((av <= w) & (au <= length))


def _texture_pixels(tex: _Texture, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """(3, h, w) colours of ``tex`` at the given offsets; solid: its first colour (3, 1, 1)."""
    if tex.kind < 0:
        return tex.colours[0][:, None, None]
    a, b = _rotate(dx, dy, tex.cos, tex.sin, tex.half_period)
    tone = np.floor(a).astype(np.int64)
    if tex.kind == 1:
        tone = tone + np.floor(b).astype(np.int64)
    dark = (tone & 1).astype(bool)
    return np.where(dark, tex.colours[1][:, None, None], tex.colours[0][:, None, None])


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
    _paint(img, rows, cols, inside, _texture_pixels(c.fill, dx, dy))


def _draw_object(img: np.ndarray, o: _Object, parts_out: np.ndarray, draw_body: bool,
                 draw_badge: bool) -> None:
    """Paint an object (or some of its parts) and write its (body, badge) masks into the
    zeroed ``parts_out`` (2, H, W), drawn or not."""
    rows, cols, dx, dy = _window(o.cx, o.cy, o.r)
    u, v = _rotate(dx, dy, o.cos, o.sin, o.r)
    badge = u * u + v * v <= np.float32(_BADGE**2)
    body = _shape_mask(o.label // 2, u, v) & ~badge
    if draw_body:
        _paint(img, rows, cols, body, o.body_colour[:, None, None])
    if draw_badge:
        _paint(img, rows, cols, badge, _texture_pixels(o.badge, dx, dy))
    parts_out[0, rows, cols] = body
    parts_out[1, rows, cols] = badge


def _render(scene: _Scene, omit: frozenset[str], noise: bool, image_out: np.ndarray,
            parts_out: np.ndarray) -> None:
    """Render into ``image_out`` (3, H, W) uint8 and each object's (body, badge) masks into
    the zeroed ``parts_out`` (n_objects, 2, H, W)."""
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
        _draw_object(img, o, parts_out[k], drawn and "body" not in omit,
                     drawn and "badge" not in omit)
    if noise:
        y, x = scene.noise_offset
        img += np.float32(scene.noise_sigma) * _noise_bank()[:, y:y + IMAGE_SIZE, x:x + IMAGE_SIZE]
    img *= np.float32(255)
    img += np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    image_out[...] = img  # truncation after +0.5: round half up


def generate(split: str, indices: Iterable[int], seed: int, *, omit: Sequence[str] = (),
             noise: bool = True) -> Generated:
    """Generate images ``indices`` of ``split`` for ``seed`` (see the module docstring).

    Args:
        split: "single", "pair" or "parts".
        indices: non-negative image numbers; image i is the same whatever else is asked for.
        seed: non-negative; each (seed, split) is an independent, endless stream of images.
        omit: re-render without some elements, for deletion tests and checks: "target" or
            "other" (a whole object), "body" or "badge" (that part of every object). Masks,
            labels and circles still describe the full scene.
        noise: add the pixel noise (False gives exact, noise-free colours for tests).

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
    return Generated(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels[:, 0].copy()),
        masks=masks[:, 0].contiguous(),
        other_labels=torch.from_numpy(labels[:, 1].copy()),
        other_masks=masks[:, 1].contiguous() if pair else None,
        parts=torch.from_numpy(obj_parts[:, 0]) if split == "parts" else None,
        circles=torch.from_numpy(circles[:, 0].copy()),
        other_circles=torch.from_numpy(circles[:, 1].copy()) if pair else None,
    )


@dataclass
class SyntheticSample(Sample):
    """A :class:`Sample` with the class object's part masks (``"parts"`` split only).

    parts: name ("body", "badge") -> bool (H, W) mask; their union is ``mask``.
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
