"""How far apart a frozen text encoder puts captions that differ in one attribute word.

The demo's U-Net reads the encoder's token embeddings through cross-attention (Imagen §2.1,
App. F.1), so a caption attribute can only steer the image as far as the tokens that carry it
differ. For each pair of shapes captions that differ in one word (position, colour, kind or
size), with e_a: [La, D] and e_b: [Lb, D] the two captions' valid token embeddings:

  least-matched cosine = min( min_i max_j cos(e_a[i], e_b[j]), min_j max_i cos(e_a[i], e_b[j]) )

i.e. how well the worst-matched token of either caption is matched by some token of the
other: near 1 when every token has a near copy across the pair (the attribute word barely
changes the embeddings), low when the differing word's tokens are new. It needs no equal token
counts (byte-level T5 spells "left" and "right" in different numbers of tokens). Also printed:
the cosine of the mean-pooled embeddings.

  python experiments/encoder_probe.py [--encoders=byt5-tiny-random,all-minilm-l6-v2]
      [--out=probe.md]

Prints a markdown table (one row per encoder, one column per attribute: the mean over that
attribute's pairs) and writes it to --out when given. all-minilm-l6-v2 reads the weights
`make minilm` unpacks.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from configs import base64 as base64_config
from imagen_jax import atomic, cli
from imagen_jax.text import registry

# (attribute, caption a, caption b): shapes captions (imagen_jax.data.shapes) one word apart.
PAIRS = (
    ("position", "a small blue circle on the left", "a small blue circle on the right"),
    (
        "position",
        "a large red square above a small green circle",
        "a large red square below a small green circle",
    ),
    (
        "position",
        "a large red square to the left of a small green circle",
        "a large red square to the right of a small green circle",
    ),
    ("colour", "a small blue circle on the left", "a small red circle on the left"),
    (
        "colour",
        "a large red square above a small green circle",
        "a large yellow square above a small green circle",
    ),
    ("kind", "a small blue circle on the left", "a small blue square on the left"),
    (
        "kind",
        "a large red square above a small green circle",
        "a large red triangle above a small green circle",
    ),
    ("size", "a small blue circle on the left", "a large blue circle on the left"),
)
ATTRIBUTES = ("position", "colour", "kind", "size")


def least_matched_cosine(a: np.ndarray, b: np.ndarray) -> float:
  """min over both captions' tokens of the best cosine to the other's; a: [La, D], b: [Lb, D]."""
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  sim = a @ b.T
  return float(min(sim.max(axis=1).min(), sim.max(axis=0).min()))


def pooled_cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine of the mean-pooled token embeddings; a: [La, D], b: [Lb, D]."""
  pa, pb = a.mean(axis=0), b.mean(axis=0)
  return float(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))


def probe(encoder) -> dict[str, tuple[float, float]]:
  """attribute -> (mean least-matched cosine, mean pooled cosine) over its `PAIRS`."""
  out = {}
  for attribute in ATTRIBUTES:
    scores = []
    for _, a, b in (p for p in PAIRS if p[0] == attribute):
      emb, mask = encoder.encode([a, b])
      emb, mask = np.asarray(emb, np.float64), np.asarray(mask).astype(bool)
      ea, eb = emb[0][mask[0]], emb[1][mask[1]]
      scores.append((least_matched_cosine(ea, eb), pooled_cosine(ea, eb)))
    out[attribute] = tuple(float(x) for x in np.mean(scores, axis=0))
  return out


def table(results: dict[str, dict[str, tuple[float, float]]]) -> str:
  head = "| encoder | " + " | ".join(ATTRIBUTES) + " |"
  lines = [head, "|---" * (len(ATTRIBUTES) + 1) + "|"]
  for name, r in results.items():
    cells = [f"{r[a][0]:.3f} ({r[a][1]:.3f})" for a in ATTRIBUTES]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return (
      "least-matched token cosine (pooled cosine) between captions one attribute word apart; "
      "near 1: the word barely moves the tokens\n\n" + "\n".join(lines) + "\n"
  )


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the functions)."""
  flags.DEFINE_list("encoders", ["byt5-tiny-random", registry.MINILM], "text.registry names")
  flags.DEFINE_string("out", "", "also write the table here (markdown)")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  results = {}
  for name in flags.FLAGS.encoders:
    missing = registry.missing_default_weights(name)
    if missing:
      raise cli.UserError(f"--encoders: {missing}")
    text = base64_config.get_config(f"shapes,text_name={name}").text
    results[name] = probe(registry.get_text_encoder(text, progress=False))
  text = table(results)
  print(text)
  if flags.FLAGS.out:
    atomic.write_text(flags.FLAGS.out, text)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
