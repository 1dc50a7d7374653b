"""DrawBench side-by-side human evaluation (Imagen §4.3-4.4, App. A, Fig. 3).

DrawBench is 200 prompts in 11 categories; raters see two models' images for a prompt and
answer, separately, which set is better on image-text alignment and which on fidelity (App. A:
"Which set of images better represents the text caption?" / "Which set of images is of higher
quality?"), with left/right randomised. This module reads the prompt list, lays out the
rating sheet and the per-category grids; `experiments/drawbench.py` samples the images.

The prompt list is not shipped with this project. Get it from the DrawBench Google Sheet linked
from https://imagen.research.google (sheet 1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY),
exported as `category<TAB>prompt` lines (UTF-8; `#` starts a comment line).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Sequence

import numpy as np
import PIL.Image

from imagen_jax import atomic, images
from imagen_jax import paths as paths_lib
from imagen_jax.evals import prompts

CHOICES = ("left", "right", "tie")


def read_prompts(path: str) -> list[tuple[str, str]]:
  """[(category, prompt)] from a `category<TAB>prompt` file (`evals.prompts`); errors name the
  bad line."""
  if not os.path.exists(path):
    raise ValueError(
        f"DrawBench prompt file {path!r} does not exist; export the sheet linked "
        "from imagen.research.google as category<TAB>prompt lines"
    )
  return [(p.category, p.text) for p in prompts.read_prompts(path, require_category=True)]


def assign_sides(num: int, seed: int) -> np.ndarray:
  """bool [num]: True where model A is shown on the left (seeded, recorded in the sheet)."""
  return np.random.default_rng(seed).random(num) < 0.5


def png_data_uri(image: np.ndarray) -> str:
  buf = io.BytesIO()
  PIL.Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_JS = """
