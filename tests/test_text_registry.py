"""The registry contract (docs/interfaces.md) on the offline byt5-tiny-random encoder."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imagen_jax.text import registry


@pytest.fixture(scope="module")
def encoder():
  return registry.get_text_encoder(registry.default_text_config("byt5-tiny-random", max_length=32))


def test_contract_shapes_and_padding(encoder):
  assert encoder.dim == 256 and encoder.max_length == 32
  texts = ["a red circle", "", "héllo ✓ 猫"]
  ids, mask = encoder.tokenize(texts)
  assert ids.shape == mask.shape == (3, 32) and ids.dtype == np.int32 and mask.dtype == bool
  emb, mask2 = encoder.encode(texts)
  assert emb.shape == (3, 32, 256) and emb.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(mask2), mask)
  emb = np.asarray(emb)
  assert np.isfinite(emb).all()
  assert np.all(emb[~mask] == 0.0)  # zero at padding
  # encode_tokens is pure and jittable with explicit params.
  again = jax.jit(encoder.encode_tokens)(encoder.params, ids, mask)
  np.testing.assert_allclose(np.asarray(again), emb, atol=1e-6)


def test_dropped_text_has_no_nans(encoder):
  ids = np.zeros((3, 32), np.int32)  # same shape as above: no new compile
  mask = np.zeros((3, 32), bool)
  emb = np.asarray(encoder.encode_tokens_jit(encoder.params, ids, mask))
  assert np.all(emb == 0.0)


def test_embeddings_keep_token_identity(encoder):
  """The demo U-Net learns from these: unit-RMS tokens, distinct tokens -> distinct vectors."""
  emb, mask = encoder.encode(["abcdefgh", "abcdefgx", "red", "blue"])
  emb = np.asarray(emb)
  rms = np.sqrt(np.mean(emb[np.asarray(mask)] ** 2, axis=-1))
  np.testing.assert_allclose(rms, 1.0, atol=1e-3)  # final RMSNorm with unit scale
  x = emb[0, :8] / np.linalg.norm(emb[0, :8], axis=-1, keepdims=True)
  cos = x @ x.T
  assert np.max(cos - np.eye(8)) < 0.8, cos  # positions are not collapsed onto one vector
  # One changed letter changes its own position most.
  diff = np.linalg.norm(emb[0] - emb[1], axis=-1)
  assert np.argmax(diff) == 7
  pooled = [emb[i][np.asarray(mask)[i]].mean(0) for i in (2, 3)]
  assert np.linalg.norm(pooled[0] - pooled[1]) > 0.1


def test_fixed_random_weights_are_deterministic(encoder):
  again = registry.get_text_encoder(registry.default_text_config("byt5-tiny-random"))
  flat_a = jax.tree_util.tree_leaves(encoder.params)
  flat_b = jax.tree_util.tree_leaves(again.params)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Guard against silent changes of the seed, init scheme or JAX's threefry (the demo's
  # trained U-Nets depend on these exact weights).
  emb = np.asarray(encoder.params["token_embedding"])
  assert emb.shape == (384, 256)
  np.testing.assert_allclose(
      emb[100, :4], [0.5895252, -1.3914738, -0.2700354, -0.81294036], atol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(encoder.params["layers_1"]["mlp"]["wo"][0, :3]),
      [-0.04480673, -0.0049395, 0.08635984],
      atol=1e-7,
  )


def test_init_params_follow_module_init():
  """The fast init draws the same tree and scales as T5Encoder.init (checked from shapes)."""
  from flax import linen as nn

  from imagen_jax.text import t5

  config = t5.preset_config("byt5-tiny-random")
  params = registry.get_text_encoder(registry.default_text_config()).params
  abstract = nn.unbox(t5.abstract_params(config))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert all(jax.tree.leaves(jax.tree.map(lambda p, a: p.shape == a.shape, params, abstract)))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = path[-1].key
    if name == "scale":
      assert np.all(np.asarray(leaf) == 1.0)
    else:
      want = (
          registry.TINY_RANDOM_BIAS_STD
          if name == "relative_attention_bias"
          else t5.init_std(config, name)
      )
      std = float(np.std(np.asarray(leaf)))
      assert abs(std / want - 1) < 0.25, (path, std, want)  # the bias has only 128 draws


def test_tiny_random_tokens_carry_their_context():
  """The same byte in two different words must not encode to the same vector (with HF's
  near-uniform attention init it did, cosine 1.000: a bag of bytes), and swapping the two
  objects' colours must change the token set."""
  encoder = registry.get_text_encoder(registry.default_text_config(max_length=64))
  texts = [
      "a small yellow triangle to the left of a large purple circle",
      "a small purple triangle to the left of a large yellow circle",
  ]
  emb, mask = encoder.encode(texts)
  emb, mask = np.asarray(emb), np.asarray(mask)
  ids, _ = encoder.tokenize(texts)
  unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-9)
  first = [i for i in range(int(mask[0].sum())) if ids[0, i] == ids[0, 5]]  # every "l"
  assert len(first) >= 2
  same_byte = [float(unit[0, i] @ unit[0, j]) for i in first for j in first if i < j]
  assert max(same_byte) < 0.9, same_byte
  n = int(mask[0].sum())
  nearest = (unit[0, :n] @ unit[1, :n].T).max(axis=1)
  assert np.mean(nearest) < 0.97, np.mean(nearest)


