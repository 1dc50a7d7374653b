"""Stage configs (base64.py, sr256.py, sr1024.py) and their argument parser, in big_vision's way.

Each stage module has `get_config(arg)`, where `arg` is "VARIANT[,key=value,...]":

    from configs import base64
    config = base64.get_config("paper,batch=256")   # train.global_batch_size = 256
    config = base64.get_config("tiny,num_steps=5,optim.name=adam")

or on the command line (ml_collections.config_flags passes the text after ':' to get_config,
then applies `--config.section.field=value` flags to the locked result):

    python -m imagen_jax.train --config=configs/base64.py:paper,batch=256 \
        --config.train.num_steps=5 --workdir=DIR

A key is a short knob of `KNOBS` (batch, num_steps, lr, text_name, max_length, ...) or the
dotted path of any config field (`diffusion.aug_level=(0.0, 0.5)`, `text.path=/ckpt/t5`).
Values are Python literals (`ast.literal_eval`; true / false too), else strings. An unknown key
is a ValueError naming it and what is allowed. The key `model=SIZE` builds the network from
another preset size of the stage (`imagen_jax.nn.presets`, e.g. `shapes,model=shapes_unet`: the
plain U-Net beside the shapes Efficient U-Net); its fields then take `--config.model.*` flags.
`stage_config(stage, arg)` assembles one locked `ml_collections.ConfigDict` with the sections
`stage, model, diffusion, text, data, optim, train, sample, mesh, distributed`. Building it reads
no files: the network's text width is `imagen_jax.text.registry.text_dim(config.text)` and its
text length `config.text.max_length`, both resolved where the encoder is used. Variants:

* `paper`: what Imagen reports (Saharia et al. 2022, §4.1 and App. F): batch 2048, lr 1e-4 with
    10k linear warmup then cosine decay, Adafactor for the base model and Adam(0.9, 0.999, 1e-8)
    for the super-resolution models, text dropped with p = 0.1, cosine logSNR schedule for base and
    SR256, the 1000-step linear-beta schedule (1e-4 -> 0.02) in continuous time for SR1024,
    epsilon-prediction, frozen T5-XXL at 128 tokens (the paper does not state the token count).
* `tiny`: seconds-per-step CPU sizes for tests.
* `shapes`: the built-in offline demo (shapes dataset; base at 32x32, SR 32->64): the numbers
    of `_VARIANTS` below, then the demo's per-stage choices `_SHAPES_DEMO`.

Where the paper is silent we choose, and say so next to the value.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from imagen_jax.data import pipeline
from imagen_jax.nn import presets
from imagen_jax.stage import SamplingSettings
from imagen_jax.text import registry

STAGES = ("base64", "sr256", "sr1024")
VARIANTS = ("paper", "tiny", "shapes")

# Logical axis -> mesh axis, MaxText style: params and activations have disjoint names, each
# name has one rule, and no param or activation maps two of its dims to one mesh axis, so the
# result never depends on rule order (tests/test_tensor_parallel.py permutes the rules).
# The paper is silent on partitioning; our choice, for the three mesh axes:
#   data x fsdp split the batch (`activation_batch`); fsdp also splits every param (ZeRO-3:
#     `embed`, `conv_out`, `text_embed`), all-gathered per layer for compute.
#   tensor splits channels: the feature maps' channels (`activation_embed`), conv kernels along
#     C_in (`conv_in`), Dense hidden widths (`mlp`) and attention heads. Each tensor shard then
#     stores 1/tensor of every feature map and computes 1/tensor of every conv on the channels
#     it holds; the partial sums are reduce-scattered back to channel shards (Megatron-style
#     channel parallelism: feature maps, not params, dominate a U-Net's memory). Norm
#     statistics, text sequences (small: [B, L, D]) and the [B, E] conditioning vector stay
#     whole over tensor.
# With tensor = 1 the tensor rules are no-ops and every param and batch keeps its data x fsdp
# layout (`parallel.sharding.fit_spec` drops mesh axes of size 1 from the specs).
PARAM_AXIS_RULES = (
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("text_embed", "fsdp"),
    ("conv_in", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
)
ACTIVATION_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),  # the data loader shards the batch the same way
    ("activation_height", None),
    ("activation_width", None),
    ("activation_embed", "tensor"),  # feature-map channels [B, H, W, C]
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),  # T5's feed-forward hidden units
    ("activation_kv", None),
    ("activation_length", None),  # text tokens
    ("activation_text_embed", None),
)
LOGICAL_AXIS_RULES = PARAM_AXIS_RULES + ACTIVATION_AXIS_RULES

# Per stage and variant: (image_size, lowres_size, sr_crop_size). SR1024 trains on aligned
# 256x256 / 64x64 crops of 1024 / 256 images (App. F.3) and runs convolutionally at full size
# at inference. The shapes cascade is 32 -> 64 -> 128 (its SR1024 stage trains on 64/32 crops).
_SIZES = {
    "paper": {"base64": (64, 0, 0), "sr256": (256, 64, 0), "sr1024": (1024, 256, 256)},
    "tiny": {"base64": (16, 0, 0), "sr256": (16, 8, 0), "sr1024": (32, 16, 16)},
    "shapes": {"base64": (32, 0, 0), "sr256": (64, 32, 0), "sr1024": (128, 64, 64)},
}

_VARIANTS = {
    "paper": dict(
        text_name="t5-v1_1-xxl",
        max_length=128,
        batch=2048,
        num_steps=2_500_000,
        lr=1e-4,
        warmup=10_000,
        ema_decay=0.9999,
        log_every=100,
        ckpt_every=5_000,
        sample_every=20_000,
        num_samples=16,
        sample_steps=256,
        mesh_fsdp=16,
        adafactor_relative=True,
    ),
    "tiny": dict(
        text_name="byt5-tiny-random",
        max_length=64,
        batch=8,
        num_steps=40,
        lr=3e-3,
        warmup=5,
        ema_decay=0.9,
        log_every=5,
        ckpt_every=10,
        sample_every=0,
        num_samples=2,
        sample_steps=4,
        mesh_fsdp=1,
        adafactor_relative=False,
    ),
    "shapes": dict(
        text_name="byt5-tiny-random",
        max_length=64,
        batch=32,
        num_steps=2_000,
        lr=1e-3,
        warmup=100,
        ema_decay=0.999,
        log_every=50,
        ckpt_every=500,
        sample_every=500,
        num_samples=8,
        sample_steps=32,
        mesh_fsdp=1,
        adafactor_relative=False,
    ),
}


# The short keys of `get_config("VARIANT,key=value")`: each names one field, which it sets after
# the variant's values (the per-variant numbers above use the same names).
KNOBS = {
    "text_name": "text.name",
    "max_length": "text.max_length",
    "batch": "train.global_batch_size",
    "num_steps": "train.num_steps",
    "lr": "optim.learning_rate",
    "warmup": "optim.warmup_steps",
    "ema_decay": "train.ema_decay",
    "log_every": "train.log_every",
    "ckpt_every": "train.ckpt_every",
    "sample_every": "train.sample_every",
    "num_samples": "sample.num_images",
    "sample_steps": "sample.num_steps",
    "mesh_fsdp": "mesh.shape.fsdp",
    "adafactor_relative": "optim.adafactor_multiply_by_parameter_scale",
}

# The built-in demo (`make demo`): per-stage choices sized for a short CPU budget (minutes per
# stage on 2 cores). Both stages predict x0 (the paper predicts eps, §2 / App. A): with a space-to-depth
# network and a few thousand steps, eps- and v-prediction leave per-pixel noise in the samples
# (base colour alignment at chance), while x0-prediction learns the content first. Adam for the
# base too: the one optimizer tested at this scale. EMA 0.995: a 0.999 EMA lags a 2000-step run.
_SHAPES_DEMO = {
    "base64": {
        "train.num_steps": 2500,
        "train.global_batch_size": 16,
        "optim.name": "adam",
        "diffusion.target": "x0",
    },
    "sr256": {
        "train.num_steps": 2000,
        "train.global_batch_size": 16,
        "diffusion.target": "x0",
        # aug_level ~ U(0, 0.5) in training, 0.1 at sampling (§2.4: 0.1-0.3 for the best
        # samples; the whole [0, 1] range wastes a short run on near-pure-noise inputs).
        "diffusion.aug_level": (0.0, 0.5),
        "sample.aug_level": 0.1,
        "sample.guidance_weight": 1.0,
    },
    "sr1024": {"diffusion.target": "x0", "diffusion.aug_level": (0.0, 0.5)},
}
_SHAPES_COMMON = {"train.ema_decay": 0.995, "train.sample_every": 0, "optim.warmup_steps": 100}

# What the paper's runs need to fit their pods (§4.1: batch 2048; 256 TPU-v4 chips for the base,
# 128 per SR stage; 32 GiB of HBM per chip). The paper does not state numerics or partitioning;
# these were chosen by compiling each stage's train step for its slice on a CPU
# (aot/compile_stage.py; the table of what was tried is in docs/results/scale.md): bfloat16
# compute (params, EMA and optimizer state stay float32), every residual block and attention
# layer rematerialised, the frozen T5-XXL stored and run in bfloat16.
_PAPER_SCALE = {
    "model.dtype": "bfloat16",
    "model.remat": True,
    "text.dtype": "bfloat16",
    "text.param_dtype": "bfloat16",
}
# The base stage's params and batch split over all chips (ZeRO-3, data 1 x fsdp 256 on v4-512):
# the layout measured to fit (27.6 of 32 GiB per chip); the SR stages keep data x fsdp 16.
_PAPER_MESH = {"base64": {"mesh.shape.data": 1, "mesh.shape.fsdp": -1}, "sr256": {}, "sr1024": {}}


def _check(name: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _split_top_level(text: str) -> list[str]:
  """Splits at the commas outside brackets and quotes: "a=(1, 2),b=3" -> ["a=(1, 2)", "b=3"]."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
  """A Python literal ("256", "1e-4", "(0.0, 0.5)", "None"), true / false, else the string."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(
    arg: str | None, variants: Sequence[str], default: str
) -> tuple[str, list[tuple[str, Any]]]:
  """ "VARIANT[,key=value,...]" -> (variant, [(key, value), ...]) (big_vision's `arg`).

  The variant may be left out ("batch=8" or None): `default` is used.
  """
  parts = _split_top_level(arg or "")
  variant = default
  if parts and "=" not in parts[0]:
    variant = parts.pop(0)
  _check("variant", variant, variants)
  overrides = []
  for part in parts:
    key, eq, value = part.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"config argument {part!r} in {arg!r} is not key=value")
    overrides.append((key.strip(), parse_value(value.strip())))
  return variant, overrides


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Sequence[tuple[str, Any]],
    knobs: dict[str, str] | None = None,
    fixed: Sequence[str] = (),
) -> None:
  """Sets each (key, value) on the unlocked `config`; key: a `knobs` name or a field path.

  `fixed`: top-level fields that the arg may not set (e.g. `stage`, set by the module).
  """
  knobs = knobs or {}
  for key, value in overrides:
    path = knobs.get(key, key)
    names = path.split(".")
    node = config
    for depth, name in enumerate(names):
      allowed = [k for k in node.keys() if depth or k not in fixed]
      if name not in allowed and depth:
        raise ValueError(
            f"unknown config key {key!r}: {'.'.join(names[:depth])} has no field {name!r}; "
            f"its fields: {', '.join(allowed)}"
        )
      if name not in allowed:
        raise ValueError(
            f"unknown config key {key!r}; allowed: "
            + (f"{', '.join(knobs)}, or " if knobs else "")
            + f"a field path (section.field) in {', '.join(allowed)}"
        )
      if depth < len(names) - 1:
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
          raise ValueError(f"config key {key!r}: {'.'.join(names[: depth + 1])} is not a section")
    field = names[-1]
    old = node[field]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[field] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"config key {key!r}: cannot set {path} = {value!r} ({e})") from e


def diffusion_config(stage: str) -> ml_collections.ConfigDict:
  """Continuous-time diffusion settings (Imagen App. A)."""
  c = ml_collections.ConfigDict()
  # Cosine schedule for base and SR256; SR1024 uses the 1000-step linear-beta schedule in
  # continuous time (App. F.3).
  c.schedule = "linear_beta" if stage == "sr1024" else "cosine"
  c.logsnr_min = -20.0
  c.logsnr_max = 20.0
  c.beta_start = 1e-4
  c.beta_end = 0.02
  c.num_timesteps = 1000
  # What the network predicts: eps as in the paper; v / x0 are supported extensions.
  c.target = "eps"
  # Noise conditioning augmentation (§2.4, App. D.2): per-example aug_level ~ U(min, max) at
  # training time. The paper only says "randomly"; uniform over the whole [0, 1] is our choice.
  # Ignored by the base stage.
  c.aug_level = (0.0, 1.0) if stage != "base64" else (0.0, 0.0)
  return c


def optim_config(stage: str, v: dict) -> ml_collections.ConfigDict:
  """Optimizer per stage (§4.1): Adafactor for base, Adam(0.9, 0.999, 1e-8) for SR."""
  c = ml_collections.ConfigDict()
  c.name = "adafactor" if stage == "base64" else "adam"
  c.learning_rate = v["lr"]
  c.warmup_steps = v["warmup"]
  # "10k linear warmup then cosine" (§4.1); decay length and floor are not stated: we decay
  # over the whole run to end_learning_rate.
  c.decay = "cosine"
  c.end_learning_rate = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  # Global-norm gradient clipping: the paper is silent; 1.0 is common in peers. <= 0 disables.
  c.grad_clip_norm = 1.0
  # Adafactor: optax defaults (the paper names no settings).
  c.adafactor_min_dim_size_to_factor = 128
  c.adafactor_decay_rate = 0.8
  # Relative (parameter-scale) steps are optax's default; they start zero-initialised output
  # layers at 1e-3 * lr, which short CPU runs cannot afford, so tiny / shapes turn them off.
  c.adafactor_multiply_by_parameter_scale = v["adafactor_relative"]
  c.adafactor_clipping_threshold = 1.0
  return c


def text_config(variant: str) -> ml_collections.ConfigDict:
  """The variant's `text` block (its fields are defined once, by `registry.default_text_config`).

  The network's text input is `[B, max_length, registry.text_dim(block)]` (T5-XXL: 4096, §2.1).
  """
  _check("variant", variant, VARIANTS)
  v = _VARIANTS[variant]
  return registry.default_text_config(v["text_name"], max_length=v["max_length"])


def data_config(stage: str, variant: str) -> ml_collections.ConfigDict:
  """Dataset settings read by `imagen_jax.data.pipeline.make_loader` (its own defaults)."""
  image_size, lowres_size, crop = _SIZES[variant][stage]
  return pipeline.default_data_config(
      # the paper's data (§4.1) is not public: a paper run names its own (--config.data.name)
      "" if variant == "paper" else "shapes",
      data_dir="/tmp/imagen_jax_data",
      resolution=image_size,  # shapes renders at the stage's output resolution
      num_train={"paper": 100_000, "tiny": 64, "shapes": 20_000}[variant],
      num_test={"paper": 1_000, "tiny": 16, "shapes": 500}[variant],
      sr_crop_size=crop,
      crop="center" if variant == "tiny" else "random",
      keep_caption=True,
  )  # host-side only: the prompts of the sample grids


def train_config(v: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_steps = v["num_steps"]
  c.global_batch_size = v["batch"]
  # k > 1: each optimizer step averages the gradients of k microbatches of
  # global_batch_size / k (train.step.accumulate_grads): the paper's batch on a smaller slice.
  c.grad_accum_steps = 1
  # EMA decay: not stated in the paper; 0.9999 as in peers for long runs.
  c.ema_decay = v["ema_decay"]
  # Per-example loss weight over time (diffusion.losses.loss_weights): "none" is the paper's
  # plain MSE (App. A); "min_snr" is Min-SNR-gamma (Hang et al. 2023) with min_snr_gamma (their
  # default 5). A training choice, so it may change on resume (unlike diffusion.*).
  c.loss_weighting = "none"
  c.min_snr_gamma = 5.0
  c.log_every = v["log_every"]
  c.ckpt_every = v["ckpt_every"]
  c.max_to_keep = 3  # newest checkpoints kept
  c.keep_period = 0  # > 0: also keep every checkpoint whose step it divides (e.g. 50_000)
  c.sample_every = v["sample_every"]  # 0 disables periodic sample grids
  c.seed = 0
  c.nonfinite = "stop"  # 'stop': raise with the step number; 'skip': keep params, go on
  # With 'skip': this many non-finite steps in a row stop the run (it diverged). Our choice.
  c.max_nonfinite_steps = 10
  c.progress_bar = True
  # Preemption (SIGTERM to any process) is agreed by jax's coordination service at no per-step
  # cost; only with its preemption service turned off do the hosts agree by one tiny
  # all-gather every this many steps.
  c.preemption_check_every = 10
  # A checkpoint whose data position is per-process grain iterator state is refused; True
  # resumes it with the data at step x global_batch_size of the global order instead.
  c.data_position_from_step = False
  # Warm start (train.warm_start): a workdir whose EMA params start this run (fresh optimizer);
  # '' = none. freeze: a regex of param names that get no updates; '' = none.
  c.init_from = ""
  c.freeze = ""
  # (start, end): a jax.profiler trace of steps start + 1 .. end in <workdir>/tensorboard
  # (imagen_jax.profiling); (0, 0) = off.
  c.profile_steps = (0, 0)
  return c


def sampling_block(
    *, w: float, steps: int, aug_level: float = 0.0, sampler: str = "ddim", threshold="dynamic"
) -> ml_collections.ConfigDict:
  """One stage's sampling settings as a config block: every field of `stage.SamplingSettings`
  (defined, with its defaults and meaning, there and only there), read back by
  `SamplingSettings.from_config`. Used by the stage configs' `sample` section and by each stage
  of configs/cascade.py.

  w: the paper's guidance weight (§2.2; 1 = no guidance); steps: the sampler's steps (the paper
  does not state them per stage); aug_level: SR only, the noise-conditioning-augmentation level
  of the low-res input (§2.4); sampler: ddpm | ddim | dpmpp_2m | heun | euler_ancestral;
  threshold: none | static | dynamic (§2.3).
  """
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(SamplingSettings):
    c[f.name] = f.default
  c.max_scale = config_dict.placeholder(float)  # DeepFloyd IF's cap on s; unset: none
  c.update(sampler=sampler, num_steps=steps, guidance_weight=w, threshold=threshold)
  c.aug_level = aug_level
  return c


def sample_config(stage: str, v: dict) -> ml_collections.ConfigDict:
  """Periodic EMA sample grids written during training (not the paper's evaluation)."""
  # COCO settings, §4.1 / App.: w = 1.35 for the base stage, 8 for the SR stages.
  c = sampling_block(w=1.35 if stage == "base64" else 8.0, steps=v["sample_steps"])
  c.num_images = v["num_samples"]
  return c


def mesh_config(v: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shape = {"data": -1, "fsdp": v["mesh_fsdp"], "tensor": 1}  # -1 = fill the devices
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  # Params of at least this many elements whose rules leave them unsplit over fsdp are split
  # along their largest divisible dim (our choice; see parallel/sharding.fsdp_fallback).
  c.fsdp_min_size = 1 << 16
  # Apply the networks' activation sharding constraints (nn.with_logical_constraint, the
  # activation_* rules) in the train step. Measured on 8 CPU devices: the same XLA FLOPs per
  # device with tensor = 1; with tensor = 2, 16-19% fewer in the U-Net's forward + backward
  # than letting XLA propagate layouts from the param / batch shardings (it then repeats work
  # over tensor).
  c.constrain_activations = True
  return c


def distributed_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.initialize = False
  c.coordinator_address = ""  # e.g. "127.0.0.1:12345"; empty = let jax auto-detect
  c.num_processes = -1
  c.process_id = -1
  c.cpu_collectives = ""  # "gloo" for multi-process CPU runs
  return c


def stage_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The full, locked config of one cascade stage; `arg`: "VARIANT[,key=value,...]"."""
  _check("stage", stage, STAGES)
  variant, overrides = parse_arg(arg, VARIANTS, default="tiny")
  # `model=SIZE`: another network preset (its own fields, so not a field override).
  model_size = dict(overrides).get("model", variant)
  overrides = [(k, v) for k, v in overrides if k != "model"]
  v = _VARIANTS[variant]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.variant = variant
  c.model = presets.get_model_config(stage, str(model_size))
  # The stage's output / input resolutions (the network trains on data.sr_crop_size crops
  # when that is set, App. F.3); lowres_size 0 = base stage.
  c.image_size, c.lowres_size, crop = _SIZES[variant][stage]
  c.model.image_size = crop or c.image_size  # nominal; the networks are convolutional
  c.diffusion = diffusion_config(stage)
  c.text = text_config(variant)
  c.data = data_config(stage, variant)
  c.optim = optim_config(stage, v)
  c.train = train_config(v)
  c.sample = sample_config(stage, v)
  c.mesh = mesh_config(v)
  c.distributed = distributed_config()
  if variant == "shapes":
    apply_overrides(c, [*_SHAPES_COMMON.items(), *_SHAPES_DEMO[stage].items()])
  if variant == "paper":
    apply_overrides(c, [*_PAPER_SCALE.items(), *_PAPER_MESH[stage].items()])
  apply_overrides(c, overrides, KNOBS, fixed=("stage", "variant"))
  c.lock()
  return c
