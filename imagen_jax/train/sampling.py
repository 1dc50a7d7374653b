"""Periodic EMA sample grids during training (a progress check, not the paper's evaluation).

Builds a `DenoiseFn(z_t, logsnr, cond) -> eps_hat` from the stage network and its EMA params,
wraps it in classifier-free guidance (Imagen §2.2: eps~ = w * eps(z, c) + (1 - w) *
eps(z, null), null = zero embeddings + all-False mask), and runs
`imagen_jax.diffusion.samplers.sample` for a few steps. Prompts are the text of real training
examples; SR stages condition on those examples' real low-res images, upsampled and
noise-augmented at `sample.aug_level` (§2.4).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import forward, guidance, parameterization, samplers


def make_denoise_fn(model: nn.Module, params: Any, *, target: str,
                    guidance_weight: float) -> Callable:
    """`denoise(z_t, logsnr, cond) -> eps_hat` with CFG (w = 1: the conditional model only).

    `cond` holds `text_emb [B, L, D]`, `text_mask [B, L]` and, for SR, `lowres [B, H, W, C]`
    (upsampled + augmented) and `aug_level [B]`.
    """

    def eps_of(z, logsnr, emb, mask, extra):
        pred = model.apply({"params": params}, z, logsnr, emb, mask, train=False, **extra)
        return parameterization.prediction_to_eps(pred.astype(jnp.float32), z, logsnr, target)

    def denoise(z_t, logsnr, cond):
        emb, mask = cond["text_emb"], cond["text_mask"]
        extra = {k: cond[k] for k in ("lowres", "aug_level") if k in cond}
        if guidance_weight == 1.0:
            return eps_of(z_t, logsnr, emb, mask, extra)
        # One batched call for the conditional and the unconditional halves.
        two = lambda x: jnp.concatenate([x, x], axis=0)
        eps = eps_of(two(z_t), two(logsnr),
                     jnp.concatenate([emb, jnp.zeros_like(emb)], axis=0),
                     jnp.concatenate([mask, jnp.zeros_like(mask)], axis=0),
                     {k: two(v) for k, v in extra.items()})
        eps_cond, eps_uncond = jnp.split(eps, 2, axis=0)
        return guidance.classifier_free_guidance(eps_cond, eps_uncond, guidance_weight)

    return denoise


def make_sample_fn(*, model: nn.Module, config, schedule, encode_tokens: Callable | None
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
                up, aug, jax.random.normal(k_aug, up.shape, jnp.float32))
            cond["aug_level"] = aug
        denoise = make_denoise_fn(model, ema_params, target=config.diffusion.target,
                                  guidance_weight=float(c.guidance_weight))
        noise = jax.random.normal(k_noise, (n, h, w, ch), jnp.float32)
        return samplers.sample(denoise, cond, noise, k_sample, sampler=c.sampler,
                               num_steps=int(c.num_steps), schedule=schedule,
                               threshold=c.threshold, percentile=float(c.percentile))

    return sample
