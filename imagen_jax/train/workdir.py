"""The pre-flight check of a training workdir, before anything starts (the distributed job,
the mesh, the encoder): every bucket it names is reachable, and the workdir is not another run's.

Imports nothing from jax at module level, so `main` can run it first.
"""

from __future__ import annotations

import json

from imagen_jax import paths, run_meaning


class WorkdirMismatchError(ValueError):
  """The workdir's config.json records a run of another meaning."""


def check_workdir(config, workdir: str) -> None:
  """Raises `paths.AccessError` for an unusable bucket among the workdir, `data.data_dir` and
  `text.embedding_cache`, and `WorkdirMismatchError` when `workdir/config.json` records another
  run (its `run_meaning.MEANING_FIELDS` differ from `config`'s; the text fingerprint, known only
  once the encoder is loaded, is left to the resume check)."""
  for p in (workdir, config.data.get("data_dir", ""), config.text.get("embedding_cache", "")):
    if p:
      paths.check_access(p)
  saved_path = paths.path(workdir) / "config.json"
  if not saved_path.exists():
    return
  try:
    saved = json.loads(saved_path.read_text())
  except ValueError as e:
    raise WorkdirMismatchError(
        f"{saved_path} is not valid JSON ({e}); is it a run's workdir?"
    ) from None
  current = json.loads(config.to_json_best_effort())
  diffs = run_meaning.meaning_diff(saved, current, fingerprint=False)
  if diffs:
    raise WorkdirMismatchError(
        f"--workdir={workdir} holds another run ({saved.get('stage')!r} stage): "
        + run_meaning.format_meaning_diff(diffs, "in its config.json", "this config has")
        + ". Use a fresh workdir, or resume with the workdir's values"
    )
