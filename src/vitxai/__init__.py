"""vitxai: compute, compare and evaluate attribution methods on Vision Transformers."""

__version__ = "0.1.0"
