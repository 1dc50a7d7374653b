"""DrawBench scoring (imagen_jax/evals/drawbench_score.py, experiments/drawbench_score.py) on
synthetic rating sheets whose answer is known: unanimous and tied categories give exact rates,
ties count half, the bootstrap interval matches the binomial one, a known preference is
recovered, and bad sheets are refused naming the file and line."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax.evals import drawbench_score as score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = [
    "index", "category", "prompt", "left_model", "right_model", "alignment_choice",
    "alignment_winner", "fidelity_choice", "fidelity_winner",
]  # fmt: skip


def write_sheet(path, rows, rng, a="imagen", b="other"):
  """rows: [(category, alignment winner, fidelity winner)], winners 'A' / 'B' / 'tie' / ''."""
  name = {"A": a, "B": b, "tie": "tie", "": ""}
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(HEADER)
    for i, (cat, al, fi) in enumerate(rows):
      left, right = (a, b) if rng.random() < 0.5 else (b, a)

      def choice(winner, left=left):
        return winner if winner in ("tie", "") else ("left" if name[winner] == left else "right")

      w.writerow([i, cat, f"prompt {i}", left, right, choice(al), name[al], choice(fi), name[fi]])
  return str(path)


def by(prefs):
  return {(p.question, p.category): p for p in prefs}


def test_exact_categories(tmp_path):
  rng = np.random.default_rng(0)
  rows = [("Colors", "A", "A" if i % 2 else "B") for i in range(4)]
  rows += [("Text", "tie", "tie") for _ in range(3)]
  rows += [("Rare", "B", "")]  # fidelity unanswered
  sheets = [write_sheet(tmp_path / f"r{k}.csv", rows, rng) for k in range(3)]
  ratings, a, b = score.read_sheets(sheets, "imagen")
  assert (a, b) == ("imagen", "other")
  p = by(score.preference(ratings, num_boot=500))
  assert (p["alignment", "Colors"].rate, p["alignment", "Colors"].low) == (1.0, 1.0)
  assert p["alignment", "Colors"].high == 1.0 and p["alignment", "Colors"].ratings == 12
  assert p["fidelity", "Colors"].rate == 0.5
  assert p["fidelity", "Colors"].low < 0.5 < p["fidelity", "Colors"].high
  assert (p["alignment", "Text"].rate, p["alignment", "Text"].low) == (0.5, 0.5)
  assert p["alignment", "Rare"].rate == 0.0 and ("fidelity", "Rare") not in p
  # all: (12 * 1 + 9 * 0.5 + 3 * 0) / 24
  assert p["alignment", "all"].rate == pytest.approx(16.5 / 24)
  assert p["alignment", "all"].prompts == 8
  # The other side's preference is the complement.
  q = by(score.preference(score.read_sheets(sheets, "other")[0], num_boot=500))
  assert q["alignment", "all"].rate == pytest.approx(1 - 16.5 / 24)


def test_bootstrap_interval_matches_the_binomial_one(tmp_path):
  """One rater, n prompts, each preferring A with p = 0.7: the 95% interval is about
  rate +- 1.96 sqrt(rate (1 - rate) / n)."""
  rng = np.random.default_rng(1)
  n = 400
  rows = [("c", "A" if rng.random() < 0.7 else "B", "A") for _ in range(n)]
  ratings, _, _ = score.read_sheets([write_sheet(tmp_path / "r.csv", rows, rng)], "imagen")
  p = by(score.preference(ratings, num_boot=4000, seed=3))["alignment", "c"]
  half = 1.96 * np.sqrt(p.rate * (1 - p.rate) / n)
  assert (p.high - p.low) / 2 == pytest.approx(half, rel=0.15)
  assert p.low < 0.7 < p.high


def test_known_preference_is_recovered_per_category(tmp_path):
  """11 categories x 20 prompts, 5 raters; category k's true preference for A is known."""
  rng = np.random.default_rng(2)
  truth = {f"cat{k}": 0.2 + 0.06 * k for k in range(11)}
  sheets = []
  for r in range(5):
    rows = []
    for cat, t in truth.items():
      for _ in range(20):
        rows.append((cat, "A" if rng.random() < t else "B", "tie"))
    sheets.append(write_sheet(tmp_path / f"r{r}.csv", rows, rng))
  p = by(score.preference(score.read_sheets(sheets, "imagen")[0], num_boot=1000))
  covered = sum(p["alignment", c].low <= t <= p["alignment", c].high for c, t in truth.items())
  assert covered >= 9  # 95% intervals: ~10.5 of 11 expected
  assert abs(p["alignment", "all"].rate - np.mean(list(truth.values()))) < 0.05
  assert p["fidelity", "all"].rate == 0.5


@pytest.mark.parametrize(
    "rows, models, match",
    [
        ([("c", "A", "A")], ("x", "y"), "model_a='imagen'; allowed: x, y"),
        ([("c", "A", "A")], ("imagen", "imagen"), "exactly two"),
    ],
)
def test_bad_sheets_are_refused(tmp_path, rows, models, match):
  sheet = write_sheet(tmp_path / "r.csv", rows, np.random.default_rng(0), *models)
  with pytest.raises(ValueError, match=match):
    score.read_sheets([sheet], "imagen")


def test_bad_winner_names_file_and_line(tmp_path):
  sheet = write_sheet(tmp_path / "r.csv", [("c", "A", "A")] * 2, np.random.default_rng(0))
  text = open(sheet).read().splitlines()
  parts = text[2].split(",")
  parts[6] = "imagine"  # alignment_winner of the second row (line 3)
  text[2] = ",".join(parts)
  open(sheet, "w").write("\n".join(text) + "\n")
  with pytest.raises(ValueError, match=r"r.csv:3: alignment_winner='imagine'"):
    score.read_sheets([sheet], "imagen")


def test_command_writes_table_and_plot(tmp_path):
  rng = np.random.default_rng(4)
  rows = [("Colors", "A", "B"), ("Colors", "A", "tie"), ("Text", "B", "A")]
  sheets = [write_sheet(tmp_path / f"r{k}.csv", rows, rng) for k in range(2)]
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [
          sys.executable, "experiments/drawbench_score.py", f"--sheets={','.join(sheets)}",
          "--model_a=imagen", "--num_boot=200", f"--outdir={out}",
      ],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = (out / "preference.md").read_text()
  assert "| Colors | 2 | 100.0% [100.0, 100.0] | 25.0% [" in md, md
  assert "| **all** | 3 |" in md and "2 raters" in md
  assert (out / "preference.png").stat().st_size > 5000
  assert len((out / "preference.csv").read_text().splitlines()) == 1 + 2 * 3
