"""Fine-tuning methods: one module each, registered by name (see base.py for the hooks)."""
from . import adalora, dylora, finetune, lora  # noqa: F401  (registration side effect)
from .base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
