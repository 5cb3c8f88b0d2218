"""Model loading and adapters."""

from vitxai.models.adapter import Capture, ModelAdapter, ViTAdapter, is_timm_vit
from vitxai.models.loading import ModelLoadError, adapt, data_config, load_model, read_state_dict

__all__ = [
    "Capture",
    "ModelAdapter",
    "ModelLoadError",
    "ViTAdapter",
    "adapt",
    "data_config",
    "is_timm_vit",
    "load_model",
    "read_state_dict",
]
