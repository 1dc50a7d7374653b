"""The BERT text encoder: parity with transformers' PyTorch BertModel, tokenizer, registry.

Golden tests always run (tests/goldens/make_bert_goldens.py writes them): two tiny random
checkpoints (full outputs) and the real all-MiniLM-L6-v2 weights (a few dims and per-token norms
of a few sentences). The real weights are not committed: ``make minilm`` puts them in
``.venv/models/all-minilm-l6-v2`` (or set IMAGEN_MINILM_PATH); ``make test`` sets
IMAGEN_REQUIRE_MINILM=1, so there the real-weights tests fail, never skip, without them.
The live test runs where torch is installed.
"""

import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base64, sr256, sr1024
from imagen_jax.stage import Stage
from imagen_jax.text import bert, cache, hf_weights, registry
from imagen_jax.text.tokenizer import TruncationWarning, WordPieceTokenizer

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
BERT_GOLDENS = os.path.join(GOLDENS, "bert")
TOL = 1e-4
RULES = (
    ("activation_batch", ("fsdp", "tensor")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("kv", None),
)


def _goldens_module():
  sys.path.insert(0, GOLDENS)
  try:
    import make_bert_goldens
  finally:
    sys.path.remove(GOLDENS)
  return make_bert_goldens


def encode_dir(path, ids, mask):
  config = hf_weights.read_config(path)
  params = hf_weights.load_params(path, config, progress=False)
  out = jax.jit(bert.BertEncoder(config).apply)({"params": params}, ids, mask)
  return config, np.asarray(out)


@pytest.mark.parametrize("name", ["bert_model", "bert_mlm_prefixed"])
def test_golden_parity(name):
  path = os.path.join(BERT_GOLDENS, name)
  with np.load(os.path.join(path, "io.npz"), allow_pickle=False) as io:
    ids, mask, expected = io["ids"], io["mask"], io["expected"]
  config, out = encode_dir(path, ids, mask)
  assert isinstance(config, bert.BertConfig)
  assert config.hidden_act == ("gelu_new" if name == "bert_mlm_prefixed" else "gelu")
  assert out.shape == expected.shape and out.dtype == np.float32
  assert np.max(np.abs(out - expected)) <= TOL
  assert np.all(out[~mask] == 0.0)


def test_live_parity_with_transformers(tmp_path):
  pytest.importorskip("torch")
  gold = _goldens_module()
  hf = dict(
      vocab_size=50,
      hidden_size=48,
      num_hidden_layers=2,
      num_attention_heads=6,
      intermediate_size=20,
      max_position_embeddings=64,
      hidden_act="relu",
      layer_norm_eps=1e-7,
  )
  model = gold.build_model(hf, cls="BertModel", seed=5)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  ids, mask = gold.make_inputs(hf["vocab_size"], 64, (64, 30, 2), seed=4)
  _, out = encode_dir(str(tmp_path), ids, mask)
  assert np.max(np.abs(out - gold.reference_output(model, ids, mask))) <= TOL


def test_checkpoint_errors(tmp_path):
  src = os.path.join(BERT_GOLDENS, "bert_model")
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  with open(bad / "config.json") as f:
    hf = json.load(f)
  hf["num_hidden_layers"] = 1  # the weights hold 2 layers
  (bad / "config.json").write_text(json.dumps(hf))
  with pytest.raises(hf_weights.CheckpointError, match="unknown encoder tensor.*encoder.layer.1"):
    hf_weights.load_params(str(bad), hf_weights.read_config(str(bad)), progress=False)
  hf.update(num_hidden_layers=2, position_embedding_type="relative_key")
  (bad / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    hf_weights.read_config(str(bad))
  with pytest.raises(ValueError, match="hidden_size=30 is not a multiple"):
    bert.BertConfig(50, 30, 1, 4, 8)


def test_tokenizer_matches_transformers_and_truncates_keeping_sep():
  from transformers import BertTokenizerFast

  path = os.path.join(BERT_GOLDENS, "bert_model")
  ours = WordPieceTokenizer(path, max_length=10)
  ref = BertTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
  texts = ["A red circle, to the LEFT of squares!", "", "zebra above the blue"]
  with pytest.warns(TruncationWarning, match="1 of 3 prompts"):
    ids, mask = ours(texts)
  want = ref(texts, padding="max_length", max_length=10, truncation=True)
  np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
  assert ids[1, :2].tolist() == [2, 3] and mask[1].sum() == 2  # "" -> [CLS] [SEP]
  assert ids[2, 1] == 1  # "zebra" is [UNK]
  with pytest.warns(TruncationWarning, match="1 of 1 prompts"):
    long_ids, long_mask = WordPieceTokenizer(path, max_length=4)(["red blue green circle"])
  assert long_ids.tolist() == [[2, 6, 7, 3]] and long_mask.all()  # [CLS] red blue [SEP]


def test_tokenizer_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    WordPieceTokenizer(str(tmp_path), max_length=8)
  tok = json.load(open(os.path.join(BERT_GOLDENS, "bert_model", "tokenizer.json")))
  tok["model"]["vocab"]["[PAD]"], tok["model"]["vocab"]["a"] = 5, 0
  (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
  with pytest.raises(ValueError, match="not a BERT WordPiece tokenizer"):
    WordPieceTokenizer(str(tmp_path), max_length=8)


def _golden_text_config(**kw):
  path = os.path.join(BERT_GOLDENS, "bert_model")
  return registry.default_text_config("bert-tiny-golden", path=path, **kw)


def test_registry_builds_bert_and_checks_names():
  enc = registry.get_text_encoder(_golden_text_config(max_length=12), progress=False)
  assert enc.dim == 32 and registry.text_dim(_golden_text_config()) == 32
  assert len(enc.fingerprint) == 16
  tiny = registry.get_text_encoder(registry.default_text_config("byt5-tiny-random"))
  assert enc.fingerprint != tiny.fingerprint
  emb, mask = enc.encode(["a red circle", "the blue squares above"])
  assert emb.shape == (2, 12, 32) and emb.dtype == np.float32
  assert mask.sum(axis=1).tolist() == [5, 7]  # [CLS] the blue square ##s above [SEP]
  assert np.all(np.asarray(emb)[~np.asarray(mask)] == 0.0)
  # text_dim knows the preset without files (what a stage config reads).
  assert registry.text_dim(registry.default_text_config("all-minilm-l6-v2")) == 384
  with pytest.raises(ValueError, match="exceeds .* max_position_embeddings=40"):
    registry.get_text_encoder(_golden_text_config(max_length=41), progress=False)
  t5_dir = os.path.join(GOLDENS, "t5", "t5_relu_full")
  with pytest.raises(ValueError, match="names a BERT encoder but .* T5Config"):
    registry.get_text_encoder(registry.default_text_config("bert-x", path=t5_dir))
  with pytest.raises(ValueError, match="all-minilm-l6-v2.*hidden_size 384 .name. vs 32"):
    registry.get_text_encoder(
        registry.default_text_config("all-minilm-l6-v2", path=_golden_text_config().path)
    )


def test_bfloat16_encoder_is_close_to_float32():
  texts = ["a red circle above the blue squares", "two green circles"]
  f32 = registry.get_text_encoder(_golden_text_config(max_length=12), progress=False)
  bf16 = registry.get_text_encoder(
      _golden_text_config(max_length=12, dtype="bfloat16", param_dtype="bfloat16"), progress=False
  )
  assert bf16.params["layers_0"]["mlp"]["wi"].dtype == np.dtype("bfloat16")
  want, got = np.asarray(f32.encode(texts)[0]), np.asarray(bf16.encode(texts)[0])
  assert got.dtype == np.float32 and 0 < np.max(np.abs(got - want)) <= 0.05 * np.abs(want).max()


def test_sharded_bert_equals_single_device():
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cfg = _golden_text_config(max_length=16)
  single = registry.get_text_encoder(cfg, progress=False)
  sharded = registry.get_text_encoder(cfg, mesh=mesh, rules=RULES, progress=False)
  wq = sharded.params["layers_0"]["attention"]["query"]
  assert wq.sharding.spec == P("fsdp", "tensor", None)
  assert sharded.fingerprint == single.fingerprint
  texts = [f"{c} circle {i}" for i, c in enumerate(["red", "blue"] * 4)]
  out_s, _ = sharded.encode(texts)
  out_1, _ = single.encode(texts)
  assert not out_s.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_1), atol=1e-5)


def test_embedding_cache_with_bert(tmp_path):
  enc = registry.get_text_encoder(_golden_text_config(max_length=12), progress=False)
  examples = [(0, "a red circle"), (1, "two blue squares"), (2, "")]
  manifest = cache.write_cache(enc, examples, str(tmp_path / "c"), progress=False)
  assert manifest["encoder"] == "bert-tiny-golden" and manifest["fingerprint"] == enc.fingerprint
  reader = cache.TextEmbeddingCache(str(tmp_path / "c"))
  reader.check_encoder(enc.name, enc.dim, enc.max_length, enc.fingerprint)
  emb, mask = enc.encode(["two blue squares"])
  got = reader.get(1)
  np.testing.assert_allclose(got[0], np.asarray(emb)[0], atol=1e-6)
  np.testing.assert_array_equal(got[1], np.asarray(mask)[0])
  reader.close()


@pytest.mark.parametrize("module", [base64, sr256, sr1024], ids=lambda m: m.__name__)
def test_every_stage_config_takes_a_bert_encoder(module):
  # The preset's width needs no files (what --config.text.name=all-minilm-l6-v2 gives a stage).
  c = module.get_config("tiny,text_name=all-minilm-l6-v2,text.path=/weights/minilm")
  assert Stage.from_config(c).text_dim == 384 and c.text.path == "/weights/minilm"
  # A BERT checkpoint by path: the stage reads the encoder's width and embeddings.
  golden = os.path.join(BERT_GOLDENS, "bert_model")
  c = module.get_config(f"tiny,text_name=bert-tiny-golden,text.path={golden},max_length=16")
  stage = Stage.from_config(c)
  enc = registry.get_text_encoder(c.text, progress=False)
  ids, mask = enc.tokenize(["a red circle", "two blue squares"])
  emb, got_mask = stage.text_embeddings(
      {"text_ids": ids, "text_mask": mask}, enc.encode_tokens, enc.params
  )
  assert stage.text_dim == 32 and emb.shape == (2, 16, 32)
  np.testing.assert_array_equal(got_mask, mask)


def minilm_path():
  """The unpacked all-MiniLM-L6-v2 directory (``make minilm``), or skip / fail (module doc)."""
  path = registry.default_path(registry.MINILM)
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    msg = f"no all-MiniLM-L6-v2 weights in {path}: run `make minilm` (or set IMAGEN_MINILM_PATH)"
    if os.environ.get("IMAGEN_REQUIRE_MINILM"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def test_minilm_without_weights_names_the_make_step(monkeypatch, tmp_path):
  monkeypatch.setenv(registry.MINILM_ENV, str(tmp_path))
  assert registry.default_path("all-minilm-l6-v2") == str(tmp_path)
  assert registry.default_path("bert-base-uncased") is None
  with pytest.raises(FileNotFoundError, match="make minilm"):
    registry.get_text_encoder(registry.default_text_config("all-minilm-l6-v2"))
  # The same check, before any work, for the entry points (the demo, the encoder probe).
  assert str(tmp_path) in registry.missing_default_weights("all-minilm-l6-v2")
  assert registry.missing_default_weights(registry.TINY_RANDOM) is None
  (tmp_path / "model.safetensors").write_bytes(b"")
  assert registry.missing_default_weights("all-minilm-l6-v2") is None


def test_minilm_real_weights_parity():
  path = minilm_path()
  gold = _goldens_module()
  with np.load(gold.MINILM_GOLDEN, allow_pickle=False) as g:
    want = {k: g[k] for k in g.files}
  digest = hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()
  assert digest == str(want["sha256"]), "not the weights the golden was made from"
  # No text.path: the registry reads the weights from where `make minilm` puts them.
  text_cfg = registry.default_text_config("all-minilm-l6-v2", max_length=gold.MINILM_MAX_LENGTH)
  enc = registry.get_text_encoder(text_cfg, progress=False)
  # BertModel's 22,713,216 params less its pooler (384 * 384 + 384), which Imagen does not read.
  assert enc.dim == 384 and bert.count_params(enc.config) == 22_565_376
  ids, mask = enc.tokenize(list(gold.SENTENCES))
  np.testing.assert_array_equal(ids, want["ids"])  # the tokenizer matches transformers'
  np.testing.assert_array_equal(mask, want["mask"])
  emb = np.asarray(enc.encode_tokens_jit(enc.params, ids, mask))
  assert np.max(np.abs(emb[..., : gold.HEAD] - want["head"])) <= TOL
  assert np.max(np.abs(np.linalg.norm(emb, axis=-1) - want["norms"])) <= 10 * TOL
