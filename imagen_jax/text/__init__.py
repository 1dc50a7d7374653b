"""Frozen T5 text encoder (Imagen §2.1): Flax T5, HF safetensors loading, tokenizers, cache.

Public entry points: ``registry.get_text_encoder(text_config) -> TextEncoder`` and
``registry.default_text_config(name, path=None, max_length=128)``; see docs/interfaces.md.
"""

from imagen_jax.text.registry import TextEncoder, default_text_config, get_text_encoder

__all__ = ["TextEncoder", "default_text_config", "get_text_encoder"]
