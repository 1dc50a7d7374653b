"""experiments/encoder_probe.py: the token-matching measure against closed forms, and the probe
on the random encoder."""

import numpy as np
import pytest

from configs import base64 as base64_config
from experiments import encoder_probe
from imagen_jax.text import registry


def test_least_matched_cosine_closed_forms():
  e = np.eye(3)
  assert encoder_probe.least_matched_cosine(e[:2], e[:2]) == pytest.approx(1.0)
  # A token of one caption with no copy in the other (orthogonal to all of it): 0.
  assert encoder_probe.least_matched_cosine(e[:2], e[:1]) == pytest.approx(0.0)
  assert encoder_probe.least_matched_cosine(e[:1], e[:2]) == pytest.approx(0.0)
  # Scale does not matter; a token at 60 degrees from its best match gives cos 60 = 0.5.
  a = np.array([[2.0, 0.0]])
  b = np.array([[0.5, 0.5 * np.sqrt(3.0)]])
  assert encoder_probe.least_matched_cosine(a, b) == pytest.approx(0.5)
  assert encoder_probe.pooled_cosine(a, b) == pytest.approx(0.5)


def test_pairs_differ_in_one_word_of_their_attribute():
  for attribute, a, b in encoder_probe.PAIRS:
    diff = [(x, y) for x, y in zip(a.split(), b.split()) if x != y]
    assert len(a.split()) == len(b.split()) and len(diff) == 1, (a, b)
    assert attribute in encoder_probe.ATTRIBUTES


def test_probe_on_the_random_encoder_writes_a_row_per_encoder():
  text = base64_config.get_config("shapes,text_name=byt5-tiny-random").text
  result = encoder_probe.probe(registry.get_text_encoder(text, progress=False))
  assert set(result) == set(encoder_probe.ATTRIBUTES)
  for least, pooled in result.values():
    assert -1.0 <= least < 1.0 and least <= pooled <= 1.0  # one word apart: never identical
  table = encoder_probe.table({"byt5-tiny-random": result})
  row = next(line for line in table.splitlines() if line.startswith("| byt5-tiny-random |"))
  assert row.count("|") == len(encoder_probe.ATTRIBUTES) + 2
