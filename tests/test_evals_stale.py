"""Resumable evaluation artefacts are keyed by what produced them: stale ones are never reused.

COCO sample chunks, reference statistics (COCO and sweep), sweep points and statistics files
carry a provenance key (`imagen_jax.evals.provenance`); a rerun into the same folder with
another model, seed, chunk size, reference set or settings recomputes, and an edited key is
refused or recomputed. `pytest -k stale` selects these tests.
"""

import dataclasses
import json
import os

import numpy as np
import PIL.Image
import pytest

from imagen_jax.evals import coco, features, frechet, provenance, sweep
from imagen_jax.sampling import cascade
from tests import cascade_fixtures

SETTINGS = [
    cascade.SamplingSettings(num_steps=2, guidance_weight=3.0),
    cascade.SamplingSettings(num_steps=2, guidance_weight=1.5, aug_level=0.1),
]
PROMPTS = [f"a red circle number {i}" for i in range(6)]


@pytest.fixture(scope="module")
def model():
  return cascade.Cascade.from_workdirs(cascade_fixtures.shared_tiny_cascade())


def _counting(model, monkeypatch):
  calls = []
  real = model.sample
  monkeypatch.setattr(model, "sample", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
  return calls


def _images(paths, total):
  return np.concatenate(list(coco.iter_chunks(paths, total=total)))


class _ConvComputer:
  """The COCO reference-statistics interface (`statistics(batches, total)`, `identity`) over the
  offline random-conv features, so the keying is tested without the FID InceptionV3."""

  def __init__(self):
    self.features = features.RandomConvFeatures(size=32, dim=8, batch_size=8)
    self.identity = self.features.identity
    self.calls = 0

  def statistics(self, batches, total=None):
    self.calls += 1
    return self.features.statistics(np.concatenate(list(batches)))


def test_stale_key_is_canonical_and_names_what_differs(tmp_path):
  a = {"seed": 0, "stages": [{"step": 7}], "settings": (1.0, "dynamic")}
  assert provenance.artefact_key(a) == provenance.artefact_key(dict(reversed(list(a.items()))))
  assert len(provenance.artefact_key(a)) == 64
  path = str(tmp_path / "x.npz")
  provenance.save_npz(path, a, images=np.arange(3))
  np.testing.assert_array_equal(provenance.load_if_matches(path, a)["images"], np.arange(3))
  b = {**a, "seed": 1, "stages": [{"step": 9}]}
  with pytest.warns(provenance.StaleArtefactWarning, match="recomputing"):
    assert provenance.load_if_matches(path, b) is None
  with pytest.raises(
      provenance.StaleArtefactError, match=r"seed: 0 -> 1.*stages\[0\]\.step: 7 -> 9"
  ):
    provenance.require(path, b)
  assert provenance.load_if_matches(str(tmp_path / "absent.npz"), a) is None
  with pytest.raises(ValueError, match="reserved"):
    provenance.save_npz(path, a, provenance_key=np.str_("x"))


def test_stale_tampered_key_is_refused(tmp_path):
  ident = {"artefact": "t", "seed": 0}
  # An identity edited to claim what the caller wants, without its key: the hash gives it away.
  path = str(tmp_path / "stats.npz")
  stats = frechet.FrechetStats(np.zeros(2), np.eye(2), 5, "tf")
  stats.save(path, {"seed": 1})
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays[provenance.IDENTITY_FIELD] = np.str_(provenance.canonical_json(ident))
  np.savez(path, **arrays)
  with pytest.raises(provenance.StaleArtefactError, match="the file was edited"):
    frechet.FrechetStats.load(path, expected_identity=ident)
  with pytest.warns(provenance.StaleArtefactWarning):
    assert provenance.load_if_matches(path, ident) is None
  # A statistics file without any key (older version, or made by hand) is not trusted either.
  stats.save(path)
  with pytest.raises(provenance.StaleArtefactError, match="no provenance key"):
    frechet.FrechetStats.load(path, expected_identity=ident)
  # JSON artefacts: the same record.
  jpath = str(tmp_path / "m.json")
  provenance.write_json(jpath, ident, {"fd": 1.0})
  assert provenance.require(jpath, ident) == {"fd": 1.0}
  record = json.loads(open(jpath).read())
  record["provenance"]["key"] = provenance.artefact_key({**ident, "seed": 5})
  open(jpath, "w").write(json.dumps(record))
  with pytest.raises(provenance.StaleArtefactError, match="edited"):
    provenance.require(jpath, ident)


def test_stale_coco_reference_statistics_from_another_set_are_recomputed(tmp_path):
  rng = np.random.default_rng(0)
  names = [f"im{i}.png" for i in range(6)]
  for n in names:
    PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / n)
  computer = _ConvComputer()
  path = str(tmp_path / "reference.npz")
  first = coco.reference_statistics(computer, str(tmp_path), names, path, size=32)
  again = coco.reference_statistics(computer, str(tmp_path), names, path, size=32)
  assert computer.calls == 1  # same reference set: reused
  np.testing.assert_array_equal(first.mu, again.mu)
  # Another reference set of the same size (one image replaced): same file name, same count.
  PIL.Image.fromarray(np.full((40, 48, 3), 255, np.uint8)).save(tmp_path / names[2])
  with pytest.warns(provenance.StaleArtefactWarning, match="reference.files_sha256"):
    other = coco.reference_statistics(computer, str(tmp_path), names, path, size=32)
  assert computer.calls == 2 and other.n == first.n
  assert not np.allclose(other.mu, first.mu)
  # The stored file now belongs to the new set; loading it as the old one is refused.
  ident = coco.reference_identity(computer, str(tmp_path), names, 32)
  assert frechet.FrechetStats.load(path, expected_identity=ident).n == 6
  with pytest.raises(provenance.StaleArtefactError, match="reference_size: 32 -> 64"):
    frechet.FrechetStats.load(
        path, expected_identity=coco.reference_identity(computer, str(tmp_path), names, 64)
    )


