"""The command line around every entry point: quiet library logs, one-line user errors.

Every command of the project (`python -m imagen_jax.train` / `.sample`, `experiments/*.py`,
`launch/*.py`, `benchmarks/*.py`, `python -m imagen_jax.evals.convert_weights`) starts with
`cli.run(main)` in place of `absl.app.run(main)` (the argparse ones use `cli.ArgumentParser`):

* **Logging.** The command's own INFO lines (logged from this package or from the script's
  folder), its progress bars and every WARNING or worse are shown; INFO from libraries (Orbax's
  checkpoint internals, absl, TFDS, grain, jax) is dropped. absl's own `--verbosity=0` (or
  `-v 0`; 1 = debug) brings every library's INFO back.
* **User errors** end in one line on stderr, `<command>: error: <message>`, exit status 2
  (`USER_ERROR_STATUS`, argparse's), and no traceback: a bad flag value or a misspelt flag or
  config field, an unknown config variant or a missing config file (all caught while the flags
  are parsed), an `absl.app.UsageError` raised by the command, a missing input file
  (`require_file`) and the library's own user-error types (`USER_ERRORS`: a missing or foreign
  workdir, an unreachable bucket, a checkpoint of another model). Any other exception is an
  internal error and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
from typing import Callable, Iterable

import jax
from absl import app, flags
from absl import logging as absl_logging

from imagen_jax import paths

USER_ERROR_STATUS = 2

# The library's exception types that mean "the command's input is wrong", by qualified name so
# that this module imports none of them (a test checks every name resolves to an exception).
USER_ERRORS = frozenset(
    {
        "absl.app.UsageError",
        "imagen_jax.cli.UserError",
        "imagen_jax.paths.AccessError",
        "imagen_jax.sampling.cascade.StageLoadError",
        "imagen_jax.run_meaning.CheckpointMismatchError",
        "imagen_jax.train.workdir.WorkdirMismatchError",
        "imagen_jax.train.warm_start.WarmStartError",
        "imagen_jax.text.cache_read.CacheError",
        "imagen_jax.text.hf_weights.CheckpointError",
    }
)
# What the flags parser can raise for a bad value: absl's flags.Error, and config_flags' errors
# from a config file's get_config (ValueError / TypeError) or an override of a field the
# config does not have (AttributeError / KeyError).
_FLAG_ERRORS = (flags.Error, ValueError, TypeError, AttributeError, KeyError)


class UserError(Exception):
  """A mistake in the command line or its inputs (one line, exit status 2)."""


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is one of `USER_ERRORS` (by class, subclasses included)."""
  return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(error).__mro__)


def one_line(message: str) -> str:
  """A (possibly multi-line) error message on one line.

  config_flags puts a whole traceback into the message of an error raised by a config file's
  `get_config` ("flag --config=X: Error whilst parsing config file: Traceback ... ValueError:
  unknown variant ..."): that becomes "flag --config=X: unknown variant ...".
  """
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  if not lines:
    return "error"
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    head = lines[0].split(" Error whilst parsing config file")[0].rstrip(":")
    last = lines[-1]
    kind, sep, text = last.partition(": ")
    if sep and kind.replace(".", "").isidentifier():
      last = text
    return f"{head}: {last}" if head != lines[-1] else last
  return " ".join(lines)


