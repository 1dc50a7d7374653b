"""Periodic EMA sample grids during training (a progress check, not the paper's evaluation).

Builds a `DenoiseFn(z_t, logsnr, cond) -> eps_hat` from the stage network and its EMA params
(`imagen_jax.denoiser`, the same guided denoiser the cascade samples with), with classifier-free
guidance (Imagen §2.2: eps~ = w * eps(z, c) + (1 - w) *
eps(z, null), null = zero embeddings + all-False mask), and runs
`imagen_jax.diffusion.samplers.sample` for a few steps. Prompts are the text of real training
examples; SR stages condition on those examples' real low-res images, upsampled and
noise-augmented at `sample.aug_level` (§2.4).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.denoiser import make_denoise_fn
from imagen_jax.diffusion import forward, samplers


def make_sample_fn(
    *, model: nn.Module, config, schedule, encode_tokens: Callable | None
) -> Callable:
  """`sample(ema_params, text_params, batch, rng) -> images [N, H, W, C]` (pure; jit it).

  `batch` holds `text_ids`/`text_mask` (or `text_emb`), `image` (for its size) and, for SR,
  `lowres`.
  """
  c = config.sample
  is_sr = config.stage != "base64"

  def sample(ema_params, text_params, batch, rng):
    mask = batch["text_mask"].astype(jnp.bool_)
    if "text_emb" in batch:
      emb = batch["text_emb"].astype(jnp.float32)
    else:
      emb = encode_tokens(text_params, batch["text_ids"], mask)
    n, h, w, ch = batch["image"].shape
    k_noise, k_aug, k_sample = jax.random.split(rng, 3)
    cond = dict(text_emb=emb, text_mask=mask)
    if is_sr:
      up = forward.upsample_lowres(batch["lowres"].astype(jnp.float32), (h, w))
      aug = jnp.full((n,), c.aug_level, jnp.float32)
      cond["lowres"] = forward.noise_condition_augment(
          up, aug, jax.random.normal(k_aug, up.shape, jnp.float32)
      )
      cond["aug_level"] = aug
    denoise = make_denoise_fn(
        model, ema_params, target=config.diffusion.target, guidance_weight=float(c.guidance_weight)
    )
    noise = jax.random.normal(k_noise, (n, h, w, ch), jnp.float32)
    return samplers.sample(
        denoise,
        cond,
        noise,
        k_sample,
        schedule=schedule,
        settings=samplers.SamplerSettings(
            sampler=c.sampler,
            num_steps=int(c.num_steps),
            threshold=c.threshold,
            percentile=float(c.percentile),
        ),
    )

  return sample