def test_config_errors():
  with pytest.raises(ValueError, match="text_config.path is required for 't5-v1_1-xxl'"):
    registry.get_text_encoder(registry.default_text_config("t5-v1_1-xxl"))
  with pytest.raises(ValueError, match="unknown text encoder name 'clip-vit'"):
    registry.get_text_encoder(registry.default_text_config("clip-vit"))
  with pytest.raises(ValueError, match="text.dtype='fp8'"):
    registry.get_text_encoder(registry.default_text_config(dtype="fp8"))
  with pytest.raises(ValueError, match="fixed random weights"):
    registry.get_text_encoder(registry.default_text_config(path="/some/dir"))


def test_minimal_config_dict_defaults():
  enc = registry.get_text_encoder(ml_collections.ConfigDict({"name": "byt5-tiny-random"}))
  assert enc.max_length == 128


def test_bfloat16_compute_close_to_float32(encoder):
  enc16 = registry.get_text_encoder(
      registry.default_text_config(
          "byt5-tiny-random", max_length=32, dtype="bfloat16", param_dtype="bfloat16"
      )
  )
  assert enc16.params["token_embedding"].dtype == jnp.bfloat16
  texts = ["a red circle", "two blue squares"]
  e16, m = enc16.encode(texts)
  e32, _ = encoder.encode(texts)
  assert e16.dtype == jnp.float32 and np.isfinite(np.asarray(e16)).all()
  err = np.abs(np.asarray(e16) - np.asarray(e32))[np.asarray(m)]
  assert err.mean() < 0.05, err.mean()


def test_hf_config_parsing_errors():
  from imagen_jax.text import t5

  base = dict(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
  assert t5.T5Config.from_hf_dict({**base, "feed_forward_proj": "gated-gelu"}).act == "gelu_new"
  assert not t5.T5Config.from_hf_dict(base).is_gated  # HF's default is T5 1.0 relu
  with pytest.raises(ValueError, match="feed_forward_proj='swish-gelu'"):
    t5.T5Config.from_hf_dict({**base, "feed_forward_proj": "swish-gelu"})
  with pytest.raises(ValueError, match="act='tanh'"):
    t5.T5Config.from_hf_dict({**base, "feed_forward_proj": "gated-tanh"})
  with pytest.raises(ValueError, match="model_type='umt5'"):
    t5.T5Config.from_hf_dict({**base, "model_type": "umt5"})


def test_default_config_fields_are_settable_when_locked():
  cfg = registry.default_text_config()
  cfg.lock()
  cfg.path = "/ckpt/t5-v1_1-xxl"  # typed placeholder: settable from the command line too
  cfg.precision = "highest"
  assert cfg.max_length == 128 and cfg.dtype == "float32"
  # Training's fields of the same block: guidance dropout (§2.2) and the embedding cache.
  assert cfg.drop_prob == 0.1 and cfg.embedding_cache == ""
  cfg.embedding_cache = "/cache/dir"
  with pytest.raises(ValueError, match="precision='bogus'"):
    registry.get_text_encoder(
        ml_collections.ConfigDict({"name": "byt5-tiny-random", "precision": "bogus"})
    )
