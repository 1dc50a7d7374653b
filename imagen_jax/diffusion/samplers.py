"""Reverse-process samplers: DDPM ancestral, DDIM(eta), DPM-Solver++(2M) (Imagen App. A), and
EDM's Heun and Euler ancestral (Karras et al. 2022; :mod:`imagen_jax.diffusion.karras`).

Every sampler talks to the network through one contract,

    DenoiseFn(z_t [B, H, W, C], logsnr [B], cond) -> eps_hat [B, H, W, C],

(classifier-free guidance and SR low-res conditioning are wrapped into ``denoise_fn`` by the
caller). Each step turns eps_hat into x0_hat = (z_t - sigma_t eps_hat) / alpha_t, applies the
thresholding choice to x0_hat (Imagen §2.3), recomputes the eps consistent with the thresholded
x0_hat, and moves from time t to the next grid time s < t. All choices of a run live in one
frozen, hashable :class:`SamplerSettings` (a static ``jax.jit`` argument), as in k-diffusion's
sampler functions: the solver, the step count, the time grid, thresholding.

Notation: lambda = logsnr, alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), and for s < t
    c = 1 - exp(lambda_t - lambda_s) = -expm1(lambda_t - lambda_s)  in (0, 1],
so that for the continuous-time VP process (Kingma et al. 2021, "VDM", App. A)
    q(z_s | z_t, x) = N(alpha_s x + sigma_s sqrt(1 - c) eps(z_t, x),  sigma_s^2 c I).

Time grid (the paper is silent; a setting, see :func:`time_grid`): ``num_steps + 1`` times
t_0 = t_max > ... > t_N = t_min, uniform in t ("uniform_t"), uniform in logSNR
("logsnr_uniform") or EDM's rho = 7 grid in sigma / alpha ("karras", which starts at
sigma / alpha = 80, below t_max). Step i calls the network at t_i and moves to t_{i+1}; the last
step lands on t_N as if sigma(t_min) were 0, i.e. it returns the (thresholded) x0 prediction,
the clean image "at t_min" (DDPM's last step outputs its mean, Ho et al. 2020; DPM-Solver's
"denoise to zero", Lu et al. 2022; EDM's sigma_N = 0). So a sampler costs ``num_steps`` network
calls, except Heun: 2 per step but the last, ``2 num_steps - 1``
(:attr:`SamplerSettings.network_calls`). The start is z = noise ~ N(0, I), exact up to
alpha(t_0)^2 (2e-9 for the cosine schedule at t_max = 1; 1.6e-4 at the Karras grid's start).

Choosing the grid. The output is the posterior mean E[x0 | z_{t_{N-1}}] of the last network
call, so it lacks Var(x0 | z_{t_{N-1}}); on top of that each solver has its own discretisation
error. For Gaussian data (std 0.25; tests/test_samplers.py's exact float64 recursion) the
output std is off by, at 25 steps:

    schedule     sampler    uniform_t  logsnr_uniform  karras
    cosine       dpmpp_2m     -1.2%       +3.0%       +3.6%
    cosine       ddim (eta=0) -10%        -18%        -12%
    linear_beta  dpmpp_2m     -13%        +2.0%       +3.6%
    linear_beta  ddim (eta=0) -20%        -14%        -12%
    either       heun           -           -         +3.3% (49 calls; 13 steps = 25 calls: +15%)

On uniform_t, linear_beta's last call is at t = 1/N, logsnr 3.9 (cosine: 5.5), hence its bias;
the logSNR-uniform grid ends at the schedule's logsnr_max (20), which removes it, but spends
fewer steps where cosine's first-order DDIM/DDPM need them. So: uniform_t for cosine,
logsnr_uniform for linear_beta with DPM-Solver++(2M) (the SR1024 stage at few steps). The karras
grid spans sigma / alpha in [0.002, 80] on both schedules, so it behaves the same on both; at
equal network calls Heun is behind DPM-Solver++(2M) on this data.

The reverse loop is one ``jax.lax.scan`` over the grid: one compile whatever ``num_steps``.
To reuse that compile across calls, jit the caller with the params as arguments, e.g.

    @functools.partial(jax.jit, static_argnames=("settings",))
    def run(params, cond, noise, rng, settings):
      fn = make_denoise_fn(model, params, ...)          # closes over traced params
      return sample(fn, cond, noise, rng, schedule=sched, settings=settings)

    run(params, cond, noise, rng, SamplerSettings(sampler="dpmpp_2m", num_steps=25))

float32 note: at t_max = 1 (logsnr -20) x0_hat = (z - sigma eps_hat) / alpha divides by
alpha = 4.5e-5, so the first x0_hat carries ~1e-3 absolute rounding error. It is harmless
(the step multiplies it by alpha_s, and thresholding clips it) except for ``num_steps=1``,
whose output *is* that x0_hat; this is inherent to eps-prediction, not to the sampler.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import editing, karras
from imagen_jax.diffusion.guidance import THRESHOLD_MODES, apply_threshold, check_percentile
from imagen_jax.diffusion.parameterization import eps_to_x0, x0_to_eps
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, get_schedule
from imagen_jax.diffusion.static import static_real

Array = jax.Array
DenoiseFn = Callable[[Array, Array, Any], Array]
# callback({"i", "t", "logsnr", "x", "denoised"}) -> None; see :func:`sample`.
Callback = Callable[[dict], None]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "heun", "euler_ancestral")
# Samplers whose step reads earlier steps (no RePaint resampling: a redone step has no history).
MULTISTEP_SAMPLERS = ("dpmpp_2m",)
TIME_GRIDS = ("uniform_t", "logsnr_uniform", "karras")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to run the reverse process; frozen and hashable, so a static ``jax.jit`` argument.

  Attributes:
    sampler: "ddpm" (ancestral, :func:`ddpm_step`), "ddim" (:func:`ddim_step`), "dpmpp_2m"
      (DPM-Solver++(2M), :func:`dpmpp_2m_step`), "heun" (EDM's 2nd-order solver,
      :func:`karras.heun_step`) or "euler_ancestral" (k-diffusion's; exactly DDIM with eta = 1,
      see :mod:`karras`).
    num_steps: number of steps N, int >= 1 (network calls: :attr:`network_calls`).
    eta: DDIM stochasticity in [0, 1] (0 = deterministic DDIM, 1 = DDPM variance); "ddim" only.
    gamma: DDPM variance interpolation in [0, 1] (0 = posterior variance, 1 = forward
      variance; Imagen App. A); "ddpm" only.
    threshold: "none", "static" or "dynamic", applied to x0_hat at every step (Imagen §2.3).
    percentile: dynamic-thresholding percentile in (0, 100] (paper: 99.5); below 1 with
      threshold="dynamic" gives a ``guidance.PercentileScaleWarning`` (0-100 scale, not 0-1).
    max_scale: optional cap c >= 1 on the dynamic-thresholding s (DeepFloyd IF); None = none.
    time_grid: "uniform_t", "logsnr_uniform" or "karras" (see :func:`time_grid`); any sampler.
    t_min, t_max: ends of the time grid, 0 <= t_min < t_max <= 1.
    sigma_min, sigma_max, rho: the "karras" grid's range in sigma / alpha and its exponent
      (Karras et al. 2022, Eq. 5; defaults EDM's 0.002, 80, 7); only with time_grid="karras".
  """

  sampler: str = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  gamma: float = 0.0
  threshold: str = "dynamic"
  percentile: float = 99.5
  max_scale: Optional[float] = None
  time_grid: str = "uniform_t"
  t_min: float = 0.0
  t_max: float = 1.0
  sigma_min: float = karras.SIGMA_MIN
  sigma_max: float = karras.SIGMA_MAX
  rho: float = karras.RHO

  def __post_init__(self):
    def put(name, value):  # normalise to Python scalars: stable hashing and equality
      object.__setattr__(self, name, value)

    if self.sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {SAMPLERS}")
    n = self.num_steps
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
      raise ValueError(f"num_steps must be a static int >= 1, got {n!r}")
    put("num_steps", int(n))
    eta = static_real("eta", self.eta, "in [0, 1]")
    if not 0.0 <= eta <= 1.0:
      raise ValueError(
          f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM variance), got {eta}"
      )
    if eta != 0.0 and self.sampler != "ddim":
      raise ValueError(f"eta={eta} is DDIM's stochasticity; sampler {self.sampler!r} needs eta=0")
    put("eta", eta)
    gamma = static_real("gamma", self.gamma, "in [0, 1]")
    if not 0.0 <= gamma <= 1.0:
      raise ValueError(
          f"gamma must be in [0, 1] (0 = posterior, 1 = forward variance), got {gamma}"
      )
    if gamma != 0.0 and self.sampler != "ddpm":
      raise ValueError(
          f"gamma={gamma} is DDPM's variance knob; sampler {self.sampler!r} needs gamma=0"
      )
    put("gamma", gamma)
    if self.threshold not in THRESHOLD_MODES:
      raise ValueError(f"unknown threshold mode {self.threshold!r}; allowed: {THRESHOLD_MODES}")
    # Warn only where the percentile is used; stacklevel 4 (check_percentile, __post_init__,
    # __init__) names the line that builds the settings.
    dynamic = self.threshold == "dynamic"
    put("percentile", check_percentile(self.percentile, warn=dynamic, stacklevel=4))
    if self.max_scale is not None:
      max_scale = static_real("max_scale", self.max_scale, ">= 1 or None")
      if not max_scale >= 1.0:
        raise ValueError(
            f"max_scale must be >= 1 or None (s is clipped to [1, max_scale]), got {max_scale}"
        )
      put("max_scale", max_scale)
    if self.time_grid not in TIME_GRIDS:
      raise ValueError(f"unknown time_grid {self.time_grid!r}; allowed: {TIME_GRIDS}")
    t_min = static_real("t_min", self.t_min, "in [0, 1)")
    t_max = static_real("t_max", self.t_max, "in (0, 1]")
    if not 0.0 <= t_min < t_max <= 1.0:
      raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    put("t_min", t_min)
    put("t_max", t_max)
    defaults = {"sigma_min": karras.SIGMA_MIN, "sigma_max": karras.SIGMA_MAX, "rho": karras.RHO}
    for name, default in defaults.items():
      value = static_real(name, getattr(self, name), "> 0")
      if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
      if value != default and self.time_grid != "karras":
        raise ValueError(
            f"{name}={value} is the karras grid's; time_grid {self.time_grid!r} needs "
            f"{name}={default}"
        )
      put(name, value)
    if not self.sigma_min < self.sigma_max:
      raise ValueError(f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

  @property
  def needs_noise(self) -> bool:
    """Whether the sampler draws fresh noise at every step (then ``sample`` needs an rng)."""
    return self.sampler in ("ddpm", "euler_ancestral") or (
        self.sampler == "ddim" and self.eta != 0.0
    )

  @property
  def network_calls(self) -> int:
    """Network evaluations per sample: ``num_steps``, or ``2 num_steps - 1`` for Heun."""
    return 2 * self.num_steps - 1 if self.sampler == "heun" else self.num_steps


def _as_schedule(schedule: Union[Schedule, str]) -> Schedule:
  return get_schedule(schedule) if isinstance(schedule, str) else schedule


def time_grid(schedule: Union[Schedule, str], settings: SamplerSettings) -> Array:
  """The sampler's ``num_steps + 1`` times, from ``t_max`` down to ``t_min`` (float32 ``[N+1]``).

      "uniform_t":       t_i = t_max + (i / N) (t_min - t_max)
      "logsnr_uniform":  t_i = t_fn(lambda_max' + (i / N) (lambda_min' - lambda_max')),
                         lambda_max' = logsnr(t_max),  lambda_min' = logsnr(t_min),
      "karras":          Karras et al. 2022 Eq. 5 in sigma / alpha (:func:`karras.karras_time_grid`),

  i = 0..N, with the schedule's ``logsnr_fn`` and its inverse ``t_fn``. At t_min = 0 the
  schedules give their finite clip logsnr_max (20), so the logSNR grid ends there; a schedule
  whose logsnr is infinite at t_min is rejected. The last point is never a network call (the
  last step returns x0_hat), so only its logsnr's role as the end of the grid matters.
  """
  schedule = _as_schedule(schedule)
  n, t_min, t_max = settings.num_steps, settings.t_min, settings.t_max
  if settings.time_grid == "uniform_t":
    return jnp.linspace(jnp.float32(t_max), jnp.float32(t_min), n + 1, dtype=jnp.float32)
  if settings.time_grid == "karras":
    return karras.karras_time_grid(
        schedule,
        n,
        t_min=t_min,
        t_max=t_max,
        sigma_min=settings.sigma_min,
        sigma_max=settings.sigma_max,
        rho=settings.rho,
    )
  # The ends are constants of the static settings: evaluate them now to check them.
  with jax.ensure_compile_time_eval():
    ends = np.asarray(schedule.logsnr_fn(jnp.asarray([t_max, t_min], jnp.float32)))
  if not np.all(np.isfinite(ends)):
    raise ValueError(
        f"time_grid='logsnr_uniform' needs a finite logsnr at t_max={t_max} and t_min={t_min}; "
        f"the schedule gives {ends.tolist()} (clip it at a logsnr_max)"
    )
  logsnrs = jnp.linspace(jnp.float32(ends[0]), jnp.float32(ends[1]), n + 1, dtype=jnp.float32)
  ts = jnp.asarray(schedule.t_fn(logsnrs), jnp.float32)
  # The ends exactly (t_fn o logsnr_fn is the identity only to float32 rounding).
  return ts.at[0].set(t_max).at[-1].set(t_min)


def predict_x0_eps(
    denoise_fn: DenoiseFn,
    z_t: Array,
    logsnr_t: Array,
    cond: Any,
    *,
    threshold: str = "dynamic",
    percentile: float = 99.5,
    max_scale: Optional[float] = None,
) -> tuple[Array, Array]:
  """Call the network once and return the thresholded x0_hat and the eps consistent with it.

      eps_hat = denoise_fn(z_t, lambda_t, cond);  x0_hat = T((z_t - sigma_t eps_hat) / alpha_t)
      eps_hat <- (z_t - alpha_t x0_hat) / sigma_t            (only if T is not the identity)

  Args:
    z_t: ``[B, H, W, C]``; logsnr_t: scalar (shared by the batch; passed to the net as ``[B]``).
  Returns:
    (x0_hat, eps_hat), each ``[B, H, W, C]`` float32.
  """
  batch = z_t.shape[0]
  logsnr_b = jnp.full((batch,), logsnr_t, jnp.float32)
  eps = jnp.asarray(denoise_fn(z_t, logsnr_b, cond), jnp.float32)
  if eps.shape != z_t.shape:
    raise ValueError(f"denoise_fn must return eps_hat shaped like z_t {z_t.shape}, got {eps.shape}")
  x0 = eps_to_x0(eps, z_t, logsnr_t)
  if threshold != "none":
    x0 = apply_threshold(x0, threshold, percentile, max_scale=max_scale)
    eps = x0_to_eps(x0, z_t, logsnr_t)
  return x0, eps


def _reverse_c(logsnr_t: Array, logsnr_s: Array) -> Array:
  """c = 1 - SNR(t)/SNR(s) = -expm1(lambda_t - lambda_s), in (0, 1] for s < t."""
  return -jnp.expm1(logsnr_t - logsnr_s)


def ddim_step(
    z_t: Array,
    x0_hat: Array,
    eps_hat: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    eta,
    noise: Optional[Array],
) -> Array:
  """One DDIM step t -> s (Song et al. 2021, "DDIM", Eq. 12 and 16, in continuous time):

      z_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std * noise,
      std = eta * sigma_s * sqrt(c),     c = 1 - exp(lambda_t - lambda_s).

  eta = 0 is the deterministic DDIM (the probability-flow ODE's first-order solver); eta = 1
  gives std^2 = sigma_s^2 c, the DDPM posterior variance (see :func:`ddpm_step`).
  Shapes: tensors ``[B, H, W, C]``; logsnr_t, logsnr_s, eta scalars; ``noise`` may be None
  when eta is statically 0.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  c = _reverse_c(logsnr_t, logsnr_s)
  eta = jnp.asarray(eta, jnp.float32)
  dir_coef = sigma_s * jnp.sqrt(jnp.maximum(1.0 - eta * eta * c, 0.0))
  z_s = alpha_s * x0_hat + dir_coef * eps_hat
  if noise is None:
    return z_s
  return z_s + eta * sigma_s * jnp.sqrt(c) * noise


def ddpm_step(
    z_t: Array,
    x0_hat: Array,
    eps_hat: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    noise: Array,
    gamma=0.0,
) -> Array:
  """One DDPM ancestral step t -> s (Ho et al. 2020; continuous-time VP as in VDM App. A):

      z_s ~ N(mu, std^2 I),  mu = alpha_s x0_hat + sigma_s sqrt(1 - c) eps_hat
                               = alpha_s (1 - c) z_t / alpha_t + alpha_s c x0_hat,
      std^2 = (sigma_s^2 c)^(1 - gamma) * (sigma_t^2 c)^gamma.

  gamma = 0 is the true posterior variance q(z_s | z_t, x0_hat) (Ho et al.'s sigma~^2);
  gamma = 1 the forward variance sigma_{t|s}^2 = sigma_t^2 c (Ho et al.'s beta_t); in between,
  the log-space interpolation of Nichol & Dhariwal 2021 Eq. 15, Imagen App. A's "stochasticity"
  knob. ``eps_hat`` must be consistent with ``x0_hat`` and ``z_t``; then the two forms of mu
  agree (the first avoids dividing by alpha_t ~ 4.5e-5 at t = 1).
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  c = _reverse_c(logsnr_t, logsnr_s)
  mean = alpha_s * x0_hat + sigma_s * jnp.sqrt(1.0 - c) * eps_hat
  gamma = jnp.asarray(gamma, jnp.float32)
  std = jnp.sqrt(c) * sigma_s ** (1.0 - gamma) * sigma_t**gamma
  return mean + std * noise


def dpmpp_2m_step(
    z_t: Array,
    x0_hat: Array,
    x0_prev: Array,
    logsnr_prev: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    first: Array,
) -> Array:
  """One DPM-Solver++(2M) step t -> s, data-prediction form (Lu et al. 2022, Alg. 2).

  Lu et al.'s lambda is log(alpha / sigma) = logsnr / 2, hence the halves:

      h = (lambda_s - lambda_t) / 2,  h_prev = (lambda_t - lambda_prev) / 2,  r = h_prev / h,
      D = (1 + 1/(2r)) x0_hat(t) - 1/(2r) x0_hat(prev)     (first step: D = x0_hat(t)),
      z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D.

  With D = x0_hat this is exactly DDIM(eta=0). Shapes: tensors ``[B, H, W, C]``; logsnrs and
  ``first`` (bool: no previous x0_hat yet) are scalars.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  h = 0.5 * (logsnr_s - logsnr_t)
  h_prev = jnp.where(first, h, 0.5 * (logsnr_t - logsnr_prev))  # placeholder avoids 1/0
  k = jnp.where(first, 0.0, 0.5 * h / h_prev)  # k = 1 / (2 r)
  d = (1.0 + k) * x0_hat - k * x0_prev
  return (sigma_s / sigma_t) * z_t - alpha_s * jnp.expm1(-h) * d


def sample(
    denoise_fn: DenoiseFn,
    cond: Any,
    noise: Array,
    rng: Optional[Array],
    *,
    schedule: Union[Schedule, str],
    settings: SamplerSettings,
    callback: Optional[Callback] = None,
    init_image: Optional[Array] = None,
    mask: Optional[Array] = None,
    edit: Optional[editing.EditSettings] = None,
) -> Array:
  """Draw x0 ~ p(x0 | cond) by running the reverse process from z = noise (Imagen App. A).

  Or edit ``init_image`` (:mod:`imagen_jax.diffusion.editing`): with ``edit.strength`` < 1 the
  grid runs from t_start = strength * t_max (SDEdit); with ``init_image`` the loop starts from
  z = alpha(t_0) x + sigma(t_0) noise; with ``mask`` every step's output keeps the known region
  re-noised to its time (RePaint), each step run ``edit.resample_steps`` times.

  Args:
    denoise_fn: ``DenoiseFn(z_t, logsnr [B], cond) -> eps_hat`` (may itself be jitted).
    cond: any pytree, passed through to ``denoise_fn`` unchanged.
    noise: the initial z at t_max, N(0, I), ``[B, H, W, C]``.
    rng: PRNG key for the stochastic samplers (step i uses ``fold_in(rng, i)``), or a ``[B]``
      array of typed keys (``jax.random.key``), one stream per sample, so that a sample's noise
      does not depend on the batch it is drawn in; unused (and may be None) unless
      ``settings.needs_noise`` ("ddpm", "euler_ancestral", or "ddim" with eta > 0).
    schedule: a :class:`Schedule` or a schedule name for :func:`get_schedule`. Static.
    settings: the :class:`SamplerSettings`. Static.
    callback: optional ``callback(info)``, called on the host once per step (k-diffusion's
      convention) with ``info = {"i": step, "t": t_i, "logsnr": lambda_i, "x": z_{t_i},
      "denoised": x0_hat}`` as numpy arrays (``x``, ``denoised``: ``[B, H, W, C]``; the
      others scalars); ``denoised`` is the thresholded x0 prediction of step i. It runs
      through ``jax.debug.callback`` (unordered: use ``info["i"]``, not the call order); with
      None nothing is added to the program. Static. With resampling, ``i`` counts network
      calls.
    init_image: optional ``[B, H, W, C]`` in [-1, 1], the image to edit (traced).
    mask: optional ``[B, H, W, 1]`` (or ``[B, H, W, C]``) in [0, 1], 1 = known (kept), 0 =
      regenerated (imagen-pytorch's ``inpaint_masks``); needs ``init_image`` and ``rng`` (the
      known region is re-noised with fresh noise at every step). Traced.
    edit: :class:`editing.EditSettings` (strength, resample_steps), default none. Static.
  Returns:
    x0 ``[B, H, W, C]`` float32: the thresholded x0 prediction of the last step (with a mask:
    ``init_image`` where mask = 1).
  """
  if not isinstance(settings, SamplerSettings):
    raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable or None, got {callback!r}")
  schedule = _as_schedule(schedule)
  z = jnp.asarray(noise, jnp.float32)
  if z.ndim < 2:
    raise ValueError(f"noise must be [B, ...] (batch first), got shape {z.shape}")
  edit = editing.check_edit(edit, init_image, mask, settings.sampler, MULTISTEP_SAMPLERS)
  settings = editing.sdedit_settings(settings, edit.strength)
  if init_image is not None:
    init_image = editing.check_init_image(init_image, z.shape)
  if mask is not None:
    mask = editing.check_mask(mask, z.shape)
    if rng is None:
      raise ValueError(
          "inpainting re-noises the known region at every step: pass a PRNG key as rng"
      )
  needs_noise = settings.needs_noise or mask is not None
  if needs_noise and rng is None:
    raise ValueError(
        f"sampler {settings.sampler!r} (eta={settings.eta}) draws noise at every step: pass a "
        f"PRNG key as rng"
    )
  per_sample = (
      needs_noise and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim > 0
  )
  if per_sample and rng.shape != z.shape[:1]:
    raise ValueError(
        f"rng must be one PRNG key or [B] = [{z.shape[0]}] typed keys (one per "
        f"sample), got keys of shape {rng.shape}"
    )
  return _reverse_loop(
      denoise_fn,
      schedule,
      settings,
      callback,
      per_sample,
      cond,
      z,
      rng,
      (init_image, mask, edit.resample_steps),
  )


# Deliberately not jitted here: a jit with `denoise_fn` as a static argument would keep every
# denoise_fn -- and the network params it closes over -- alive in jit's cache, and embed those
# params as constants in the program. Callers that sample repeatedly jit `sample` themselves
# with params as traced arguments (see the module docstring); eager calls compile the scan
# once per call.
def _reverse_loop(denoise_fn, schedule, settings, callback, per_sample, cond, z, rng, edit):
  """The scan of :func:`sample` (arguments already validated; see there).

  ``edit = (init_image | None, mask | None, resample_steps)``: the SDEdit start and the
  post-step hook (:func:`_edit_hook`).
  """
  sampler, num_steps = settings.sampler, settings.num_steps
  needs_noise = settings.needs_noise
  ts = time_grid(schedule, settings)  # [N + 1]
  logsnrs = schedule.logsnr_fn(ts)
  steps = jnp.arange(num_steps, dtype=jnp.int32)
  is_last = steps == num_steps - 1
  # Euler ancestral is DDIM with eta = 1 (see karras' module docstring).
  eta = jnp.float32(1.0 if sampler == "euler_ancestral" else settings.eta)
  gamma = jnp.float32(settings.gamma)
  init_image, mask, resample_steps = edit
  hook = _edit_hook(mask, init_image, resample_steps, rng, per_sample)

  def predict(z, logsnr):
    return predict_x0_eps(
        denoise_fn,
        z,
        logsnr,
        cond,
        threshold=settings.threshold,
        percentile=settings.percentile,
        max_scale=settings.max_scale,
    )

  def step(carry, xs):
    z_t, x0_prev, logsnr_prev = carry
    i, t, logsnr_t, logsnr_s, last = xs[:5]
    renoise = xs[5] if len(xs) > 5 else False  # RePaint: go back to t after this call
    x0_hat, eps_hat = predict(z_t, logsnr_t)
    if callback is not None:
      jax.debug.callback(
          lambda *a: callback(dict(zip(("i", "t", "logsnr", "x", "denoised"), a))),
          i,
          t,
          logsnr_t,
          z_t,
          x0_hat,
      )
    step_noise = None
    if needs_noise and per_sample:
      step_noise = jax.vmap(
          lambda k: jax.random.normal(jax.random.fold_in(k, i), z_t.shape[1:], jnp.float32)
      )(rng)
    elif needs_noise:
      step_noise = jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, jnp.float32)
    if sampler == "ddpm":
      z_s = ddpm_step(z_t, x0_hat, eps_hat, logsnr_t, logsnr_s, step_noise, gamma)
    elif sampler in ("ddim", "euler_ancestral"):
      z_s = ddim_step(z_t, x0_hat, eps_hat, logsnr_t, logsnr_s, eta, step_noise)
    elif sampler == "heun":
      z_s = karras.heun_step(predict, z_t, x0_hat, eps_hat, logsnr_t, logsnr_s, last)
    else:
      z_s = dpmpp_2m_step(z_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, i == 0)
    # Final step "to x0": sigma(t_min) is taken as 0, so z_s is the x0 prediction itself.
    z_s = jnp.where(last, x0_hat, z_s)
    if hook is not None:
      z_s = hook(z_s, i, logsnr_t, logsnr_s, last, renoise)
    return (z_s, x0_hat, logsnr_t), None

  if init_image is not None:  # SDEdit: start from the noised image at the grid's first time
    z = editing.sdedit_start(init_image, logsnrs[0], z)
  init = (z, jnp.zeros_like(z), logsnrs[0])
  xs = (steps, ts[:-1], logsnrs[:-1], logsnrs[1:], is_last)
  if resample_steps > 1:  # RePaint: each step r times; xs[0] becomes the network call's index
    grid_step, back = editing.resample_plan(num_steps, resample_steps)
    calls = jnp.arange(len(grid_step), dtype=jnp.int32)
    xs = (calls,) + tuple(a[grid_step] for a in xs[1:]) + (jnp.asarray(back),)
  (x0, _, _), _ = jax.lax.scan(step, init, xs)
  return x0


def _edit_hook(mask, init_image, resample_steps, rng, per_sample):
  """The post-step hook of an inpainting run, or None: ``hook(z_s, i, logsnr_t, logsnr_s,
  last, renoise) -> z_s`` keeps the known region (:func:`editing.replace_known`) and, where
  ``renoise``, goes back to t (:func:`editing.renoise`). Its noise is ``fold_in(fold_in(key,
  i), stream)``, apart from the samplers' ``fold_in(key, i)`` (per sample for ``[B]`` keys)."""
  if mask is None:
    return None

  def normal(i, stream, shape):
    def draw(key, shape):
      return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), stream), shape)

    return jax.vmap(lambda k: draw(k, shape[1:]))(rng) if per_sample else draw(rng, shape)

  def hook(z_s, i, logsnr_t, logsnr_s, last, renoise):
    z_s = editing.replace_known(z_s, init_image, mask, logsnr_s, normal(i, 1, z_s.shape), last)
    if resample_steps > 1:
      back = editing.renoise(z_s, logsnr_s, logsnr_t, normal(i, 2, z_s.shape))
      z_s = jnp.where(renoise, back, z_s)
    return z_s

  return hook
