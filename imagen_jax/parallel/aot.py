"""Ahead-of-time compilation for a TPU pod on any machine: per-chip memory, FLOPs, roofline.

`jax.experimental.topologies.get_topology_desc` (libtpu, from `jax[tpu]`) describes a TPU
slice without the hardware; a `Mesh` of its devices lets `jax.jit(f).lower(...).compile()`
produce the program XLA would run on each chip, whose `memory_analysis()` and
`cost_analysis()` are per chip. What a step costs then follows from the chip's published
figures (`CHIPS`), a roofline that ignores inter-chip communication:

    step_s >= max(flops / peak_flops, bytes_accessed / hbm_bandwidth)   (XLA's flops, bytes)
    MFU <= model_flops / (step_s * peak_flops)   (model FLOPs, `nn.flops`: no remat, no T5)

A program fits when XLA's peak memory is within the HBM XLA lets it use (`usable_hbm_bytes`:
XLA's own limit, below the nominal HBM).

Topology names: Cloud TPU's `v4-512` / `v5p-128` count TensorCores (two per v4 / v5p chip:
v4-512 is 256 chips), `v5e-16` (or `v5litepod-16`) counts chips; `v4:4x8x8`-style names give
the chip grid directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, topologies

from imagen_jax import atomic
from imagen_jax.parallel import mesh as mesh_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's published per-chip figures (bf16 peak, HBM, HBM bandwidth)."""

  name: str
  peak_tflops: float
  hbm_gib: float
  hbm_tbps: float
  cores_per_chip: int  # TensorCores per chip, as counted by Cloud TPU slice names
  grid_dims: int  # 3: torus of v4 / v5p; 2: v5e


CHIPS = {
    "v4": Chip("TPU v4", 275.0, 32.0, 1.2, 2, 3),
    "v5p": Chip("TPU v5p", 459.0, 95.0, 2.76, 2, 3),
    "v5e": Chip("TPU v5e", 197.0, 16.0, 0.82, 1, 2),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  chip: Chip
  generation: str  # key of CHIPS
  grid: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid)

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.grid))}"


def _grid(num_chips: int, dims: int) -> tuple[int, ...]:
  """Slice grid of `num_chips` (a power of two): v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4...;
  v5e 1x1, 2x2, 2x4, 4x4, 4x8, ... (the shapes Cloud TPU provisions)."""
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(grid) < num_chips:
    i = min(range(dims), key=lambda k: (grid[k], -k))  # grow the smallest, last axes first
    grid[i] *= 2
  # Cloud TPU's order: ascending, a trailing 1 last (2x2x1, 2x2x4, 4x8x8; 2x4, 16x16).
  return tuple(sorted(g for g in grid if g > 1)) + tuple(g for g in grid if g == 1)


def parse_topology(name: str) -> Topology:
  """`v4-512`, `v5p-128`, `v5e-256`, `v5litepod-16` or `v4:4x8x8` -> `Topology`."""
  allowed = (
      "allowed: v4-N / v5p-N (N = TensorCores, 2 per chip, N >= 8), v5e-N / v5litepod-N (N = "
      "chips), N a power of two, or GEN:AxBxC (e.g. v4:4x8x8, v5e:16x16) with GEN in "
      f"{', '.join(CHIPS)}"
  )
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod)([-:])([0-9x]+)", name.strip())
  if not m:
    raise ValueError(f"unknown TPU topology {name!r}; {allowed}")
  gen = _ALIASES.get(m.group(1), m.group(1))
  chip = CHIPS[gen]
  if m.group(2) == ":":
    grid = tuple(int(d) for d in m.group(3).split("x"))
    if len(grid) != chip.grid_dims or min(grid) < 1:
      raise ValueError(
          f"TPU topology {name!r}: {gen} grids have {chip.grid_dims} positive sizes; {allowed}"
      )
    return Topology(name, chip, gen, grid)
  if not m.group(3).isdigit():
    raise ValueError(f"unknown TPU topology {name!r}; {allowed}")
  count = int(m.group(3))
  if count % chip.cores_per_chip or count < 1:
    raise ValueError(f"TPU topology {name!r}: {gen} counts {chip.cores_per_chip} cores per chip")
  chips = count // chip.cores_per_chip
  if chips & (chips - 1):
    raise ValueError(f"TPU topology {name!r}: {chips} chips is not a power of two; {allowed}")
  if chip.grid_dims == 3 and chips < 4:
    raise ValueError(f"TPU topology {name!r}: {gen} slices start at 4 chips; {allowed}")
  return Topology(name, chip, gen, _grid(chips, chip.grid_dims))


