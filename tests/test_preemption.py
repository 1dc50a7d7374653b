"""Preemption on one process: SIGTERM sets a flag the loop polls, at no per-step cost, and the
previous handler comes back after the run. (A trainer run that checkpoints and resumes after
SIGTERM: tests/test_train_trainer.py; SIGTERM to one of 2 processes, both saving the same step
through jax's preemption sync point: tests/test_elastic.py, `-k "preempt and multihost"`.)"""

import os
import signal

import pytest

from imagen_jax.train import trainer


def test_preempt_single_process_sigterm_sets_the_flag_and_restores_the_handler():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    p = trainer._Preemption(check_every=1)
    assert not p._service  # one process: no coordination service
    p.install()
    assert not p.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.reached(2) and p.reached(3)  # at once, whatever the step
    assert seen == []  # the run's handler took it, not the previous one
    p.uninstall()
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("value", [0, -1])
def test_preempt_check_every_is_validated(value, tmp_path):
  from imagen_jax.train import settings
  from tests.test_train_trainer import tiny_config

  config = tiny_config("base64", tmp_path, **{"train.preemption_check_every": value})
  with pytest.raises(ValueError, match=r"train.preemption_check_every=.*allowed: an int >= 1"):
    settings.check(config)
