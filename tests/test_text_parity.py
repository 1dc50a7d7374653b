"""Parity of our Flax T5 encoder with transformers' PyTorch T5 (float32, max abs diff <= 1e-4).

The golden test always runs (committed checkpoints + outputs from
tests/goldens/make_t5_goldens.py); the live tests run when torch is installed.
"""

import os
import sys

import jax
import numpy as np
import pytest

from imagen_jax.text import hf_weights, t5

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
TOL = 1e-4


def encode_dir(path, ids, mask):
  config = hf_weights.read_config(path)
  params = hf_weights.load_params(path, config, progress=False)
  out = jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids, mask)
  return config, np.asarray(out)


@pytest.mark.parametrize("name", ["t5_relu_full", "t5_gated_encoder_sharded"])
def test_golden_parity(name):
  path = os.path.join(GOLDENS, "t5", name)
  with np.load(os.path.join(path, "io.npz"), allow_pickle=False) as io:
    ids, mask, expected = io["ids"], io["mask"], io["expected"]
  config, out = encode_dir(path, ids, mask)
  assert config.is_gated == (name == "t5_gated_encoder_sharded")
  assert out.shape == expected.shape and out.dtype == np.float32
  assert np.max(np.abs(out - expected)) <= TOL
  assert np.all(out[~mask] == 0.0)


def _goldens_module():
  sys.path.insert(0, GOLDENS)
  try:
    import make_t5_goldens
  finally:
    sys.path.remove(GOLDENS)
  return make_t5_goldens


LIVE_CASES = {
    # T5 1.0 family, full model, tied embeddings, default buckets.
    "relu_full": (
        dict(
            vocab_size=50,
            d_model=24,
            d_kv=6,
            d_ff=40,
            num_layers=2,
            num_heads=4,
            num_decoder_layers=1,
            feed_forward_proj="relu",
        ),
        True,
        70,
    ),
    # T5 1.1 family (gated gelu_new), encoder only, odd bucket settings.
    "gated_gelu_encoder": (
        dict(
            vocab_size=70,
            d_model=32,
            d_kv=4,
            d_ff=24,
            num_layers=3,
            num_heads=8,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=30,
            feed_forward_proj="gated-gelu",
        ),
        False,
        50,
    ),
    # Gated ReLU variant and a non-default epsilon.
    "gated_relu_eps": (
        dict(
            vocab_size=40,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            layer_norm_epsilon=1e-3,
            feed_forward_proj="gated-relu",
        ),
        False,
        20,
    ),
}


@pytest.mark.parametrize("case", sorted(LIVE_CASES))
def test_live_parity_with_transformers(case, tmp_path):
  pytest.importorskip("torch")
  gold = _goldens_module()
  hf, full, length = LIVE_CASES[case]
  model = gold.build_model(hf, full=full, seed=7)
  gold.save_checkpoint(model, str(tmp_path), shard=None)
  ids, mask = gold.make_inputs(hf["vocab_size"], length, (length, length // 3, 1), seed=3)
  expected = gold.reference_output(model, ids, mask)
  _, out = encode_dir(str(tmp_path), ids, mask)
  assert np.max(np.abs(out - expected)) <= TOL


def test_relative_position_buckets_match_transformers():
  torch = pytest.importorskip("torch")
  _, T5EncoderModel, _ = _goldens_module().import_transformers_t5()
  from transformers.models.t5.modeling_t5 import T5Attention

  for num_buckets, max_distance in ((32, 128), (8, 20), (16, 30), (64, 256), (32, 64)):
    n = 300
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    ours = t5.relative_position_buckets(n, n, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, ref, err_msg=f"{num_buckets}, {max_distance}")