def quiet_libtpu(topology: Topology) -> None:
  """libtpu looks for a TPU VM's metadata when it loads; say there is none (harmless
  warnings otherwise). Only names what is unset; must run before the first libtpu call."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling needs no exclusive TPU: let several processes (parallel tests, compiles) load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault(
      "TPU_ACCELERATOR_TYPE",
      f"{topology.generation}-{topology.num_chips * topology.chip.cores_per_chip}",
  )


def topology_devices(topology: Topology) -> list:
  """The slice's devices (no hardware needed: libtpu describes them)."""
  quiet_libtpu(topology)
  kw = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name, **kw)
  return list(desc.devices)


def make_mesh(shape: dict[str, int], devices: Sequence[Any]) -> jax.sharding.Mesh:
  """A mesh of `devices` (a TPU topology's) laid out for its interconnect (`mesh_utils`)."""
  resolved = mesh_lib.resolve_mesh_shape(shape, len(devices))
  shape = tuple(resolved.values())
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=list(devices))
  except NotImplementedError:  # e.g. 16 x 16 on a 4x8x8 torus: an axis spans part of a ring
    grid = mesh_utils.create_device_mesh(
        shape, devices=list(devices), allow_split_physical_axes=True
    )
  auto = (jax.sharding.AxisType.Auto,) * len(resolved)
  return jax.sharding.Mesh(np.asarray(grid), tuple(resolved), axis_types=auto)


def usable_hbm_bytes(device) -> float:
  """The HBM per chip that XLA lets a program use on `device`'s TPU generation (its limit,
  below the nominal HBM: libtpu keeps some for itself), as XLA itself states it.

  A compile-only device reports no `memory_stats()`, so the figure is read from XLA's
  refusal of a program whose temporaries cannot fit: "... exceeds available HBM (30.75G)"
  (XLA prints GiB with two decimals, so the figure is good to 0.01 GiB). Cached per kind.
  """
  kind = device.device_kind
  if kind not in _USABLE_HBM:
    mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
    huge = jax.ShapeDtypeStruct(
        (2**38,),
        np.float32,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )  # 1 TiB of temporaries: no chip holds them
    try:
      compile_or_explain(jax.jit(lambda a: (a * 2 + 1) * a).lower(huge))
    except DoesNotFitError as e:
      if e.available_bytes is None:
        raise RuntimeError(f"XLA named no available HBM for {kind}: {e}") from e
      _USABLE_HBM[kind] = e.available_bytes
    else:
      raise RuntimeError(f"a 1 TiB program compiled for {kind}: no HBM limit to read")
  return _USABLE_HBM[kind]


_USABLE_HBM: dict[str, float] = {}


