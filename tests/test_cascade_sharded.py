"""Cascade sampling on (data, fsdp, tensor) meshes of 8 fake CPU devices: the same images as on
one device, every stage's params and the T5 params split over fsdp (nothing whole on device 0),
and the jitted building blocks compiled ahead of time from abstract inputs alone.

The tiny trained-stage fixtures (tests/cascade_fixtures.py) are tiny: `fsdp_min_size` is lowered
so that the fsdp fallback splits their mid-size params too.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.sampling import cascade
from imagen_jax.sampling import stage_sampler as ss
from imagen_jax.text import registry
from tests import cascade_fixtures

FSDP_MIN_SIZE = 1024
SETTINGS = [
    cascade.SamplingSettings(num_steps=3, guidance_weight=3.0),
    # Stochastic: each sample's per-step noise comes from its index, on any mesh.
    cascade.SamplingSettings(sampler="ddpm", num_steps=2, aug_level=0.2),
]
PROMPTS = ["a red circle in the center", "a small blue square on the left", "", "a green one"]
PROMPTS = PROMPTS + ["a large green triangle above a small red circle"]  # 5: padded to 8


@pytest.fixture(scope="module")
def workdirs():
  return cascade_fixtures.shared_tiny_cascade()


@pytest.fixture(scope="module")
def one_device(workdirs):
  model = cascade.Cascade.from_workdirs(workdirs, devices=jax.devices()[:1])
  return model.sample(PROMPTS, SETTINGS, seed=5, batch_size=8, progress=False)


def _spec_axes(spec: P) -> set[str]:
  out = set()
  for entry in spec:
    if entry is not None:
      out.update((entry,) if isinstance(entry, str) else entry)
  return out


def check_sharded(tree, mesh, what: str) -> None:
  """Every leaf lies on all of `mesh`'s devices; every leaf of >= FSDP_MIN_SIZE elements is
  split over fsdp, so each device holds a fraction of it."""
  fsdp = dict(zip(mesh.axis_names, mesh.axis_sizes))["fsdp"]
  n_big = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert leaf.sharding.mesh == mesh, name
    assert len(leaf.sharding.device_set) == mesh.size, name
    if leaf.size >= FSDP_MIN_SIZE:
      n_big += 1
      assert "fsdp" in _spec_axes(leaf.sharding.spec), (name, leaf.shape, leaf.sharding.spec)
      assert leaf.addressable_shards[0].data.size <= leaf.size // fsdp, name
  assert n_big > 0, what


def sample_on(workdirs, mesh, one_device):
  model = cascade.Cascade.from_workdirs(workdirs, mesh=mesh, fsdp_min_size=FSDP_MIN_SIZE)
  assert model.mesh is mesh and model.num_devices == 8
  for k, s in enumerate(model.stages):
    check_sharded(s.params, mesh, f"stage{k + 1}")
  check_sharded(model.encoder.params, mesh, "t5")
  emb, mask = model.encode(PROMPTS[:4] + [""] * 4)
  # The encoder's outputs are split over the batch axes (data, fsdp), not on device 0.
  assert _spec_axes(emb.sharding.spec) == set(sharding_lib.batch_axes(model.rules, mesh))
  assert _spec_axes(mask.sharding.spec) == {"data", "fsdp"} and emb.shape[0] == 8
  out = model.sample(PROMPTS, SETTINGS, seed=5, batch_size=8, progress=False)
  assert [x.shape for x in out] == [(5, 16, 16, 3), (5, 32, 32, 3)]
  for a, b in zip(out, one_device):
    np.testing.assert_allclose(a, b, atol=5e-5)
  return model


@pytest.mark.slow
def test_cascade_tensor_mesh_matches_one_device(workdirs, one_device):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = sample_on(workdirs, mesh, one_device)
  # The tensor axis is used: the base U-Net's mlp / heads params and T5's are split over it.
  specs = [x.sharding.spec for x in jax.tree.leaves(model.stages[0].params)]
  assert any("tensor" in _spec_axes(s) for s in specs)
  assert any("tensor" in _spec_axes(x.sharding.spec) for x in jax.tree.leaves(model.encoder.params))


@pytest.mark.slow
def test_cascade_data_fsdp_mesh_matches_one_device(workdirs, one_device):
  # A mesh without a tensor axis: the rules naming it are dropped for params and activations.
  sample_on(workdirs, mesh_lib.make_mesh({"data": 2, "fsdp": 4}), one_device)


def test_stage_params_restore_straight_into_their_shards(workdirs):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  stage = cascade.load_stage(workdirs[1], mesh=mesh, fsdp_min_size=FSDP_MIN_SIZE)
  rules = sharding_lib.rules_from_config(stage.config)
  want = ss.stage_param_shardings(stage.stage, mesh, rules, FSDP_MIN_SIZE)
  jax.tree.map(lambda a, s: _assert_sharding(a, s), stage.params, want)
  check_sharded(stage.params, mesh, "sr")
  # Default: this process's devices, all on fsdp, with the config's fsdp_min_size.
  default = cascade.load_stage(workdirs[1])
  leaf = jax.tree.leaves(default.params)[0]
  assert dict(leaf.sharding.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(stage.params), jax.device_get(default.params)
  )


def _assert_sharding(a, s):
  assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)


@pytest.mark.slow
def test_building_blocks_compile_from_abstract_inputs_and_run_as_the_cascade(workdirs):
  """The AOT path: lower + compile from sharded ShapeDtypeStructs alone, read the compiled
  figures, then run that executable on the loaded cascade's arrays: the cascade's images."""
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = cascade.Cascade.from_workdirs(workdirs, mesh=mesh, fsdp_min_size=FSDP_MIN_SIZE)
  rules, base = model.rules, model.stages[0]
  settings = SETTINGS[0]

  sampler = ss.make_stage_sampler(
      base.stage, settings, mesh, rules, guided=True, fsdp_min_size=FSDP_MIN_SIZE
  )
  abstract = ss.abstract_sampler_inputs(base.stage, 4, mesh, rules, fsdp_min_size=FSDP_MIN_SIZE)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  compiled = sampler.lower(*abstract).compile()
  _check_figures(compiled)
  # No replicated copies: a device's arguments are well under the whole params' bytes.
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base.params))
  assert compiled.memory_analysis().argument_size_in_bytes < 0.6 * param_bytes

  denoise = ss.make_denoise_step(base.stage, mesh, rules, guided=True, fsdp_min_size=FSDP_MIN_SIZE)
  d_abstract = ss.abstract_denoise_inputs(base.stage, 4, mesh, rules, fsdp_min_size=FSDP_MIN_SIZE)
  d_compiled = denoise.lower(*d_abstract).compile()
  flops = _check_figures(d_compiled)
  sr = model.stages[1].stage
  sr_abstract = ss.abstract_denoise_inputs(sr, 4, mesh, rules, fsdp_min_size=FSDP_MIN_SIZE)
  ss.make_denoise_step(sr, mesh, rules, guided=False, fsdp_min_size=FSDP_MIN_SIZE).lower(
      *sr_abstract
  ).compile()

  encode = ss.make_encode(model.encoder.config, mesh, rules)
  e_abstract = ss.abstract_encode_inputs(
      model.encoder.config, 4, model.encoder.max_length, mesh, rules
  )
  e_compiled = encode.lower(*e_abstract).compile()
  _check_figures(e_compiled)

  # The compiled programs are the cascade's: run on its arrays they give its outputs.
  prompts = PROMPTS[:4]
  emb, mask = model.encode(prompts)
  ids, _ = model.encoder.tokenize(prompts)
  ids = jax.device_put(ids, ss.batch_sharding(mesh, rules, 2))
  np.testing.assert_allclose(e_compiled(model.encoder.params, ids, mask), emb, atol=1e-6)
  key = jax.random.fold_in(jax.random.key(5), 0)
  idx = jax.device_put(np.arange(4, dtype=np.int32), ss.batch_sharding(mesh, rules, 1))
  w = jax.device_put(np.float32(settings.guidance_weight), abstract[4].sharding)
  key = jax.device_put(key, abstract[5].sharding)
  aot = compiled(base.params, emb, mask, None, w, key, idx)
  (want,) = model.sample(prompts, SETTINGS[:1], seed=5, batch_size=4, progress=False)
  np.testing.assert_allclose(np.asarray(aot), want, atol=1e-6)
  # One guided evaluation: 2B network rows, so about twice the unguided step's FLOPs.
  unguided = ss.make_denoise_step(
      base.stage, mesh, rules, guided=False, fsdp_min_size=FSDP_MIN_SIZE
  )
  flops_1 = _check_figures(unguided.lower(*d_abstract).compile())
  assert 1.6 < flops / flops_1 < 2.4, (flops, flops_1)


def _check_figures(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] > 0
  mem = compiled.memory_analysis()
  assert mem.argument_size_in_bytes > 0 and mem.output_size_in_bytes > 0
  assert mem.temp_size_in_bytes >= 0
  return float(cost["flops"])


def test_bad_meshes_and_batches_fail_clearly(workdirs):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  stage = cascade.load_stage(workdirs[0], mesh=mesh)
  with pytest.raises(ValueError, match="pass mesh, or devices / mesh_shape, not both"):
    cascade.Cascade([stage], mesh=mesh, devices=jax.devices())
  rules = sharding_lib.rules_from_config(stage.config)
  with pytest.raises(
      ValueError, match=r"batch 6 does not divide .*allowed: a positive multiple of 4"
  ):
    ss.abstract_sampler_inputs(stage.stage, 6, mesh, rules)
  encoder = registry.get_text_encoder(stage.config.text, mesh=mesh, rules=rules)
  with pytest.raises(ValueError, match="3 texts do not divide .*allowed: a multiple of 4"):
    encoder.encode(["a", "b", "c"])
  with pytest.raises(ValueError, match="devices are not divisible"):
    cascade.Cascade([stage], mesh_shape={"data": 3, "fsdp": -1})
  with pytest.raises(ValueError, match="'base64' has no mesh.logical_axis_rules"):
    sharding_lib.rules_from_config({"stage": "base64"})


def test_rules_saved_before_activation_names_still_split_the_batch():
  """A workdir's config.json from before the activation_* names: its `batch` rule is used."""
  import ml_collections

  old = ml_collections.ConfigDict(
      {
          "stage": "base64",
          "mesh": {
              "logical_axis_rules": [["batch", ["data", "fsdp"]], ["embed", "fsdp"]],
          },
      }
  )
  rules = sharding_lib.rules_from_config(old)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert sharding_lib.batch_axes(rules, mesh) == ("data", "fsdp")
  assert ss.batch_size_multiple(mesh, rules) == 8
