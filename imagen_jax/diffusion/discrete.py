"""DeepFloyd IF's discrete-time diffusion (diffusers' `DDPMScheduler` as IF configures it).

IF trains on N = 1000 steps of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, eq. 17):

    abar(u) = cos^2(pi/2 (u + 0.008) / 1.008),  beta_i = min(1 - abar((i+1)/N) / abar(i/N), 0.999),
    alphas_cumprod[i] = prod_{j<=i} (1 - beta_j),        i = 0 .. N-1 (float32, like diffusers),

predicts eps in the first C output channels and a learned-range variance interpolation v in
[-1, 1] in the last C (Nichol & Dhariwal §3.1): log var = f log beta_t + (1 - f) log
betatilde_t, f = (v + 1) / 2, with beta_t, betatilde_t of the respaced step t -> prev_t
(`ddpm_step`). It samples with DDPM over a subset of the N steps (`leading_timesteps`, or IF's
named lists), clamps x0 by dynamic thresholding (ratio 0.95, s in [1, 1.5]: Imagen §2.3 with
a cap), and conditions IF-II on a low-res image upsampled bilinearly (align_corners) and
noised at an integer `noise_level` of the same schedule (`augment_lowres`).

For our continuous-time samplers (DDIM, DPM-Solver++, EDM's) the table is a `Schedule`
(`discrete_schedule`): t in [0, 1] is the fractional index u = t (N - 1), logsnr(t) is the
table's log(abar / (1 - abar)) interpolated linearly in u, so every grid time t = i / (N - 1)
is exactly IF's step i and the network reads timestep u.

Images are `[B, H, W, C]` float32 (NHWC); `t`, `prev_t` are integer step indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance, schedules
from imagen_jax.diffusion.schedules import squaredcos_alphas_cumprod as alphas_cumprod

Array = jax.Array
NUM_TRAIN_TIMESTEPS = schedules.SQUAREDCOS_STEPS
VARIANCE_TYPES = ("learned_range", "fixed_small")


def leading_timesteps(num_inference_steps: int, num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """diffusers' "leading" respacing: [k * (N // n) for k = n-1 .. 0] (int64, descending)."""
  if not 0 < num_inference_steps <= num_steps:
    raise ValueError(f"num_inference_steps={num_inference_steps}; allowed: 1 .. {num_steps}")
  ratio = num_steps // num_inference_steps
  return (np.arange(num_inference_steps) * ratio)[::-1].astype(np.int64)


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """The step each respaced step jumps to: the next entry, -1 after the last (abar = 1)."""
  ts = np.asarray(timesteps, np.int64)
  if ts.ndim != 1 or not ts.size or np.any(np.diff(ts) >= 0) or ts[-1] < 0:
    raise ValueError(f"timesteps must be strictly decreasing non-negative steps, got {ts}")
  return np.concatenate([ts[1:], [-1]])


def _abar(table: Array, i: Array) -> Array:
  """alphas_cumprod[i], or 1 for i < 0 (before the first step)."""
  i = jnp.asarray(i)
  return jnp.where(i >= 0, table[jnp.maximum(i, 0)], 1.0)


def ddpm_step(
    model_output: Array,
    sample: Array,
    t: Array,
    prev_t: Array,
    noise: Array,
    *,
    num_steps: int = NUM_TRAIN_TIMESTEPS,
    variance_type: str = "learned_range",
    thresholding: bool = True,
    dynamic_thresholding_ratio: float = 0.95,
    sample_max_value: float | None = 1.5,
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
) -> tuple[Array, Array]:
  """One DDPM step t -> prev_t (`DDPMScheduler.step`, epsilon prediction): (x_prev, x0).

  model_output: [B, H, W, 2C] (eps, v) for learned_range, or [B, H, W, C] eps; sample z_t and
  noise N(0, I): [B, H, W, C]; t, prev_t: integer scalars (prev_t = -1: the last step);
  sample_max_value: the cap on the thresholding s (None = none).
    x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), dynamic-thresholded (or clipped);
    mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) z_t
    with alpha_t = abar_t / abar_prev, beta_t = 1 - alpha_t; x_prev = mean + sigma noise (t > 0),
    log sigma^2 = f log beta_t + (1 - f) log max(betatilde_t, 1e-20), f = (v + 1) / 2,
    betatilde_t = (1 - abar_prev) / (1 - abar_t) beta_t (fixed_small: sigma^2 = betatilde_t).
  """
  if variance_type not in VARIANCE_TYPES:
    raise ValueError(f"variance_type={variance_type!r}; allowed: {VARIANCE_TYPES}")
  c = sample.shape[-1]
  model_output = jnp.asarray(model_output, jnp.float32)
  if variance_type == "learned_range":
    if model_output.shape[-1] != 2 * c:
      raise ValueError(
          f"learned_range needs [.., {2 * c}] outputs (eps, v), got {model_output.shape}"
      )
    eps, v = model_output[..., :c], model_output[..., c:]
  else:
    eps, v = model_output[..., :c], None
  table = jnp.asarray(alphas_cumprod(num_steps))
  abar_t, abar_prev = _abar(table, t), _abar(table, prev_t)
  beta_prod, beta_prod_prev = 1.0 - abar_t, 1.0 - abar_prev
  alpha_t = abar_t / abar_prev
  beta_t = 1.0 - alpha_t
  x0 = (sample - jnp.sqrt(beta_prod) * eps) / jnp.sqrt(abar_t)
  if thresholding:
    x0 = guidance.dynamic_threshold(
        x0, 100.0 * dynamic_thresholding_ratio, max_scale=sample_max_value
    )
  elif clip_sample:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  mean = (jnp.sqrt(abar_prev) * beta_t / beta_prod) * x0 + (
      jnp.sqrt(alpha_t) * beta_prod_prev / beta_prod
  ) * sample
  small = jnp.maximum(beta_prod_prev / beta_prod * beta_t, 1e-20)
  if v is None:
    std = jnp.sqrt(small)
  else:
    frac = (v + 1.0) / 2.0
    std = jnp.exp(0.5 * (frac * jnp.log(beta_t) + (1.0 - frac) * jnp.log(small)))
  prev = mean + jnp.where(jnp.asarray(t) > 0, std * noise, 0.0)
  return prev, x0