def test_stale_sweep_reference_statistics_from_another_set_are_recomputed(model, tmp_path):
  rng = np.random.default_rng(1)
  ref_a = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  ref_b = rng.integers(0, 128, (8, 16, 16, 3), dtype=np.uint8)
  feats = features.RandomConvFeatures(size=16, dim=8, batch_size=8)
  path = os.path.join(str(tmp_path), f"reference_{feats.name}.npz")
  kw = dict(sweep_stage=0, features=feats, batch_size=8, progress=False)
  sweep.run_sweep(model, PROMPTS, SETTINGS, [], str(tmp_path), reference_images=ref_a, **kw)
  mu_a = frechet.FrechetStats.load(path).mu
  with pytest.warns(provenance.StaleArtefactWarning, match="reference_sha256"):
    sweep.run_sweep(model, PROMPTS, SETTINGS, [], str(tmp_path), reference_images=ref_b, **kw)
  mu_b = frechet.FrechetStats.load(path).mu
  np.testing.assert_allclose(mu_b, feats.statistics(ref_b).mu)
  assert not np.allclose(mu_a, mu_b)


def test_stale_coco_chunks_rerun_with_another_seed_or_chunk_size(model, tmp_path, monkeypatch):
  calls = _counting(model, monkeypatch)
  out = str(tmp_path)
  kw = dict(batch_size=8, size=32, progress=False)
  first = coco.sample_chunks(model, PROMPTS, SETTINGS, out, seed=0, chunk=4, **kw)
  assert len(calls) == 2 and _images(first, 6).shape == (6, 32, 32, 3)
  # Same inputs: every chunk is reused.
  assert coco.sample_chunks(model, PROMPTS, SETTINGS, out, seed=0, chunk=4, **kw) == first
  assert len(calls) == 2
  # Another seed into the same folder: recomputed, and the images differ from the first run's.
  seed1 = coco.sample_chunks(model, PROMPTS, SETTINGS, out, seed=1, chunk=4, **kw)
  assert calls[2:] == [1, 1]
  assert not np.array_equal(_images(seed1, 6), _images(first, 6))
  # Another chunk size: exactly one image per prompt (no leftover 4-image chunk counted); the
  # samples are those of the first run (per-sample seeds do not depend on the chunking).
  by3 = coco.sample_chunks(model, PROMPTS, SETTINGS, out, seed=0, chunk=3, **kw)
  assert len(by3) == 2 and len(calls) == 6
  np.testing.assert_array_equal(_images(by3, 6), _images(first, 6))
  prompts = [p for path in by3 for p in np.load(path)["prompts"].tolist()]
  assert prompts == PROMPTS
  with pytest.raises(ValueError, match="hold 9 images, expected 6"):
    _images(first + by3[1:], 6)
  # Another model (other params, or another checkpoint step) is another run.
  ident = coco.samples_identity(model, PROMPTS, SETTINGS, seed=0, chunk=4, size=32)
  other = dataclasses.replace(model.stages[1], step=model.stages[1].step + 1)
  monkeypatch.setattr(model, "stages", [model.stages[0], other])
  changed = coco.samples_identity(model, PROMPTS, SETTINGS, seed=0, chunk=4, size=32)
  assert provenance.differences(ident, changed) == ["stages[1].step: 7 -> 8"]
  # A chunk whose stored key was edited is recomputed, not reused.
  monkeypatch.undo()
  calls = _counting(model, monkeypatch)
  with np.load(first[1]) as z:
    arrays = {k: z[k] for k in z.files}
  arrays[provenance.KEY_FIELD] = np.str_("0" * 64)
  np.savez(first[1], **arrays)
  with pytest.warns(provenance.StaleArtefactWarning, match="edited"):
    again = coco.sample_chunks(model, PROMPTS, SETTINGS, out, seed=0, chunk=4, **kw)
  assert len(calls) == 1 and again == first
  np.testing.assert_array_equal(_images(again, 6), _images(first, 6))


