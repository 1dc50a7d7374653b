"""Write the tiny random CLIP checkpoint `tiny_clip/` and `golden.npz` (transformers' PyTorch
CLIPModel outputs) that tests/test_evals_clip.py compares against.

    python tests/goldens/clip/make_golden.py      # needs torch (pip install torch)

`tiny_clip/` is a complete local HF checkpoint folder, as a user's would be: config.json +
model.safetensors (random weights, torch seed 0; vision 32x32 px, patch 8, 2 layers; text 2
layers, 16 positions, legacy `eos_token_id=2` as in the OpenAI checkpoints), a tiny BPE tokenizer
(lower-case letters, a few merges; vocab.json, merges.txt, tokenizer.json) and a
preprocessor_config.json with shortest_edge 32, crop 32 and non-OpenAI mean/std (so that reading
them is tested). `golden.npz`: uint8 images [3, 40, 48, 3], texts, HF's pixel_values (NCHW),
input_ids, attention_mask, L2-normalised image/text embeddings and per-pair cosines.
"""

import json
import os
import string
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT = os.path.join(HERE, "tiny_clip")
TEXTS = [
    "a red circle",
    "two blue squares on the left",
    "a very long caption about many green triangles that goes past sixteen tokens for sure",
]


def import_transformers_torch():
  """Import transformers' torch CLIP, tolerating a torchvision whose C ops do not load (a CUDA
  torchvision next to a CPU torch breaks `transformers.image_utils`; the stubbed module only
  registers detection-op kernels, which CLIP never uses)."""
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
  import transformers

  return transformers


def write_tokenizer_files(path):
  letters = list(string.ascii_lowercase)
  vocab = letters + [c + "</w>" for c in letters]
  merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("i", "n"), ("o", "n</w>"), ("a", "n")]
  vocab += ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]  # specials last: EOS has the largest id
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return len(vocab)


def main():
  tr = import_transformers_torch()
  import torch

  vocab_size = write_tokenizer_files(CKPT)
  slow = tr.CLIPTokenizer(os.path.join(CKPT, "vocab.json"), os.path.join(CKPT, "merges.txt"))
  slow.save_pretrained(CKPT)
  fast = tr.CLIPTokenizerFast.from_pretrained(CKPT)
  fast.save_pretrained(CKPT)
  config = tr.CLIPConfig(
      text_config=dict(
          vocab_size=vocab_size,
          hidden_size=16,
          intermediate_size=24,
          num_hidden_layers=2,
          num_attention_heads=2,
          max_position_embeddings=16,
          eos_token_id=2,
          bos_token_id=vocab_size - 2,
          pad_token_id=1,
      ),
      vision_config=dict(
          hidden_size=24,
          intermediate_size=40,
          num_hidden_layers=2,
          num_attention_heads=3,
          image_size=32,
          patch_size=8,
      ),
      projection_dim=12,
  )
  torch.manual_seed(0)
  model = tr.CLIPModel(config).eval()
  with torch.no_grad():  # HF's init is tiny (std 0.02); larger weights make a sharper test
    for p in model.parameters():
      p.mul_(5.0)
  model.save_pretrained(CKPT, safe_serialization=True)
  proc = tr.CLIPImageProcessor(
      size={"shortest_edge": 32},
      crop_size={"height": 32, "width": 32},
      image_mean=[0.5, 0.4, 0.3],
      image_std=[0.2, 0.25, 0.3],
  )
  proc.save_pretrained(CKPT)

  images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
  pixel_values = proc(images=list(images), return_tensors="np")["pixel_values"]
  tok = fast(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="np")
  tok_slow = slow(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="np")
  assert (tok["input_ids"] == tok_slow["input_ids"]).all(), "slow and fast tokenizers differ"
  with torch.no_grad():
    u = model.get_image_features(pixel_values=torch.from_numpy(pixel_values))
    v = model.get_text_features(
        input_ids=torch.from_numpy(tok["input_ids"]),
        attention_mask=torch.from_numpy(tok["attention_mask"]),
    )
  u = (u / u.norm(dim=-1, keepdim=True)).numpy()
  v = (v / v.norm(dim=-1, keepdim=True)).numpy()
  np.savez_compressed(
      os.path.join(HERE, "golden.npz"),
      images=images,
      texts=np.array(TEXTS),
      pixel_values=pixel_values,
      input_ids=tok["input_ids"],
      attention_mask=tok["attention_mask"],
      image_embeds=u,
      text_embeds=v,
      cosines=(u * v).sum(-1),
  )
  print("ids", tok["input_ids"], "cosines", (u * v).sum(-1))


if __name__ == "__main__":
  main()
