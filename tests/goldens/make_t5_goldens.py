"""Makes the T5 parity goldens in tests/goldens/t5/ (needs torch + transformers).

    python tests/goldens/make_t5_goldens.py            # rewrites tests/goldens/t5/

For each of the two T5 families it builds a tiny random transformers PyTorch model, saves it as a
Hugging Face safetensors checkpoint, and stores inputs plus the reference encoder output
(``T5EncoderModel`` / ``T5ForConditionalGeneration.encoder`` ``last_hidden_state``, multiplied by
the mask because our encoder zeroes padding) in ``io.npz``:

  * ``t5_relu_full``: T5 1.0 family (ReLU FF), full encoder-decoder checkpoint in one
    ``model.safetensors`` (the decoder and lm_head tensors must be skipped by the loader);
  * ``t5_gated_encoder_sharded``: T5 1.1 family (gated-GELU FF, gelu_new), encoder-only
    checkpoint split into several shards with ``model.safetensors.index.json``, with few
    relative-position buckets and a short max_distance so the log-bucket clamp is exercised.

The live test (tests/test_text_parity.py) imports ``build_model`` / ``reference_output`` from
here to compare against fresh random models whenever torch is installed.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5")

SPECS = {
    "t5_relu_full": dict(
        full=True,
        shard=None,
        seed=0,
        length=40,
        lengths=(40, 17, 1),
        hf=dict(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=1,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
        ),
    ),
    "t5_gated_encoder_sharded": dict(
        full=False,
        shard="24KB",
        seed=1,
        length=40,
        lengths=(33, 40, 2),
        hf=dict(
            vocab_size=96,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=3,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
    ),
}


def import_transformers_t5():
  """transformers' T5 classes; tolerates a torchvision that does not match torch.

  transformers imports torchvision when it is installed, and a mismatched torchvision build
  raises at import; T5 needs no torchvision, so it is then marked unavailable.
  """
  import transformers.utils.import_utils as import_utils

  try:
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001 - any failure means "do not use it"
    import_utils._torchvision_available = False
  from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

  return T5Config, T5EncoderModel, T5ForConditionalGeneration


def build_model(hf: dict, *, full: bool, seed: int):
  """A random transformers T5 model in float32 eval mode, with non-trivial norm weights."""
  import torch

  T5Config, T5EncoderModel, T5ForConditionalGeneration = import_transformers_t5()
  torch.manual_seed(seed)
  config = T5Config(dropout_rate=0.0, **hf)
  model = (T5ForConditionalGeneration if full else T5EncoderModel)(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:  # init is all ones: randomize so a swapped norm shows
        p.copy_(torch.rand_like(p) + 0.5)
  return model


def make_inputs(vocab_size: int, length: int, lengths, seed: int):
  """ids int32 [B, L] (random tokens, EOS=1 last, pad 0) and mask bool [B, L]."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), length), np.int32)
  mask = np.zeros((len(lengths), length), bool)
  for i, n in enumerate(lengths):
    ids[i, : n - 1] = rng.integers(2, vocab_size, n - 1)
    ids[i, n - 1] = 1
    mask[i, :n] = True
  return ids, mask


def reference_output(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """HF encoder ``last_hidden_state`` [B, L, D] float32, zeroed at padding."""
  import torch

  encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
  with torch.no_grad():
    out = encoder(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
    ).last_hidden_state
  return out.float().numpy() * mask[..., None]


def save_checkpoint(model, out_dir: str, shard: str | None) -> None:
  kwargs = dict(safe_serialization=True)
  if shard:
    kwargs["max_shard_size"] = shard
  model.save_pretrained(out_dir, **kwargs)
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen):  # not needed by an encoder; keep the goldens small
    os.remove(gen)


def main():
  for name, spec in SPECS.items():
    out = os.path.join(GOLDEN_DIR, name)
    shutil.rmtree(out, ignore_errors=True)
    model = build_model(spec["hf"], full=spec["full"], seed=spec["seed"])
    save_checkpoint(model, out, spec["shard"])
    ids, mask = make_inputs(spec["hf"]["vocab_size"], spec["length"], spec["lengths"], spec["seed"])
    np.savez(
        os.path.join(out, "io.npz"), ids=ids, mask=mask, expected=reference_output(model, ids, mask)
    )
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(f"{name}: {files} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
