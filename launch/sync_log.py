r"""Copies a worker's log into the run's workdir while the run lives, and once more after it ends.

    python launch/sync_log.py PID LOG DEST [--every=60]

`launch/tpu_pod.sh start` runs it detached beside the training process on every worker, with
DEST = WORKDIR/logs/<worker hostname>.log, so the per-worker logs sit in the workdir (a gs://
bucket included: a log cannot be appended to an object, so each copy uploads the whole file,
through `imagen_jax.atomic`, and a reader never sees a half-written one).
"""

from __future__ import annotations

import os
import sys
import time


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def main(argv: list[str]) -> int:
  args = [a for a in argv if not a.startswith("--every=")]
  every = [float(a.split("=", 1)[1]) for a in argv if a.startswith("--every=")] or [60.0]
  if len(args) != 3 or not args[0].isdigit():
    print(f"usage: {sys.argv[0]} PID LOG DEST [--every=SECONDS]; got {argv}", file=sys.stderr)
    return 2
  pid, log, dest = int(args[0]), args[1], args[2]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
  from imagen_jax import atomic  # importable once the checkout is on sys.path (above)

  copied = -1.0

  def copy() -> None:
    nonlocal copied
    if os.path.exists(log) and os.path.getmtime(log) != copied:
      copied = os.path.getmtime(log)
      with open(log, "rb") as f:
        atomic.write_bytes(dest, f.read())

  while alive(pid):
    copy()
    time.sleep(every[0])
  copy()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