def test_stale_sweep_point_with_other_settings_is_not_reused(model, tmp_path, monkeypatch):
  calls = _counting(model, monkeypatch)
  out = str(tmp_path)
  points = sweep.make_points([2.0], ["dynamic"])
  kw = dict(sweep_stage=0, batch_size=8, progress=False)
  r1 = sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, **kw)
  assert (r1.computed, len(calls)) == (1, 1)
  # The non-swept stage's guidance weight changed: the same (w, threshold) is a new point.
  other = [SETTINGS[0], dataclasses.replace(SETTINGS[1], guidance_weight=2.5)]
  r2 = sweep.run_sweep(model, PROMPTS, other, points, out, **kw)
  assert (r2.computed, r2.cached, len(calls)) == (1, 0, 2)
  assert r2.rows[0]["key"] != r1.rows[0]["key"]
  assert r2.rows[0]["settings"][1]["guidance_weight"] == 2.5
  # So is another seed; the original settings are still reused.
  assert sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, seed=3, **kw).computed == 1
  assert sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, **kw).cached == 1
  assert len(calls) == 3
  # A point whose metrics carry an edited key (or no key) is recomputed and replaced.
  mpath = os.path.join(out, "points", r1.rows[0]["key"], "metrics.json")
  record = json.loads(open(mpath).read())
  record["provenance"]["identity"]["seed"] = 99
  open(mpath, "w").write(json.dumps(record))
  with pytest.warns(provenance.StaleArtefactWarning, match="edited"):
    r3 = sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, **kw)
  assert (r3.computed, len(calls)) == (1, 4)
  assert provenance.require(mpath, json.loads(open(mpath).read())["provenance"]["identity"])
  open(mpath, "w").write(json.dumps(r3.rows[0]))  # the old format: a bare row
  with pytest.warns(provenance.StaleArtefactWarning, match="no provenance key"):
    assert sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, **kw).computed == 1
  # The report reads each point's samples only under its row's key.
  from imagen_jax.evals import sweep_report

  r5 = sweep.run_sweep(model, PROMPTS, SETTINGS, points, out, **kw)
  spath = os.path.join(out, "points", r5.rows[0]["key"], "samples.npz")
  with np.load(spath) as z:
    arrays = {k: z[k] for k in z.files}
  arrays[provenance.KEY_FIELD] = np.str_("f" * 64)
  np.savez(spath, **arrays)
  with pytest.raises(provenance.StaleArtefactError, match="not the key of its row"):
    sweep_report.write_sample_grid(r5.rows, out, str(tmp_path / "grid.png"), 2)


def test_stale_fid_features_identity_follows_weights_and_mode(tmp_path):
  from imagen_jax.evals import convert_weights, fid

  weights = str(tmp_path / "inception.safetensors")
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(0)), weights
  )
  tf = fid.FIDComputer(weights, mode="tf", progress=False)
  assert tf.identity["weights"]["file"]["path"] == weights and tf.identity["mode"] == "tf"
  assert features.InceptionFeatures(tf).identity == tf.identity
  clean = fid.FIDComputer(weights, mode="clean", progress=False)
  assert provenance.differences(tf.identity, clean.identity) == ['mode: "tf" -> "clean"']
  # Other weights under the same file name are other features.
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(1)), weights
  )
  os.utime(weights, ns=(1, 1))
  again = fid.FIDComputer(weights, mode="tf", progress=False)
  assert provenance.artefact_key(again.identity) != provenance.artefact_key(tf.identity)
  # Weights given as variables (tests, smoke runs) are identified by their digest.
  by_value = [fid.FIDComputer(fid.random_variables(s), progress=False).identity for s in (0, 1)]
  assert provenance.differences(*by_value)[0].startswith("weights.params_sha256: ")


def test_stale_truncated_artefact_is_recomputed(tmp_path):
  ident = {"artefact": "t"}
  path = str(tmp_path / "chunk.npz")
  provenance.save_npz(path, ident, images=np.zeros((2, 4, 4, 3), np.uint8))
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])  # a copy cut short
  with pytest.warns(provenance.StaleArtefactWarning, match="unreadable"):
    assert provenance.load_if_matches(path, ident) is None
  with pytest.raises(provenance.StaleArtefactError, match="unreadable"):
    provenance.require(path, ident)
