"""Settings-time checks of static sampler arguments.

Sampler settings are static ``jax.jit`` arguments (frozen, hashed), so a number in them must be
a Python number: a jax array cannot be hashed by value and would also hide a traced value that
no range check can see. ``bool`` is refused too (``True`` is an ``int``, never a meant weight).
"""

from __future__ import annotations

import numbers


def static_real(name: str, value, allowed: str) -> float:
  """``value`` as a Python float, or a TypeError naming ``name``, the value and ``allowed``.

  Args:
    name: the setting's name, as the user wrote it (``"strength"``, ``"guidance_rescale"``).
    value: what was given.
    allowed: the allowed values in words, e.g. ``"in (0, 1]"``; the caller checks the range.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name} must be a static Python number {allowed}, got {value!r} of type "
        f"{type(value).__name__}"
    )
  return float(value)
