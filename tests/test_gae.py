"""GAE with the fixes of docs/evaluation.md §7 and its legacy mode (§10 items 1–4)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from vitxai.methods import attribute
from vitxai.metrics.gae import gae, masked_counts

SCORES = ("faithfulness", "robustness", "local_consistency", "contrastiveness", "gae")


@pytest.fixture(scope="module")
def model():
    # average pooling and a sharpened head: a random ViT whose predictions differ between
    # images (with the CLS read-out every image gets the same class), so S varies
    adapter = tiny_vit(global_pool="avg", depth=2, dtype=torch.float64)
    with torch.no_grad():
        adapter.model.head.weight.mul_(10)
    return adapter


def coloured(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    return 0.8 * colour + 0.2 * torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)


def ig(adapter):
    return lambda images, targets: attribute("integrated_gradients", adapter, images, targets,
                                             steps=3).maps


def test_positive_inside_its_own_mosaic_batch_16(model):
    x = coloured(16)
    assert len(set(model.predict(x).argmax(1).tolist())) > 2
    out = gae(model, ig(model), x, steps=3, seed=1)
    assert out["mosaic"].tolist() == torch.arange(16).view(4, 4).tolist()
    for members, positive in zip(out["mosaic"], out["positive"], strict=True):
        assert positive in members
    assert torch.equal(out["target"], model.predict(x).argmax(1)[out["positive"]])
    # legacy tiles images m, M+m, 2M+m, 3M+m but samples the positive from 4m…4m+3
    old = gae(model, ig(model), x, steps=3, seed=1, legacy=True)
    assert old["mosaic"].tolist() == torch.arange(16).view(4, 4).T.tolist()
    assert (old["positive"] // 4 == torch.arange(4)).all()
    assert not all(p in m for m, p in zip(old["mosaic"], old["positive"], strict=True))


def test_masked_fractions_fixed_and_legacy(model):
    x = coloured(4, seed=1)
    n = 3 * 32 * 32
    seen = []

    def record(images, targets):
        seen.append(images)
        return images.sum(1) - 1.5

    out = gae(model, record, x, steps=8, batch_size=64)
    exact = torch.arange(8, dtype=torch.float64) / 8  # 3072 is a multiple of 8: exactly t/T
    assert torch.equal(out["masked_fraction_morf"][0], exact)
    assert torch.equal(out["masked_fraction_lerf"][0], exact)
    # the images handed to the relevance function are masked to the mean colour accordingly
    positive, trajectory, mosaic = seen
    masked = (trajectory == model.mean).flatten(1).double().mean(1).view(2, 7)
    assert torch.allclose(masked, exact[1:].expand(2, -1), atol=2 / n)
    assert torch.equal(positive[0], x[out["positive"][0]])

    old = gae(model, record, x, steps=10, legacy=True)
    legacy = torch.tensor([0, .1, .3, .6, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert torch.allclose(old["masked_fraction_morf"][0], legacy, atol=1 / n)
    assert torch.allclose(old["masked_fraction_lerf"][0], torch.arange(10).double() / 10,
                          atol=1 / n)
    assert masked_counts(10, 1000, legacy=True)[0].tolist() == [
        0, 100, 300, 600, 1000, 1000, 1000, 1000, 1000, 1000]
    assert masked_counts(10, 1000)[1].tolist() == list(range(0, 1000, 100))


@pytest.mark.parametrize("kind", ["ig", "random", "constant", "negative"])
def test_score_ranges(model, kind):
    x = coloured(8, seed=2)
    g = torch.Generator().manual_seed(0)
    fns = {
        "ig": ig(model),
        "random": lambda im, t: torch.randn(im.shape[0], 32, 32, generator=g,
                                            dtype=torch.float64),
        "constant": lambda im, t: torch.ones(im.shape[0], 32, 32),
        "negative": lambda im, t: -torch.rand(im.shape[0], 32, 32, generator=g),
    }
    out = gae(model, fns[kind], x, steps=4)
    for key in ("faithfulness", "robustness"):
        assert ((out[key] >= -1) & (out[key] <= 1)).all(), key
    for key in ("local_consistency", "contrastiveness", "gae"):
        assert ((out[key] >= 0) & (out[key] <= 1)).all(), key
    assert torch.equal(out["gae"], out["local_consistency"] * out["contrastiveness"])
    assert all(out[k].shape == (2,) and not torch.isnan(out[k]).any() for k in SCORES)
    if kind == "negative":  # no positive relevance: F and C are defined as 0
        assert (out["faithfulness"] == 0).all() and (out["contrastiveness"] == 0).all()


def _matching(reference: torch.Tensor, maps: torch.Tensor, default: torch.Tensor):
    """A relevance function returning maps[i] for images equal to reference[i]."""
    def fn(images, targets):
        out = default.expand(images.shape[0], -1, -1).clone()
        for j, img in enumerate(images):
            for i, ref in enumerate(reference):
                if torch.equal(img, ref):
                    out[j] = maps[i]
        return out
    return fn


def test_relevance_equal_to_cim_plus_gives_f_one(model):
    x = coloured(8, seed=3)
    first = gae(model, ig(model), x, steps=4, seed=2)
    cim = first["impact_map"]
    assert (cim > 0).any() and (cim < 0).any()
    positives = x[first["positive"]]
    noise = torch.rand(1, 32, 32, dtype=torch.float64)
    plus = gae(model, _matching(positives, cim.clamp(min=0), noise), x, steps=4, seed=2)
    assert torch.equal(plus["positive"], first["positive"])
    assert torch.allclose(plus["faithfulness"], torch.ones(2, dtype=torch.float64))
    minus = gae(model, _matching(positives, (-cim).clamp(min=0), noise), x, steps=4, seed=2)
    assert torch.allclose(minus["faithfulness"], -torch.ones(2, dtype=torch.float64))


def test_relevance_in_the_positive_quadrant_gives_c_one(model):
    x = coloured(8, seed=4)
    first = gae(model, ig(model), x, steps=3, seed=5)
    quadrant = (first["mosaic"] == first["positive"][:, None]).int().argmax(1)
    g = torch.Generator().manual_seed(0)
    for i, q in enumerate(quadrant.tolist()):
        # relevance only inside the positive's quadrant of mosaic i (for every call; only the
        # mosaic's relevance enters C)
        r = torch.zeros(1, 32, 32, dtype=torch.float64)
        row, col = divmod(q, 2)
        r[0, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 0.1 + torch.rand(
            16, 16, generator=g, dtype=torch.float64)
        out = gae(model, lambda images, targets, r=r: r.expand(images.shape[0], -1, -1), x,
                  steps=3, seed=5)
        assert torch.equal(out["positive"], first["positive"])
        assert out["contrastiveness"][i] == 1.0
    zero = gae(model, lambda images, targets: torch.zeros(images.shape[0], 32, 32), x, steps=3)
    assert (zero["contrastiveness"] == 0).all() and (zero["faithfulness"] == 0).all()


def test_one_channel_equals_three_channel_repeat(model):
    x = coloured(8, seed=6)

    def one(images, targets):
        return attribute("input_x_gradient", model, images, targets).maps

    def three(images, targets):
        return one(images, targets)[:, None].expand(-1, 3, -1, -1)

    a = gae(model, one, x, steps=4, seed=3)
    b = gae(model, three, x, steps=4, seed=3)
    for key in SCORES:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-12), key


def test_input_validation(model):
    with pytest.raises(ValueError, match="multiple of 4"):
        gae(model, ig(model), coloured(6), steps=3)
    with pytest.raises(ValueError, match="steps"):
        gae(model, ig(model), coloured(4), steps=1)
