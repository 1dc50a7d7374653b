"""What a training run means: the config fields under which a checkpoint resumes and a stage
samples, and how two configs' values of them are compared and reported.

A run's config dict (``trainer.config_to_dict``, saved as the checkpoint's config item and the
workdir's ``config.json``) records its meaning in ``MEANING_FIELDS``: the stage, the network, the
diffusion schedule / target / aug range, the image sizes and crop, the frozen text encoder (its
name, ``max_length`` and weights fingerprint: Imagen §2.1 keeps the encoder frozen, so its weights
are part of what the U-Net learned to read) and a warm start's source. ``meaning_diff`` lists the
fields whose values differ; ``meaning_error`` / ``format_meaning_diff`` name each one with its
saved and current value and the flags that restore the saved ones. ``imagen_jax.checkpoint``
refuses a resume under another meaning, ``sampling.cascade`` a stage whose config.json disagrees
with its checkpoint, ``train.workdir`` a workdir of another run.
"""

from __future__ import annotations

import json
from typing import Any


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the model / train state it is being restored into."""


# The config fields that define what a run means: a checkpoint resumes, and a stage samples, only
# under the same values (dotted paths into the config; a section compares all its fields).
# Everything else may change on resume: train.* but the warm start's source (num_steps,
# log_every, ckpt_every, sample_every, global_batch_size, ema_decay, seed, ...), optim.* (a
# different optimizer state is caught by the array shapes), sample.*, mesh.*, data.* other than
# the SR crop, and text.path / dtype / param_dtype / drop_prob / embedding_cache (the weights
# themselves are `text.fingerprint`).
MEANING_FIELDS = (
    "stage",
    "model",
    "diffusion",
    "image_size",
    "lowres_size",
    "data.sr_crop_size",
    "text.name",
    "text.max_length",
    "text.fingerprint",
    "train.init_from",  # a warm start's source (train.warm_start)
)
# Meaning fields added after checkpoints were written, with the value that reproduces them: a
# config without the field compares as if it had that value.
FIELDS_ADDED = {"train.init_from": ""}
# Where the trainer records `TextEncoder.fingerprint` in the run's config dict (config.json and
# the checkpoint's config item): the frozen encoder's weights are part of the meaning (§2.1).
TEXT_FINGERPRINT = "text.fingerprint"


def json_normal(x: Any) -> Any:
  """Round-trips through JSON so tuples/lists and ConfigDicts compare like saved JSON."""
  return json.loads(
      json.dumps(x, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
  )


# Model fields added after checkpoints were written, with the value that reproduces what those
# checkpoints were trained with: a config without the field (an older checkpoint's, or a
# hand-written one) compares as if it had that value.
MODEL_FIELDS_ADDED = {"text_positions": False}
ABSENT = object()


def with_text_fingerprint(config_dict: dict, fingerprint: str) -> dict:
  """`config_dict` with the frozen encoder's weights fingerprint at `TEXT_FINGERPRINT`."""
  return {**config_dict, "text": {**config_dict.get("text", {}), "fingerprint": fingerprint}}


def _with_added_fields(config: dict) -> dict:
  model = config.get("model")
  if not isinstance(model, dict):
    return config
  return {**config, "model": {**MODEL_FIELDS_ADDED, **model}}


def field_value(config: dict, path: str) -> Any:
  """The value at dotted ``path`` of a config dict, or ``ABSENT``."""
  node = config
  for key in path.split("."):
    if not isinstance(node, dict) or key not in node:
      return ABSENT
    node = node[key]
  return node


def _diff(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, current value) of every leaf that differs (`ABSENT` when a
  side lacks it)."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current), key=str):
      where = f"{prefix}.{k}" if prefix else str(k)
      out.extend(_diff(saved.get(k, ABSENT), current.get(k, ABSENT), where))
    return out
  return [] if saved == current else [(prefix, saved, current)]


def meaning_diff(
    saved: dict, current: dict, fingerprint: bool = True
) -> list[tuple[str, Any, Any]]:
  """The `MEANING_FIELDS` differences between two config dicts, as `_diff` tuples.

  The text fingerprint is compared when both record one (`checkpoint.Checkpointer.
  check_compatible` warns when the checkpoint has none) and `fingerprint` is set (a check made
  before the encoder loads has no current fingerprint to compare); a field absent from both is
  equal.
  """
  saved = _with_added_fields(json_normal(saved))
  current = _with_added_fields(json_normal(current))
  out = []
  for field in MEANING_FIELDS:
    a, b = field_value(saved, field), field_value(current, field)
    a, b = (FIELDS_ADDED.get(field, ABSENT) if x is ABSENT else x for x in (a, b))
    if field == TEXT_FINGERPRINT and (not fingerprint or ABSENT in (a, b)):
      continue
    out.extend(_diff(a, b, field))
  return out


def _show(value: Any) -> str:
  return "absent" if value is ABSENT else repr(value)


def format_meaning_diff(diffs, old: str = "in checkpoint", new: str = "now") -> str:
  """'field: <old> in checkpoint, now <new>; ...' and the flags that restore the old values."""
  parts = [f"{f}: {_show(a)} {old}, {new} {_show(b)}" for f, a, b in diffs[:12]]
  flags = [
      f"--config.{f}={a if isinstance(a, str) else json.dumps(a)}"
      for f, a, _ in diffs
      if f != TEXT_FINGERPRINT and a is not ABSENT
  ]
  text = "; ".join(parts) + (" ..." if len(diffs) > 12 else "")
  if any(f == TEXT_FINGERPRINT for f, _, _ in diffs):
    text += (
        " (text.fingerprint: the text encoder's weights differ from those the stage was trained "
        "with: point text.path at those weights)"
    )
  return text + (f". The checkpoint's values: {' '.join(flags[:12])}" if flags else "")


def meaning_error(where: Any, diffs) -> CheckpointMismatchError:
  """The refusal of a resume (or restore) of checkpoint `where` under other meaning fields."""
  return CheckpointMismatchError(
      f"checkpoint {where} was written for a different run (model, diffusion, text encoder or "
      f"sizes); {len(diffs)} difference(s): {format_meaning_diff(diffs)}. Resume with the "
      "checkpoint's values, or train in a fresh workdir."
  )
