"""Perturbation methods: LIME, KernelSHAP, RISE and occlusion on one perturbation engine.

Every method here evaluates the model on many masked copies of each image through
:func:`evaluate_masks` (chunked, batched, under ``inference_mode``, memory bounded by
``batch_size`` images). A mask says what is kept; the rest is either replaced in pixel space
(``space="pixel"``: by ``baseline``, a colour or baseline image) or, for ViTs, at the token
level (``space="token"``: a forward hook on ``patch_embed`` swaps the embeddings of masked
patches for the ``token_baseline`` embedding, keeping the sequence length, see
:func:`token_masking`; or, with ``removal="drop"``, masked tokens leave the sequence and each
forward costs what its kept tokens cost, see :mod:`.removal`). In token space the
features live on the patch grid: LIME and KernelSHAP use every patch as a feature (instead of
superpixels), RISE draws its masks on the patch grid, and occlusion slides its window over it;
maps are then (B, gh, gw) "token" natives, nearest-upsampled so each pixel gets its patch's value.

LIME and KernelSHAP explain a prediction by switching features off, evaluating the model on many
such coalitions, and fitting a linear model of the target score on the binary "kept"
indicators:

* **LIME** (Ribeiro et al. 2016, "Why should I trust you?", KDD), as ``lime_image`` 0.2.0.1:
  Bernoulli(0.5) coalitions, cosine-distance exponential kernel, weighted ridge regression.
* **KernelSHAP** (Lundberg & Lee 2017, "A unified approach to interpreting model predictions",
  NeurIPS): coalitions drawn from the Shapley kernel, least squares constrained to
  φ0 = f(∅) and Σφ = f(x) − f(∅); with all coalitions enumerated the result is the exact
  Shapley value.

What the original comparison got wrong and this package fixes (docs/differences.md §8): the
superpixels are computed on the displayable [0, 1] image, not the normalised one (defect 4);
images are never transposed (defect 2); the fitted score is the target's softmax probability
by default, logits only on request (``score="logit"``, defect 3); every random draw is seeded
per image (defect 15); and perturbed images are evaluated in chunks of ``batch_size`` instead of
one at a time (defect 19). The segmentation of a batch is computed once and shared by both
methods through the :class:`~vitxai.methods.base.BatchContext` cache.

* **RISE** (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
  Black-box Models", BMVC): saliency = Σ_i p_c(M_i ⊙ x + (1 − M_i) ⊙ x′)·M_i / (N·p1) over
  random smooth masks M_i.
* **Occlusion** (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
  ECCV): a pixel's attribution is the mean, over the sliding windows covering it, of
  f(x) − f(x with the window set to the baseline).

``n_samples="auto"`` (LIME, KernelSHAP, RISE) samples until the map's estimated standard error
is small (:mod:`.stopping`); KernelSHAP's ``paired=True`` evaluates each coalition with its
complement (Covert & Lee 2021, AISTATS).

Modules: ``tokens`` (token masking, the patch grid), ``removal`` (token removal),
``stopping`` (the sampling rule of ``n_samples="auto"``), ``engine`` (masks → model scores),
``segmentation`` (superpixels), ``features`` (LIME's and KernelSHAP's features and their maps),
and one module per method: ``lime``, ``kernel_shap``, ``rise``, ``occlusion``; importing this
package registers the four methods. The method functions are reached through the registry
(:func:`~vitxai.methods.base.get_method`); the names below are the package's building blocks.
"""

# The methods register in this order (the registry lists them so); the rest re-exports.
# isort: off
from vitxai.methods.perturbation import lime, kernel_shap, rise, occlusion  # noqa: F401
# isort: on
from vitxai.methods.perturbation.engine import (
    ColourBaseline,
    MaskFn,
    Space,
    baseline_colour,
    evaluate_coalitions,
    evaluate_masks,
)
from vitxai.methods.perturbation.features import feature_areas, patch_segments
from vitxai.methods.perturbation.kernel_shap import (
    KernelShapParams,
    constrained_shapley_fit,
    kernel_shap_coalitions,
    kernel_shap_standard_error,
    shapley_kernel,
)
from vitxai.methods.perturbation.lime import (
    LimeParams,
    lime_coalitions,
    lime_standard_error,
    lime_weights,
    orthogonal_rows,
    weighted_ridge,
)
from vitxai.methods.perturbation.occlusion import OcclusionParams, window_starts
from vitxai.methods.perturbation.removal import Removal, removal_logits
from vitxai.methods.perturbation.rise import RiseParams, rise_draws, rise_masks
from vitxai.methods.perturbation.segmentation import (
    SegmentationParams,
    num_segments,
    segment,
    shared_segments,
)
from vitxai.methods.perturbation.stopping import SampleCount, convergence_ratio, sample_until
from vitxai.methods.perturbation.tokens import TokenBaseline, TokenMask, patch_map, token_masking

__all__ = [
    "ColourBaseline",
    "KernelShapParams",
    "LimeParams",
    "MaskFn",
    "OcclusionParams",
    "Removal",
    "RiseParams",
    "SampleCount",
    "SegmentationParams",
    "Space",
    "TokenBaseline",
    "TokenMask",
    "baseline_colour",
    "constrained_shapley_fit",
    "convergence_ratio",
    "evaluate_coalitions",
    "evaluate_masks",
    "feature_areas",
    "kernel_shap_coalitions",
    "kernel_shap_standard_error",
    "lime_coalitions",
    "lime_standard_error",
    "lime_weights",
    "num_segments",
    "orthogonal_rows",
    "patch_map",
    "patch_segments",
    "removal_logits",
    "rise_draws",
    "rise_masks",
    "sample_until",
    "segment",
    "shapley_kernel",
    "shared_segments",
    "token_masking",
    "weighted_ridge",
    "window_starts",
]
