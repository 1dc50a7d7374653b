"""DrawBench scored: returned rating sheets -> the preference table and plot (Imagen Fig. 3).

Each rater returns the CSV that `evals.drawbench`'s rating sheet exports (one row per prompt:
`index, category, prompt, left_model, right_model, alignment_choice, alignment_winner,
fidelity_choice, fidelity_winner`; a winner is a model name, `tie`, or empty when unanswered).
For model A against model B, per question (alignment, fidelity) and per category (and `all`):

  preference(A) = (wins_A + ties / 2) / answered ratings

(Fig. 3 reports "% preference" of Imagen against each other model with 95% confidence
intervals; the paper does not say how "indifferent" answers count: we split them evenly, so 50%
means no preference either way). The 95% interval is a bootstrap over prompts: prompts are
resampled with replacement within the category (every rater's ratings of a drawn prompt come
with it), `num_boot` times with a seeded generator, and the 2.5th / 97.5th percentiles of the
resampled preference are the bounds. Rows the raters left unanswered are not counted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Sequence

import numpy as np

from imagen_jax import atomic
from imagen_jax import paths as paths_lib

QUESTIONS = ("alignment", "fidelity")
COLUMNS = ("index", "category", "prompt", "alignment_winner", "fidelity_winner")
ALL = "all"


@dataclasses.dataclass(frozen=True)
class Rating:
  rater: str
  index: int  # the prompt's index in the sheet
  category: str
  question: str
  score: float  # 1 = A preferred, 0 = B preferred, 0.5 = tie


@dataclasses.dataclass(frozen=True)
class Preference:
  question: str
  category: str
  prompts: int
  ratings: int
  rate: float  # preference for A in [0, 1]
  low: float  # 95% bootstrap interval over prompts
  high: float


def read_sheets(paths: Sequence[str], model_a: str | None = None) -> tuple[list[Rating], str, str]:
  """(ratings, A, B) from the returned CSVs (one per rater; the rater is the file name).

  Raises ValueError naming the file and line of a row that is not a sheet row, or when the
  sheets do not compare exactly two models (or `model_a` is not one of them).
  """
  rows = []
  models: set[str] = set()
  for path in paths:
    text = paths_lib.path(path).read_text()
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: not a DrawBench rating sheet export (no columns {missing})")
    for line, row in enumerate(reader, start=2):
      models.update(m for m in (row.get("left_model"), row.get("right_model")) if m)
      rows.append((path, line, row))
  if len(models) != 2:
    raise ValueError(f"the sheets compare models {sorted(models)}; allowed: exactly two")
  a = model_a or sorted(models)[0]
  if a not in models:
    raise ValueError(f"model_a={a!r}; allowed: {', '.join(sorted(models))}")
  (b,) = models - {a}
  score = {a: 1.0, b: 0.0, "tie": 0.5}
  out = []
  for path, line, row in rows:
    for q in QUESTIONS:
      winner = (row.get(f"{q}_winner") or "").strip()
      if not winner:
        continue  # unanswered
      if winner not in score:
        raise ValueError(
            f"{path}:{line}: {q}_winner={winner!r}; allowed: {a!r}, {b!r}, 'tie' or empty"
        )
      try:
        index = int(row["index"])
      except ValueError:
        raise ValueError(f"{path}:{line}: index={row['index']!r} is not an integer") from None
      out.append(Rating(str(path), index, row["category"], q, score[winner]))
  return out, a, b


def preference(
    ratings: Sequence[Rating], *, num_boot: int = 2000, seed: int = 0
) -> list[Preference]:
  """One `Preference` per question and category (categories sorted, then `all`)."""
  rng = np.random.default_rng(seed)
  out = []
  for q in QUESTIONS:
    mine = [r for r in ratings if r.question == q]
    categories = sorted({r.category for r in mine})
    for cat in categories + [ALL]:
      rows = [r for r in mine if cat == ALL or r.category == cat]
      if not rows:
        continue
      # Per prompt (keyed by category and index): its rating sum and count.
      keys = sorted({(r.category, r.index) for r in rows})
      where = {k: i for i, k in enumerate(keys)}
      sums, counts = np.zeros(len(keys)), np.zeros(len(keys))
      for r in rows:
        sums[where[(r.category, r.index)]] += r.score
        counts[where[(r.category, r.index)]] += 1
      if cat == ALL:  # resample within each category: the categories keep their sizes
        groups = [np.array([where[k] for k in keys if k[0] == c]) for c in categories]
      else:
        groups = [np.arange(len(keys))]
      boot_sum, boot_count = np.zeros(num_boot), np.zeros(num_boot)
      for g in groups:
        draw = g[rng.integers(0, len(g), size=(num_boot, len(g)))]
        boot_sum += sums[draw].sum(axis=1)
        boot_count += counts[draw].sum(axis=1)
      boot = boot_sum / boot_count
      out.append(
          Preference(
              question=q,
              category=cat,
              prompts=len(keys),
              ratings=len(rows),
              rate=float(sums.sum() / counts.sum()),
              low=float(np.percentile(boot, 2.5)),
              high=float(np.percentile(boot, 97.5)),
          )
      )
  return out


def table_markdown(prefs: Sequence[Preference], a: str, b: str, raters: int) -> str:
  """The preference table: one row per category, alignment and fidelity columns."""
  by = {(p.question, p.category): p for p in prefs}
  cats = [c for c in dict.fromkeys(p.category for p in prefs) if c != ALL] + [ALL]
  lines = [
      f"DrawBench: % of ratings preferring {a} over {b} (ties count half), 95% bootstrap "
      f"interval over prompts; {raters} raters",
      "",
      "| category | prompts | alignment | fidelity |",
      "|---|---|---|---|",
  ]
  for c in cats:
    cells = []
    for q in QUESTIONS:
      p = by.get((q, c))
      cells.append(
          "" if p is None else f"{100 * p.rate:.1f}% [{100 * p.low:.1f}, {100 * p.high:.1f}]"
      )
    n = max(by[(q, c)].prompts for q in QUESTIONS if (q, c) in by)
    lines.append(f"| {'**all**' if c == ALL else c} | {n} | {cells[0]} | {cells[1]} |")
  return "\n".join(lines) + "\n"


def table_csv(prefs: Sequence[Preference]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow([f.name for f in dataclasses.fields(Preference)])
  for p in prefs:
    w.writerow([getattr(p, f.name) for f in dataclasses.fields(Preference)])
  return buf.getvalue()


def plot(prefs: Sequence[Preference], a: str, b: str, path: str) -> None:
  """Fig. 3's layout: per question, horizontal bars of A's preference per category with the
  95% interval, and the 50% line (no preference)."""
  import matplotlib  # deferred: a 1 s import that only the plot needs

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  cats = [c for c in dict.fromkeys(p.category for p in prefs) if c != ALL] + [ALL]
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(cats) + 1.5), sharey=True)
  for ax, q in zip(axes, QUESTIONS):
    by = {p.category: p for p in prefs if p.question == q}
    ys = np.arange(len(cats))[::-1]
    rate = np.array([100 * by[c].rate if c in by else np.nan for c in cats])
    low = np.array([100 * by[c].low if c in by else np.nan for c in cats])
    high = np.array([100 * by[c].high if c in by else np.nan for c in cats])
    ax.barh(ys, rate, color=["tab:orange" if c == ALL else "tab:blue" for c in cats])
    ax.errorbar(rate, ys, xerr=[rate - low, high - rate], fmt="none", ecolor="black", capsize=3)
    ax.axvline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% preferring {a} over {b}")
    ax.set_title(q)
    ax.set_yticks(ys, cats)
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=120)
  plt.close(fig)