def command_name() -> str:
  """How the user called this command: `imagen_jax.train` (for `-m`) or the script's name."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return spec.name.removesuffix(".__main__")
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "command"


def fail(message: str) -> None:
  """Ends the command with a user error: one line on stderr, exit status 2."""
  sys.stderr.write(f"{command_name()}: error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(USER_ERROR_STATUS)


def require_file(flag: str, path: str | None, what: str = "file") -> str:
  """`path` (the value of `--flag`) if it exists, else a `UserError` naming it."""
  if not path:
    raise UserError(f"--{flag} is required (a {what})")
  if not paths.path(path).exists():
    raise UserError(f"--{flag}={path!r}: no such {what}")
  return path


def define_negative_prompt() -> flags.FlagHolder:
  """`--negative_prompt`, one flag for the sample CLI and the sweeps: the text whose embedding
  the unconditional half of classifier-free guidance reads for every prompt (None: the null
  text; `Cascade.sample(negative_prompts=...)`)."""
  return flags.DEFINE_string(
      "negative_prompt", None, "guidance's unconditional text for every prompt (default: null text)"
  )


def define_process_flags() -> Callable[[], tuple[int, int]]:
  """`--process_index`, `--process_count`, `--distributed`: where this process stands among
  those sharing a preparation job's shards (no collectives: each writes its own shards).

  Returns a function, called after the flags are parsed, giving (index, count); with
  `--distributed`, jax.distributed.initialize() (auto-detected on TPU pods and SLURM) gives them:
  one command for every host."""
  index = flags.DEFINE_integer("process_index", 0, "this process (0 .. process_count - 1)")
  count = flags.DEFINE_integer("process_count", 1, "processes sharing the shards")
  distributed = flags.DEFINE_bool(
      "distributed",
      False,
      "take process_index / process_count from jax.distributed.initialize() (auto-detected on TPU "
      "pods and SLURM): one command for every host",
  )

  def placement() -> tuple[int, int]:
    if not distributed.value:  # the library checks 0 <= index < count
      return index.value, count.value
    jax.distributed.initialize()
    return jax.process_index(), jax.process_count()

  return placement


class _LibraryInfoFilter(logging.Filter):
  """Keeps WARNING and worse, and INFO / DEBUG logged from the given folders (ours)."""

  def __init__(self, folders: Iterable[str]):
    super().__init__()
    self._folders = tuple(os.path.join(os.path.abspath(f), "") for f in folders)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return os.path.abspath(record.pathname or "").startswith(self._folders)


def our_folders() -> list[str]:
  """The folders whose INFO lines are the command's own: this package and the script's."""
  out = [os.path.dirname(os.path.abspath(__file__))]
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  if main_file:
    out.append(os.path.dirname(os.path.abspath(main_file)))
  return out


def quiet_libraries(folders: Iterable[str] | None = None) -> logging.Filter:
  """Drops library INFO lines from absl's handler and every root handler; returns the filter."""
  keep = _LibraryInfoFilter(our_folders() if folders is None else folders)
  handlers = {absl_logging.get_absl_handler(), *logging.getLogger().handlers}
  for h in handlers:
    h.addFilter(keep)
  return keep


def _unknown_field(error: Exception, argv: list[str]) -> str:
  """config_flags' error for an override of a field the config lacks, naming the flag."""
  text = str(error.args[0]) if error.args else str(error)
  if text[:1] in "'\"":  # ml_collections double-quotes its message: "'\'x\'\nDid you mean..."
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  field = text.splitlines()[0].strip("'\"") if text else ""
  given = [a.split("=")[0] for a in argv[1:] if field and a.startswith("--") and field in a]
  hint = " ".join(text.splitlines()[1:])
  where = f"{given[0]}: " if given else ""
  return f"{where}the config has no field {field!r}" + (f"; {hint}" if hint else "")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad value a one-line user error (exit status 2)."""
  try:
    rest = flags.FLAGS(argv)
    for name in list(flags.FLAGS):
      value = flags.FLAGS[name].value
      if type(value).__name__ == "_ErrorConfig":  # config_flags' deferred missing-file error
        file = getattr(flags.FLAGS[name], "config_filename", None) or "?"
        raise UserError(f"--{name}={file}: no such config file {file.split(':')[0]!r}")
  except (AttributeError, KeyError) as e:
    fail(_unknown_field(e, argv))
  except _FLAG_ERRORS + (UserError,) as e:
    fail(str(e))
  if not flags.FLAGS["verbosity"].present:
    quiet_libraries()
  return rest


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the few argparse commands: a bad argument is one line, exit status 2."""

  def error(self, message: str):
    fail(message)


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with quiet library logging and one-line user errors (module doc)."""

  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 - user errors end in one line, others re-raise
      if is_user_error(e):
        fail(str(e))
      raise

  app.run(guarded, flags_parser=parse_flags)
