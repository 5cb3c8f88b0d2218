"""Attribution methods: importing this package fills the registry."""

from vitxai.methods import attention, gradient, lrp, perturbation  # noqa: F401  (registration)
from vitxai.methods.base import (
    METHODS,
    Attribution,
    BatchContext,
    Cost,
    MethodSpec,
    attribute,
    get_method,
    register_method,
)

__all__ = [
    "METHODS",
    "Attribution",
    "BatchContext",
    "Cost",
    "MethodSpec",
    "attribute",
    "get_method",
    "register_method",
]
