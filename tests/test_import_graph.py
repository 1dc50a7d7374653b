"""The package layers (DESIGN.md, dependency direction), checked on the import graph.

Every `import` / `from ... import` statement of a module, at top level or inside a function,
is an edge; edges are followed transitively through our packages (`imagen_jax`, `experiments`,
`configs`), with each imported module's parent packages (their `__init__` runs too). So a local
import inside a function counts, which a `sys.modules` check after importing would miss.

  * sampling never imports training: sampling/, evals/, stage, denoiser, experiments/ reach no
    `imagen_jax.train` module;
  * `imagen_jax/diffusion` imports nothing of ours but itself;
  * `nn/` and `text/` reach no training code;
  * training reaches nothing of `imagen_jax/sampling` (both stand on `stage`).
  * `imagen_jax/parallel` reaches no domain code (diffusion, nn, text, data, stage, sampling,
    train, evals);
  * imports sit at the top of a module; one inside a function says why in a comment (an
    optional dependency, or a heavy library only one path needs).
"""

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = ("imagen_jax", "experiments", "configs")
TRAIN = "imagen_jax.train"


def module_file(name: str) -> pathlib.Path | None:
  path = ROOT.joinpath(*name.split("."))
  for f in (path.with_suffix(".py"), path / "__init__.py"):
    if f.is_file():
      return f
  return None


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(name: str) -> set[str]:
  parts = name.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imports_in_source(source: str, name: str, is_package: bool = False) -> set[str]:
  """Our modules that the source of module `name` imports anywhere (with their parents)."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = name.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        base = ".".join(base + ([node.module] if node.module else []))
      else:
        base = node.module
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if module_file(sub) else base)
  ours = {m for m in out if m.split(".")[0] in OURS}
  return set().union(*(_with_parents(m) for m in ours)) if ours else set()


@functools.lru_cache(maxsize=None)
def direct_imports(name: str) -> frozenset[str]:
  """Our modules that module `name` imports anywhere in its source (with their parents)."""
  path = module_file(name)
  if path is None:
    return frozenset()
  return frozenset(imports_in_source(path.read_text(), name, path.name == "__init__.py"))


def reachable(name: str) -> dict[str, list[str]]:
  """Every module reachable from `name`, with one import chain leading to it."""
  chains = {name: [name]}
  todo = [name]
  while todo:
    m = todo.pop()
    for dep in sorted(direct_imports(m)):
      if dep not in chains and module_file(dep) is not None:
        chains[dep] = chains[m] + [dep]
        todo.append(dep)
  return chains


def modules_under(*rel: str) -> list[str]:
  out = []
  for r in rel:
    p = ROOT / r
    files = [p] if p.suffix == ".py" else sorted(p.rglob("*.py"))
    out += [module_name(f) for f in files if f.is_file()]
  return out


def _training_reached(name: str) -> list[str]:
  return [
      " -> ".join(chain)
      for dep, chain in sorted(reachable(name).items())
      if dep == TRAIN or dep.startswith(TRAIN + ".")
  ]


SAMPLING = modules_under(
    "imagen_jax/sampling",
    "imagen_jax/sample.py",
    "imagen_jax/evals",
    "imagen_jax/stage.py",
    "imagen_jax/denoiser.py",
    "experiments",
)


def test_the_walker_sees_local_imports():
  # An import inside a function is an edge too, or the checks below could pass vacuously.
  source = "import os\n\ndef f():\n  from imagen_jax.train import trainer\n  return trainer\n"
  assert "imagen_jax.train.trainer" in imports_in_source(source, "experiments.x")
  assert any(c.endswith(f"{TRAIN}.trainer") for c in _training_reached("imagen_jax.train.main"))
  assert {"imagen_jax.stage", "imagen_jax.diffusion.samplers"} <= set(
      reachable("imagen_jax.sampling.cascade")
  )
  assert "experiments.demo" in SAMPLING or not (ROOT / "experiments" / "demo.py").exists()


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_never_imports_training(name):
  chains = _training_reached(name)
  assert not chains, f"{name} imports training code: " + "; ".join(chains)


@pytest.mark.parametrize("name", modules_under("imagen_jax/diffusion"))
def test_diffusion_imports_nothing_of_ours(name):
  foreign = sorted(
      m
      for m in direct_imports(name)
      if m != "imagen_jax" and not m.startswith("imagen_jax.diffusion")
  )
  assert not foreign, f"{name} imports {foreign}; imagen_jax/diffusion is pure math"


@pytest.mark.parametrize("name", modules_under("imagen_jax/nn", "imagen_jax/text"))
def test_networks_and_text_import_no_training_code(name):
  chains = _training_reached(name)
  assert not chains, f"{name} imports training code: " + "; ".join(chains)


@pytest.mark.parametrize("name", modules_under("imagen_jax/train"))
def test_training_does_not_import_sampling(name):
  # train/ and sampling/ both stand on the stage layer; neither imports the other.
  chains = [
      " -> ".join(chain)
      for dep, chain in sorted(reachable(name).items())
      if dep.startswith("imagen_jax.sampling")
  ]
  assert not chains, f"{name} imports sampling code: " + "; ".join(chains)


HIGHER = ("diffusion", "nn", "text", "data", "stage", "denoiser", "sampling", "train", "evals")


@pytest.mark.parametrize("name", modules_under("imagen_jax/parallel"))
def test_parallel_is_ground_floor(name):
  # parallel/ (mesh, shardings, AOT topologies) serves training, sampling and the AOT tools: it
  # reaches no domain code.
  chains = [
      " -> ".join(chain)
      for dep, chain in sorted(reachable(name).items())
      if any(dep == f"imagen_jax.{h}" or dep.startswith(f"imagen_jax.{h}.") for h in HIGHER)
  ]
  assert not chains, f"{name} imports domain code: " + "; ".join(chains)


def _deferred_imports(path: pathlib.Path):
  """(line number, source line, previous line) of each import inside a function of `path`."""
  lines = path.read_text().splitlines()
  tree = ast.parse("\n".join(lines))
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          yield node.lineno, lines[node.lineno - 1], lines[node.lineno - 2]


DEFERRED_CHECKED = sorted(
    f
    for d in ("imagen_jax", "experiments", "aot", "configs", "benchmarks", "launch")
    for f in (ROOT / d).rglob("*.py")
)


@pytest.mark.parametrize("path", DEFERRED_CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_at_the_top_or_say_why(path):
  # An import inside a function hides an edge (and its cost); one that has a reason says it in
  # a comment on its line, or on the line above the group it starts.
  bad = []
  for lineno, line, prev in _deferred_imports(path):
    said = "#" in line or prev.strip().startswith("#")
    if not said and prev.strip().startswith(("import ", "from ")):
      continue  # the next import of a group whose first line says why
    if not said:
      bad.append(f"{lineno}: {line.strip()}")
  assert not bad, f"{path.relative_to(ROOT)}: imports inside functions, with no reason: {bad}"
