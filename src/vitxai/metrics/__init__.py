"""Metrics on attribution maps and masks."""

from vitxai.metrics.agreement import aggregate_matrices, mask_vs_truth, overlap_matrices

__all__ = ["aggregate_matrices", "mask_vs_truth", "overlap_matrices"]
