"""Logical axis rules -> NamedShardings, computed abstractly (``jax.eval_shape``).

Networks annotate params with semantic logical axis names (``embed``, ``mlp``, ``conv_out``...)
and activations with their own (``activation_batch``, ``activation_embed``..., see
docs/interfaces.md); ``config.mesh.logical_axis_rules`` maps both to mesh axes. Everything
here works on abstract trees (``ShapeDtypeStruct``), so shardings for a 2B-param model cost no
memory, and the same code feeds ``jax.jit(init, out_shardings=...)`` and the memory benchmark.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import ready

Rules = Sequence[tuple[str, Any]]


def _axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _entry_size(entry, sizes: Mapping[str, int]) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sizes[n] for n in names)


def _used_axes(spec: P) -> set[str]:
  used = set()
  for entry in spec:
    if entry is None:
      continue
    used.update((entry,) if isinstance(entry, str) else entry)
  return used


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """A stage config's `mesh.logical_axis_rules` as hashable tuples (JSON gives lists): read here
  for training, sampling and the AOT tools alike."""
  mesh_cfg = config.get("mesh", None)
  rules = None if mesh_cfg is None else mesh_cfg.get("logical_axis_rules", None)
  if rules is None:
    raise ValueError(
        f"stage {config.get('stage', '?')!r} has no mesh.logical_axis_rules in its config; "
        "pass rules= explicitly"
    )
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  rules = tuple((str(name), norm(axes)) for name, axes in rules)
  names = dict(rules)
  if "activation_batch" not in names and "batch" in names:
    # A workdir written before activations had their own logical names: its `batch` rule is
    # the batch split (sampling is then data-parallel; the networks' constraints are unnamed).
    logging.warning(
        "stage %r: its saved rules predate the activation_* names; splitting the batch as its "
        "'batch' rule says (%s)",
        config.get("stage", "?"),
        names["batch"],
    )
    rules += (("activation_batch", names["batch"]),)
  return rules


def fsdp_min_size_from_config(config) -> int:
  """A stage config's `mesh.fsdp_min_size` (0 when absent: only the rules split params)."""
  mesh_cfg = config.get("mesh", None)
  return int(0 if mesh_cfg is None else mesh_cfg.get("fsdp_min_size", 0) or 0)


def mesh_jit(
    fn,
    mesh,
    rules: Rules,
    *,
    name: str,
    in_shardings: Any = None,
    out_shardings: Any = None,
    donate_argnums: tuple[int, ...] = (),
    constrain_activations: bool = True,
) -> ready.ReadyJit:
  """`jax.jit(fn)` traced inside `jax.set_mesh(mesh)` and, with `constrain_activations`,
  `nn.logical_axis_rules(rules)`, so the networks' activation constraints (`activation_batch ->
  (data, fsdp)`, `activation_embed -> tensor`, ...; configs/common.py) pin the layout of every
  feature map, attention head and text sequence; without, XLA propagates layouts from the
  in/out shardings (None: left to XLA). Rules naming mesh axes that `mesh` lacks are
  restricted (`rules_for_mesh`).

  The rules are entered inside the traced function (flax's rules context is not part of jit's
  cache key), so `.lower(...)` of the returned `ReadyJit` (ahead-of-time compiles) builds the
  same program as calling it. With several processes a new program is compiled on every process
  before any runs it (`parallel.ready`). The one jit-under-a-mesh of the train step, the
  samplers, the trainer's sample grids and the AOT tools."""
  active_rules = rules_for_mesh(rules, mesh) if constrain_activations else ()

  def traced(*args):
    with nn.logical_axis_rules(active_rules):
      return fn(*args)

  traced.__name__ = traced.__qualname__ = name  # the program's name in HLO dumps and profiles

  given = {"in_shardings": in_shardings, "out_shardings": out_shardings}
  jitted = jax.jit(
      traced, donate_argnums=donate_argnums, **{k: v for k, v in given.items() if v is not None}
  )
  return ready.ReadyJit(jitted, name, context=lambda: jax.set_mesh(mesh))


def check_rules(rules: Rules) -> None:
  """Raises unless every logical name has exactly one rule (flax takes the first match, so a
  repeated name would make the layout depend on rule order)."""
  seen = set()
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"logical axis rule {rule!r} must be (logical_name, mesh_axes)")
    if rule[0] in seen:
      raise ValueError(f"logical axis {rule[0]!r} has more than one rule; give each name one")
    seen.add(rule[0])


def rules_for_mesh(rules: Rules, mesh) -> tuple[tuple[str, Any], ...]:
  """`rules` with every mesh axis that `mesh` lacks dropped from the targets.

  Activation constraints (`nn.with_logical_constraint`) refuse axes the mesh does not have, while
  param specs skip them (`fit_spec`); with this, one rules table serves every mesh, e.g. a
  single-device `(data,)` mesh or a sampler's mesh without `tensor`.
  """
  check_rules(rules)
  names = set(mesh.axis_names)
  out = []
  for logical, target in rules:
    if target is not None:
      kept = tuple(a for a in ((target,) if isinstance(target, str) else target) if a in names)
      target = None if not kept else kept[0] if len(kept) == 1 else kept
    out.append((logical, target))
  return tuple(out)


