"""DeepFloyd IF U-Nets: parity with diffusers' UNet2DConditionModel on reduced random configs.

The goldens (tests/goldens/deepfloyd/, made by tests/goldens/make_if_goldens.py with torch +
diffusers) hold diffusers folders (config.json + safetensors, one file for IF-I, shards + index
for IF-II) and diffusers' outputs on fixed inputs; no torch is needed here.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.nn import deepfloyd, deepfloyd_checkpoint
from imagen_jax.nn.deepfloyd_config import IFConfig, IFConfigError, read_config

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "deepfloyd")


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _load(name, **kw):
  folder = os.path.join(GOLDENS, name)
  model, params = deepfloyd_checkpoint.load(folder, **kw)
  io = dict(np.load(os.path.join(folder, "io.npz")))
  return model, params, io


def _close(got, want):
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, atol=1e-5 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("name", ["if_i", "if_ii"])
def test_forward_matches_diffusers(name):
  model, params, io = _load(name)
  x = _nhwc(io["x"])
  noise = io.get("noise_level")
  fwd = jax.jit(lambda p, x, t, text, mask: model.apply({"params": p}, x, t, text, mask, noise))
  out = np.asarray(fwd(params, x, io["t"], io["text"], None))
  assert out.shape == x.shape[:3] + (6,)
  _close(out, _nhwc(io["out"]))
  ints = np.asarray(fwd(params, x, np.array([999, 500, 0], np.int32), io["text"], None))
  _close(ints, _nhwc(io["out_int_t"]))
  if "out_masked" in io:
    masked = np.asarray(fwd(params, x, io["t"], io["text"], io["mask"]))
    _close(masked, _nhwc(io["out_masked"]))
    # The mask matters (example 1 drops 3 of 5 tokens), so the check above could fail.
    assert np.abs(masked[1] - out[1]).max() > 1e-3


def test_noise_level_and_text_change_the_output():
  """The IF-II noise-level path and the text path both reach the output (not dead inputs)."""
  model, params, io = _load("if_ii")
  x, t, text = _nhwc(io["x"]), io["t"], io["text"]
  f = lambda noise, text: np.asarray(model.apply({"params": params}, x, t, text, None, noise))
  base = f(io["noise_level"], text)
  assert np.abs(f(io["noise_level"] + 50.0, text) - base).max() > 1e-3
  assert np.abs(f(io["noise_level"], text[::-1]) - base).max() > 1e-3


def test_bfloat16_and_remat_close_to_float32():
  model, params, io = _load("if_i", dtype=jnp.bfloat16, remat=True)
  out = np.asarray(model.apply({"params": params}, _nhwc(io["x"]), io["t"], io["text"]))
  want = _nhwc(io["out"])
  assert np.abs(out - want).max() < 0.05 * np.abs(want).max()


def test_config_fields():
  c = read_config(os.path.join(GOLDENS, "if_ii"))
  assert c.is_sr and c.text_dim == 16 and c.time_embed_dim == 16
  assert c.layers_per_block == (1, 2, 1) and c.attention_head_dim == (4, 4, 12)
  assert c.only_cross_attention == (False, True, False)
  assert c.cross_attention_norm == "group_norm"  # as IF's published U-Nets (norm_cross)
  assert not read_config(os.path.join(GOLDENS, "if_i")).is_sr


@pytest.mark.parametrize(
    "field,value",
    [
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        (
            "down_block_types",
            ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
        ),
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "projection"),
        ("time_embedding_type", "fourier"),
        ("act_fn", "mish"),
        ("attention_head_dim", 5),
        ("cross_attention_norm", "layer_norm"),
        ("cross_attention_dim", 40),  # not a multiple of norm_cross's 32 groups
    ],
)
def test_config_refuses_what_it_does_not_compute(field, value):
  with open(os.path.join(GOLDENS, "if_i", "config.json")) as f:
    d = json.load(f)
  d[field] = value
  with pytest.raises(IFConfigError, match=field):
    IFConfig.from_dict(d)


def _copy(tmp_path, name):
  dst = tmp_path / name
  shutil.copytree(os.path.join(GOLDENS, name), dst)
  return dst


def test_loader_names_missing_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  dst = _copy(tmp_path, "if_i")
  f = dst / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(f))
  del tensors["mid_block.attentions.0.add_k_proj.weight"]
  tensors["mid_block.attentions.0.extra.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, str(f))
  with pytest.raises(deepfloyd_checkpoint.IFCheckpointError) as e:
    deepfloyd_checkpoint.load(str(dst))
  assert "missing tensor(s) ['mid_block.attentions.0.add_k_proj.weight']" in str(e.value)
  assert "unexpected tensor(s) ['mid_block.attentions.0.extra.weight']" in str(e.value)


def test_loader_names_shape_mismatch(tmp_path):
  dst = _copy(tmp_path, "if_ii")
  with open(dst / "config.json") as f:
    d = json.load(f)
  d["encoder_hid_dim"] = 20  # the checkpoint's text projection reads 16
  with open(dst / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(deepfloyd_checkpoint.IFCheckpointError, match=r"shape mismatch for '.*'.*"):
    deepfloyd_checkpoint.load(str(dst))


def test_loader_refuses_missing_shard_and_pickle(tmp_path):
  dst = _copy(tmp_path, "if_ii")
  os.remove(dst / "diffusion_pytorch_model-00002-of-00002.safetensors")
  with pytest.raises(deepfloyd_checkpoint.IFCheckpointError, match="00002-of-00002"):
    deepfloyd_checkpoint.load(str(dst))
  pick = tmp_path / "pickle"
  pick.mkdir()
  shutil.copy(os.path.join(GOLDENS, "if_i", "config.json"), pick / "config.json")
  (pick / "diffusion_pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(deepfloyd_checkpoint.IFCheckpointError, match="pickle"):
    deepfloyd_checkpoint.load(str(pick))


def test_param_logical_axes():
  """Every param carries logical names (so the mesh rules shard it like our U-Nets)."""
  model = deepfloyd.IFUNet(read_config(os.path.join(GOLDENS, "if_i")))
  boxed = deepfloyd_checkpoint.abstract_params(model)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(x, "names") for x in leaves)
  names = {n for x in leaves for n in x.names if n}
  assert {"conv_in", "conv_out", "embed", "heads", "norm", "text_embed"} <= names


def test_denoiser_adapter_reads_logsnr_and_aug_level_as_if_steps():
  """IFDenoiser (our network contract) at IF's grid logsnrs and aug_level = noise_level / 1000
  is the U-Net at those integer steps (diffusers' outputs)."""
  from imagen_jax.diffusion import schedules

  _, params, io = _load("if_ii")
  config = read_config(os.path.join(GOLDENS, "if_ii"))
  model = deepfloyd.IFDenoiser(config, full_output=True)
  x = _nhwc(io["x"])
  logsnr = schedules.squaredcos_logsnr(np.array([999, 500, 0], np.float32) / 999.0)
  mask = np.ones(io["text"].shape[:2], bool)
  out = model.apply(
      {"params": {"unet": params}},
      x[..., :3],
      logsnr,
      io["text"],
      mask,
      lowres=x[..., 3:],
      aug_level=io["noise_level"] / 1000.0,
  )
  np.testing.assert_allclose(
      np.asarray(out), _nhwc(io["out_int_t"]), atol=1e-4 * np.abs(io["out_int_t"]).max()
  )
  eps = deepfloyd.IFDenoiser(config).apply(
      {"params": {"unet": params}},
      x[..., :3],
      logsnr,
      io["text"],
      mask,
      x[..., 3:],
      io["noise_level"] / 1000.0,
  )
  np.testing.assert_array_equal(np.asarray(eps), np.asarray(out)[..., :3])
