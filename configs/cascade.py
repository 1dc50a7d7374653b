"""Cascade sampling settings (Imagen §2.2-§2.4): one block per stage, any prefix runs.

Usage: `python -m imagen_jax.sampling --config=configs/cascade.py:shapes --prompt="a red circle
in the center"`; variants:
* `shapes`: the built-in demo's cascade (32x32 base -> 64x64 SR), reading the workdirs that
  `make demo` writes (`demo_out/base`, `demo_out/sr`).
* `paper`: the three paper stages (64 -> 256 -> 1024) from `workdirs/{base64,sr256,sr1024}`,
  with the guidance weights of the paper's COCO table (w = 1.35 base, 8.0 SR; §4.1).
* `if_xl`: DeepFloyd IF, stage I (IF-I-XL, text -> 64x64) -> stage II (IF-II-L, -> 256x256),
  read from the diffusers folders a user downloads (README, "DeepFloyd IF"), sampled with IF's
  DDPM (learned variance), its guidance scales (7 and 4) and thresholding.
`arg` is "VARIANT[,key=value,...]" (see configs/common.py) with field paths as keys, e.g.
`get_config("shapes,num_stages=1,stage2.aug_level=0.2")`; on the command line
`--config=configs/cascade.py:shapes,seed=3 --config.stage2.aug_level=0.2`.
"""

import ml_collections

from configs import common

VARIANTS = ("shapes", "paper", "if_xl")


def _stage(workdir, *, w, steps, aug_level=0.0, sampler="ddim", threshold="dynamic"):
  s = common.sampling_block(
      w=w, steps=steps, aug_level=aug_level, sampler=sampler, threshold=threshold
  )
  s.workdir = workdir
  s.batch_size = 0  # this stage's prompts per call, a divisor of c.batch_size; 0 = c.batch_size
  return s


def get_config(arg: str | None = None):
  """The locked cascade config; `arg`: "VARIANT[,key=value,...]" (default variant `shapes`)."""
  variant, overrides = common.parse_arg(arg, VARIANTS, default="shapes")
  c = ml_collections.ConfigDict()
  if variant == "shapes":
    c.num_stages = 2
    c.stage1 = _stage("demo_out/base", w=3.0, steps=25)
    # The demo's SR stage predicts x0 and is sampled without guidance (see
    # configs/common.py, variant `shapes`).
    c.stage2 = _stage("demo_out/sr", w=1.0, steps=20, aug_level=0.1)
    c.stage3 = _stage("", w=1.0, steps=20)
  elif variant == "if_xl":
    c.num_stages = 2
    # IF's pipeline defaults: 100 / 50 DDPM steps, w = 7 / 4, dynamic thresholding at the 95th
    # percentile, IF-II's noise_level 250 (aug_level 0.25). The cap s <= sample_max_value of
    # each model's scheduler_config.json: 1.5 for IF-I, 1.0 for IF-II (both written by
    # diffusers' scripts/convert_if.py, which made the published folders).
    c.stage1 = _stage("weights/IF-I-XL-v1.0/unet", w=7.0, steps=100, sampler="ddpm")
    c.stage2 = _stage("weights/IF-II-L-v1.0/unet", w=4.0, steps=50, aug_level=0.25, sampler="ddpm")
    c.stage3 = _stage("", w=1.0, steps=20)
    for s, cap in ((c.stage1, 1.5), (c.stage2, 1.0)):
      s.percentile, s.max_scale = 95.0, cap
    c.deepfloyd = ml_collections.ConfigDict(
        dict(
            text_name="t5-v1_1-xxl",
            text_path="weights/t5-v1_1-xxl",  # IF-I's text_encoder/ + tokenizer/ files
            text_max_length=77,
            lowres_size=64,  # IF-II's input side (IF-I's output)
            dtype="bfloat16",
            param_dtype="bfloat16",
            attn_impl="auto",
            use_text_mask=False,  # IF's pipeline passes no mask: all 77 tokens are attended
            logical_axis_rules=common.LOGICAL_AXIS_RULES,
            fsdp_min_size=1 << 16,
        )
    )
  else:
    c.num_stages = 3
    c.stage1 = _stage("workdirs/base64", w=1.35, steps=256)
    c.stage2 = _stage("workdirs/sr256", w=8.0, steps=128, aug_level=0.0)
    c.stage3 = _stage("workdirs/sr1024", w=8.0, steps=64, aug_level=0.0)
  c.seed = 0
  # Prompts per jitted call (the whole cascade). The paper cascade at 32 fits a v4-8 slice
  # (18.9 of 32 GiB per chip, the SR 1024 loop); a v5e-8 needs 16 (docs/results/scale.md).
  c.batch_size = {"shapes": 64, "paper": 32, "if_xl": 16}[variant]
  # AOT cascade reports of the slice (aot/compile_cascade.py --report_json; comma-separated):
  # a stage batch none of them shows fitting is refused (parallel/cascade_report.py). '' = none.
  c.aot_report = ""
  common.apply_overrides(c, overrides)
  c.lock()
  return c