def fit_spec(shape: Sequence[int], spec: P, mesh) -> P:
  """Drops mesh axes from dims they do not divide (a 3-channel conv cannot split over 2).

  Uneven sharding would need padding; replicating that one dim is always correct and only
  matters for tiny tensors. Mesh axes of size 1 are dropped too (they split nothing), so a
  layout on a tensor = 1 mesh has the same spec as on a mesh without a tensor axis.
  """
  sizes = _axis_sizes(mesh)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, entry in zip(shape, entries):
    # Rules may name axes this mesh lacks (e.g. 'tensor' on a (data, fsdp) mesh): skip them.
    if entry is not None:
      names = (entry,) if isinstance(entry, str) else entry
      names = tuple(n for n in names if sizes.get(n, 1) > 1)
      entry = None if not names else names[0] if len(names) == 1 else names
    out.append(entry if dim % _entry_size(entry, sizes) == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def fsdp_fallback(
    shape: Sequence[int], spec: P, mesh, *, axis: str = "fsdp", min_size: int = 0
) -> P:
  """Shards a big tensor whose spec does not use ``axis`` along its largest free, divisible dim.

  Our choice (the paper is silent on partitioning): any param of at least ``min_size`` elements
  that the logical rules leave unsplit over ``fsdp`` (not annotated, or annotated with axes the
  rules map elsewhere) is still split ZeRO-3 style, so that per-device param + optimizer bytes
  always shrink with the fsdp axis. ``min_size <= 0`` disables it.
  """
  sizes = _axis_sizes(mesh)
  if min_size <= 0 or axis not in sizes or sizes[axis] == 1:
    return spec
  if math.prod(shape) < min_size or axis in _used_axes(spec):
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if entries[i] is None and shape[i] % sizes[axis] == 0:
      entries[i] = axis
      return P(*entries)
  return spec


def mesh_specs(boxed_abstract: Any, mesh, rules: Rules, *, fsdp_min_size: int = 0) -> Any:
  """Mesh ``PartitionSpec`` tree (unboxed structure) for an abstract, logically boxed tree.

  Args:
      boxed_abstract: output of ``jax.eval_shape(model.init, ...)`` (leaves may be
          ``nn.LogicallyPartitioned``); unannotated leaves are replicated unless the fsdp fallback
          applies.
      mesh: a ``Mesh`` or ``AbstractMesh``.
      rules: logical axis rules, e.g. ``[('embed', 'fsdp'), ('mlp', 'tensor'), ...]``; one rule
          per logical name (``check_rules``).
      fsdp_min_size: see ``fsdp_fallback``.
  """
  check_rules(rules)
  logical = nn.get_partition_spec(boxed_abstract)
  abstract = nn.unbox(boxed_abstract)

  def one(leaf, logical_spec):
    spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    spec = fit_spec(leaf.shape, spec, mesh)
    spec = fsdp_fallback(leaf.shape, spec, mesh, min_size=fsdp_min_size)
    return spec

  return jax.tree.map(one, abstract, logical, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def to_named(specs: Any, mesh) -> Any:
  """PartitionSpec tree -> NamedSharding tree on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _path_key(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
    else:
      out.append(str(k))
  return tuple(out)


def specs_like_params(abstract_tree: Any, abstract_params: Any, param_specs: Any) -> Any:
  """Specs for a tree (e.g. optimizer state) whose leaves mirror params by path suffix.

  Optax states hold per-param slots (Adam's mu/nu, Adafactor's v) under paths that end with the
  param's path. A leaf with the same shape as the param at the longest matching path suffix gets
  that param's spec; every other leaf (step counts, Adafactor's factored row/column statistics,
  whose size is rows + cols, not rows * cols) is replicated.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  by_path = {_path_key(p): (leaf.shape, s) for (p, leaf), s in zip(flat_params, flat_specs)}
  max_len = max((len(k) for k in by_path), default=0)

  def one(path, leaf):
    key = _path_key(path)
    for n in range(min(len(key), max_len), 0, -1):
      hit = by_path.get(key[-n:])
      if hit is not None:
        shape, spec = hit
        return spec if tuple(shape) == tuple(getattr(leaf, "shape", ())) else P()
    return P()

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


BATCH_AXIS = "activation_batch"


def batch_axes(rules: Rules, mesh=None) -> tuple[str, ...]:
  """Mesh axes the logical ``activation_batch`` axis maps to (the global batch is split over
  these, by the data loader and inside the networks alike), restricted to the axes of ``mesh``
  when given."""
  check_rules(rules)
  spec = nn.logical_to_mesh_axes((BATCH_AXIS,), rules)
  entry = spec[0] if len(spec) else None
  if entry is None:
    return ()
  axes = (entry,) if isinstance(entry, str) else tuple(entry)
  if mesh is not None:
    axes = tuple(a for a in axes if a in mesh.axis_names)
  return axes


def per_device_bytes(abstract_tree: Any, specs: Any, mesh) -> int:
  """Bytes one device holds for ``abstract_tree`` laid out by ``specs`` (no allocation)."""
  leaves = jax.tree.leaves(abstract_tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"tree has {len(leaves)} leaves but specs have {len(spec_leaves)}")
  total = 0
  for leaf, spec in zip(leaves, spec_leaves):
    shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
    total += math.prod(shard) * jax.numpy.dtype(leaf.dtype).itemsize
  return total