def upsample_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
  """torch `F.interpolate(mode="bilinear", align_corners=True)`: [B, h, w, C] -> [B, H, W, C]
  (corner pixels map to corner pixels; output pixel i reads input (i (h-1) / (H-1)))."""
  x = jnp.asarray(x, jnp.float32)

  def axis_weights(n_in, n_out):
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return jnp.asarray(m)

  mh, mw = axis_weights(x.shape[1], size[0]), axis_weights(x.shape[2], size[1])
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("Hh,Ww,bhwc->bHWc", mh, mw, x, precision=hp)


def augment_lowres(
    up: Array, noise_level: Array, noise: Array, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> Array:
  """IF-II's noise conditioning augmentation (`DDPMScheduler.add_noise` at integer
  `noise_level [B]`): sqrt(abar_n) up + sqrt(1 - abar_n) noise, [B, H, W, C]."""
  abar = jnp.asarray(alphas_cumprod(num_steps))[jnp.asarray(noise_level, jnp.int32)]
  abar = abar[:, None, None, None]
  return jnp.sqrt(abar) * up + jnp.sqrt(1.0 - abar) * noise


def noise_level_of(aug_level: Array, num_steps: int = NUM_TRAIN_TIMESTEPS) -> Array:
  """Our aug_level in [0, 1] -> IF's integer noise_level round(aug_level N), at most N - 1
  (IF-II's default 250 is aug_level 0.25)."""
  n = jnp.round(jnp.asarray(aug_level, jnp.float32) * num_steps).astype(jnp.int32)
  return jnp.clip(n, 0, num_steps - 1)


def discrete_schedule(num_steps: int = NUM_TRAIN_TIMESTEPS) -> schedules.Schedule:
  """IF's table as a `Schedule` (`schedules.get_schedule("squaredcos_cap_v2")`)."""
  return schedules.get_schedule("squaredcos_cap_v2", num_steps=int(num_steps))


def sample(
    model_fn,
    cond,
    noise: Array,
    rng: Array,
    *,
    timesteps: tuple[int, ...],
    num_steps: int = NUM_TRAIN_TIMESTEPS,
    **step_kw,
) -> Array:
  """IF's DDPM sampling loop over `timesteps` (descending ints, e.g. `leading_timesteps(100)`),
  one `jax.lax.scan`: z <- ddpm_step(model_fn(z, t [B], cond), z, t, prev_t, n_t).

  model_fn(z_t [B,H,W,C], t float32 [B], cond) -> [B, H, W, 2C] (guided eps, v): IF's
  pipeline guides eps and keeps the conditional half's v. `rng`: one key or `[B]` typed keys
  (one noise stream per sample). Returns x0 of the last step = the sample, [B, H, W, C].
  """
  ts = np.asarray(timesteps, np.int64)
  prev = previous_timesteps(ts)
  per_sample = jnp.ndim(rng) == 1 and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)

  def draw(i):
    if per_sample:
      return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(rng)
    return jax.random.normal(jax.random.fold_in(rng, i), noise.shape)

  def body(z, xs):
    i, t, p = xs
    out = model_fn(z, jnp.full((z.shape[0],), t, jnp.float32), cond)
    z, _ = ddpm_step(out, z, t, p, draw(i), num_steps=num_steps, **step_kw)
    return z, None

  xs = (jnp.arange(len(ts)), jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32))
  z, _ = jax.lax.scan(body, jnp.asarray(noise, jnp.float32), xs)
  return z
