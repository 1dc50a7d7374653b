"""The T5 encoder sharded over 8 fake devices equals one device; T5-XXL size and memory plan."""

import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.text import hf_weights, registry, t5

# Rules for this test: fsdp over d_model, tensor parallel over heads and mlp.
RULES = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", None), ("kv", None))
SHARDED = os.path.join(os.path.dirname(__file__), "goldens", "t5", "t5_gated_encoder_sharded")


def make_mesh():
  return jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_sharded_encoding_equals_single_device():
  mesh = make_mesh()
  cfg = registry.default_text_config("byt5-tiny-random", max_length=24)
  single = registry.get_text_encoder(cfg)
  sharded = registry.get_text_encoder(cfg, mesh=mesh, rules=RULES)
  wq = sharded.params["layers_0"]["attention"]["query"]
  assert wq.sharding.spec == P("fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (64, 2, 64)

  texts = [f"prompt number {i} " + "x" * i for i in range(8)]
  ids, mask = single.tokenize(texts)
  batch = NamedSharding(mesh, P(("fsdp", "tensor"), None))
  ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
  out_s = sharded.encode_tokens_jit(sharded.params, ids_s, mask_s)
  assert not out_s.sharding.is_fully_replicated  # the batch stays split over devices

  one = jax.devices()[0]
  params_1 = jax.device_put(single.params, one)
  out_1 = jax.jit(single.encode_tokens)(
      params_1, jax.device_put(ids, one), jax.device_put(mask, one)
  )
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_1), atol=1e-5, rtol=0)


def test_checkpoint_streams_into_shardings():
  mesh = make_mesh()
  config = hf_weights.read_config(SHARDED)
  shardings = nn.logical_to_mesh_sharding(t5.logical_specs(config), mesh, RULES)
  params = hf_weights.load_params(SHARDED, config, shardings=shardings, progress=False)
  ref = hf_weights.load_params(SHARDED, config, progress=False)
  wi = params["layers_2"]["mlp"]["wi_0"]
  assert wi.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(wi), np.asarray(ref["layers_2"]["mlp"]["wi_0"]))
  with np.load(os.path.join(SHARDED, "io.npz")) as io:
    out = jax.jit(t5.T5Encoder(config).apply)({"params": params}, io["ids"], io["mask"])
    assert np.max(np.abs(np.asarray(out) - io["expected"])) <= 1e-4


def test_t5_xxl_param_count_and_fsdp_bytes():
  config = t5.preset_config("t5-v1_1-xxl")
  n = t5.count_params(config)  # eval_shape only
  assert abs(n / 4.6e9 - 1) < 0.05, n
  assert n == 4_762_310_656
  per = t5.per_device_param_bytes(config, (("embed", "fsdp"),), {"fsdp": 16})
  # Everything but the replicated [32, 64] relative-position table is split 16 ways.
  table = 32 * 64 * 4
  assert per == (n * 4 - table) // 16 + table
  print(f"T5-XXL encoder: {n:,} params; {per:,} bytes/device (float32, 16-way fsdp)")
