"""Flax Linen networks of Imagen: the base U-Net (App. F.1) and Efficient U-Nets (App. B.1, F.2,
F.3), with their text conditioning.

Public API (docs/interfaces.md):
  presets.get_model_config(stage, size) -> ml_collections.ConfigDict
  unet.build_model(model_config) -> nn.Module
  model.apply(params, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None,
              train=False, rngs=...) -> [B, H, W, C_out]
"""

from imagen_jax.nn.presets import get_model_config
from imagen_jax.nn.unet import EfficientUNet, UNet, build_model

__all__ = ["get_model_config", "build_model", "UNet", "EfficientUNet"]
