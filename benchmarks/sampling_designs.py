#!/usr/bin/env python3
"""Which coalition designs make LIME and KernelSHAP more accurate at a fixed budget.

On the bundled model's benchmark images, each design runs ``--draws`` times per image at a
fixed number of evaluations and is scored by the normalised L2 error ‖φ − φ_ref‖ / ‖φ_ref‖
against a 20,000-sample reference of the same estimand (paired, leverage-sampled KernelSHAP;
paired LIME). Designs:

- KernelSHAP, all paired and importance-weighted (weight = kernel / sampling probability):
  i.i.d. uniform sizes (vitxai's ``sampling="leverage"``); the sizes stratified (exact counts
  per size instead of multinomial ones); stratified with the players balanced within a size
  (consecutive windows of random permutations); size laws ∝ kernel(k)^γ between uniform
  (γ = 0) and the kernel (γ = 1); sizes 1 and S − 1 enumerated first (the shap package's
  scheme when its budget allows); and a logistic control variate fitted to the log-odds (a
  surrogate σ(a + b·z) whose Shapley values are computed without the model, plus KernelSHAP
  of the residual; after Goldwasser & Hooker 2024, "Stabilizing Estimates of Shapley Values
  with Control Variates"). The log-odds fit is the variant that fails: vitxai's
  ``surrogate="logistic"`` fits the probabilities with a ridge penalty instead, here additive
  with one penalty for every superpixel and with vitxai's area prior (the penalty on a
  superpixel's coefficient ∝ 1 / its area²), and as vitxai fits it: the area prior and
  pairwise interactions between the strongest superpixels; ``convergence.py`` measures it
  across budgets.
- LIME: independent Bernoulli(½) rows and randomised orthogonal arrays
  (``sampling="orthogonal"``), each unpaired and paired.

    python benchmarks/sampling_designs.py --out benchmarks/results/sampling-designs.json
    # the surrogate's area prior on images it was not chosen on
    python benchmarks/sampling_designs.py --first-image 6 --images 6 --only surrogate \
        --out benchmarks/results/sampling-designs-images-6-11.json
    python benchmarks/sampling_designs.py --quick   # smoke test (< 1 min): numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import vitxai.methods.perturbation as P
from vitxai.methods import BatchContext
from vitxai.methods.perturbation.kernel_shap import adjusted_shapley_fit
from vitxai.methods.perturbation.surrogate import (
    LogisticSurrogate,
    fit_to_kernel_shap_samples,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_adapter, load_images, machine_info  # noqa: E402

#: a KernelSHAP design: (features, evaluations, generator) → coalitions (n, S), weights (n,)
Design = Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def size_kernel(s: int, k: torch.Tensor) -> torch.Tensor:
    """Total Shapley-kernel mass of the coalitions of size k: (S − 1) / (k (S − k))."""
    return (s - 1) / (k * (s - k)).double()


def paired_design(law_power: float = 0.0, stratified: bool = False, balanced: bool = False,
                  enumerate_ends: bool = False) -> Design:
    """Paired, importance-weighted KernelSHAP coalitions; rows 0 and 1 the endpoints.

    A pair is a coalition of size k ≤ S/2 and its complement; its size class k is drawn with
    probability ∝ (2, or 1 for k = S/2) · kernel(k)^law_power (0: uniform sizes), or allocated
    in exact proportions (``stratified``). Each row weighs the kernel mass of its class over
    the expected rows drawn from it, so the weighted regression estimates the Shapley values.
    ``balanced``: within a class the coalitions are consecutive windows of random
    permutations, so every player is in nearly equally many. ``enumerate_ends``: all
    coalitions of sizes 1 and S − 1 first, with their exact kernel weights.
    """
    def design(s: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = [torch.zeros(1, s, dtype=torch.bool), torch.ones(1, s, dtype=torch.bool)]
        w = [torch.zeros(2, dtype=torch.float64)]
        first = 1
        if enumerate_ends:
            eye = torch.eye(s, dtype=torch.bool)
            z += [eye, ~eye]
            w.append(torch.full((2 * s,), float(size_kernel(s, torch.tensor(1))) / s,
                                dtype=torch.float64))
            first = 2
        pairs = max(1, (n - sum(len(r) for r in z)) // 2)
        classes = torch.arange(first, s // 2 + 1)
        sizes_in = torch.where(2 * classes == s, 1.0, 2.0).double()
        mass = sizes_in * size_kernel(s, classes)  # kernel mass of each class
        law = sizes_in * size_kernel(s, classes) ** law_power
        law = law / law.sum()
        if stratified:  # systematic sampling: counts within 1 of pairs · law
            edges = torch.floor(torch.cumsum(law * pairs, 0) + torch.rand(1, generator=g))
            counts = torch.diff(edges, prepend=torch.zeros(1, dtype=edges.dtype)).long()
            drawn = torch.repeat_interleave(torch.arange(len(classes)), counts)
        else:
            drawn = torch.multinomial(law, pairs, replacement=True, generator=g)
        k = classes[drawn]
        if balanced:
            small = torch.zeros(len(k), s, dtype=torch.bool)
            perm, pos = torch.randperm(s, generator=g), 0
            for j, kj in enumerate(k.tolist()):
                if pos + kj > s:
                    perm, pos = torch.randperm(s, generator=g), 0
                small[j, perm[pos:pos + kj]] = True
                pos += kj
        else:
            small = torch.rand(len(k), s, generator=g).argsort(1).argsort(1) < k[:, None]
        z.append(torch.stack([small, ~small], 1).reshape(-1, s))
        w.append((mass[drawn] / (2 * law[drawn] * pairs)).repeat_interleave(2))
        return torch.cat(z), torch.cat(w)
    return design


def leverage_design(s: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """vitxai's own ``paired=True, sampling="leverage"`` coalitions."""
    ctx = BatchContext.for_batch(1, int(torch.randint(0, 2**31, (1,), generator=g)))
    z, w, _ = P.kernel_shap_coalitions(ctx, torch.tensor([s]), n, True, "leverage")
    return z[0], w[0]


