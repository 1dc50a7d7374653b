"""Pure-jnp diffusion math (float32, no nn.Module, imports nothing else from the project).

See docs/interfaces.md for the contracts; Imagen App. A for the process.
"""

from imagen_jax.diffusion.forward import noise_condition_augment, q_sample, upsample_lowres
from imagen_jax.diffusion.guidance import (
    apply_threshold,
    classifier_free_guidance,
    dynamic_threshold,
    static_threshold,
)
from imagen_jax.diffusion.losses import diffusion_loss
from imagen_jax.diffusion.parameterization import (
    prediction_to_eps,
    prediction_to_v,
    prediction_to_x0,
)
from imagen_jax.diffusion.samplers import DenoiseFn, SamplerSettings, sample, time_grid
from imagen_jax.diffusion.schedules import (
    Schedule,
    alpha_sigma,
    cosine_logsnr,
    cosine_t,
    get_schedule,
    linear_beta_logsnr,
    linear_beta_t,
)

__all__ = [
    "DenoiseFn",
    "SamplerSettings",
    "Schedule",
    "alpha_sigma",
    "apply_threshold",
    "classifier_free_guidance",
    "cosine_logsnr",
    "cosine_t",
    "diffusion_loss",
    "dynamic_threshold",
    "get_schedule",
    "linear_beta_logsnr",
    "linear_beta_t",
    "noise_condition_augment",
    "prediction_to_eps",
    "prediction_to_v",
    "prediction_to_x0",
    "q_sample",
    "sample",
    "static_threshold",
    "time_grid",
    "upsample_lowres",
]
