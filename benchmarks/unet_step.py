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

The training step is the plain loss of the paper (App. A): x0 ~ batch, t ~ U(0,1),
logsnr = cosine(t), z_t = alpha x0 + sigma eps, loss = |eps_hat - eps|^2. The diffusion math is
inlined here (a few lines) so the benchmark depends on nothing but the network.
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import flags

from configs import common
from imagen_jax import cli, profiling
from imagen_jax.nn import attention, presets, unet
from imagen_jax.nn import flops as flops_lib
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


def _inputs(cfg, text, batch, key):
  s, length, dim = cfg.image_size, int(text.max_length), registry.text_dim(text)
  k = jax.random.split(key, 4)
  out = dict(
      x_t=jax.random.normal(k[0], (batch, s, s, 3)),
      logsnr=jnp.zeros((batch,)),
      text_emb=jax.random.normal(k[1], (batch, length, dim)),
      text_mask=jnp.ones((batch, length), bool),
  )
  if cfg.lowres_cond:
    out["lowres"] = jax.random.normal(k[2], (batch, s, s, 3))
    out["aug_level"] = jax.random.uniform(k[3], (batch,))
  return out


def param_count(cfg, text, batch=1) -> int:
  model = unet.build_model(cfg)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), **_inputs(cfg, text, batch, jax.random.key(0)))
  )
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def count_paper():
  paper = {"base64": 2.0e9, "sr256": 600e6, "sr1024": 400e6}
  text = text_config("paper")
  for stage, ref in paper.items():
    n = param_count(presets.get_model_config(stage, "paper"), text)
    print(
        f"{stage:7s} paper preset: {n / 1e6:8.1f}M params  (paper: {ref / 1e6:.0f}M, "
        f"{100 * (n - ref) / ref:+.1f}%)  [{registry.text_dim(text)}-dim text]"
    )


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _median_time(fn, n):
  """(median wall seconds, median process CPU seconds) of fn() over n calls.

  CPU time (all threads of this process) is the steadier figure on a shared machine: on an
  otherwise idle C-core CPU the wall time approaches cpu / C.
  """
  times, cpu = [], []
  for _ in range(n):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(times), statistics.median(cpu)


def make_train_step(model, tx, cond, batch):
  """Adam step on the eps-MSE loss with the cosine schedule (App. A), x0 given."""

  def train_step(params, opt_state, x0, key):
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (batch,))
    logsnr = -2.0 * jnp.log(jnp.tan(0.5 * math.pi * jnp.clip(t, 1e-4, 1 - 1e-4)))  # cosine
    alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None, None, None]
    eps = jax.random.normal(k_eps, x0.shape)
    z_t = alpha * x0 + sigma * eps

    def loss_fn(p):
      eps_hat = model.apply(p, z_t, logsnr, **cond, train=True, rngs={"dropout": k_drop})
      return jnp.mean((eps_hat - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


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
  model = unet.build_model(cfg)
  b = FLAGS.batch
  inputs = _inputs(cfg, text, b, jax.random.key(0))
  cond = {k: v for k, v in inputs.items() if k not in ("x_t", "logsnr")}
  # An "rbg" key: compiling init with threefry costs ~0.1 s of CPU per param leaf here (one
  # threefry kernel per initializer); the benchmark does not care about init quality.
  t0 = time.perf_counter()
  params = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0, impl="rbg"), **inputs))
  init_s = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx = optax.adam(1e-4)
  opt_state = tx.init(params)
  x0, key = inputs["x_t"], jax.random.key(1)

  t0 = time.perf_counter()
  with attention.recording() as seen:
    lowered = jax.jit(make_train_step(model, tx, cond, b), donate_argnums=(0, 1)).lower(
        params, opt_state, x0, key
    )
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  attn = "+".join(sorted(set(seen))) or "none"
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
  forward_flops = flops_lib.network_forward_flops(cfg, abstract)
  model_flops = flops_lib.TRAIN_FACTOR * forward_flops.total
  flops = _flops(compiled)
  if cfg.attn_impl != "dense":
    # XLA's cost analysis counts a loop body once, so the per-example attention loop
    # (attn_impl per_example, or auto on one CPU device) hides most attention FLOPs: count
    # the same step with dense attention instead (analysis of the lowered module, no compile).
    dense_cfg = cfg.copy_and_resolve_references()
    dense_cfg.attn_impl = "dense"
    step = make_train_step(unet.build_model(dense_cfg), tx, cond, b)
    flops = _flops(jax.jit(step).lower(params, opt_state, x0, key))

  forward = jax.jit(lambda p, i: model.apply(p, **i))
  t0 = time.perf_counter()
  fwd = forward.lower(params, inputs).compile()
  fwd_compile_s = time.perf_counter() - t0

  state = [params, opt_state]

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], x0, key)
    return loss

  jax.block_until_ready(step())  # warm-up
  step_s, step_cpu = _median_time(step, FLAGS.steps)
  jax.block_until_ready(fwd(state[0], inputs))
  fwd_s, fwd_cpu = _median_time(lambda: fwd(state[0], inputs), FLAGS.fwd_steps)
  if FLAGS.profile_steps:  # after the timing: the trace costs nothing timed
    try:
      window = profiling.parse_window(FLAGS.profile_steps, "--profile_steps")
    except ValueError as e:
      raise cli.UserError(str(e)) from None
    profile = profiling.StepWindow(window, FLAGS.profile_dir)
    for i in range(1, profile.end + 1):
      with profile.before(i):
        loss = step()
      profile.after(i, loss)
    print(f"trace of steps {profile.start + 1}..{profile.end} in {FLAGS.profile_dir}")

  print(
      f"preset              {FLAGS.preset}  (kind={cfg.kind}, dtype={cfg.dtype}, "
      f"remat={cfg.remat}, attn_impl={cfg.attn_impl}, image {cfg.image_size}x"
      f"{cfg.image_size}, batch {b}, text {text.name} [{text.max_length}, "
      f"{registry.text_dim(text)}])"
  )
  print(f"devices             {jax.devices()[0].platform} x{jax.device_count()}")
  print(f"parameters          {n_params / 1e6:.2f}M")
  print(f"attention           {attn}")
  print(
      f"model FLOPs         {model_flops / 1e9:.4f} GFLOP (3 x forward: conv "
      f"{forward_flops.conv / forward_flops.total:.0%}, attention "
      f"{forward_flops.attention / forward_flops.total:.0%})"
  )
  print(f"train-step FLOPs    {flops / 1e9:.4f} GFLOP (XLA cost analysis)")
  print(
      f"compile time        {compile_s:.1f} s (train step), {fwd_compile_s:.1f} s (forward), "
      f"{init_s:.1f} s (init, compile + run)"
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