def kernel_shap_fit(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                    adjustment: Adjustment = None, areas: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """KernelSHAP of one image's samples, plain or adjusted (see :data:`KERNEL_SHAP`);
    ``areas`` (S,): the superpixels' pixel counts, for the area prior."""
    counts = torch.tensor([z.shape[1]])
    if adjustment in ("common ridge", "area prior"):  # additive surrogates, as first shipped
        prior = areas if adjustment == "area prior" else torch.ones(z.shape[1])
        g = fit_to_kernel_shap_samples(z, y, w, areas=prior, interacting=0)
        residual = P.constrained_shapley_fit(z[None], (y - g(z))[None], w[None], counts)[0]
        return g.shapley(torch.Generator().manual_seed(0)) + residual
    if adjustment == "interactions":
        return adjusted_shapley_fit(z[None], y[None], w[None], counts, "logistic",
                                    torch.tensor([False]), [torch.Generator().manual_seed(0)],
                                    areas[None]).phi[0]
    fit = P.constrained_shapley_fit(z[None], y[None], w[None], counts)[0]
    if adjustment is None:
        return fit
    odds = torch.logit(y.clamp(1e-6, 1 - 1e-6))
    b = P.constrained_shapley_fit(z[None], odds[None], w[None], counts)[0]
    surrogate = torch.sigmoid(odds[0] + z.double() @ b)
    residual = P.constrained_shapley_fit(z[None], (y - surrogate)[None], w[None], counts)[0]
    return LogisticSurrogate.additive(odds[0], b).shapley(torch.Generator().manual_seed(0),
                                                          20_000) + residual


def lime_fit(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    counts = torch.tensor([z.shape[1]])
    w = P.lime_weights(z[None], counts, 0.25)
    return P.weighted_ridge(z[None].double(), y[None], w, 1.0)[0][0]


#: how KernelSHAP's samples are fitted: plain (None); a logistic control variate fitted to the
#: log-odds; an additive logistic surrogate fitted to the probabilities with a common ridge
#: penalty or with vitxai's area prior (the penalty on a superpixel's coefficient ∝ 1 / area²);
#: or vitxai's ``surrogate="logistic"``: the area prior and pairwise interactions
Adjustment = Literal[None, "log-odds", "common ridge", "area prior", "interactions"]
#: KernelSHAP: label → (design, adjustment); the first is the baseline
KERNEL_SHAP: dict[str, tuple[Design, Adjustment]] = {
    "leverage, i.i.d. sizes (vitxai)": (leverage_design, None),
    "stratified sizes": (paired_design(stratified=True), None),
    "stratified, players balanced within a size": (
        paired_design(stratified=True, balanced=True), None),
    "size law kernel^0.5": (paired_design(law_power=0.5), None),
    "size law kernel^-0.5": (paired_design(law_power=-0.5), None),
    "sizes 1 and S-1 enumerated, stratified rest": (
        paired_design(stratified=True, enumerate_ends=True), None),
    "leverage + logistic control variate": (leverage_design, "log-odds"),
    "leverage + surrogate, common ridge": (leverage_design, "common ridge"),
    "leverage + surrogate, area prior": (leverage_design, "area prior"),
    "leverage + surrogate, area prior, interactions (vitxai)": (leverage_design,
                                                                "interactions"),
}
KERNEL_SHAP_BASELINE = "leverage, i.i.d. sizes (vitxai)"
#: LIME: label → (paired, sampling); "bernoulli paired" is the baseline
LIME_BASELINE = "bernoulli paired"
LIME = {"bernoulli": (False, "bernoulli"), "bernoulli paired": (True, "bernoulli"),
        "orthogonal": (False, "orthogonal"), "orthogonal paired": (True, "orthogonal")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--first-image", type=int, default=0,
                   help="index of the first benchmark image (e.g. 6: images the designs were "
                        "not chosen on)")
    p.add_argument("--only", default="",
                   help="run only the designs whose label contains this text (e.g. surrogate)")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--kernel-shap-samples", type=int, default=250)
    p.add_argument("--lime-samples", type=int, default=450)
    p.add_argument("--reference", type=int, default=20000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sampling-designs.json")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.draws, args.reference = 1, 2, 400
        args.kernel_shap_samples, args.lime_samples = 120, 120
    adapter, model_note = load_adapter("bundled", pretrained=False)
    images = load_images(adapter, args.first_image + args.images)[args.first_image:]
    targets = adapter.predict(images).argmax(1).cpu()
    segments = [P.shared_segments(BatchContext.for_batch(1), images[i:i + 1],
                                  P.SegmentationParams())[0] for i in range(args.images)]
    counts = P.num_segments(torch.stack(segments))
    areas = P.feature_areas(torch.stack(segments), counts)  # (images, S_max), 0 on padding

    def score(i: int, z: torch.Tensor) -> torch.Tensor:
        return P.evaluate_coalitions(adapter, images[i:i + 1], segments[i][None], z[None],
                                     targets[i:i + 1])[0]

    def chosen(designs: dict[str, Any], base: str) -> dict[str, Any]:
        """The designs --only selects, with the method's baseline when any is selected."""
        if not any(args.only in label for label in designs):
            return {}
        return {k: v for k, v in designs.items() if args.only in k or k == base}

    kernel_shap_designs = chosen(KERNEL_SHAP, KERNEL_SHAP_BASELINE)
    lime_designs = chosen(LIME, LIME_BASELINE)
    rows: list[dict[str, Any]] = []
    for i in range(args.images):
        s, image = int(counts[i]), args.first_image + i
        start = time.perf_counter()
        if kernel_shap_designs:
            z, w = leverage_design(s, args.reference, torch.Generator().manual_seed(99))
            ks_ref = kernel_shap_fit(z, score(i, z), w)
        if lime_designs:
            z = P.lime_coalitions(BatchContext.for_batch(1, 99), torch.tensor([s]),
                                  args.reference, True)[0]
            lime_ref = lime_fit(z, score(i, z))
        print(f"image {image}: {s} features, references {time.perf_counter() - start:.0f} s",
              flush=True)
        for draw in range(args.draws):
            seed = 1000 * image + draw
            for label, (design, adjustment) in kernel_shap_designs.items():
                z, w = design(s, args.kernel_shap_samples, torch.Generator().manual_seed(seed))
                phi = kernel_shap_fit(z, score(i, z), w, adjustment, areas[i, :s])
                rows.append({"method": "kernel_shap", "design": label, "image": image,
                             "draw": draw, "evaluations": len(z),
                             "error": float((phi - ks_ref).norm() / ks_ref.norm())})
            for label, (paired, sampling) in lime_designs.items():
                z = P.lime_coalitions(BatchContext.for_batch(1, seed), torch.tensor([s]),
                                      args.lime_samples, paired, sampling)[0]
                phi = lime_fit(z, score(i, z))
                rows.append({"method": "lime", "design": label, "image": image, "draw": draw,
                             "evaluations": len(z),
                             "error": float((phi - lime_ref).norm() / lime_ref.norm())})
    summary = []
    for method, base in (("kernel_shap", KERNEL_SHAP_BASELINE), ("lime", LIME_BASELINE)):
        if not any(r["method"] == method for r in rows):
            continue
        mean = {d: float(np.mean([r["error"] for r in rows
                                  if r["method"] == method and r["design"] == d]))
                for d in dict.fromkeys(r["design"] for r in rows if r["method"] == method)}
        for d, e in mean.items():
            summary.append({"method": method, "design": d, "mean_error": e,
                            "evaluations_factor": (mean[base] / e) ** 2})
    out = {"machine": machine_info(), "model": model_note, "images": args.images,
           "first_image": args.first_image, "only": args.only,
           "draws": args.draws, "reference_samples": args.reference, "quick": args.quick,
           "kernel_shap_samples": args.kernel_shap_samples, "lime_samples": args.lime_samples,
           "rows": rows, "summary": summary}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    last = args.first_image + args.images - 1
    lines = [f"Normalised L2 error against a {args.reference}-sample reference, mean over "
             f"images {args.first_image}–{last} × {args.draws} draws; KernelSHAP at "
             f"{args.kernel_shap_samples} evaluations, LIME at {args.lime_samples}. The last "
             "column is how many times fewer evaluations a design needs than the method's "
             "baseline (KernelSHAP: i.i.d. leverage sizes; LIME: paired Bernoulli rows) for "
             "the same error: (e_baseline / e)², as errors fall like 1/√n.", "",
             "| method | design | error | fewer evaluations |", "|---|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['design']} | {r['mean_error']:.3f} | "
              f"{r['evaluations_factor']:.2f}× |" for r in summary]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines) + f"\nresults: {path} (+ .md)")
    return 0 if all(math.isfinite(r["mean_error"]) for r in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
