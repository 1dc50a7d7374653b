"""`parallel.hlo_breakdown` on a hand-written compiled module: each kind's HBM bytes are the
closed-form sums of its buffers, on-chip buffers (`S(k)`, k > 0) are left out of HBM, and an
asynchronous copy or collective is counted once, at its start."""

import json
import os
import subprocess
import sys

import pytest

from imagen_jax.parallel import hlo_breakdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sizes: a, the conv's output: bf16[2,4,4,8] = 512 B; w: bf16[3,3,8,8] = 1152 B; s: f32[8,128] =
# 4096 B; the all-gather's result bf16[4,4,4,8] = 1024 B.
HLO = """HloModule jit_train_step

%fused_conv (p0: bf16[2,4,4,8], p1: bf16[3,3,8,8]) -> bf16[2,4,4,8] {
  %p0 = bf16[2,4,4,8]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,8,8]{3,2,1,0:S(1)} parameter(1)
  ROOT %c = bf16[2,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}
}

%slice_rows (p: f32[8,128]) -> f32[2,128] {
  %p = f32[8,128]{1,0} parameter(0)
  ROOT %r = f32[2,128]{1,0:S(1)} slice(%p), slice={[0:2], [0:128]}
}

ENTRY %main (a: bf16[2,4,4,8], w: bf16[3,3,8,8], s: f32[8,128]) -> (bf16[4,4,4,8], f32[8,128]) {
  %a = bf16[2,4,4,8]{3,2,1,0} parameter(0)
  %w = bf16[3,3,8,8]{3,2,1,0} parameter(1)
  %s = f32[8,128]{1,0} parameter(2)
  %copy-start = (bf16[3,3,8,8]{3,2,1,0:S(1)}, bf16[3,3,8,8]{3,2,1,0}, u32[]{:S(2)}) copy-start(%w)
  %slice-start = ((f32[8,128]{1,0}), f32[2,128]{1,0:S(1)}, s32[]{:S(2)}) async-start(%s), calls=%slice_rows
  %slice-done = f32[2,128]{1,0:S(1)} async-done(%slice-start)
  %slice-start.2 = ((f32[8,128]{1,0}), f32[2,128]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%s), slice={[2:4], [0:128]}
  %slice-done.2 = f32[2,128]{1,0:S(1)} slice-done(%slice-start.2)
  %copy-done = bf16[3,3,8,8]{3,2,1,0:S(1)} copy-done(%copy-start)
  %fusion = bf16[2,4,4,8]{3,2,1,0} fusion(%a, %copy-done), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(train_step)/jvp(UNet)/Conv_0/conv_general_dilated"}
  %ag-start = (bf16[2,4,4,8]{3,2,1,0}, bf16[4,4,4,8]{3,2,1,0}) all-gather-start(%fusion), dimensions={0}
  %ag-done = bf16[4,4,4,8]{3,2,1,0} all-gather-done(%ag-start)
  %enc = f32[8,128]{1,0} add(%s, %s), metadata={op_name="jit(train_step)/T5Encoder/add"}
  %upd = f32[8,128]{1,0} multiply(%enc, %s), metadata={op_name="jit(train_step)/optimizer/mul"}
  ROOT %tuple = (bf16[4,4,4,8]{3,2,1,0}, f32[8,128]{1,0}) tuple(%ag-done, %upd)
}
"""


def test_each_kind_is_the_sum_of_its_hbm_buffers():
  parts = hlo_breakdown.breakdown(HLO)
  gb = lambda n: pytest.approx(n / 1e9)  # noqa: E731
  # The prefetches into on-chip memory: the HBM read of w, once (its -done adds nothing), and
  # the rows two asynchronous slices read (1024 of the 4096 B of s each; the second as
  # `compiled.as_text()` prints it, the first as XLA's dumps do).
  assert parts["other"] == {"count": 3, "gb": gb(1152 + 2 * 1024)}
  # The conv fusion reads a from HBM and w from on-chip memory, writes 512 B.
  assert parts["conv"] == {"count": 1, "gb": gb(512 + 512)}
  # The all-gather reads its operand and writes the gathered result; 1024 B cross chips.
  assert parts["collectives"] == {"count": 1, "gb": gb(512 + 1024)}
  assert parts["collective_gb"] == gb(1024)
  assert parts["t5"] == {"count": 1, "gb": gb(3 * 4096)}
  assert parts["optimizer"] == {"count": 1, "gb": gb(3 * 4096)}
  assert parts["attention"] == parts["ema"] == {"count": 0, "gb": 0.0}
  assert parts["hbm_gb"] == gb(1152 + 2 * 1024 + 1024 + 1536 + 2 * 3 * 4096)
  # On chip: the destinations (1152, 1024 and 1024 B) and their 4-byte sync flags.
  assert parts["onchip_gb"] == gb(1152 + 4 + 2 * (1024 + 4))


def test_saved_hlo_reads_back_and_the_module_runs_on_it(tmp_path):
  path = str(tmp_path / "step.hlo.gz")
  hlo_breakdown.write_hlo(path, HLO)
  assert hlo_breakdown.read_hlo(path) == HLO
  (tmp_path / "plain.txt").write_text(HLO)
  assert hlo_breakdown.read_hlo(str(tmp_path / "plain.txt")) == HLO
  out = subprocess.run(
      [sys.executable, "-m", "imagen_jax.parallel.hlo_breakdown", path],
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert json.loads(out.stdout)["hbm_gb"] == hlo_breakdown.breakdown(HLO)["hbm_gb"]
