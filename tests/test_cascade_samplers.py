"""The EDM samplers, the Karras grid, CFG rescale, the guidance schedule and the DeepFloyd IF
threshold cap reach the sharded cascade sampler from the cascade config and the sample CLI's
flags (configs/cascade.py -> stage.SamplingSettings -> stage_sampler.make_stage_sampler)."""

import dataclasses

import numpy as np
import pytest

from configs import cascade as cascade_config
from imagen_jax import denoiser, stage
from imagen_jax.diffusion import samplers
from imagen_jax.sampling import cascade
from tests import cascade_fixtures


def test_cascade_config_and_cli_flags_set_karras_heun_rescale():
  c = cascade_config.get_config(
      "shapes,stage1.sampler=heun,stage1.time_grid=karras,stage1.guidance_rescale=0.7,"
      "stage1.guidance_schedule=linear,stage1.max_scale=1.5"
  )
  s1, s2 = (cascade.SamplingSettings.from_config(b) for b in (c.stage1, c.stage2))
  assert (s1.sampler, s1.time_grid, s1.guidance_rescale) == ("heun", "karras", 0.7)
  assert (s1.guidance_schedule, s1.max_scale) == ("linear", 1.5)
  assert (s2.sampler, s2.guidance_rescale, s2.guidance_schedule, s2.max_scale) == (
      "ddim",
      0.0,
      "constant",
      None,
  )
  ss = s1.sampler_settings()
  assert (ss.sampler, ss.time_grid, ss.max_scale, ss.network_calls) == ("heun", "karras", 1.5, 49)
  # The CLI's flags (imagen_jax.sampling) override every stage, checked here, naming the value.
  out = stage.override_settings([s1, s2], {"sampler": "euler_ancestral", "guidance_rescale": 0.5})
  assert [(s.sampler, s.guidance_rescale) for s in out] == [("euler_ancestral", 0.5)] * 2
  assert out[0].time_grid == "karras" and out[1].aug_level == s2.aug_level
  with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\].*1.5"):
    stage.override_settings([s1], {"guidance_rescale": 1.5})
  with pytest.raises(ValueError, match="unknown time_grid 'edm'"):
    stage.override_settings([s1], {"time_grid": "edm"})
  with pytest.raises(ValueError, match="max_scale must be >= 1"):
    stage.override_settings([s1], {"max_scale": 0.5})


@pytest.mark.slow  # ~75 s alone on 2 cores (tiny cascade fixture + a Heun stage compile)
def test_sharded_cascade_runs_karras_heun_rescale_settings(monkeypatch):
  """The sharded stage sampler hands every new setting to the sampler and the denoiser."""
  seen = {}
  real_sample, real_make = samplers.sample, denoiser.make_denoise_fn

  def spy_sample(*args, settings, **kw):
    seen["settings"] = settings
    return real_sample(*args, settings=settings, **kw)

  def spy_make(*args, **kw):
    seen["denoiser"] = kw
    return real_make(*args, **kw)

  monkeypatch.setattr(samplers, "sample", spy_sample)
  monkeypatch.setattr(denoiser, "make_denoise_fn", spy_make)
  model = cascade.Cascade.from_workdirs(cascade_fixtures.shared_tiny_cascade()[:1])
  settings = cascade.SamplingSettings(
      sampler="heun",
      num_steps=2,
      time_grid="karras",
      guidance_weight=3.0,
      guidance_schedule="linear",
      guidance_rescale=0.7,
      max_scale=1.5,
  )
  (out,) = model.sample(["a red circle", "a blue square"], [settings], seed=1, progress=False)
  assert out.shape == (2, 16, 16, 3) and np.all(np.isfinite(out)) and np.abs(out).max() <= 1.0
  want = dataclasses.replace(settings, guidance_weight=0.0).sampler_settings()
  assert seen["settings"] == want and seen["settings"].max_scale == 1.5
  assert seen["denoiser"]["guidance_rescale"] == 0.7
  assert callable(seen["denoiser"]["guidance_weight"])  # w(t) of the linear schedule
