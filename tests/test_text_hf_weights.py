"""Loading HF safetensors T5 checkpoints: layouts, skipped decoder, and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from imagen_jax.text import hf_weights, registry

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "t5")
FULL = os.path.join(GOLDENS, "t5_relu_full")
SHARDED = os.path.join(GOLDENS, "t5_gated_encoder_sharded")


def read_all(path):
  with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def write_dir(tmp_path, tensors, config_src=FULL, index=None):
  d = tmp_path / "ckpt"
  d.mkdir()
  shutil.copy(os.path.join(config_src, "config.json"), d / "config.json")
  if index is None:
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  else:  # index: file name -> list of keys
    weight_map = {}
    for fname, keys in index.items():
      save_file({k: tensors[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return str(d)


def load(path):
  return hf_weights.load_params(path, hf_weights.read_config(path), progress=False)


class Spy:
  """Records which files are opened and which tensors are read through safe_open."""

  def __init__(self, monkeypatch):
    self.opened, self.read = [], []
    real = hf_weights.safe_open
    spy = self

    class Handle:

      def __init__(self, file, framework):
        spy.opened.append(os.path.basename(file))
        self._cm = real(file, framework=framework)

      def __enter__(self):
        self._h = self._cm.__enter__()
        return self

      def __exit__(self, *a):
        return self._cm.__exit__(*a)

      def keys(self):
        return self._h.keys()

      def get_slice(self, key):
        return self._h.get_slice(key)

      def get_tensor(self, key):
        spy.read.append(key)
        return self._h.get_tensor(key)

    monkeypatch.setattr(hf_weights, "safe_open", Handle)


def test_full_checkpoint_never_reads_decoder(tmp_path, monkeypatch):
  tensors = read_all(FULL)
  dec = sorted(k for k in tensors if k.startswith(("decoder.", "lm_head.")))
  enc = sorted(k for k in tensors if k not in dec)
  assert dec, "the golden full checkpoint should hold decoder tensors"
  path = write_dir(tmp_path, tensors, index={"enc.safetensors": enc, "dec.safetensors": dec})
  spy = Spy(monkeypatch)
  params = load(path)
  assert "dec.safetensors" not in spy.opened  # decoder-only shard never opened
  assert sorted(spy.read) == enc and not any(k.startswith("decoder") for k in spy.read)
  ref = load(FULL)
  np.testing.assert_array_equal(params["layers_1"]["mlp"]["wi"], ref["layers_1"]["mlp"]["wi"])


def test_embed_tokens_alias_and_encoder_only(tmp_path):
  tensors = {k: v for k, v in read_all(FULL).items() if k.startswith(("encoder.", "shared."))}
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  params = load(write_dir(tmp_path, tensors))
  np.testing.assert_array_equal(params["token_embedding"], tensors["encoder.embed_tokens.weight"])


def test_weight_layout_conversion():
  tensors = read_all(FULL)
  params = load(FULL)
  q = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"]  # torch [h*k, d]
  ours = np.asarray(params["layers_0"]["attention"]["query"])  # [d, h, k]
  assert ours.shape == (32, 4, 8)
  np.testing.assert_array_equal(ours.reshape(32, 32), q.T)
  o = tensors["encoder.block.0.layer.0.SelfAttention.o.weight"]  # [d, h*k]
  out = np.asarray(params["layers_0"]["attention"]["out"])  # [h, k, d]
  np.testing.assert_array_equal(out.reshape(32, 32), o.T)


def test_missing_key(tmp_path):
  tensors = read_all(FULL)
  del tensors["encoder.block.1.layer.0.SelfAttention.q.weight"]
  with pytest.raises(
      hf_weights.CheckpointError,
      match=r"missing encoder tensor\(s\).*block\.1\.layer\.0\.SelfAttention\.q",
  ):
    load(write_dir(tmp_path, tensors))


def test_missing_embedding(tmp_path):
  tensors = read_all(FULL)
  del tensors["shared.weight"]
  with pytest.raises(hf_weights.CheckpointError, match="shared.weight or encoder.embed_tokens"):
    load(write_dir(tmp_path, tensors))


def test_unknown_key(tmp_path):
  tensors = read_all(FULL)
  tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(hf_weights.CheckpointError, match=r"unknown encoder tensor.*extra\.weight"):
    load(write_dir(tmp_path, tensors))


def test_family_mismatch_is_unknown_key(tmp_path):
  # ReLU (T5 1.0) weights with a gated (T5 1.1) config.json: 'wi' is unknown.
  with pytest.raises(
      hf_weights.CheckpointError, match=r"unknown encoder tensor.*DenseReluDense\.wi"
  ):
    load(write_dir(tmp_path, read_all(FULL), config_src=SHARDED))


def test_shape_mismatch(tmp_path):
  tensors = read_all(FULL)
  tensors["encoder.final_layer_norm.weight"] = np.ones((31,), np.float32)
  with pytest.raises(
      hf_weights.CheckpointError,
      match=r"shape mismatch for 'encoder.final_layer_norm.weight'" r".*\(31,\).*\(32,\)",
  ):
    load(write_dir(tmp_path, tensors))


def test_bin_refused_with_conversion_hint(tmp_path):
  shutil.copy(os.path.join(FULL, "config.json"), tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(
      hf_weights.CheckpointError,
      match=r"(?s)PyTorch \.bin.*save_pretrained\(DST, safe_serialization=True\)",
  ):
    load(str(tmp_path))


def test_missing_files(tmp_path):
  with pytest.raises(hf_weights.CheckpointError, match="no config.json"):
    hf_weights.read_config(str(tmp_path))
  shutil.copy(os.path.join(FULL, "config.json"), tmp_path / "config.json")
  with pytest.raises(hf_weights.CheckpointError, match="no model.safetensors"):
    load(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"shared.weight": "gone.safetensors"}})
  )
  with pytest.raises(hf_weights.CheckpointError, match="gone.safetensors"):
    load(str(tmp_path))


def test_param_dtype_bf16():
  import jax.numpy as jnp

  config = hf_weights.read_config(FULL, param_dtype=jnp.bfloat16)
  params = hf_weights.load_params(FULL, config, progress=False)
  assert params["token_embedding"].dtype == jnp.bfloat16


def make_t5_dir(tmp_path):
  """A `t5-v1_1-tiny` checkpoint folder (the sharded golden weights) with a sentencepiece
  tokenizer trained on the spot."""
  spm = pytest.importorskip("sentencepiece")
  from transformers import T5Tokenizer

  d = tmp_path / "model"
  shutil.copytree(SHARDED, d)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("a red circle\na blue square on the left\n" * 20)
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(tmp_path / "sp"),
      vocab_size=20,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      minloglevel=2,
  )
  T5Tokenizer(vocab_file=str(tmp_path / "sp.model"), extra_ids=0).save_pretrained(str(d))
  return d


def test_registry_with_local_dir(tmp_path):
  """A named encoder from a local directory: weights + sentencepiece tokenizer."""
  d = make_t5_dir(tmp_path)
  enc = registry.get_text_encoder(
      registry.default_text_config("t5-v1_1-tiny", path=str(d), max_length=16)
  )
  emb, mask = enc.encode(["a red circle", ""])
  assert emb.shape == (2, 16, 32) and enc.dim == 32
  assert np.all(np.asarray(emb)[~np.asarray(mask)] == 0)
  with pytest.raises(ValueError, match=r"name='t5-v1_1-xxl' but .*d_model 4096 \(name\) vs 32"):
    registry.get_text_encoder(registry.default_text_config("t5-v1_1-xxl", path=str(d)))
