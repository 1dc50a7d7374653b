r"""Training-step and denoiser speed of one network preset.

  python benchmarks/unet_step.py --preset=base64:bench --batch=8 --steps=10
  python benchmarks/unet_step.py --count_only          # paper parameter counts (eval_shape)

The text input is `[batch, L, D]` of the text block the preset is measured with: the stage
config's (`configs.common.text_config(size)`) for paper / tiny / shapes, `BENCH_TEXT` for bench;
D = `registry.text_dim(text)`, L = `text.max_length` (`--text_name`, `--text_len` override).

Prints: parameter count, the attention implementation the step runs (`nn.attention`: cuDNN's
fused kernel on GPU where it applies, Pallas' flash kernel on TPU), the model FLOPs of one
training step (`nn.flops`: 3 x the network's conv and matmul FLOPs, no remat) and XLA's count
(cost analysis of the compiled step), compile time, median train-step time (Adam on an eps-MSE
loss; block_until_ready), images/s, achieved GFLOP/s, the MFU (model FLOPs / (step time x the
device's published peak, `PEAK_TFLOPS` or `--peak_tflops`)) and XLA's FLOPs over the same,
and the median forward-only denoiser time.

The training step is the plain loss of the paper (App. A) with an Adam update, built by
benchmarks/train_step_bench.py (shared with benchmarks/efficient_vs_unet.py).
"""

from __future__ import annotations

import time

import jax
import train_step_bench as bench  # benchmarks/ (this script's folder, first on sys.path)
from absl import flags

from configs import common
from imagen_jax import cli, profiling
from imagen_jax.nn import presets
from imagen_jax.text import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "base64:bench", "stage:size, e.g. base64:bench or sr256:shapes")
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_integer("steps", 10, "timed training steps (after one warm-up step)")
flags.DEFINE_integer("fwd_steps", 10, "timed forward-only denoiser evaluations")
flags.DEFINE_string(
    "profile_steps", "", "START:END: after timing, trace steps START+1..END (train.profile_steps)"
)
flags.DEFINE_string("profile_dir", "unet_step_profile", "TensorBoard log dir of the trace")
flags.DEFINE_string("dtype", None, "override the compute dtype (float32 | bfloat16)")
flags.DEFINE_string("text_name", None, "override the text encoder (its width D)")
flags.DEFINE_integer("text_len", None, "override the text length L")
flags.DEFINE_bool("remat", None, "override remat")
flags.DEFINE_string("attn_impl", None, "override attention impl (attention.ATTN_IMPLS)")
flags.DEFINE_float(
    "peak_tflops",
    None,
    "the device's peak TFLOP/s for the MFU figure (default: PEAK_TFLOPS by device kind)",
)
flags.DEFINE_bool(
    "count_only", False, "print parameter counts of the paper presets (eval_shape) and exit"
)


# Published dense bf16 peak TFLOP/s per device, by `jax.devices()[0].device_kind` prefix (the
# TPU figures match `imagen_jax.parallel.aot.CHIPS`). MFU = model FLOPs / (time x peak).
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
}


def peak_tflops(device) -> float | None:
  """The device's peak (the `--peak_tflops` flag wins); None where unknown (e.g. a CPU)."""
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  kind = getattr(device, "device_kind", "")
  for prefix, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return peak
  return None


# The bench preset's text: t5-v1_1-small's width (512) at 64 tokens, a mid-size text input.
BENCH_TEXT = registry.default_text_config("t5-v1_1-small", max_length=64)


def text_config(size: str, name: str | None = None, length: int | None = None):
  """The text block a preset size is measured with (a copy; `name` / `length` override)."""
  text = BENCH_TEXT if size == "bench" else common.text_config(size)
  text = text.copy_and_resolve_references()
  text.name = name or text.name
  text.max_length = length or text.max_length
  return text


def count_paper():
  paper = {"base64": 2.0e9, "sr256": 600e6, "sr1024": 400e6}
  text = text_config("paper")
  for stage, ref in paper.items():
    n = bench.param_count(presets.get_model_config(stage, "paper"), text)
    print(
        f"{stage:7s} paper preset: {n / 1e6:8.1f}M params  (paper: {ref / 1e6:.0f}M, "
        f"{100 * (n - ref) / ref:+.1f}%)  [{registry.text_dim(text)}-dim text]"
    )


