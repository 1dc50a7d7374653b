"""Device mesh from config, and multi-host initialisation.

The mesh has named axes ``data`` (pure data parallelism: params replicated), ``fsdp`` (data
parallelism whose params / optimizer state are sharded, ZeRO-3 style) and optionally ``tensor``
(model parallelism inside a layer). The paper trains the base model on 256 TPU-v4 chips and each
SR model on 128 (Imagen §4.1) but does not say how the model is partitioned; a (data, fsdp)
mesh is our choice, and the shape is a config setting (``config.mesh.shape``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces the one ``-1`` entry of ``shape`` by what fills ``num_devices``.

  Args:
      shape: axis name -> size, e.g. ``{'data': -1, 'fsdp': 2, 'tensor': 1}``; names must be in
          ``MESH_AXES``; at most one size may be ``-1``.
      num_devices: total device count (all processes).

  Returns:
      An ordered dict (in the order of ``shape``) whose sizes multiply to ``num_devices``.
  """
  names = list(shape.keys())
  for name in names:
    if name not in MESH_AXES:
      raise ValueError(f"mesh axis {name!r} is not one of {MESH_AXES}")
  sizes = [int(shape[n]) for n in names]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"mesh shape {dict(shape)} has more than one -1 (fill) axis")
  for n, s in zip(names, sizes):
    if s != -1 and s < 1:
      raise ValueError(f"mesh axis {n!r} has size {s}; allowed: a positive int or -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(
          f"mesh shape {dict(shape)}: {num_devices} devices are not divisible by the fixed "
          f"axes' product {known}"
      )
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh shape {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
        f"but {num_devices} are available"
    )
  return dict(zip(names, sizes))


def make_mesh(
    shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """Builds a ``jax.sharding.Mesh`` with Auto axis types (pjit-style sharding propagation).

  ``jax.make_mesh`` defaults to Explicit axes in jax 0.10; the training step relies on the
  compiler propagating shardings from the in/out shardings and the logical constraints, so we
  ask for Auto axes. ``jax.make_mesh`` orders devices so that the last axes (fsdp, tensor) sit on
  the fastest interconnect.
  """
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  names = tuple(resolved.keys())
  sizes = tuple(resolved.values())
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  if devices == list(jax.devices()):
    return jax.make_mesh(sizes, names, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), names, axis_types=auto)


def abstract_mesh(shape: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """An ``AbstractMesh`` of ``num_devices`` devices (no hardware needed), for memory planning."""
  resolved = resolve_mesh_shape(shape, num_devices)
  names = tuple(resolved.keys())
  return jax.sharding.AbstractMesh(
      tuple(resolved.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)
  )


def maybe_initialize_distributed(dist_config) -> None:
  """Calls ``jax.distributed.initialize`` when ``dist_config.initialize`` is true.

  Must run before anything touches the jax backend. Empty ``coordinator_address`` /
  ``num_processes`` / ``process_id`` (None or -1) let jax auto-detect them (TPU pods, SLURM);
  the local multi-process launcher sets them explicitly (127.0.0.1:PORT).
  """
  if not dist_config.initialize:
    return
  kwargs = {}
  if dist_config.get("coordinator_address"):
    kwargs["coordinator_address"] = dist_config.coordinator_address
  if dist_config.get("num_processes", -1) not in (None, -1):
    kwargs["num_processes"] = int(dist_config.num_processes)
  if dist_config.get("process_id", -1) not in (None, -1):
    kwargs["process_id"] = int(dist_config.process_id)
  if dist_config.get("local_device_ids"):
    kwargs["local_device_ids"] = list(dist_config.local_device_ids)
  if dist_config.get("cpu_collectives"):
    # Cross-process collectives on the CPU backend need an implementation (gloo) chosen
    # before the backend starts; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
  jax.distributed.initialize(**kwargs)
