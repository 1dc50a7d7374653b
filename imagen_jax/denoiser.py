"""(network, params, stage settings) -> DenoiseFn, with classifier-free guidance built in.

The samplers speak one contract (`imagen_jax.diffusion.samplers`):

    DenoiseFn(z_t [B, H, W, C], logsnr [B], cond) -> eps_hat [B, H, W, C].

A network predicts in its stage's target space (eps as in the paper, or v / x0 where a stage's
config says so); :func:`make_denoise_fn` converts that to eps and applies classifier-free
guidance (Imagen §2.2, eq. in §4.1):

    eps_tilde = w * eps(z_t, c) + (1 - w) * eps(z_t, null),     w = guidance_weight,

with the conditional and unconditional halves in ONE batched forward pass of size 2B (the
"null" text is all-zero embeddings with an all-False mask, exactly what training uses when it
drops the text with p = 0.1; a negative prompt replaces it when `cond` carries
`uncond_text_emb` / `uncond_text_mask`, `uncond_text`). Guidance in eps space equals guidance in x0 or v space: the
conversions are affine in the prediction with coefficients shared by both halves.

`cond` is a dict: `text_emb [B, L, D]`, `text_mask bool [B, L]`, and for SR stages `lowres`
(the low-res image already upsampled to z_t's size and noise-augmented, [B, H, W, C]) and
`aug_level [B]` (Imagen §2.4, App. D.2).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import parameterization, schedules

Array = jax.Array


def null_text(text_emb: Array, text_mask: Array) -> tuple[Array, Array]:
  """The null text of classifier-free guidance (§2.2): zero embeddings `[B, L, D]` and an
  all-False mask `[B, L]`; training drops the text to it (`stage.Stage.drop_text`)."""
  return jnp.zeros_like(text_emb), jnp.zeros_like(text_mask, dtype=bool)


def uncond_text(cond: Mapping[str, Any], text_emb: Array, text_mask: Array) -> tuple[Array, Array]:
  """The unconditional branch's text: a negative prompt's embedding when `cond` has one
  (`uncond_text_emb [B, L, D]`, `uncond_text_mask [B, L]`), else the null text."""
  if "uncond_text_emb" in cond:
    emb, mask = cond["uncond_text_emb"], cond["uncond_text_mask"].astype(bool)
    if emb.shape != text_emb.shape or mask.shape != text_mask.shape:
      raise ValueError(
          f"negative prompt embeddings {emb.shape} / mask {mask.shape} must match the prompts' "
          f"{text_emb.shape} / {text_mask.shape}"
      )
    return emb, mask
  return null_text(text_emb, text_mask)


def make_deepfloyd_model_fn(model, params, *, guidance_weight=1.0, num_steps: int = 1000):
  """IF's guided model function for `diffusion.discrete.sample`: `fn(z_t, t [B], cond) ->
  [B, H, W, 2C]` = (eps_uncond + w (eps_cond - eps_uncond), v_cond), IF's pipeline's guidance
  (the learned-range v of the conditional half). `model` is an `nn.deepfloyd.IFDenoiser`
  (called with `full_output=True`); t is IF's integer step, given to it as its logsnr."""
  full = model.clone(full_output=True)
  static_no_guidance = isinstance(guidance_weight, (int, float)) and guidance_weight == 1.0

  def network(z, logsnr, emb, mask, lowres, aug):
    return full.apply(
        {"params": params}, z, logsnr, emb, mask, lowres=lowres, aug_level=aug, train=False
    ).astype(jnp.float32)

  def fn(z_t, t, cond):
    logsnr = schedules.squaredcos_logsnr(t / (num_steps - 1), num_steps)
    emb, mask = cond["text_emb"], cond["text_mask"].astype(bool)
    lowres, aug = cond.get("lowres"), cond.get("aug_level")
    if static_no_guidance:
      return network(z_t, logsnr, emb, mask, lowres, aug)
    u_emb, u_mask = uncond_text(cond, emb, mask)
    double = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=0)  # noqa: E731
    out = network(
        double(z_t, z_t),
        double(logsnr, logsnr),
        double(emb, u_emb),
        double(mask, u_mask),
        double(lowres, lowres),
        double(aug, aug),
    )
    out_c, out_u = jnp.split(out, 2, axis=0)
    c = z_t.shape[-1]
    eps = guidance_lib.classifier_free_guidance(out_c[..., :c], out_u[..., :c], guidance_weight)
    return jnp.concatenate([eps, out_c[..., c:]], axis=-1)

  return fn


def make_denoise_fn(
    model, params, *, target: str, guidance_weight: float = 1.0, guidance_rescale: float = 0.0
) -> Callable[[Array, Array, Mapping[str, Any]], Array]:
  """Wrap a network into a guided `DenoiseFn` (Imagen §2.2).

  Args:
    model: a Flax module called as `model.apply({'params': params}, z_t, logsnr, text_emb,
      text_mask, lowres=..., aug_level=..., train=False)` (see `imagen_jax.nn.unet`).
    params: the network's params (EMA params for sampling).
    target: what the network predicts: "eps", "v" or "x0".
    guidance_weight: the paper's w; 1 = no guidance (one forward of size B), 0 = unconditional.
      May be a traced scalar (so sweeps reuse one compile); a Python 1.0 skips the null half;
      or a function `w(logsnr [B]) -> [B]` (a per-step schedule, `guidance.guidance_weight_at`).
    guidance_rescale: CFG rescale phi in [0, 1] (`guidance.rescale_guidance`); 0 = off.
  Returns:
    `denoise_fn(z_t, logsnr, cond) -> eps_hat`, float32 `[B, H, W, C]`.
  """
  if target not in parameterization.TARGETS:
    raise ValueError(f"unknown prediction target {target!r}; allowed: {parameterization.TARGETS}")
  static_no_guidance = isinstance(guidance_weight, (int, float)) and guidance_weight == 1.0

  def network(z_t, logsnr, text_emb, text_mask, lowres, aug_level):
    pred = model.apply(
        {"params": params},
        z_t,
        logsnr,
        text_emb,
        text_mask,
        lowres=lowres,
        aug_level=aug_level,
        train=False,
    )
    return parameterization.prediction_to_eps(pred.astype(jnp.float32), z_t, logsnr, target)

  def denoise_fn(z_t: Array, logsnr: Array, cond: Mapping[str, Any]) -> Array:
    text_emb, text_mask = cond["text_emb"], cond["text_mask"].astype(bool)
    lowres, aug_level = cond.get("lowres"), cond.get("aug_level")
    if static_no_guidance:
      return network(z_t, logsnr, text_emb, text_mask, lowres, aug_level)
    null_emb, null_mask = uncond_text(cond, text_emb, text_mask)
    double = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=0)
    eps_both = network(
        double(z_t, z_t),
        double(logsnr, logsnr),
        double(text_emb, null_emb),
        double(text_mask, null_mask),
        double(lowres, lowres),
        double(aug_level, aug_level),
    )
    eps_cond, eps_uncond = jnp.split(eps_both, 2, axis=0)
    w = guidance_weight(logsnr) if callable(guidance_weight) else guidance_weight
    eps = guidance_lib.classifier_free_guidance(eps_cond, eps_uncond, w)
    return guidance_lib.rescale_guidance(eps, eps_cond, z_t, logsnr, guidance_rescale)

  return denoise_fn
