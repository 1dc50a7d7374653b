"""Applications sit on the library: experiments and the sampling CLI never import training, the
demo, or configs by file path, and never edit sys.path."""

import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))) + [
    os.path.join(REPO, "imagen_jax", "sampling", "main.py")
]


def _imports(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_applications_import_neither_training_nor_the_demo(path):
  source = open(path, encoding="utf-8").read()
  names = set(_imports(ast.parse(source)))
  train = sorted(n for n in names if n == "imagen_jax.train" or n.startswith("imagen_jax.train."))
  assert not train, f"{path} imports {train}: train stages with imagen_jax.cli_runner"
  if not path.endswith("demo.py"):
    assert not {n for n in names if n.split(".")[-1] == "demo"}, f"{path} imports the demo"
  assert "sys.path" not in source, f"{path} edits sys.path"
  assert "spec_from_file_location" not in source, f"{path} loads a module by file path"


def test_the_library_has_no_demo():
  assert not os.path.exists(os.path.join(REPO, "imagen_jax", "demo.py"))
  assert not os.path.exists(os.path.join(REPO, "imagen_jax", "visualize.py"))
