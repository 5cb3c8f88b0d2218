"""The synthetic ground-truth benchmark: determinism, exact masks, splits, and the claim that
no pixel outside the class object predicts the class (tested with a classifier, not assumed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitxai.data import ImageDataset
from vitxai.data.synthetic import (
    CLASS_NAMES,
    CLASS_TEXTURES,
    IMAGE_SIZE,
    NUM_CLASSES,
    SPLITS,
    SyntheticBenchmark,
    generate,
)


def test_unknown_split_lists_the_splits():
    with pytest.raises(ValueError, match="single, pair, parts"):
        SyntheticBenchmark(split="test")
    with pytest.raises(ValueError, match="valid splits"):
        generate("train", [0], 0)
    with pytest.raises(ValueError, match="cannot omit"):
        generate("single", [0], 0, omit=("sky",))


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_and_independent_of_batching(split):
    a = generate(split, range(5), seed=3)
    b = generate(split, [4, 2], seed=3)
    alone = generate(split, [2], seed=3)
    assert torch.equal(a.images, generate(split, range(5), seed=3).images)
    assert torch.equal(a.images[[4, 2]], b.images)
    assert torch.equal(a.images[2], alone.images[0])
    assert torch.equal(a.masks[[4, 2]], b.masks) and torch.equal(a.labels[[4, 2]], b.labels)
    assert not torch.equal(a.images, generate(split, range(5), seed=4).images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_splits_are_independent_streams():
    single, parts = generate("single", range(3), 0), generate("parts", range(3), 0)
    assert not torch.equal(single.images, parts.images)


@pytest.mark.parametrize("split", SPLITS)
def test_masks_are_exactly_the_class_objects(split):
    """Removing an object changes exactly its mask's pixels; without noise the object shows
    exactly its two tones, so the mask holds no background pixel either."""
    n = 12
    full = generate(split, range(n), 7, noise=False)
    gone = generate(split, range(n), 7, noise=False, omit=("target",))
    changed = (full.images != gone.images).any(1)
    assert not (changed & ~full.masks).any(), "pixels outside the mask depend on the object"
    # Object colour can coincide with the background by chance, but only on a few pixels.
    assert changed[full.masks].float().mean() > 0.97
    assert (full.masks.flatten(1).sum(1) > 1600).all()  # smallest object: r=30 square
    for i in range(n):
        pixels = full.images[i].flatten(1).T
        assert len(torch.unique(pixels[full.masks[i].flatten()], dim=0)) == 2
    ys = torch.arange(IMAGE_SIZE) + 0.5
    cx, cy, r = (full.circles[:, k, None, None] for k in range(3))
    in_circle = (ys[None, None, :] - cx) ** 2 + (ys[None, :, None] - cy) ** 2 <= r**2
    assert not (full.masks & ~in_circle).any()
    noisy = generate(split, range(n), 7)
    assert torch.equal(noisy.masks, full.masks) and torch.equal(noisy.labels, full.labels)
    if split == "parts":
        first, second = full.parts[:, 0], full.parts[:, 1]
        assert torch.equal(first | second, full.masks) and not (first & second).any()
        assert (first.flatten(1).sum(1) > 600).all() and (second.flatten(1).sum(1) > 600).all()
        no_first = generate(split, range(n), 7, noise=False, omit=("first",))
        changed = (full.images != no_first.images).any(1)
        assert not (changed & ~first).any() and changed[first].float().mean() > 0.97


def test_pair_split_two_classes_disjoint_masks():
    g = generate("pair", range(40), 5)
    assert (g.labels != g.other_labels).all() and (g.other_labels >= 0).all()
    for a, b in zip(g.labels.tolist(), g.other_labels.tolist(), strict=True):
        assert not set(CLASS_TEXTURES[a]) & set(CLASS_TEXTURES[b])
    assert not (g.masks & g.other_masks).any()
    assert (g.masks.flatten(1).any(1) & g.other_masks.flatten(1).any(1)).all()
    gap = (g.circles[:, :2] - g.other_circles[:, :2]).norm(dim=1)
    assert (gap >= g.circles[:, 2] + g.other_circles[:, 2]).all()
    gone = generate("pair", range(6), 5, noise=False, omit=("other",))
    full = generate("pair", range(6), 5, noise=False)
    assert not ((full.images != gone.images).any(1) & ~full.other_masks[:6]).any()


def test_labels_cover_all_classes_uniformly():
    labels = generate("single", range(200), 1).labels
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    assert len(CLASS_NAMES) == NUM_CLASSES == 10 and (counts >= 8).all()


def test_dataset_samples():
    ds = SyntheticBenchmark("pair", size=3, seed=2)
    assert isinstance(ds, ImageDataset) and len(ds) == 3 and ds.has_masks and ds.has_labels
    s = ds.load(1)
    g = generate("pair", [1], 2)
    assert s.image.dtype == torch.float32 and s.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert 0 <= float(s.image.min()) and float(s.image.max()) <= 1
    assert torch.equal((s.image * 255).round().byte(), g.images[0])
    assert s.label == int(g.labels[0]) and s.other_label == int(g.other_labels[0])
    assert torch.equal(s.mask, g.masks[0]) and torch.equal(s.other_mask, g.other_masks[0])
    assert ds.describe()["split"] == "pair" and ds.describe()["classes"]["1"] == "stripes+checker"
    with pytest.raises(IndexError):
        ds.load(3)
    parts = SyntheticBenchmark("parts", size=1).load(0)
    assert set(parts.parts) == {"first", "second"}
    assert torch.equal(parts.parts["first"] | parts.parts["second"], parts.mask)
    single = SyntheticBenchmark("single", size=1).load(0)
    assert single.other_mask is None and single.other_label == -1 and single.parts is None


# --- the benchmark's claim: evidence outside the object cannot predict the class -----------

def _histogram(values: torch.Tensor, edges: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    index = torch.bucketize(values.flatten(1).contiguous(), edges)
    return torch.zeros(len(values), len(edges) + 1).scatter_add_(1, index, weight)


def _region_features(images: torch.Tensor, circles: torch.Tensor, chunk: int = 100
                     ) -> dict[str, torch.Tensor]:
    """Features of the pixels inside / outside each object's bounding circle (+2 px).

    The hidden circle's radius and centre are drawn independently of the class, so hiding it
    leaks nothing (a hole shaped like the object would). Same features for both regions:
    16-px pooled colours of the region, histograms (colour, gradient energy, orientation
    coherence) over the region, and rotation-invariant angular spectra of gradient energy
    and coherence on rings around the circle's centre (radii 0.05–1 r inside, 1.05–2.5 r
    outside).
    """
    ys = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    unit = torch.linspace(0.125, 0.875, 7)
    energy_edges = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    theta = torch.arange(64) * 2 * math.pi / 64
    out: dict[str, list[torch.Tensor]] = {"inside": [], "outside": []}
    for s in range(0, len(images), chunk):
        img = images[s:s + chunk].float() / 255
        c = circles[s:s + chunk]
        cx, cy, r = (c[:, k, None, None] for k in range(3))
        circle = (ys[None, None, :] - cx) ** 2 + (ys[None, :, None] - cy) ** 2 <= (r + 2) ** 2
        gray = img.mean(1, keepdim=True)
        gx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1))
        gy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1))
        tensor = F.avg_pool2d(torch.cat([gx * gx, gy * gy, gx * gy], 1), 4)  # structure tensor
        energy = tensor[:, 0] + tensor[:, 1]
        coherence = ((tensor[:, 0] - tensor[:, 1]) ** 2 + 4 * tensor[:, 2] ** 2).sqrt() / (
            energy + 1e-4)
        small = F.avg_pool2d(img, 4)
        for name, region in (("inside", circle), ("outside", ~circle)):
            weight = F.avg_pool2d(region[:, None].float(), 4).flatten(1)
            area = weight.sum(1, keepdim=True) + 1e-6
            feats = [F.avg_pool2d(img * region[:, None], 16).flatten(1)]
            feats += [_histogram(small[:, k], unit, weight) / area for k in range(3)]
            feats += [_histogram(energy, energy_edges, weight) / area,
                      _histogram(coherence, unit, weight) / area]
            rho = torch.linspace(0.05, 1.0, 10) if name == "inside" else torch.linspace(
                1.05, 2.5, 10)
            px = c[:, 0, None, None] + c[:, 2, None, None] * rho[:, None] * theta.cos()
            py = c[:, 1, None, None] + c[:, 2, None, None] * rho[:, None] * theta.sin()
            grid = torch.stack([px, py], -1) / IMAGE_SIZE * 2 - 1
            rings = F.grid_sample(torch.stack([energy, coherence], 1), grid, align_corners=False)
            spectrum = torch.fft.rfft(rings, dim=-1).abs()[..., :9] / 64
            feats.append(spectrum.flatten(1).log1p())
            out[name].append(torch.cat(feats, 1))
    return {k: torch.cat(v) for k, v in out.items()}


def _logistic_regression_accuracy(x: torch.Tensor, y: torch.Tensor, n_train: int,
                                  l2: float = 1e-2) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression (L-BFGS)."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], NUM_CLASSES, requires_grad=True)
    b = torch.zeros(NUM_CLASSES, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


def test_outside_the_object_is_at_chance_and_inside_is_not():
    torch.manual_seed(0)
    n, n_train = 800, 600
    g = generate("single", range(n), seed=11)
    feats = _region_features(g.images, g.circles)
    outside = _logistic_regression_accuracy(feats["outside"], g.labels, n_train)
    inside = _logistic_regression_accuracy(feats["inside"], g.labels, n_train)
    # chance is 0.1; with 200 held-out images its standard deviation is 0.021
    assert outside < 0.2, f"pixels outside the object predict the class: accuracy {outside}"
    assert inside > 0.35, f"the test has no power: object-region accuracy {inside}"
