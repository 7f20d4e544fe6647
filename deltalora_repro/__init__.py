"""Reproduction of Delta-LoRA (arXiv 2309.02411).

The names for Hugging Face / PEFT training code (deltalora_repro.hf) are imported on first use, so
that `import deltalora_repro` loads neither torch nor transformers."""

_HF_NAMES = ("DeltaLoRA", "DeltaLoRACallback", "export_peft_adapter")
__all__ = list(_HF_NAMES)


def __getattr__(name: str):
    if name in _HF_NAMES:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'deltalora_repro' has no attribute {name!r}")
