"""The training settings (`config.train`), checked before anything is built or compiled.

A bad value fails at once naming the field, its value and what is allowed, instead of after the
minutes of a compile (e.g. an interval of 0 taken modulo). Intervals count steps:

  log_every, ckpt_every                 > 0: every that many steps (and at the last step)
  sample_every                          > 0: a sample grid every that many steps; 0: none
  num_steps, global_batch_size          > 0 (the batch of one optimizer step)
  grad_accum_steps                      >= 1, dividing global_batch_size: microbatches per step
  max_to_keep                           None (keep all) or >= 1 newest checkpoints kept
  keep_period                           0 (off) or > 0: also keep every step divisible by it
  nonfinite                             'stop' (raise at the first non-finite step) or 'skip'
                                        (leave params unchanged and go on)
  max_nonfinite_steps                   >= 1: with 'skip', this many non-finite steps in a row
                                        stop the run (it is diverging, not hitting a bad batch)
  preemption_check_every                >= 1 (used only with jax's preemption service off)
  ema_decay                             in [0, 1]
  freeze                                '' or a regular expression of param names
  profile_steps                         (start, end), 0 <= start <= end: trace steps
                                        start + 1 .. end; (0, 0) = off
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from imagen_jax import profiling
from imagen_jax.diffusion import losses

NONFINITE = ("stop", "skip")


def _int(train, field: str, low: int, allowed: str) -> int:
  value = train[field]
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"train.{field}={value!r}; allowed: {allowed}")
  return value


def every(step: int, interval: int) -> bool:
  """Whether an `interval` setting fires at `step` (0 = never)."""
  return interval > 0 and step % interval == 0


def check(config) -> None:
  """Raises ValueError for the first bad `config.train` (and dependent `sample`) setting."""
  t = config.train
  _int(t, "num_steps", 1, "an int > 0")
  batch = _int(t, "global_batch_size", 1, "an int > 0")
  accum = _int(t, "grad_accum_steps", 1, "an int >= 1 (microbatches per optimizer step)")
  if batch % accum:
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    raise ValueError(
        f"train.grad_accum_steps={accum} does not divide train.global_batch_size={batch}; "
        f"allowed: {', '.join(map(str, divisors[:12]))}{', ...' if len(divisors) > 12 else ''}"
    )
  for field in ("log_every", "ckpt_every"):
    _int(t, field, 1, "an int > 0 (steps between two)")
  _int(t, "sample_every", 0, "an int >= 0 (0: no sample grids)")
  if t.max_to_keep is not None:
    _int(t, "max_to_keep", 1, "None (keep all) or an int >= 1")
  _int(t, "keep_period", 0, "an int >= 0 (0 turns it off)")
  if t.nonfinite not in NONFINITE:
    raise ValueError(f"train.nonfinite={t.nonfinite!r}; allowed: {', '.join(NONFINITE)}")
  _int(t, "max_nonfinite_steps", 1, "an int >= 1")
  _int(t, "preemption_check_every", 1, "an int >= 1")
  if t.get("freeze"):
    try:
      re.compile(t.freeze)
    except re.error as e:
      raise ValueError(f"train.freeze={t.freeze!r} is not a regular expression: {e}") from None
  profiling.parse_window(t.get("profile_steps", (0, 0)))
  decay = t.ema_decay
  if not isinstance(decay, (int, float)) or not math.isfinite(decay) or not 0 <= decay <= 1:
    raise ValueError(f"train.ema_decay={decay!r}; allowed: a number in [0, 1]")
  if t.sample_every:
    n = config.sample.num_images
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= batch:
      raise ValueError(
          f"sample.num_images={n!r}; allowed: 1..train.global_batch_size={batch} (the grid's "
          "prompts are the first examples of a batch), or train.sample_every=0"
      )


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the train step reads of the config, read and checked once (`from_config`), so the
  step receives these rather than the ConfigDict.

  ema_decay: `train.ema_decay` (App. F: 0.9999).
  loss_weighting, min_snr_gamma: `train.*` (`diffusion.losses.loss_weights`).
  grad_accum_steps: `train.grad_accum_steps`, microbatches per optimizer step.
  drop_prob: `text.drop_prob`, the classifier-free guidance text dropout (§2.2: 10%).
  aug_range: `diffusion.aug_level` (lo, hi), the training range of the SR stages' noise
    conditioning augmentation (§2.4); (0, 0) for a base stage.
  """

  ema_decay: float
  loss_weighting: str
  min_snr_gamma: float
  grad_accum_steps: int
  drop_prob: float
  aug_range: tuple[float, float]

  @classmethod
  def from_config(cls, config) -> "StepSettings":
    """Raises ValueError naming the field, its value and what is allowed."""
    t = config.train
    is_sr = int(config.get("lowres_size", 0) or 0) > 0
    aug_lo, aug_hi = (float(a) for a in config.diffusion.aug_level)
    if is_sr and not 0.0 <= aug_lo <= aug_hi <= 1.0:
      raise ValueError(
          f"diffusion.aug_level={tuple(config.diffusion.aug_level)} must be a "
          "range (lo, hi) with 0 <= lo <= hi <= 1"
      )
    drop_prob = float(config.text.drop_prob)
    if not 0.0 <= drop_prob <= 1.0:
      raise ValueError(f"text.drop_prob={drop_prob} must be in [0, 1]")
    weighting, gamma = str(t.loss_weighting), float(t.min_snr_gamma)
    if weighting not in losses.LOSS_WEIGHTINGS:
      raise ValueError(f"train.loss_weighting={weighting!r} is not one of {losses.LOSS_WEIGHTINGS}")
    if not gamma > 0.0:
      raise ValueError(f"train.min_snr_gamma={gamma!r} must be > 0 (the paper uses 5)")
    accum = t.get("grad_accum_steps", 1)
    if isinstance(accum, bool) or int(accum) < 1:
      raise ValueError(f"train.grad_accum_steps={accum!r}; allowed: an int >= 1")
    return cls(
        ema_decay=float(t.ema_decay),
        loss_weighting=weighting,
        min_snr_gamma=gamma,
        grad_accum_steps=int(accum),
        drop_prob=drop_prob,
        aug_range=(aug_lo, aug_hi),
    )


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
  """What the training loader and its resume position read of the config (`from_config`).

  data: the `data` section, the pipeline's own settings (`data.pipeline.make_loader`).
  image_size, lowres_size: the stage's sides (`lowres_size` None for a base stage).
  global_batch_size, seed: `train.*`; shuffle: `data.shuffle` (with the seed, the data order
    a checkpoint's saved position refers to).
  """

  data: Any
  image_size: int
  lowres_size: int | None
  global_batch_size: int
  seed: int
  shuffle: bool

  @classmethod
  def from_config(cls, config) -> "LoaderSettings":
    return cls(
        data=config.data,
        image_size=int(config.image_size),
        lowres_size=int(config.lowres_size or 0) or None,
        global_batch_size=int(config.train.global_batch_size),
        seed=int(config.train.seed),
        shuffle=bool(config.data.shuffle),
    )