def main(argv):
  del argv
  if FLAGS.count_only:
    count_paper()
    return
  stage, size = FLAGS.preset.split(":")
  cfg = presets.get_model_config(stage, size)
  text = text_config(size, FLAGS.text_name, FLAGS.text_len)
  if FLAGS.dtype:
    cfg.dtype = FLAGS.dtype
  if FLAGS.remat is not None:
    cfg.remat = FLAGS.remat
  if FLAGS.attn_impl:
    cfg.attn_impl = FLAGS.attn_impl
  b = FLAGS.batch
  ts = bench.build(cfg, text, b)
  model_flops, forward_flops = ts.model_flops()
  flops = ts.xla_flops()

  forward = jax.jit(lambda p, i: ts.model.apply(p, **i))
  t0 = time.perf_counter()
  fwd = forward.lower(ts.params, ts.inputs).compile()
  fwd_compile_s = time.perf_counter() - t0

  step_s, step_cpu = ts.time(FLAGS.steps)
  jax.block_until_ready(fwd(ts.params, ts.inputs))
  fwd_s, fwd_cpu = bench.median_time(lambda: fwd(ts.params, ts.inputs), FLAGS.fwd_steps)
  if FLAGS.profile_steps:  # after the timing: the trace costs nothing timed
    try:
      window = profiling.parse_window(FLAGS.profile_steps, "--profile_steps")
    except ValueError as e:
      raise cli.UserError(str(e)) from None
    profile = profiling.StepWindow(window, FLAGS.profile_dir)
    for i in range(1, profile.end + 1):
      with profile.before(i):
        loss = ts.step()
      profile.after(i, loss)
    print(f"trace of steps {profile.start + 1}..{profile.end} in {FLAGS.profile_dir}")

  print(
      f"preset              {FLAGS.preset}  (kind={cfg.kind}, dtype={cfg.dtype}, "
      f"remat={cfg.remat}, attn_impl={cfg.attn_impl}, image {cfg.image_size}x"
      f"{cfg.image_size}, batch {b}, text {text.name} [{text.max_length}, "
      f"{registry.text_dim(text)}])"
  )
  print(f"devices             {jax.devices()[0].platform} x{jax.device_count()}")
  print(f"parameters          {ts.num_params / 1e6:.2f}M")
  print(f"attention           {ts.attention}")
  print(
      f"model FLOPs         {model_flops / 1e9:.4f} GFLOP (3 x forward: conv "
      f"{forward_flops.conv / forward_flops.total:.0%}, attention "
      f"{forward_flops.attention / forward_flops.total:.0%})"
  )
  print(f"train-step FLOPs    {flops / 1e9:.4f} GFLOP (XLA cost analysis)")
  print(
      f"compile time        {ts.compile_s:.1f} s (train step), {fwd_compile_s:.1f} s (forward), "
      f"{ts.init_s:.1f} s (init, compile + run)"
  )
  print(
      f"train step          {step_s:.4f} s median over {FLAGS.steps} "
      f"(process CPU time {step_cpu:.3f} s)"
  )
  print(f"images/s            {b / step_s:.2f}")
  print(
      f"achieved            {flops / step_s / 1e9:.1f} GFLOP/s "
      f"({flops / step_cpu / 1e9:.1f} GFLOP per CPU-second)"
  )
  peak = peak_tflops(jax.devices()[0])
  kind = jax.devices()[0].device_kind
  if peak:
    mfu, xla = model_flops / step_s / (peak * 1e12), flops / step_s / (peak * 1e12)
    print(f"MFU                 {mfu:.2%} of {peak:g} TFLOP/s ({kind}); XLA FLOPs {xla:.2%}")
  else:
    print(f"MFU                 n/a: no peak known for {kind!r} (pass --peak_tflops)")
  print(
      f"denoiser forward    {fwd_s:.3f} s median over {FLAGS.fwd_steps} "
      f"(process CPU time {fwd_cpu:.3f} s)"
  )


if __name__ == "__main__":
  cli.run(main)
