"""Config dtype names -> JAX dtypes, for the networks and the text encoder alike.

The dtype policy (docs/DESIGN.md, principle 9): `dtype` is the compute dtype (bfloat16 on
accelerators), `param_dtype` the storage dtype (float32); norm statistics, softmax, losses and
all diffusion math stay float32 whatever these say.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_dtype(value: Any, field: str = "dtype") -> Any:
  """A config value -> a JAX dtype: a name of `DTYPES`, a dtype itself, or None (float32).

  `field` names the setting in the error, e.g. "model.dtype" or "text.param_dtype".
  """
  if value is None:
    return jnp.float32
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(f"{field}={value!r}; allowed: {sorted(DTYPES)}")
    return DTYPES[value]
  return jnp.dtype(value).type
