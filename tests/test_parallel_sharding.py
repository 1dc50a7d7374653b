"""Logical rules -> shardings, computed abstractly; optimizer-state layouts; byte counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sh


def _rules():
  return common.LOGICAL_AXIS_RULES


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    k = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    c = nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
    )
    x = nn.Conv(64, (3, 3), kernel_init=c, name="conv")(x)
    x = nn.Dense(256, kernel_init=k, name="mlp")(x)
    x = nn.Dense(3, name="plain")(x)  # unannotated: replicated unless big
    return nn.Dense(512 * 3 // 3, use_bias=False, name="big_plain")(x)


def _boxed():
  return jax.eval_shape(lambda: Net().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))


def test_specs_follow_rules_and_fit_shapes():
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  specs = sh.mesh_specs(_boxed()["params"], mesh, _rules())
  # tensor = 1 splits nothing: it is left out of the specs.
  assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")
  assert specs["mlp"]["kernel"] == P("fsdp")
  assert specs["plain"]["kernel"] == P()
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  specs = sh.mesh_specs(_boxed()["params"], mesh, _rules())
  assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")  # C_in = 3: not split
  assert specs["mlp"]["kernel"] == P("fsdp", "tensor")
  # 3 channels do not split over fsdp=2: that dim is replicated, not an error.
  assert sh.fit_spec((3, 8), P("fsdp", None), mesh) == P()


def test_fsdp_fallback_shards_big_unannotated_params():
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  specs = sh.mesh_specs(_boxed()["params"], mesh, _rules(), fsdp_min_size=1000)
  assert specs["big_plain"]["kernel"] == P(None, "fsdp")  # [3, 512]: largest dim
  assert specs["plain"]["kernel"] == P()  # 256 * 3 elements < 1000


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.adam(1e-3),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(1e-3)),
    ],
)
def test_optimizer_slots_follow_their_params(make_tx):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = _boxed()["params"]
  params = nn.unbox(boxed)
  p_specs = sh.mesh_specs(boxed, mesh, _rules())
  opt = jax.eval_shape(make_tx().init, params)
  o_specs = sh.specs_like_params(opt, params, p_specs)
  flat = jax.tree_util.tree_flatten_with_path(opt)[0]
  flat_specs = jax.tree.leaves(o_specs, is_leaf=lambda x: isinstance(x, P))
  assert len(flat) == len(flat_specs)
  hits = 0
  for (path, leaf), spec in zip(flat, flat_specs):
    key = jax.tree_util.keystr(path)
    if "mlp" in key and "kernel" in key and leaf.shape == (64, 256):
      assert spec == P("fsdp", "tensor"), key
      hits += 1
    if leaf.shape in ((), (1,)):
      assert spec == P(), key
  assert hits >= 1
  # Every spec must be valid for its leaf (jit would reject it otherwise).
  for (_, leaf), spec in zip(flat, flat_specs):
    jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)


def test_per_device_bytes_divides_by_fsdp():
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
  m1 = mesh_lib.abstract_mesh({"data": 16, "fsdp": 16}, 256)
  full = sh.per_device_bytes(params, {"w": P()}, m1)
  split = sh.per_device_bytes(params, {"w": P("fsdp")}, m1)
  assert full == 4 * 1024 * 1024 and split == full // 16


def test_batch_axes():
  assert sh.batch_axes(_rules()) == ("data", "fsdp")
  assert sh.batch_axes([("activation_batch", "data")]) == ("data",)
  assert sh.batch_axes([("batch", "data")]) == ()  # a param-style name is not the batch rule
  assert sh.batch_axes([]) == ()
  mesh = mesh_lib.make_mesh({"data": 8})
  assert sh.batch_axes(_rules(), mesh) == ("data",)
