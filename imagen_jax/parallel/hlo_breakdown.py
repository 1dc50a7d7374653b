"""Where a compiled step's work goes, by kind, read from its optimized HLO text.

Every instruction of the program's non-fused computations (the entry, loop bodies; the bodies
of fusions and reducers are part of their caller) is put in one kind, from its opcode and the
JAX / Flax scope in its `op_name` metadata:

  collectives   all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
  t5            the frozen text encoder (`T5Encoder` scope)
  optimizer     the optax update (`optimizer` scope of `train.step`)
  ema           the EMA update (`ema` scope; XLA may fuse it into the optimizer's fusions)
  attention     attention layers (`Attention_*`, `SelfAttention`, `TextCrossAttention` scopes;
                the Pallas kernels included)
  conv          convolutions and the fusions built around one
  other         normalisation, elementwise, copies, layout changes and the rest

Per kind: the instruction count and `gb` = the HBM bytes of its result plus those of its
operands, each buffer read or written once (an estimate of HBM traffic: fusion-internal reuse and
re-reads of tiles are not in it). Only buffers in HBM count: XLA's memory-space assignment puts
prefetched slices and small values in on-chip memory (a layout's `S(k)`, k > 0: VMEM, v4's CMEM,
SMEM), and the compiled program copies them there with asynchronous `copy-start` / slice
`async-start` instructions; the HBM read of such a copy is counted once, at its start (its
`-done` moves nothing more; an asynchronous slice reads only the part it writes), and the
on-chip bytes are summed apart (`onchip_gb`). For
collectives, `collective_gb` is the bytes of their results (the data each chip gathers or keeps),
an estimate of inter-chip traffic per step.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys

from imagen_jax import atomic

KINDS = ("collectives", "t5", "optimizer", "ema", "attention", "conv", "other")
_COLLECTIVES = (
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-reduce",
    "all-reduce-start",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
)
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
# A shape, its layout when printed: `bf16[8,64]{1,0:T(8,128)(2,1)S(3)}`; `S(k)`: memory space k.
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ATTENTION = re.compile(r"(^|/)(\w*Attention(_\d+)?)(/|$)")


def _arrays(text: str) -> list[tuple[int, bool, bool]]:
  """(bytes, on chip, scalar) of each array shape in `text` (a result shape or a tuple)."""
  out = []
  for t, dims, layout in _SHAPE.findall(text):
    space = _SPACE.search(layout)
    size = _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
    out.append((size, bool(space and space.group(1) != "0"), not dims))
  return out


def _shape_bytes(text: str) -> tuple[int, int]:
  """(HBM bytes, on-chip bytes) of the shapes in `text`."""
  arrays = _arrays(text)
  return sum(b for b, on, _ in arrays if not on), sum(b for b, on, _ in arrays if on)


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _HEADER.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name and line.strip() == "}":
      name = None
    elif name:
      comps[name].append(line)
  return comps


def _kind(opcode: str, op_name: str, has_conv: bool) -> str:
  if opcode in _COLLECTIVES:
    return "collectives"
  if "T5Encoder" in op_name:
    return "t5"
  if re.search(r"(^|/)optimizer(/|$)", op_name):
    return "optimizer"
  if re.search(r"(^|/)ema(/|$)", op_name):
    return "ema"
  if _ATTENTION.search(op_name):
    return "attention"
  if opcode == "convolution" or has_conv:
    return "conv"
  return "other"


def breakdown(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {count, gb}} of an optimized HLO module's text, plus `collective_gb`, `hbm_gb` (the
  kinds' sum) and `onchip_gb`."""
  comps = _computations(hlo)
  called = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
  conv_comps = {n for n, lines in comps.items() if any(" convolution(" in x for x in lines)}
  out = {k: {"count": 0, "gb": 0.0} for k in KINDS}
  collective_bytes = onchip_bytes = 0
  for name, lines in comps.items():
    if name in called:
      continue
    result_bytes = {}
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      instr, shape, opcode, rest = m.groups()
      hbm, onchip = _shape_bytes(shape)
      result_bytes[instr] = hbm
      if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      if opcode.endswith("-done"):  # its `-start` counted the move
        continue
      onchip_bytes += onchip
      operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
      if opcode.endswith("-start") and opcode not in _COLLECTIVES and opcode != "copy-start":
        # An asynchronous op, `async-start` or its printed form (`slice-start`, ...):
        # ((operands), destination, context); a slice reads only the bytes it writes.
        arrays = _arrays(shape)
        dest = [a for a in arrays[len(operands) :] if not a[2]]  # not the scalar context
        source_in_hbm = any(not on for _, on, _ in arrays[: len(operands)])
        moved = sum(b for b, on, _ in dest if not on) + source_in_hbm * sum(b for b, *_ in dest)
      elif opcode.endswith("-start"):  # the tuple holds the source (the operand) and destination
        moved = hbm
      else:
        moved = hbm + sum(result_bytes.get(o, 0) for o in operands)
      op_name = (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
      callee = re.search(r"calls=%([\w.\-]+)", rest)
      kind = _kind(opcode, op_name, bool(callee and callee.group(1) in conv_comps))
      out[kind]["count"] += 1
      out[kind]["gb"] += moved / 1e9
      if kind == "collectives":  # a `-start` tuple also holds its operand: count the largest
        collective_bytes += max((b for b, *_ in _arrays(shape)), default=0)
  out["collective_gb"] = collective_bytes / 1e9
  out["hbm_gb"] = sum(out[k]["gb"] for k in KINDS)
  out["onchip_gb"] = onchip_bytes / 1e9
  return out


def write_hlo(path: str, hlo: str) -> None:
  """The compiled HLO text at `path`, gzipped, written atomically."""
  atomic.write_bytes(path, gzip.compress(hlo.encode()))


def read_hlo(path: str) -> str:
  """HLO text from `path`, gzipped (`write_hlo`) or plain (an XLA dump's module)."""
  with open(path, "rb") as f:
    data = f.read()
  return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()


if __name__ == "__main__":  # python -m imagen_jax.parallel.hlo_breakdown HLO[.gz] ...
  for arg in sys.argv[1:]:
    print(json.dumps({"hlo": arg, **breakdown(read_hlo(arg))}))
