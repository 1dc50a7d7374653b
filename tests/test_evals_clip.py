"""CLIP score: Flax CLIP vs transformers' PyTorch CLIPModel on a tiny random checkpoint.

Goldens and the checkpoint: tests/goldens/clip/ (README there). Live tests need torch.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from imagen_jax.evals import clip, clip_model

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "goldens", "clip")
CKPT = os.path.join(GOLDEN_DIR, "tiny_clip")


def _golden():
  return np.load(os.path.join(GOLDEN_DIR, "golden.npz"))


@pytest.fixture(scope="module")
def scorer():
  # batch_size 8 = the 8 fake devices: the 3 pairs are padded to 8 and sharded.
  return clip.CLIPScorer(CKPT, batch_size=8, progress=False)


def _rel_err(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_preprocessing_and_tokens_match_hf_golden(scorer):
  z = _golden()
  assert scorer.image_cfg.mean == (0.5, 0.4, 0.3)  # read from preprocessor_config.json
  pixels = clip.preprocess_images(z["images"], scorer.image_cfg)
  np.testing.assert_allclose(pixels, z["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)
  ids, mask = scorer.tokenize(list(z["texts"]))
  np.testing.assert_array_equal(ids, z["input_ids"])
  np.testing.assert_array_equal(mask, z["attention_mask"])


def test_clip_matches_hf_golden(scorer):
  z = _golden()
  assert scorer._runner.num_shards == 8
  u, v = scorer.embeddings(z["images"], list(z["texts"]))
  print(
      f"CLIP golden rel err: image {_rel_err(u, z['image_embeds']):.2e}, "
      f"text {_rel_err(v, z['text_embeds']):.2e}"
  )
  assert _rel_err(u, z["image_embeds"]) <= 1e-4
  assert _rel_err(v, z["text_embeds"]) <= 1e-4
  res = scorer.score(z["images"], list(z["texts"]))
  np.testing.assert_allclose(res.cosines, z["cosines"], atol=1e-5)
  cos = z["cosines"].astype(np.float64)
  assert res.mean_cosine == pytest.approx(cos.mean(), abs=1e-5)
  # torchmetrics convention: negative cosines count as 0, then x100.
  assert res.clip_score == pytest.approx(100 * np.maximum(cos, 0).mean(), abs=1e-3)
  assert (cos < 0).any()  # the golden has a negative pair, so the clipping is exercised


def test_summary_conventions():
  res = clip.summarize(np.array([0.3, -0.1, 0.2]))
  assert res.mean_cosine == pytest.approx(0.4 / 3)
  assert res.clip_score == pytest.approx(100 * 0.5 / 3)


def test_paper_model_shapes_have_the_known_parameter_counts():
  # HF defaults are ViT-B/32; ViT-L/14 as in openai/clip-vit-large-patch14's config.json.
  b32 = clip_model.CLIPConfig.from_dict({})
  l14 = clip_model.CLIPConfig.from_dict(
      {
          "projection_dim": 768,
          "text_config": {
              "hidden_size": 768,
              "intermediate_size": 3072,
              "num_attention_heads": 12,
              "num_hidden_layers": 12,
          },
          "vision_config": {
              "hidden_size": 1024,
              "intermediate_size": 4096,
              "num_attention_heads": 16,
              "num_hidden_layers": 24,
              "patch_size": 14,
          },
      }
  )
  for cfg, count in [(b32, 151_277_313), (l14, 427_616_513)]:
    assert sum(int(np.prod(s)) for s in clip_model.param_shapes(cfg).values()) == count


def test_errors_name_the_bad_value(tmp_path, scorer):
  with pytest.raises(ValueError, match="does not exist"):
    clip.CLIPScorer(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="3 images but 2 texts"):
    scorer.score(_golden()["images"], ["a", "b"])
  with pytest.raises(ValueError, match="uint8 images"):
    clip.preprocess_images(np.zeros((1, 8, 8, 3), np.float32), scorer.image_cfg)
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    clip_model._activation("relu")
  # A checkpoint whose config does not fit its weights is refused, naming the tensor.
  bad = tmp_path / "bad"
  shutil.copytree(CKPT, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["projection_dim"] = 13
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="projection.weight has shape"):
    clip.CLIPScorer(str(bad))


def _transformers_torch():
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location(
      "clip_make_golden", os.path.join(GOLDEN_DIR, "make_golden.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.import_transformers_torch()


@pytest.mark.parametrize("eos_rule", ["legacy_argmax", "eos_token_id"])
def test_clip_matches_hf_live(tmp_path, eos_rule, scorer):
  tr = _transformers_torch()
  import torch

  path = CKPT
  if eos_rule == "eos_token_id":
    # Newer configs pool at the first id == eos_token_id. With the real EOS that is also the
    # argmax, so pick an ordinary token ("e</w>") to make the two rules disagree.
    path = str(tmp_path / "ckpt")
    shutil.copytree(CKPT, path)
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    vocab = json.loads(open(os.path.join(path, "vocab.json")).read())
    cfg["text_config"]["eos_token_id"] = vocab["e</w>"]
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
  model = tr.CLIPModel.from_pretrained(path).eval()
  proc = tr.CLIPImageProcessor.from_pretrained(path)
  # The legacy case reuses the compiled 8-way sharded scorer; the other runs unsharded
  # (batch_size 4 does not divide the 8 devices).
  ours = scorer if path == CKPT else clip.CLIPScorer(path, batch_size=4, progress=False)
  images = np.random.default_rng(1).integers(0, 256, (2, 35, 33, 3), dtype=np.uint8)
  texts = ["the green one", "an orange thing in the middle"]
  pixels = proc(images=list(images), return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(
      clip.preprocess_images(images, ours.image_cfg), pixels.transpose(0, 2, 3, 1), atol=1e-5
  )
  ids, mask = ours.tokenize(texts)
  with torch.no_grad():
    u = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
    v = model.get_text_features(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
    ).numpy()
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  v /= np.linalg.norm(v, axis=-1, keepdims=True)
  got_u, got_v = ours.embeddings(images, texts)
  print(
      f"CLIP live ({eos_rule}) rel err: image {_rel_err(got_u, u):.2e}, "
      f"text {_rel_err(got_v, v):.2e}"
  )
  assert _rel_err(got_u, u) <= 1e-4
  assert _rel_err(got_v, v) <= 1e-4
