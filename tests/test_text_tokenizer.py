"""Tokenizers: ByT5 bytes (no files) and the T5 sentencepiece tokenizer from a local directory."""

import json
import os
import warnings

import numpy as np
import pytest

from imagen_jax.text import tokenizer


def test_byt5_ids_match_hf_convention():
  tok = tokenizer.ByT5Tokenizer(max_length=8)
  ids, mask = tok(["ab", ""])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, 8)
  # 'a' = 97 -> 100, 'b' -> 101, then EOS 1, then pad 0.
  np.testing.assert_array_equal(ids[0], [100, 101, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
  # Empty prompt: just EOS, one real token (never an all-False mask).
  np.testing.assert_array_equal(ids[1], [1, 0, 0, 0, 0, 0, 0, 0])
  assert mask[1].sum() == 1


def test_byt5_non_ascii():
  tok = tokenizer.ByT5Tokenizer(max_length=16)
  ids, mask = tok(["héllo ✓ 猫"])
  n = len("héllo ✓ 猫".encode("utf-8"))
  assert mask[0].sum() == n + 1
  assert bytes(int(i) - 3 for i in ids[0, :n]).decode("utf-8") == "héllo ✓ 猫"


def test_truncation_warns_with_count():
  tok = tokenizer.ByT5Tokenizer(max_length=6)
  with pytest.warns(tokenizer.TruncationWarning, match=r"2 of 3 prompts exceed max_length=6"):
    ids, mask = tok(["a" * 10, "b" * 30, "c"])
  assert tok.last_num_truncated == 2 and tok.num_truncated == 2
  assert mask[:2].all()
  np.testing.assert_array_equal(ids[0], [100] * 5 + [1])  # keeps EOS last, as HF does
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tok(["short"])  # no warning when nothing is cut
  assert tok.last_num_truncated == 0 and tok.num_truncated == 2


def test_bad_inputs_are_clear_errors():
  tok = tokenizer.ByT5Tokenizer(max_length=8)
  with pytest.raises(TypeError, match="list of strings"):
    tok("one string")
  with pytest.raises(TypeError, match="must be str"):
    tok([b"bytes"])
  with pytest.raises(ValueError, match="max_length"):
    tokenizer.ByT5Tokenizer(max_length=1)
  with pytest.raises(ValueError, match="needs text_config.path"):
    tokenizer.make_tokenizer("sentencepiece", 8)


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  """A tiny T5 sentencepiece tokenizer trained on the spot (no downloads)."""
  spm = pytest.importorskip("sentencepiece")
  from transformers import T5Tokenizer

  d = tmp_path_factory.mktemp("spiece")
  corpus = d / "corpus.txt"
  corpus.write_text(
      "\n".join(
          [
              "a red circle on the left",
              "a small blue square",
              "two green triangles above a yellow star",
          ]
          * 20
      )
  )
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(d / "spiece"),
      vocab_size=30,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      character_coverage=1.0,
      minloglevel=2,
  )
  out = d / "tok"
  T5Tokenizer(vocab_file=str(d / "spiece.model"), extra_ids=0).save_pretrained(str(out))
  return str(out)


def test_sentencepiece_matches_hf_and_truncates(spiece_dir):
  from transformers import AutoTokenizer

  tok = tokenizer.make_tokenizer("sentencepiece", 12, spiece_dir)
  hf = AutoTokenizer.from_pretrained(spiece_dir, local_files_only=True)
  long = "two green triangles above a yellow star " * 3
  texts = ["a red circle", "", "Ünïcødé 猫 ✓", long]
  with pytest.warns(tokenizer.TruncationWarning, match="of 4 prompts exceed max_length=12"):
    ids, mask = tok(texts)
  ref = hf(texts, padding="max_length", truncation=True, max_length=12, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
  assert mask[1].sum() == 1 and ids[1, 0] == 1  # empty prompt is just EOS


def test_sentencepiece_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no T5 tokenizer files"):
    tokenizer.make_tokenizer("sentencepiece", 8, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    tokenizer.make_tokenizer("sentencepiece", 8, os.path.join(str(tmp_path), "nope"))


def test_sentencepiece_needs_a_real_tokenizer_file(tmp_path):
  # tokenizer_config.json alone is not a tokenizer: refused by name, not deep inside transformers.
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"expected tokenizer\.json or spiece\.model.*found"):
    tokenizer.make_tokenizer("sentencepiece", 8, str(tmp_path))


def _checkpoint_without_tokenizer(d):
  """A T5 checkpoint directory with config.json and a weights file but no tokenizer files."""
  hf = dict(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
  (d / "config.json").write_text(json.dumps({**hf, "feed_forward_proj": "gated-gelu"}))
  (d / "model.safetensors").write_bytes(b"\0" * 64)
  return str(d)


def test_missing_tokenizer_reported_before_weights_load(tmp_path, monkeypatch):
  from imagen_jax.text import hf_weights, registry

  def weights_must_not_load(*args, **kwargs):
    raise AssertionError("weights were read before the tokenizer files were checked")

  monkeypatch.setattr(hf_weights, "load_params", weights_must_not_load)
  path = _checkpoint_without_tokenizer(tmp_path)
  cfg = registry.default_text_config("t5-v1_1-custom", path=path)
  with pytest.raises(FileNotFoundError, match=r"no T5 tokenizer files in .*tokenizer\.json or "):
    registry.get_text_encoder(cfg)


def test_tokenizer_loaded_before_weights(spiece_dir, tmp_path, monkeypatch):
  import shutil

  from imagen_jax.text import hf_weights, registry

  order = []
  real_make = tokenizer.make_tokenizer

  def make(*args, **kwargs):
    order.append("tokenizer")
    return real_make(*args, **kwargs)

  def load_params(path, config, **kwargs):
    order.append("weights")
    return {}

  d = tmp_path / "ckpt"
  shutil.copytree(spiece_dir, d)
  _checkpoint_without_tokenizer(d)
  monkeypatch.setattr(tokenizer, "make_tokenizer", make)
  monkeypatch.setattr(hf_weights, "load_params", load_params)
  enc = registry.get_text_encoder(registry.default_text_config("t5-v1_1-custom", path=str(d)))
  assert order == ["tokenizer", "weights"]
  assert enc.tokenize(["a red circle"])[0].shape == (1, 128)
