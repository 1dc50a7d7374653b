"""DrawBench scored: returned rating sheets -> Imagen's Fig. 3 preference table and plot.

  python experiments/drawbench_score.py --sheets=ratings/alice.csv,ratings/bob.csv \
      --model_a=w3 --outdir=drawbench_scores

Reads the CSVs the rating sheet of `experiments/drawbench.py` exports (one per rater), and
writes `preference.md` (per category and over all prompts: % of ratings preferring model A on
alignment and on fidelity, ties counted half, 95% bootstrap intervals over prompts),
`preference.csv` and `preference.png` (the plot). See `imagen_jax/evals/drawbench_score.py`.
"""

from __future__ import annotations

import os

from absl import flags

from imagen_jax import atomic, cli, paths
from imagen_jax.evals import drawbench_score as score

_SHEETS = flags.DEFINE_list("sheets", None, "the raters' exported CSVs", required=True)
_MODEL_A = flags.DEFINE_string("model_a", None, "the model whose preference is reported")
_BOOT = flags.DEFINE_integer("num_boot", 2000, "bootstrap resamples of the prompts")
_SEED = flags.DEFINE_integer("seed", 0, "bootstrap seed")
_OUTDIR = flags.DEFINE_string("outdir", "drawbench_scores", "output folder")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  sheets = [cli.require_file("sheets", s, "rating sheet CSV") for s in _SHEETS.value]
  if _BOOT.value < 100:
    raise cli.UserError(f"--num_boot={_BOOT.value}; allowed: >= 100 (the interval's tails)")
  try:
    ratings, a, b = score.read_sheets(sheets, _MODEL_A.value)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if not ratings:
    raise cli.UserError(f"--sheets={','.join(sheets)}: no answered ratings")
  prefs = score.preference(ratings, num_boot=_BOOT.value, seed=_SEED.value)
  md = score.table_markdown(prefs, a, b, raters=len(sheets))
  paths.makedirs(_OUTDIR.value)
  atomic.write_text(os.path.join(_OUTDIR.value, "preference.md"), md)
  atomic.write_text(os.path.join(_OUTDIR.value, "preference.csv"), score.table_csv(prefs))
  score.plot(prefs, a, b, os.path.join(_OUTDIR.value, "preference.png"))
  print(md)
  print(f"wrote preference.md, preference.csv and preference.png in {_OUTDIR.value}")


if __name__ == "__main__":
  cli.run(main)