function exportCSV() {
  const q = s => '"' + String(s).replace(/"/g, '""') + '"';
  const rows = [["index","category","prompt","left_model","right_model","alignment_choice",
                 "alignment_winner","fidelity_choice","fidelity_winner"].join(",")];
  let unanswered = 0;
  for (const item of ITEMS) {
    const pick = k => {
      const el = document.querySelector('input[name="' + k + '_' + item.index + '"]:checked');
      return el ? el.value : "";
    };
    const win = c => c === "left" ? item.left : c === "right" ? item.right : c;
    const a = pick("alignment"), f = pick("fidelity");
    if (!a || !f) unanswered++;
    rows.push([item.index, q(item.category), q(item.prompt), q(item.left), q(item.right),
               a, q(win(a)), f, q(win(f))].join(","));
  }
  if (unanswered && !confirm(unanswered + " prompts are not fully answered. Export anyway?"))
    return;
  const blob = new Blob([rows.join("\\n") + "\\n"], {type: "text/csv"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "drawbench_ratings.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}
"""


def write_rating_sheet(
    path: str,
    items: Sequence[tuple[str, str]],
    images_a: np.ndarray,
    images_b: np.ndarray,
    name_a: str,
    name_b: str,
    seed: int,
    negative_prompt: str | None = None,
) -> dict:
  """A self-contained HTML sheet (images inlined as base64 PNG data URIs).

  Args:
    items: [(category, prompt)] of length P; images_a / images_b: uint8 `[P, k, S, S, 3]`.
    seed: the left/right randomisation seed (written into the page with the assignment).
    negative_prompt: the one both models were sampled with (recorded in the assignment).
  Returns the assignment {'seed', 'a_on_left': [bool] * P}, also saved as `<path>.sides.json`.
  """
  if images_a.shape[:2] != (len(items), images_a.shape[1]) or images_a.shape != images_b.shape:
    raise ValueError(
        f"images must be [P={len(items)}, k, S, S, 3] for both models, got "
        f"{images_a.shape} and {images_b.shape}"
    )
  if name_a == name_b:
    raise ValueError(f"the two models need different names, both are {name_a!r}")
  sides = assign_sides(len(items), seed)
  meta = []
  body = []
  for i, ((cat, prompt), a_left) in enumerate(zip(items, sides)):
    left, right = (images_a[i], images_b[i]) if a_left else (images_b[i], images_a[i])
    ln, rn = (name_a, name_b) if a_left else (name_b, name_a)
    meta.append({"index": i, "category": cat, "prompt": prompt, "left": ln, "right": rn})
    imgs = lambda xs: "".join(f'<img src="{png_data_uri(x)}">' for x in xs)  # noqa: E731
    radios = lambda k, i=i: " ".join(  # noqa: E731
        f'<label><input type="radio" name="{k}_{i}" value="{c}">{c}</label>' for c in CHOICES
    )
    body.append(
        f'<div class="item"><p><b>{i + 1}.</b> <span class="cat">[{html.escape(cat)}]</span> '
        f'{html.escape(prompt)}</p><div class="pair"><div class="side"><h4>left</h4>'
        f'{imgs(left)}</div><div class="side"><h4>right</h4>{imgs(right)}</div></div>'
        f'<p>Which set better represents the text? {radios("alignment")}</p>'
        f'<p>Which set is of higher quality (photorealism)? {radios("fidelity")}</p></div>'
    )
  # "</" inside a <script> would end it (a prompt may contain "</script>"); "<\\/" is the same
  # JSON string.
  items_json = json.dumps(meta).replace("</", "<\\/")
  doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>DrawBench rating sheet</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: auto; }}
.item {{ border-bottom: 1px solid #ccc; padding: 8px 0; }}
.pair {{ display: flex; gap: 24px; }} .side img {{ width: 128px; height: 128px;
image-rendering: pixelated; margin: 2px; }} .cat {{ color: #666; }}
</style></head><body>
<h1>DrawBench side-by-side ratings</h1>
<p>For each prompt, compare the left and right sets of images: first on how well they match
the text, then on image quality. The left/right order is random per prompt (seed {seed}).
When done, press <button onclick="exportCSV()">export CSV</button> (the file names the true
model of each answer).</p>
{''.join(body)}
<p><button onclick="exportCSV()">export CSV</button></p>
<script>
const ITEMS = {items_json};
const SIDES_SEED = {seed};
{_JS}
</script></body></html>
"""
  atomic.write_text(path, doc)
  assignment = {
      "seed": seed,
      "model_a": name_a,
      "model_b": name_b,
      "a_on_left": [bool(s) for s in sides],
      "negative_prompt": negative_prompt,
  }
  atomic.write_json(path + ".sides.json", assignment)
  return assignment


def write_category_grids(
    outdir: str,
    items: Sequence[tuple[str, str]],
    images_a: np.ndarray,
    images_b: np.ndarray,
    name_a: str,
    name_b: str,
) -> list[str]:
  """One PNG per category: a row per prompt, k columns of model A then k of model B."""
  paths_lib.makedirs(outdir)
  k = images_a.shape[1]
  cols = [f"{name_a} #{j + 1}" for j in range(k)] + [f"{name_b} #{j + 1}" for j in range(k)]
  paths = []
  for cat in dict.fromkeys(c for c, _ in items):  # sheet order
    idx = [i for i, (c, _) in enumerate(items) if c == cat]
    rows = [list(images_a[i]) + list(images_b[i]) for i in idx]
    sheet = images.labelled_grid(rows, [items[i][1] for i in idx], cols)
    safe = "".join(ch if ch.isalnum() else "_" for ch in cat).strip("_")
    path = os.path.join(outdir, f"{safe}.png")
    paths.append(atomic.save_png(path, sheet))
  return paths


def sample_k(
    model,
    prompts: Sequence[str],
    settings,
    k: int,
    *,
    seed: int,
    batch_size: int,
    progress: bool = True,
    negative_prompt: str | None = None,
) -> np.ndarray:
  """k samples per prompt from the cascade's last stage: uint8 `[P, k, S, S, 3]`;
  `negative_prompt` replaces the null text of guidance for every prompt (`Cascade.sample`).

  Sample j of prompt p has global index p * k + j, so two models sampled with the same seed
  start from the same noise for the same (p, j) (a paired comparison).
  """
  if k < 1:
    raise ValueError(f"k (images per prompt) must be >= 1, got {k}")
  flat = [p for p in prompts for _ in range(k)]
  pad = (-len(flat)) % batch_size  # one static batch shape for the jitted sampler
  flat += [""] * pad
  negatives = None if negative_prompt is None else [negative_prompt] * len(flat)
  out = model.sample(
      flat,
      settings,
      seed=seed,
      batch_size=batch_size,
      progress=progress,
      negative_prompts=negatives,
  )[-1][: len(flat) - pad]
  u8 = images.to_uint8(out)
  return u8.reshape((len(prompts), k) + u8.shape[1:])
