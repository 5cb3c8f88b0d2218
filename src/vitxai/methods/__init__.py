"""Attribution methods: importing this package fills the registry."""

from vitxai.methods import (  # noqa: F401  (registration)
    attention,
    cam,
    gradient,
    lrp,
    perturbation,
)
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