@dataclasses.dataclass
class Report:
  """Per-chip figures of one compiled program (bytes, flops) and its roofline.

  `xla_peak_bytes` is XLA's own peak (`memory_analysis().peak_memory_in_bytes`: the live
  buffers at the worst point of its schedule); `hbm_bytes` the budget `fits` is judged
  against (XLA's usable HBM, `usable_hbm_bytes`, unless overridden). `model_flops` are the
  useful FLOPs per chip (`nn.flops`: no remat, no frozen text encoder), None when not counted;
  `kernel_flops` the FLOPs inside custom kernels that XLA's cost analysis does not see (the
  Pallas flash kernel's backward): counted analytically (`nn.flops.kernel_train_flops`) and
  added to XLA's for the compute time.
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  bytes_accessed: float
  chip: Chip
  hbm_bytes: float
  xla_peak_bytes: int | None = None
  generated_code_bytes: int = 0
  optimal_seconds: float | None = None
  model_flops: float | None = None
  kernel_flops: float = 0.0

  @property
  def buffer_bytes(self) -> int:
    """Arguments + outputs not aliased to a donated argument + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def peak_bytes(self) -> int:
    """XLA's peak where it gives one, else the buffer sum."""
    return self.buffer_bytes if self.xla_peak_bytes is None else self.xla_peak_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def compute_s(self) -> float:
    return (self.flops + self.kernel_flops) / (self.chip.peak_tflops * 1e12)

  @property
  def memory_s(self) -> float:
    return self.bytes_accessed / (self.chip.hbm_tbps * 1e12)

  @property
  def roofline_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def xla_flops_bound(self) -> float:
    """XLA's FLOPs (remat and the text encoder included) + the kernels' / (roofline x peak)."""
    return self.compute_s / self.roofline_s if self.roofline_s else 0.0

  @property
  def mfu_bound(self) -> float | None:
    """Model FLOPs / (roofline step time x peak): the MFU no schedule of this program beats."""
    if self.model_flops is None or not self.roofline_s:
      return None
    return self.model_flops / (self.roofline_s * self.chip.peak_tflops * 1e12)

  def as_dict(self) -> dict:
    return dict(
        argument_gib=self.argument_bytes / GIB,
        output_gib=self.output_bytes / GIB,
        alias_gib=self.alias_bytes / GIB,
        temp_gib=self.temp_bytes / GIB,
        buffers_gib=self.buffer_bytes / GIB,
        peak_gib=self.peak_bytes / GIB,
        xla_peak=self.xla_peak_bytes is not None,
        usable_gib=self.hbm_bytes / GIB,
        hbm_gib=self.chip.hbm_gib,
        generated_code_mib=self.generated_code_bytes / 2**20,
        fits=self.fits,
        tflop=self.flops / 1e12,
        kernel_tflop=self.kernel_flops / 1e12,
        model_tflop=None if self.model_flops is None else self.model_flops / 1e12,
        gbytes_accessed=self.bytes_accessed / 1e9,
        compute_s=self.compute_s,
        memory_s=self.memory_s,
        roofline_s=self.roofline_s,
        optimal_s=self.optimal_seconds,
        xla_flops_bound=self.xla_flops_bound,
        mfu_bound=self.mfu_bound,
    )


def report(
    compiled,
    chip: Chip,
    hbm_gib: float | None = None,
    *,
    model_flops: float | None = None,
    kernel_flops: float = 0.0,
) -> Report:
  """Reads `compiled.memory_analysis()` / `cost_analysis()` (per chip). `hbm_gib`: the budget
  (default: XLA's usable HBM of the compiled program's devices)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if hbm_gib is None:
    budget = usable_hbm_bytes(_first_device(compiled))
  else:
    budget = hbm_gib * GIB
  peak = getattr(mem, "peak_memory_in_bytes", None)
  optimal = cost.get("optimal_seconds")
  return Report(
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      chip=chip,
      hbm_bytes=budget,
      xla_peak_bytes=None if peak is None else int(peak),
      generated_code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      optimal_seconds=None if optimal is None or optimal < 0 else float(optimal),
      model_flops=model_flops,
      kernel_flops=kernel_flops,
  )


def _first_device(compiled):
  shardings = jax.tree.leaves(compiled.input_shardings)
  return next(iter(shardings[0].device_set))


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded `ShapeDtypeStruct`s (each leaf's shard)."""
  return sum(
      math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
  )


def write_report(path: str | None, data: dict) -> None:
  """Writes a script's figures as JSON at `path` (None: nothing), atomically: an interrupted
  compile never leaves a half-written report."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_json(path, data)


class DoesNotFitError(RuntimeError):
  """XLA refused the program: it needs more memory per chip than the chip has."""

  def __init__(self, message: str, needed_bytes: float | None, available_bytes: float | None):
    super().__init__(message)
    self.needed_bytes = needed_bytes
    self.available_bytes = available_bytes


def compile_or_explain(lowered, options: dict | None = None):
  """`lowered.compile()`, turning XLA's out-of-memory refusal into `DoesNotFitError` with the
  sizes it names (needed, then available: XLA's units are binary, G = 2^30 bytes)."""
  try:
    return lowered.compile(options) if options else lowered.compile()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "exceed" not in text.lower():
      raise
    # "... required for HLO temporaries (42.00G) exceeds available HBM (15.75G)"
    sizes = re.findall(r"([0-9]+(?:\.[0-9]+)?)([KMGT])\b", text)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    needed = available = None
    if len(sizes) >= 2:
      needed, available = (float(v) * scale[u] for v, u in sizes[:2])
    raise DoesNotFitError(text, needed, available) from e
