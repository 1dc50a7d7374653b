"""Makes the DeepFloyd IF parity goldens in tests/goldens/deepfloyd/ (needs torch + diffusers).

    python tests/goldens/make_if_goldens.py          # rewrites tests/goldens/deepfloyd/

(made with torch 2.13.0 and diffusers 0.42.1 in a separate venv; nothing here is needed to run
the tests.)

Two reduced, randomly initialised diffusers `UNet2DConditionModel`s with IF's block types and
options (small widths), each saved as a diffusers folder (`config.json` + safetensors) and with
its outputs on fixed inputs in `io.npz` (NCHW as torch gives them):

  * `if_i`: IF-I style (ResnetDownsampleBlock2D + SimpleCrossAttnDownBlock2D, the
    SimpleCrossAttn middle, text projection `encoder_hid_dim`, attention-pooled text added to
    the time embedding, GELU, scale-shift ResBlocks, learned-range variance channels, the text
    normalised by GroupNorm(32) before its keys and values: `cross_attention_norm`), one
    safetensors file; outputs without and with a text mask, at integer and fractional timesteps.
  * `if_ii`: IF-II style (6 input channels, `class_embed_type="timestep"` noise level,
    per-block layers / head dims (unequal, so the up blocks' unreversed head-dim indexing is
    exercised), only-cross-attention in one block, resnet_out_scale_factor and
    mid_block_scale_factor 1.414), saved in shards with the index json; without the masked
    output (diffusers' text mask breaks only-cross-attention layers).

`scheduler.npz`: diffusers `DDPMScheduler` with IF's settings (squaredcos_cap_v2, 1000 steps,
learned_range variance, dynamic thresholding 0.95 / max 1.5) stepped on fixed model outputs with
respaced timesteps, with the noise it drew; also IF-II's bilinear align_corners upsampling and
its noise-level augmentation (`add_noise`).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepfloyd")

COMMON = dict(
    act_fn="gelu",
    time_embedding_act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    encoder_hid_dim=16,
    encoder_hid_dim_type="text_proj",
    cross_attention_dim=32,  # a multiple of norm_cross's 32 groups
    cross_attention_norm="group_norm",  # as IF's published U-Nets (IF's norm_encoder)
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    norm_num_groups=4,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
)

SPECS = {
    "if_i": dict(
        seed=0,
        size=16,
        shard=None,
        unet=dict(
            COMMON,
            sample_size=16,
            in_channels=3,
            out_channels=6,
            block_out_channels=(4, 8, 12),
            layers_per_block=1,
            down_block_types=(
                "ResnetDownsampleBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
            ),
            up_block_types=(
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "ResnetUpsampleBlock2D",
            ),
            attention_head_dim=4,
        ),
    ),
    "if_ii": dict(
        seed=1,
        size=16,
        shard="100KB",
        unet=dict(
            COMMON,
            sample_size=16,
            in_channels=6,
            out_channels=6,
            class_embed_type="timestep",
            block_out_channels=(4, 8, 12),
            layers_per_block=(1, 2, 1),
            down_block_types=(
                "ResnetDownsampleBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
            ),
            up_block_types=(
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "ResnetUpsampleBlock2D",
            ),
            attention_head_dim=(4, 4, 12),
            only_cross_attention=(False, True, False),
            resnet_out_scale_factor=1.414,
            mid_block_scale_factor=1.414,
        ),
    ),
}

# IF's scheduler_config.json (stage I): the settings diffusers' IFPipeline steps with.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    variance_type="learned_range",
    prediction_type="epsilon",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5,
    clip_sample=True,
    clip_sample_range=1.0,
)


README = """DeepFloyd IF parity goldens: reduced random diffusers U-Nets (IF-I, IF-II) as diffusers
folders, their outputs on fixed inputs (`io.npz`), and `DDPMScheduler` steps with IF's settings
(`scheduler.npz`). Made by `python tests/goldens/make_if_goldens.py` (needs torch + diffusers);
checked by tests/test_deepfloyd_nn.py and tests/test_discrete.py (no torch).
"""


def build_model(name: str) -> UNet2DConditionModel:
  spec = SPECS[name]
  torch.manual_seed(spec["seed"])
  model = UNet2DConditionModel(**spec["unet"]).eval()
  # diffusers zero-inits nothing here, but random init leaves some paths tiny: perturb every
  # tensor so each one changes the output.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def inputs(name: str) -> dict[str, np.ndarray]:
  spec = SPECS[name]
  c = spec["unet"]
  rng = np.random.default_rng(100 + spec["seed"])
  b, s = 3, spec["size"]
  out = dict(
      x=rng.standard_normal((b, c["in_channels"], s, s)).astype(np.float32),
      t=np.array([999.0, 437.5, 3.0], np.float32),
      text=rng.standard_normal((b, 5, c["encoder_hid_dim"])).astype(np.float32),
      mask=np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool),
  )
  if c.get("class_embed_type") == "timestep":
    out["noise_level"] = np.array([250.0, 0.0, 100.0], np.float32)
  return out


def reference_outputs(model, io: dict) -> dict[str, np.ndarray]:
  kw = {}
  if "noise_level" in io:
    kw["class_labels"] = torch.from_numpy(io["noise_level"])
  x, text = torch.from_numpy(io["x"]), torch.from_numpy(io["text"])
  with torch.no_grad():
    plain = model(x, torch.from_numpy(io["t"]), text, **kw).sample
    ints = model(x, torch.tensor([999, 500, 0]), text, **kw).sample
    out = dict(out=plain.numpy(), out_int_t=ints.numpy())
    # diffusers pads the text mask by the image tokens, which breaks only-cross-attention
    # layers (no image keys): the masked path is compared only without them.
    if not any(
        model.config.only_cross_attention
        if isinstance(model.config.only_cross_attention, (list, tuple))
        else [model.config.only_cross_attention]
    ):
      mask = torch.from_numpy(io["mask"])
      out["out_masked"] = model(
          x, torch.from_numpy(io["t"]), text, encoder_attention_mask=mask, **kw
      ).sample.numpy()
  return out


def scheduler_goldens() -> dict[str, np.ndarray]:
  sched = DDPMScheduler(**SCHEDULER)
  rng = np.random.default_rng(7)
  out = {"alphas_cumprod": sched.alphas_cumprod.numpy()}
  for steps in (10, 27):
    sched.set_timesteps(steps)
    ts = sched.timesteps.numpy()
    out[f"timesteps_{steps}"] = ts
    sample = rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 1.5
    model_output = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    model_output[:, 3:] = np.tanh(model_output[:, 3:])  # learned-range v in [-1, 1]
    for k, t in enumerate(ts[[0, len(ts) // 2, -1]]):
      gen = torch.Generator().manual_seed(1000 + k)
      res = sched.step(
          torch.from_numpy(model_output), int(t), torch.from_numpy(sample), generator=gen
      )
      noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1000 + k))
      tag = f"{steps}_{k}"
      out[f"t_{tag}"] = np.array(int(t))
      out[f"sample_{tag}"] = sample
      out[f"model_output_{tag}"] = model_output
      out[f"noise_{tag}"] = noise.numpy()
      out[f"prev_{tag}"] = res.prev_sample.numpy()
      out[f"x0_{tag}"] = res.pred_original_sample.numpy()
  # IF-II's conditioning: bilinear align_corners upsampling, then add_noise at noise_level.
  low = rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
  up = F.interpolate(torch.from_numpy(low), (16, 16), mode="bilinear", align_corners=True)
  noise = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  level = torch.tensor([250, 0])
  noised = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").add_noise(
      up, torch.from_numpy(noise), level
  )
  out.update(
      lowres=low,
      upsampled=up.numpy(),
      aug_noise=noise,
      aug_level=level.numpy(),
      lowres_noised=noised.numpy(),
  )
  return out


def main():
  if os.path.isdir(GOLDEN_DIR):
    shutil.rmtree(GOLDEN_DIR)
  os.makedirs(GOLDEN_DIR)
  for name, spec in SPECS.items():
    model = build_model(name)
    folder = os.path.join(GOLDEN_DIR, name)
    if spec["shard"]:
      model.save_pretrained(folder, safe_serialization=True, max_shard_size=spec["shard"])
    else:
      model.save_pretrained(folder, safe_serialization=True)
    io = inputs(name)
    io.update(reference_outputs(model, io))
    np.savez_compressed(os.path.join(folder, "io.npz"), **io)
    with open(os.path.join(folder, "config.json")) as f:
      print(
          name,
          "params:",
          sum(p.numel() for p in model.parameters()),
          "files:",
          sorted(os.listdir(folder)),
          "keys:",
          len(json.load(f)),
      )
  np.savez_compressed(os.path.join(GOLDEN_DIR, "scheduler.npz"), **scheduler_goldens())
  with open(os.path.join(GOLDEN_DIR, "README.md"), "w") as f:
    f.write(README)


if __name__ == "__main__":
  main()
