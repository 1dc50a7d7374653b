"""The registry contract (docs/interfaces.md) on the offline byt5-tiny-random encoder."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imagen_jax.text import registry


@pytest.fixture(scope="module")
def encoder():
    return registry.get_text_encoder(registry.default_text_config("byt5-tiny-random",
                                                                  max_length=32))


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
    ids = np.zeros((2, 32), np.int32)
    mask = np.zeros((2, 32), bool)
    emb = np.asarray(encoder.encode_tokens(encoder.params, ids, mask))
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
    # Guard against silent changes of the seed or init scheme (the demo depends on them).
    emb = np.asarray(encoder.params["token_embedding"])
    assert emb.shape == (384, 256)
    assert abs(float(emb.std()) - 1.0) < 0.02


def test_config_errors():
    with pytest.raises(ValueError, match="text_config.path is required for 't5-v1_1-xxl'"):
        registry.get_text_encoder(registry.default_text_config("t5-v1_1-xxl"))
    with pytest.raises(ValueError, match="unknown text encoder name 'clip-vit'"):
        registry.get_text_encoder(registry.default_text_config("clip-vit"))
    with pytest.raises(ValueError, match="text_config.dtype='fp8'"):
        registry.get_text_encoder(registry.default_text_config(dtype="fp8"))
    with pytest.raises(ValueError, match="fixed random weights"):
        registry.get_text_encoder(registry.default_text_config(path="/some/dir"))


def test_minimal_config_dict_defaults():
    enc = registry.get_text_encoder(ml_collections.ConfigDict({"name": "byt5-tiny-random"}))
    assert enc.max_length == 128
