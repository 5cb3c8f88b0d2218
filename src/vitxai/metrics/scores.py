"""One table of every score vitxai writes: its column name, label, better direction and range.

A score's ``name`` is its column in the run's files (``per_image_methods.csv``,
``per_image_pairs.csv``, ``per_image_evaluation.csv``); compare, evaluate, the report and the
command line's summary all read names, labels and directions from here.

``direction`` says which way is better: "higher", "lower", or None for descriptive scores
(mask area, sparseness, pass counts), which are reported without a ranking. ``range`` is the
(low, high) interval a defined value lies in (None = unbounded on that side); undefined values
are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"] | None


@dataclass(frozen=True)
class Score:
    """One score: ``name`` (the column), ``label`` (for tables and figures), ``direction``
    ("higher" or "lower" is better, None = descriptive) and ``range`` (low, high)."""

    name: str
    label: str
    direction: Direction
    range: tuple[float | None, float | None] = (None, None)

    @property
    def higher_is_better(self) -> bool | None:
        """True, False, or None for a descriptive score."""
        return None if self.direction is None else self.direction == "higher"

    def contains(self, value: float) -> bool:
        """Whether a defined ``value`` lies in the score's range."""
        low, high = self.range
        return (low is None or value >= low) and (high is None or value <= high)


def _table(*scores: Score) -> dict[str, Score]:
    return {s.name: s for s in scores}


UNIT = (0.0, 1.0)
SIGNED_UNIT = (-1.0, 1.0)
NON_NEGATIVE = (0.0, None)

#: compare, per image and pair of methods (per_image_pairs.csv): overlap of the unified masks
MASK_PAIR_SCORES = _table(
    Score("iou", "IoU", "higher", UNIT),
    Score("dice", "Dice", "higher", UNIT),
    Score("coverage", "coverage |A∩B|/|A| (row = A)", "higher", UNIT),
)

#: compare, per image and method, where the data has truth masks: the mask and the map
#: against an object's mask; columns "truth_NAME" (the explained object) and "other_NAME"
#: (the other object of the two-object split)
TRUTH_SCORES = _table(
    Score("iou", "IoU with truth", "higher", UNIT),
    Score("dice", "Dice with truth", "higher", UNIT),
    Score("coverage", "mask on object", "higher", UNIT),
    Score("recall", "object found", "higher", UNIT),
    Score("pointing", "pointing game", "higher", UNIT),
    Score("mass_inside", "mass inside truth", "higher", UNIT),
)

#: compare, per image and method (per_image_methods.csv): the columns summarised over images
METHOD_COLUMNS = _table(
    *(Score(f"truth_{s.name}", s.label, s.direction, s.range) for s in TRUTH_SCORES.values()),
    Score("other_mass_inside", "mass on other object", "lower", UNIT),
    Score("mask_fraction", "mask area", None, UNIT),
    Score("seconds_per_image", "seconds / image", "lower", NON_NEGATIVE),
    Score("peak_memory_mb", "peak memory (MB)", "lower", NON_NEGATIVE),
    Score("forward_passes", "forward passes", None, NON_NEGATIVE),
    Score("backward_passes", "backward passes", None, NON_NEGATIVE),
)

#: the cost columns among :data:`METHOD_COLUMNS`
COST_COLUMNS = ("seconds_per_image", "forward_passes", "backward_passes", "peak_memory_mb")

#: evaluate, per image and method (per_image_evaluation.csv)
EVALUATION_SCORES = _table(
    Score("deletion_auc", "deletion AUC", "lower", UNIT),
    Score("insertion_auc", "insertion AUC", "higher", UNIT),
    Score("single_deletion", "single deletion ρ", "higher", SIGNED_UNIT),
    # single deletion on a model fine-tuned with cell deletions, maps recomputed on it
    Score("idsds", "IDSDS ρ", "higher", SIGNED_UNIT),
    Score("incremental_deletion_ascending", "incremental deletion, least relevant first",
          "higher", UNIT),
    Score("incremental_deletion_descending", "incremental deletion, most relevant first",
          "lower", UNIT),
    Score("pointing_game", "pointing game", "higher", UNIT),
    Score("relevance_mass", "relevance mass", "higher", UNIT),
    Score("rank_accuracy", "relevance rank accuracy", "higher", UNIT),
    Score("class_discrimination", "class discrimination", "higher", SIGNED_UNIT),
    Score("gini", "Gini sparseness", None, UNIT),
    Score("entropy", "entropy", None, NON_NEGATIVE),
)

#: evaluate, per image and pair of methods on the patch grid (Krishna et al. 2022)
EVALUATION_PAIR_SCORES = _table(
    Score("feature_agreement", "feature agreement", "higher", UNIT),
    Score("rank_agreement", "rank agreement", "higher", UNIT),
    Score("sign_agreement", "sign agreement", "higher", UNIT),
    Score("signed_rank_agreement", "signed rank agreement", "higher", UNIT),
    Score("rank_correlation", "rank correlation", "higher", SIGNED_UNIT),
    Score("pairwise_rank_agreement", "pairwise rank agreement", "higher", UNIT),
)
