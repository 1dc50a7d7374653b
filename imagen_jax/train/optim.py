"""Optimizers and learning-rate schedules per cascade stage (Imagen §4.1).

The paper trains the base model with Adafactor and the super-resolution models with
Adam(b1=0.9, b2=0.999, eps=1e-8), all at lr 1e-4 with 10k linear warmup steps and then cosine
decay. The decay length and final value are not stated: we decay over `train.num_steps` to
`optim.end_learning_rate` (0 by default). Global-norm gradient clipping is our addition (the
paper is silent), set by `optim.grad_clip_norm` (<= 0 disables it).
"""

from __future__ import annotations

import optax

from imagen_jax.train import warm_start

OPTIMIZERS = ("adafactor", "adam", "adamw")
DECAYS = ("cosine", "constant")


def make_lr_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine (or constant)."""
  c = optim_config
  if c.decay not in DECAYS:
    raise ValueError(f"unknown optim.decay {c.decay!r}; allowed: {', '.join(DECAYS)}")
  warmup = int(c.warmup_steps)
  if c.decay == "constant":
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, c.learning_rate, max(warmup, 1)),
            optax.constant_schedule(c.learning_rate),
        ],
        [warmup],
    )
  # warmup_cosine_decay_schedule's decay_steps includes the warmup.
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=c.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(int(num_steps), warmup + 1),
      end_value=c.end_learning_rate,
  )


def make_optimizer(
    optim_config, num_steps: int, *, freeze: str = ""
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, schedule)`: optional global-norm clipping, then the stage's optimizer.

  freeze: a regex of param names (`train.warm_start.param_name`) that get zero updates and no
  optimizer state (`train.freeze`); clipping sees only the trained params' gradients.
  """
  c = optim_config
  schedule = make_lr_schedule(c, num_steps)
  if c.name == "adafactor":
    # optax defaults, as the paper names no Adafactor settings (IMAGEN_FACTS.md).
    opt = optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=c.adafactor_min_dim_size_to_factor,
        decay_rate=c.adafactor_decay_rate,
        multiply_by_parameter_scale=c.adafactor_multiply_by_parameter_scale,
        clipping_threshold=c.adafactor_clipping_threshold,
    )
  elif c.name == "adam":
    opt = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
  elif c.name == "adamw":
    opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  else:
    raise ValueError(f"unknown optim.name {c.name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if c.grad_clip_norm and c.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
  if freeze:
    opt = optax.multi_transform(
        {"train": opt, "freeze": optax.set_to_zero()}, warm_start.freeze_labels(freeze)
    )
  return opt, schedule
