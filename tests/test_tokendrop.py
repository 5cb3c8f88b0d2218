"""Token removal (drop, attention_mask), paired KernelSHAP and ``n_samples="auto"``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import MEAN, STD, block_images, images_for, linear_adapter, tiny_vit
from safetensors.torch import load_file
from torch import nn

import vitxai.methods.perturbation as P
from vitxai.methods.base import BatchContext, attribute, get_method, params_record
from vitxai.methods.perturbation.removal import removal_logits, token_embeddings
from vitxai.models.adapter import ModelAdapter, ViTAdapter, cpu_has_native_bf16

GOLDEN = Path(__file__).parent / "golden" / "token_blend.safetensors"
#: token-space settings recorded in GOLDEN by the code before ``removal`` existed (a9cd1b4)
BLEND = {"lime": {"n_samples": 40}, "kernel_shap": {"n_samples": 40},
         "rise": {"n_samples": 24, "grid": 2}, "occlusion": {"window": 8, "stride": 8}}


@pytest.fixture(scope="module")
def vit() -> ViTAdapter:
    """float32 tiny ViT with a class token and 2 registers (3 prefix tokens)."""
    return tiny_vit(reg_tokens=2)


@pytest.fixture(scope="module")
def vit64() -> ViTAdapter:
    return tiny_vit(reg_tokens=2, dtype=torch.float64)


def random_keep(m: int, n: int, k: int | None, seed: int = 0) -> torch.Tensor:
    """(m, n) bool masks keeping k random patches each (k None: Bernoulli(½))."""
    g = torch.Generator().manual_seed(seed)
    if k is None:
        return torch.rand(m, n, generator=g) < 0.5
    keep = torch.zeros(m, n, dtype=torch.bool)
    for i in range(m):
        keep[i, torch.randperm(n, generator=g)[:k]] = True
    return keep


# ------------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("kept", [7, None])  # equal counts (dense) or not (padded)
@pytest.mark.parametrize("kw", [{"reg_tokens": 2}, {"reg_tokens": 1, "global_pool": "avg"},
                                {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 1, "global_pool": "max"}])
def test_drop_equals_attention_mask(kw, kept) -> None:
    vit = tiny_vit(**kw)
    x = images_for(vit, 6)
    keep = random_keep(6, 16, kept)
    with torch.inference_mode():
        drop = removal_logits(vit, token_embeddings(vit, x), keep, "drop")
        masked = removal_logits(vit, token_embeddings(vit, x), keep, "attention_mask")
    torch.testing.assert_close(drop, masked, atol=1e-5, rtol=0)
    assert not torch.allclose(drop, vit.predict(x), atol=1e-3)  # removal changed something


def test_drop_equals_attention_mask_with_a_probe() -> None:
    """A mean-patch probe reads the kept patches only, under both removals."""
    from conftest import TINY_CFG

    from vitxai.models import adapt
    from vitxai.models.probe import LinearProbe, attach_probe

    model = tiny_vit(reg_tokens=1).model
    torch.manual_seed(4)
    attach_probe(model, LinearProbe("cls+mean_patch", 32, 5, num_prefix_tokens=2))
    vit = adapt(model, name="probed", config=TINY_CFG)
    x, keep = images_for(vit, 4), random_keep(4, 16, None)
    with torch.inference_mode():
        tokens = token_embeddings(vit, x)
        drop = removal_logits(vit, tokens, keep, "drop")  # ragged counts: padded and masked
        masked = removal_logits(vit, tokens, keep, "attention_mask")
    torch.testing.assert_close(drop, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("removal", ["drop", "attention_mask"])
def test_keeping_everything_is_the_plain_forward(vit, removal) -> None:
    x = images_for(vit, 3)
    with torch.inference_mode():
        everything = torch.ones(3, 16, dtype=torch.bool)
        out = removal_logits(vit, token_embeddings(vit, x), everything, removal)
    torch.testing.assert_close(out, vit.predict(x), atol=1e-6, rtol=0)


def test_prefix_tokens_always_kept(vit) -> None:
    x = images_for(vit, 2)
    seen = []
    handle = vit.model.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with torch.inference_mode():
            full = vit.model._pos_embed(vit.model.patch_embed(vit.normalize(x)))
            keep = torch.zeros(2, 16, dtype=torch.bool)
            keep[:, [2, 9]] = True
            removal_logits(vit, token_embeddings(vit, x), keep, "drop")
            nothing = torch.zeros(2, 16, dtype=torch.bool)
            out = removal_logits(vit, token_embeddings(vit, x), nothing, "drop")
    finally:
        handle.remove()
    p = vit.num_prefix_tokens
    assert p == 3 and seen[0].shape[1] == p + 2 and seen[1].shape[1] == p
    torch.testing.assert_close(seen[0][:, :p], full[:, :p])  # class token and registers
    torch.testing.assert_close(seen[0][:, p:], full[:, [p + 2, p + 9]])  # in order
    assert torch.isfinite(out).all()  # no patch left: the prefix tokens still classify


def test_blend_default_unchanged(vit64) -> None:
    """Token-space outputs with the default removal equal those recorded before it existed
    (to float64 rounding: another CPU's kernels differ in the last bits; any change of draws
    or semantics moves the maps by their own size)."""
    golden = load_file(str(GOLDEN))
    x = images_for(vit64, 2)
    for (name, kw), tb in itertools.product(BLEND.items(), ("mean", "zero")):
        ctx = BatchContext.for_batch(2, seed=3, image_ids=["a", "b"])
        r = attribute(name, vit64, x, [1, 4], context=ctx, space="token", token_baseline=tb,
                      **kw)
        expected = golden[f"{name}.{tb}"]
        torch.testing.assert_close(r.native, expected, rtol=0,
                                   atol=1e-6 * float(expected.abs().max()), msg=f"{name}.{tb}")


@pytest.mark.parametrize(("method", "kw"), [
    ("lime", {"n_samples": 40}), ("kernel_shap", {"n_samples": 40, "paired": True}),
    ("rise", {"n_samples": 30, "grid": 2, "masks": "binary", "p_keep": 0.5}),
    ("occlusion", {"window": 8, "stride": 8}),
])
def test_methods_drop_equal_attention_mask(vit, method, kw) -> None:
    x, t, kw = images_for(vit, 2), [3, 7], dict(kw, score="logit")
    drop = attribute(method, vit, x, t, space="token", removal="drop", **kw)
    masked = attribute(method, vit, x, t, space="token", removal="attention_mask", **kw)
    blend = attribute(method, vit, x, t, space="token", **kw)
    torch.testing.assert_close(drop.native, masked.native, atol=1e-5, rtol=0)
    assert (drop.native - blend.native).abs().max() > 0.1 * blend.native.abs().max()
    assert drop.cost.forward == blend.cost.forward


def test_drop_sorts_rows_by_kept_count(vit, monkeypatch) -> None:
    """Forwards see rows in order of their kept count, so a chunk pads little."""
    import vitxai.methods.perturbation.engine as engine

    calls = []

    def spy(adapter, tokens, keep, removal, image):
        calls.append(keep.sum(1))
        return removal_logits(adapter, tokens, keep, removal, image)

    monkeypatch.setattr(engine, "removal_logits", spy)
    attribute("lime", vit, images_for(vit, 2), [0, 1], space="token", removal="drop",
              n_samples=50, batch_size=8)
    counts = torch.cat(calls)
    assert len(counts) == 100 and bool((counts[1:] >= counts[:-1]).all())


def test_token_chunks_fill_a_token_budget() -> None:
    from vitxai.methods.perturbation.engine import token_chunk_end

    kept = torch.tensor([8, 9, 9, 10, 11, 12, 14, 20, 21])
    assert token_chunk_end(kept, 0, 40, 1) == 3  # 4 rows × (1 + 10) = 44 > 40: 3 rows
    assert token_chunk_end(kept, 0, 100, 1) == 4  # then 1 + 11 > 1.25 × (1 + 8)
    assert token_chunk_end(kept, 5, 100, 1) == 7  # 15 ≤ 1.25 × 13; 21 is not
    assert token_chunk_end(kept, 7, 10, 1) == 8  # one row over the budget still runs
    assert token_chunk_end(kept, 1, 100, 1, same_count=True) == 3


def test_drop_packs_short_sequences(vit, monkeypatch) -> None:
    """KernelSHAP's coalitions keep few or many patches; the few go many to a forward, and
    no forward holds more than batch_size full sequences' worth of tokens (padding included)
    unless it is one row."""
    import vitxai.methods.perturbation.engine as engine

    sizes = []

    def spy(adapter, tokens, keep, removal, image):
        sizes.append((len(keep), len(keep) * (3 + int(keep.sum(1).max()))))
        return removal_logits(adapter, tokens, keep, removal, image)

    monkeypatch.setattr(engine, "removal_logits", spy)
    x = images_for(vit, 2)
    r = attribute("kernel_shap", vit, x, [0, 1], space="token", removal="drop", n_samples=200,
                  batch_size=4)
    assert sum(n for n, _ in sizes) == 400
    assert max(n for n, _ in sizes) > 4
    assert all(n == 1 or tokens <= 4 * (3 + 16) for n, tokens in sizes)
    monkeypatch.undo()
    alone = attribute("kernel_shap", vit, x, [0, 1], space="token", removal="drop",
                      n_samples=200, batch_size=1)
    torch.testing.assert_close(r.native, alone.native, atol=1e-6, rtol=1e-4)


def test_drop_embeds_each_image_once(vit) -> None:
    """The patch embedding runs on the B images, not on each of their B·n coalitions."""
    seen = []
    handle = vit.model.patch_embed.register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    try:
        attribute("kernel_shap", vit, images_for(vit, 3), [0, 1, 2], space="token",
                  removal="drop", n_samples=40, batch_size=8)
    finally:
        handle.remove()
    assert [len(x) for x in seen] == [3]


# ------------------------------------------------------------------------------- grid


def test_patch_segments_grid() -> None:
    from vitxai.methods.perturbation import patch_segments

    vit = tiny_vit()  # 4 × 4 patches
    x = images_for(vit, 2)
    assert torch.equal(patch_segments(vit, x)[1], torch.arange(16).view(4, 4))
    cells = patch_segments(vit, x, grid=2)
    assert cells.shape == (2, 4, 4)
    assert torch.equal(cells[0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1],
                                               [2, 2, 3, 3], [2, 2, 3, 3]]))
    uneven = patch_segments(vit, x, grid=3)[0]  # 4 patches in 3 cells: 2, 1, 1 a side
    assert torch.equal(uneven[0], torch.tensor([0, 0, 1, 2]))
    assert torch.equal(uneven[:, 0], torch.tensor([0, 0, 3, 6]))
    with pytest.raises(ValueError, match="grid=5 is finer than the 4×4 patch grid"):
        patch_segments(vit, x, grid=5)


@pytest.mark.parametrize("removal", ["blend", "drop"])
def test_grid_kernel_shap_is_the_exact_shapley_value_of_the_cells(vit64, removal) -> None:
    """grid=2 makes a 4-player game, enumerated: its values are the Shapley values of the
    cells, computed here by brute force from the model on every coalition of cells."""
    x, target = images_for(vit64, 1), 5
    r = attribute("kernel_shap", vit64, x, target, space="token", removal=removal, grid=2,
                  n_samples=100, score="logit")
    cells = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]).flatten()
    coalitions = torch.tensor(list(itertools.product([False, True], repeat=4)))
    keep = coalitions[:, cells]  # (16, 16 patches)
    with torch.inference_mode():
        if removal == "drop":
            tokens = token_embeddings(vit64, x).expand(16, -1, -1)
            value = removal_logits(vit64, tokens, keep, "drop")[:, target]
        else:
            from vitxai.methods.perturbation import token_masking
            with token_masking(vit64, (32, 32), "mean") as masking:
                masking.keep = keep
                value = vit64.logits(x.expand(16, -1, -1, -1))[:, target]
    v = dict(zip(map(tuple, coalitions.tolist()), value.double().tolist(), strict=True))
    shapley = torch.zeros(4, dtype=torch.float64)
    for z, fz in v.items():
        for j in range(4):
            if z[j]:
                k = sum(z) - 1
                weight = math.factorial(k) * math.factorial(3 - k) / math.factorial(4)
                shapley[j] += weight * (fz - v[tuple(b and i != j for i, b in enumerate(z))])
    expected = shapley[cells].view(1, 4, 4)  # each patch holds its cell's value
    torch.testing.assert_close(r.native, expected, atol=1e-9, rtol=1e-7)
    assert r.cost.forward == 16


# ------------------------------------------------------------------------------- paired


def quadratic_game(s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v(z) = a·z + Σ_{i<j} b_ij z_i z_j and its exact Shapley values a_i + ½ Σ_j b_ij."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s, generator=g, dtype=torch.float64)
    b = torch.randn(s, s, generator=g, dtype=torch.float64).triu(1)
    return a, b, a + 0.5 * (b.sum(0) + b.sum(1))


@pytest.mark.parametrize("sampling", ["kernel", "leverage"])
def test_paired_sampling_is_exact_with_fewer_evaluations(sampling) -> None:
    """Additive plus pairwise interactions: paired sampling is exact once its design has full
    rank (Mayer & Wüthrich 2025); unpaired sampling is still off at 10× the evaluations."""
    s = 12
    a, b, phi = quadratic_game(s)
    counts = torch.tensor([s])

    def error(n: int, paired: bool) -> float:
        z, w, valid = P.kernel_shap_coalitions(BatchContext.for_batch(1), counts, n, paired,
                                               sampling)
        zz = z.double()
        y = zz @ a + ((zz @ b) * zz).sum(-1)
        est = P.constrained_shapley_fit(z, y, w, counts)
        return float((est[0] - phi).abs().max())

    assert error(2 + 4 * s, True) < 1e-9
    assert error(2 + 40 * s, False) > 1e-3
    z, _, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1), counts, 41, True)
    assert torch.equal(z[0, 3:40:2], ~z[0, 2:40:2])  # rows 2 + 2i and 3 + 2i are complements


def cubic_game(s: int, seed: int = 5) -> Callable[[torch.Tensor], torch.Tensor]:
    """v(z) = Σ a_i z_i + Σ b_ij z_i z_j + Σ c_ijk z_i z_j z_k: sampled estimates are noisy."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s, generator=g, dtype=torch.float64)
    b = torch.randn(s, s, generator=g, dtype=torch.float64) / s
    c = torch.randn(s, s, s, generator=g, dtype=torch.float64) / s

    def value(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        m = (z @ c.view(s, s * s)).view(*z.shape, s)  # m_njk = Σ_i z_ni c_ijk
        return z @ a + ((z @ b) * z).sum(-1) + ((m * z[..., None]).sum(-2) * z).sum(-1)
    return value


def test_leverage_sampling_estimates_the_shapley_values() -> None:
    """Uniform sizes with kernel / uniform importance weights: weights average 1, sizes are
    uniform, and the estimate converges to the exact (enumerated) Shapley values as well as
    kernel sampling's does."""
    s, counts = 16, torch.tensor([16])  # 2^16 coalitions: 20,002 samples do not enumerate
    value = cubic_game(s)
    z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1), counts, 2**s)
    exact = P.constrained_shapley_fit(z, value(z), w, counts)[0]
    z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1, 3), counts, 20002,
                                       sampling="leverage")
    sizes = z[0, 2:].sum(1)
    frequency = torch.bincount(sizes, minlength=s)[1:].double() / len(sizes)
    assert (frequency - 1 / (s - 1)).abs().max() < 0.01  # uniform on 1..S−1
    assert abs(float(w[0, 2:].mean()) - 1) < 0.03
    k = torch.arange(1, s, dtype=torch.float64)
    kernel = (s - 1) / (k * (s - k))
    ratio = w[0, 2:] / kernel[sizes - 1]  # ∝ the kernel within and across sizes
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    errors = {}
    for sampling in ("kernel", "leverage"):
        z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1, 3), counts, 20002,
                                           paired=True, sampling=sampling)
        errors[sampling] = float((P.constrained_shapley_fit(z, value(z), w, counts)[0]
                                  - exact).norm() / exact.norm())
    assert errors["leverage"] < 0.02 and errors["kernel"] < 0.02, errors


