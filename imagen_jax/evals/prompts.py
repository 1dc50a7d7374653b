"""Prompts for sampling and evaluation: prompt files (read one way for every tool: sampling,
sweeps, DrawBench) and the shapes test split's prompts.

Format (UTF-8): one prompt per line; blank lines and lines starting with `#` are skipped; a line
`category<TAB>prompt` carries a category (DrawBench's export, Imagen §4.3 / App. A: 200 prompts
in 11 categories). Without a tab the category is "".
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from imagen_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  category: str = ""


def read_prompts(path: str, *, require_category: bool = False) -> list[Prompt]:
  """The prompts of a file (see the module doc); errors name the file and line.

  Args:
    require_category: every line must be `category<TAB>prompt` (DrawBench).
  """
  if not os.path.exists(path):
    raise ValueError(f"prompt file {path!r} does not exist")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      parts = line.split("\t")
      if len(parts) > 2 or any(not p.strip() for p in parts):
        raise ValueError(f"{path}:{n}: expected 'prompt' or 'category<TAB>prompt', got {line!r}")
      if require_category and len(parts) != 2:
        raise ValueError(f"{path}:{n}: expected 'category<TAB>prompt', got {line!r}")
      category, text = parts if len(parts) == 2 else ("", parts[0])
      out.append(Prompt(text.strip(), category.strip()))
  if not out:
    raise ValueError(f"prompt file {path!r} holds no prompts")
  return out


def read_texts(path: str) -> list[str]:
  """Just the prompt texts of a file (categories dropped)."""
  return [p.text for p in read_prompts(path)]


def shapes_test_prompts(
    data_dir: str,
    resolution: int,
    *,
    num_train: int,
    num_test: int,
    seed: int,
    limit: int,
    background: str = "black",
) -> tuple[list[str], list[dict], np.ndarray]:
  """The shapes test split (built or reused in data_dir): prompts, attributes, real images."""
  if limit > num_test:
    raise ValueError(f"num_prompts={limit} exceeds the shapes test split ({num_test})")
  builder = shapes.build_shapes(
      data_dir, resolution, num_train=num_train, num_test=num_test, seed=seed, background=background
  )
  test = shapes.read_examples(builder, "test")
  return (
      [ex["caption"] for ex in test[:limit]],
      [ex["attributes"] for ex in test[:limit]],
      np.stack([ex["image"] for ex in test]),
  )
