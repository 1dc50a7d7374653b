"""imagen_jax.evals.prompts: one reader for every prompt file."""

import pytest

from imagen_jax.evals import drawbench, prompts


def test_comments_blank_lines_and_categories(tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("# header\n\na red circle\n  # indented comment\nColors\tA blue car.\r\n")
  got = prompts.read_prompts(str(f))
  assert got == [prompts.Prompt("a red circle"), prompts.Prompt("A blue car.", "Colors")]
  assert prompts.read_texts(str(f)) == ["a red circle", "A blue car."]


def test_bad_files_name_the_file_and_line(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    prompts.read_prompts(str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("# only a comment\n")
  with pytest.raises(ValueError, match="holds no prompts"):
    prompts.read_prompts(str(empty))
  bad = tmp_path / "bad.tsv"
  bad.write_text("a\tb\tc\n")
  with pytest.raises(ValueError, match=r"bad.tsv:1: expected"):
    prompts.read_prompts(str(bad))
  untagged = tmp_path / "db.tsv"
  untagged.write_text("Colors\tA red car.\nno tab here\n")
  with pytest.raises(ValueError, match=r"db.tsv:2: expected 'category<TAB>prompt'"):
    prompts.read_prompts(str(untagged), require_category=True)


def test_drawbench_reads_category_prompt_pairs(tmp_path):
  f = tmp_path / "db.tsv"
  f.write_text("# DrawBench\nColors\tA red car.\nCounting\tThree cats.\n")
  assert drawbench.read_prompts(str(f)) == [("Colors", "A red car."), ("Counting", "Three cats.")]
  with pytest.raises(ValueError, match="export the sheet"):
    drawbench.read_prompts(str(tmp_path / "none.tsv"))