class Quadratic(nn.Module):
    """float64 logits quadratic in the pixels: a superpixel game with pairwise interactions."""

    def __init__(self, size: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Linear(3 * size * size, 3).double()
        self.b = nn.Linear(3 * size * size, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.a(x) + self.b(x) ** 2


def test_paired_kernel_shap_exact_end_to_end() -> None:
    adapter = ModelAdapter(Quadratic(16), MEAN, STD, (16, 16), "quadratic")
    x = block_images(1, 4, size=16, dtype=torch.float64)
    seg = P.SegmentationParams(algorithm="slic", n_segments=14)
    kw = dict(score="logit", segmentation=seg)
    exact = attribute("kernel_shap", adapter, x, 1, n_samples=2**16, **kw)
    s = int(P.num_segments(exact.segments)[0])
    assert 2**s <= 2**16 and s >= 8
    paired = attribute("kernel_shap", adapter, x, 1, n_samples=4 * s + 2, paired=True, **kw)
    single = attribute("kernel_shap", adapter, x, 1, n_samples=4 * s + 2, **kw)
    torch.testing.assert_close(paired.native, exact.native, atol=1e-8, rtol=0)
    assert (single.native - exact.native).abs().max() > 1e-4


# ------------------------------------------------------------------------------- auto


class Wiggly(nn.Module):
    """float64 logits sin(8·linear(x)): a game with interactions of every order."""

    def __init__(self, size: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3 * size * size, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(8 * self.linear(x.flatten(1)))


@pytest.mark.parametrize(("method", "kw", "tolerance", "budget"), [
    ("kernel_shap", {"paired": True}, 0.02, 300), ("lime", {}, 0.02, 300),
    ("rise", {"grid": 2}, 0.1, 1000),  # RISE is noisy: its terms carry the mean score
])
def test_auto_stops_earlier_on_an_easy_model(method, kw, tolerance, budget) -> None:
    """An additive game (linear logits) converges sooner than a wiggly one, and no image
    exceeds max_samples."""
    kw = dict(kw, n_samples="auto", tolerance=tolerance, max_samples=budget, score="logit")
    if method != "rise":
        kw["segmentation"] = P.SegmentationParams(algorithm="slic", n_segments=9)
    x = block_images(2, 3, dtype=torch.float64)
    easy = attribute(method, linear_adapter(32), x, [1, 2], **kw)
    hard = attribute(method, ModelAdapter(Wiggly(32), MEAN, STD, (32, 32), "wiggly"), x,
                     [1, 2], **kw)
    for r in (easy, hard):
        assert r.evaluations is not None and r.standard_error is not None
        assert (r.evaluations <= budget).all() and r.cost.forward == math.ceil(
            r.evaluations.double().mean())
        # stopped because converged, or at the budget
        assert ((r.standard_error < tolerance) | (r.evaluations == budget)).all()
    assert easy.evaluations.sum() < hard.evaluations.sum()
    if method != "rise":
        assert (easy.standard_error < tolerance).all() and (hard.evaluations == budget).all()


def test_auto_enumerates_small_games_exactly(vit64) -> None:
    x = block_images(1, 2, dtype=torch.float64)
    seg = P.SegmentationParams(algorithm="slic", n_segments=4)
    auto = attribute("kernel_shap", vit64, x, 1, n_samples="auto", segmentation=seg)
    s = int(P.num_segments(auto.segments)[0])
    fixed = attribute("kernel_shap", vit64, x, 1, n_samples=2**s, segmentation=seg)
    assert int(auto.evaluations[0]) == 2**s and float(auto.standard_error[0]) == 0.0
    torch.testing.assert_close(auto.native, fixed.native)


@pytest.mark.parametrize("sampling", ["kernel", "leverage"])
def test_kernel_shap_standard_error_is_calibrated(sampling) -> None:
    """Over repeated draws, the estimated SE tracks the actual spread of the estimates."""
    s = 10
    g = torch.Generator().manual_seed(5)
    w3 = torch.randn(s, s, s, generator=g, dtype=torch.float64) / s  # third-order: noisy
    counts = torch.tensor([s])
    estimates, ses = [], []
    for seed in range(40):
        z, w, _ = P.kernel_shap_coalitions(BatchContext.for_batch(1, seed), counts, 200, True,
                                           sampling)
        zz = z.double()
        y = torch.einsum("bni,bnj,bnk,ijk->bn", zz, zz, zz, w3)
        phi = P.constrained_shapley_fit(z, y, w, counts)
        estimates.append(phi[0])
        ses.append(P.kernel_shap_standard_error(z, y, w, counts, phi, True)[0])
    spread = torch.stack(estimates).std(0)
    ratio = torch.stack(ses).mean(0) / spread
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


@pytest.mark.parametrize(("paired", "sampling"), [
    (False, "bernoulli"), (True, "bernoulli"), (False, "orthogonal"), (True, "orthogonal")])
def test_lime_standard_error_is_calibrated(paired, sampling) -> None:
    """The SE tracks the spread of the fits, also for orthogonal arrays, whose rows it treats
    as independent."""
    s = 12
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(s, generator=g, dtype=torch.float64)
    w2 = torch.randn(s, s, generator=g, dtype=torch.float64) / s
    counts = torch.tensor([s])
    estimates, ses = [], []
    for seed in range(40):
        z = P.lime_coalitions(BatchContext.for_batch(1, seed), counts, 151, paired,
                              sampling).double()
        y = torch.sin(z @ w1) + ((z @ w2) * z).sum(-1)
        w = P.lime_weights(z, counts, 0.25)
        coef, intercept = P.weighted_ridge(z, y, w, 1.0)
        estimates.append(coef[0])
        ses.append(P.lime_standard_error(z, y, w, 1.0, coef, intercept, counts, paired)[0])
    ratio = torch.stack(ses).mean(0) / torch.stack(estimates).std(0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


def test_paired_lime_estimates_the_same_regression() -> None:
    """Paired rows are complements and each row is still Bernoulli(0.5): at many samples the
    paired fit equals the unpaired one, and at few it is closer to it than unpaired draws."""
    s, counts = 12, torch.tensor([12])
    value = cubic_game(s, seed=2)

    def fit(n: int, paired: bool, seed: int) -> torch.Tensor:
        z = P.lime_coalitions(BatchContext.for_batch(1, seed), counts, n, paired)
        w = P.lime_weights(z, counts, 0.25)
        return P.weighted_ridge(z.double(), value(z), w, 1.0)[0][0]

    z = P.lime_coalitions(BatchContext.for_batch(1), counts, 9, True)[0]
    assert z[0].all() and torch.equal(z[2:9:2], ~z[1:9:2])
    assert 0.45 < float(P.lime_coalitions(BatchContext.for_batch(1), counts, 4001, True)
                        [0, 1:].double().mean()) < 0.55
    truth = fit(200_001, False, 9)
    assert float((fit(200_001, True, 9) - truth).norm() / truth.norm()) < 0.01

    def error(paired: bool) -> float:
        return sum(float((fit(201, paired, seed) - truth).norm()) for seed in range(20))
    assert error(True) < error(False)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("s", [1, 2, 3, 7, 8, 12, 33])
def test_orthogonal_rows_are_randomised_orthogonal_arrays(paired, s) -> None:
    """Each block balances every t columns exactly (t = 2, or 3 with paired, whose rows
    2i and 2i + 1 are complements); over seeds every row is uniform, as a Bernoulli(½) row."""
    strength = min(s, 3 if paired else 2)
    block = 2 ** (math.ceil(math.log2(s)) + 1 if paired else math.ceil(math.log2(s + 1)))
    rows = P.orthogonal_rows(3 * block - 1, s, paired, torch.Generator().manual_seed(s))
    assert rows.shape == (3 * block - 1, s) and block <= max(2, 4 * s)
    powers = 2 ** torch.arange(strength)
    for b in range(2):
        part = rows[b * block:(b + 1) * block].long()
        for cols in itertools.combinations(range(s), strength):
            cells = torch.bincount((part[:, list(cols)] * powers).sum(1), minlength=2**strength)
            assert (cells == block // 2**strength).all(), (b, cols, cells)
    if paired:
        assert torch.equal(rows[1::2], ~rows[0:-1:2])
    # one row (the 5th) over many seeds: each column and each pair of columns is uniform
    fifth = torch.stack([P.orthogonal_rows(8, s, paired, torch.Generator().manual_seed(seed))
                         [4] for seed in range(2000)]).double()
    assert (fifth.mean(0) - 0.5).abs().max() < 0.05
    if s > 1:
        assert abs(float((fifth[:, 0] * fifth[:, 1]).mean()) - 0.25) < 0.04


@pytest.mark.parametrize("paired", [False, True])
def test_orthogonal_lime_estimates_the_same_regression_with_less_noise(paired) -> None:
    s, counts = 12, torch.tensor([12])
    value = cubic_game(s, seed=2)

    def fit(n: int, sampling: str, seed: int) -> torch.Tensor:
        z = P.lime_coalitions(BatchContext.for_batch(1, seed), counts, n, paired, sampling)
        w = P.lime_weights(z, counts, 0.25)
        return P.weighted_ridge(z.double(), value(z), w, 1.0)[0][0]

    truth = fit(200_001, "bernoulli", 9)
    assert float((fit(200_001, "orthogonal", 9) - truth).norm() / truth.norm()) < 0.01

    def error(sampling: str) -> float:
        return sum(float((fit(201, sampling, seed) - truth).norm()) for seed in range(20))
    assert error("orthogonal") < error("bernoulli")


# ------------------------------------------------------------------------------- batches


@pytest.mark.parametrize(("method", "kw"), [
    ("lime", {"space": "token", "removal": "drop", "n_samples": 24}),
    ("lime", {"space": "token", "removal": "attention_mask", "n_samples": 24}),
    ("kernel_shap", {"space": "token", "removal": "drop", "n_samples": 24, "paired": True}),
    ("kernel_shap", {"space": "token", "n_samples": 40, "paired": True, "sampling": "leverage"}),
    ("lime", {"space": "token", "removal": "drop", "n_samples": 24, "grid": 3}),
    ("lime", {"space": "token", "n_samples": "auto", "paired": True, "max_samples": 81}),
    ("lime", {"space": "token", "n_samples": 40, "paired": True, "sampling": "orthogonal"}),
    ("lime", {"space": "token", "n_samples": "auto", "sampling": "orthogonal",
              "max_samples": 80}),
    ("rise", {"space": "token", "removal": "drop", "masks": "binary", "n_samples": 24,
              "grid": 2, "p_keep": 0.5}),
    ("occlusion", {"space": "token", "removal": "drop"}),
    ("lime", {"space": "token", "removal": "drop", "n_samples": "auto", "max_samples": 80}),
    ("kernel_shap", {"space": "token", "n_samples": "auto", "paired": True,
                     "max_samples": 80}),
    ("rise", {"n_samples": "auto", "max_samples": 80, "grid": 2, "masks": "binary"}),
    *((method, {"space": "token", "paired": True, "surrogate": "logistic", **budget})
      for method in ("kernel_shap", "lime")
      for budget in ({"n_samples": 50}, {"n_samples": "auto", "max_samples": 90})),
])
def test_batch_equals_per_image(vit64, method, kw) -> None:
    x, t, ids = images_for(vit64, 3), torch.tensor([0, 4, 8]), ["a.jpg", "b.jpg", "c.jpg"]
    kw = dict(kw, batch_size=16)
    together = attribute(method, vit64, x, t, context=BatchContext.for_batch(3, 7, ids), **kw)
    for i in range(3):
        alone = attribute(method, vit64, x[i:i + 1], t[i:i + 1],
                          context=BatchContext.for_batch(1, 7, ids[i:i + 1]), **kw)
        torch.testing.assert_close(together.native[i], alone.native[0], atol=1e-8, rtol=0)
        if together.evaluations is not None:
            assert int(together.evaluations[i]) == int(alone.evaluations[0])
            torch.testing.assert_close(together.standard_error[i], alone.standard_error[0])


# ------------------------------------------------------------------------------- errors


class Wrapped(nn.Module):
    """A ViT that is not timm's VisionTransformer (same parts, its own forward)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.blocks, self.patch_embed, self.num_classes = vit.blocks, vit.patch_embed, 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


@pytest.mark.parametrize(("method", "kw", "message"), [
    ("lime", {"removal": "drop"}, "removal='drop' needs space='token'"),
    ("kernel_shap", {"removal": "attention_mask"}, "needs space='token'"),
    ("occlusion", {"removal": "cut", "space": "token"}, "removal='cut' is not one of"),
    ("rise", {"removal": "drop", "space": "token"}, "needs masks='binary'"),
    ("rise", {"masks": "soft"}, "masks='soft' is not one of"),
    ("lime", {"tolerance": 0.0}, r"tolerance=0.0 is out of range \(0.0, inf\)"),
    ("kernel_shap", {"tolerance": -1.0}, "tolerance=-1.0 is out of range"),
    ("kernel_shap", {"n_samples": "many"}, "n_samples='many' must be an integer or 'auto'"),
    ("lime", {"n_samples": 2.5}, "n_samples=2.5 must be an integer or 'auto'"),
    ("rise", {"max_samples": 0}, "max_samples=0 is out of range"),
    ("kernel_shap", {"sampling": "sobol"}, "sampling='sobol' is not one of"),
    ("lime", {"sampling": "leverage"}, "sampling='leverage' is not one of"),
    ("lime", {"grid": 4}, "grid=4 groups patch tokens and needs space='token'"),
    ("kernel_shap", {"grid": 0, "space": "token"}, "grid=0 is out of range"),
])
def test_bad_combinations_are_one_line_errors(method, kw, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        get_method(method).make_params(**kw)
    assert "\n" not in str(info.value)


def test_drop_needs_a_timm_vit(vit) -> None:
    x = images_for(vit, 1)
    with pytest.raises(ValueError, match="with space='token' needs a ViT"):
        attribute("lime", linear_adapter(32), x.double(), 0, space="token", removal="drop")
    other = ViTAdapter(Wrapped(vit.model), MEAN, STD, (32, 32), "wrapped")
    with pytest.raises(ValueError, match="needs a timm VisionTransformer; 'wrapped' is not one"):
        attribute("kernel_shap", other, x, 0, space="token", removal="drop", n_samples=10)
    attribute("kernel_shap", other, x, 0, space="token", n_samples=10)  # blend still works


def test_drop_refuses_an_empty_pool() -> None:
    vit = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="keeps no patch.*pools its patch tokens"):
        attribute("kernel_shap", vit, images_for(vit, 1), 0, space="token", removal="drop",
                  n_samples=10)


def test_new_parameters_recorded_only_when_set() -> None:
    """Runs recorded before removal, paired and the stopping rule keep their fingerprints."""
    for method in ("lime", "kernel_shap", "rise", "occlusion"):
        spec = get_method(method)
        record = params_record(spec.make_params())
        new = {"removal", "paired", "tolerance", "max_samples", "masks", "sampling",
               "surrogate"}
        assert not (new | ({"grid"} if method in ("lime", "kernel_shap") else set())) & set(
            record)
    assert params_record(get_method("kernel_shap").make_params(paired=True))["paired"] is True


def test_precision_auto() -> None:
    from vitxai.source import RunSource

    vit = tiny_vit()
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert vit.set_precision("auto").precision == expected
    assert tiny_vit(dtype=torch.float64).set_precision("auto").precision == "fp32"
    record = RunSource(model="bundled", precision="auto").record()
    assert record["precision"] == ("bf16" if expected == "bf16" else "float32")


def test_compare_writes_standard_errors(tmp_path) -> None:
    """A run with n_samples="auto" has per-image standard_error and evaluations columns, and
    its config records the stopping parameters only where set."""
    import csv
    import json

    from vitxai.cli import main

    out = tmp_path / "run"
    code = main(["compare", "--model", "bundled", "--n-images", "2", "--no-progress",
                 "--methods", "lime", "kernel_shap", "--out", str(out),
                 "--param", "lime.n_samples=auto", "--param", "lime.max_samples=80",
                 "--param", "kernel_shap.n_samples=24", "--param", "kernel_shap.paired=true",
                 "--param", 'kernel_shap.sampling="leverage"', "--param", "lime.paired=true",
                 "--param", 'kernel_shap.surrogate="logistic"',
                 "--param", 'lime.sampling="orthogonal"', "--segmentation", 'algorithm="slic"',
                 "--precision", "auto"])
    assert code == 0
    with open(out / "per_image_methods.csv") as f:
        rows = list(csv.DictReader(f))
    lime = [r for r in rows if r["method"] == "lime"]
    shap = [r for r in rows if r["method"] == "kernel_shap"]
    assert len(lime) == 2 and all(0 < int(r["evaluations"]) <= 80 for r in lime)
    assert all(float(r["standard_error"]) >= 0 for r in lime)
    assert all(r["standard_error"] == "" and r["evaluations"] == "24" for r in shap)  # NaN
    config = json.loads((out / "config.json").read_text())
    assert config["methods"]["kernel_shap"]["paired"] is True
    assert config["methods"]["kernel_shap"]["sampling"] == "leverage"
    assert config["methods"]["kernel_shap"]["surrogate"] == "logistic"
    assert config["methods"]["lime"]["paired"] is True
    assert config["methods"]["lime"]["sampling"] == "orthogonal"
    assert "removal" not in config["methods"]["lime"]
    assert config["methods"]["lime"]["n_samples"] == "auto"
    assert config["source"]["precision"] == ("bf16" if cpu_has_native_bf16() else "float32")
