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

Per kind: the instruction count and bytes = the bytes of its result plus those of its operands
(each buffer read or written once: an estimate of HBM traffic that ignores caching in VMEM and
fusion-internal reuse); for collectives, `collective_gb` is the bytes of their results (the data
each chip gathers or keeps), an estimate of inter-chip traffic per step.
"""

from __future__ import annotations

import math
import re

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
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ATTENTION = re.compile(r"(^|/)(\w*Attention(_\d+)?)(/|$)")


def _shape_bytes(text: str) -> int:
  return sum(
      _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
      for t, dims in _SHAPE.findall(text)
  )


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
  """{kind: {count, gb}} of an optimized HLO module's text, plus `collective_gb`."""
  comps = _computations(hlo)
  called = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
  conv_comps = {n for n, lines in comps.items() if any(" convolution(" in x for x in lines)}
  out = {k: {"count": 0, "gb": 0.0} for k in KINDS}
  collective_bytes = 0
  for name, lines in comps.items():
    if name in called:
      continue
    result_bytes = {}
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      instr, shape, opcode, rest = m.groups()
      result_bytes[instr] = _shape_bytes(shape)
      if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
      moved = result_bytes[instr] + sum(result_bytes.get(o, 0) for o in operands)
      op_name = (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
      callee = re.search(r"calls=%([\w.\-]+)", rest)
      kind = _kind(opcode, op_name, bool(callee and callee.group(1) in conv_comps))
      out[kind]["count"] += 1
      out[kind]["gb"] += moved / 1e9
      if kind == "collectives":
        collective_bytes += result_bytes[instr]
  out["collective_gb"] = collective_bytes / 1e9
  return out
