"""The COCO guidance sweep (experiments/coco_guidance_sweep.py) end to end on a tiny COCO-shaped
folder, with the tiny random cascade, a random-weights FID InceptionV3 and the tiny random CLIP
(numbers meaningless, plumbing real): outputs, FID and CLIP score against an independent
recomputation from the saved samples, and resuming after an interruption."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax import atomic
from imagen_jax.evals import clip, convert_weights, fid, frechet, sweep
from tests import cascade_fixtures

CLIP_CKPT = os.path.join(os.path.dirname(__file__), "goldens", "clip", "tiny_clip")
NUM_PROMPTS = 4


def _coco_folder(root):
  """captions_val2014.json + 5 images (JPEG and PNG, landscape and portrait, RGB, grey, RGBA)."""
  rng = np.random.default_rng(1)
  (root / "val2014").mkdir()
  images, anns = [], []
  for i in range(5):
    ext = "png" if i % 2 else "jpg"
    name = f"COCO_val2014_{i:012d}.{ext}"
    h, w = (30, 44) if i % 2 else (48, 36)
    mode, ch = [("RGB", 3), ("L", 1), ("RGB", 3), ("RGBA", 4), ("RGB", 3)][i]
    px = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    PIL.Image.fromarray(px[..., 0] if ch == 1 else px, mode).save(root / "val2014" / name)
    images.append({"id": 100 + i, "file_name": name})
    anns += [
        {"id": 10 * i + j, "image_id": 100 + i, "caption": f"a red square {i} and circle {j}"}
        for j in range(2)
    ]
  (root / "annotations").mkdir()
  (root / "annotations" / "captions_val2014.json").write_text(
      json.dumps({"images": images, "annotations": anns})
  )


def _run(args):
  out = subprocess.run(
      [sys.executable, os.path.join(cascade_fixtures.REPO, "experiments", "coco_guidance_sweep.py")]
      + args,
      capture_output=True,
      text=True,
      cwd=cascade_fixtures.REPO,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def _rows(outdir):
  with open(outdir / "results.csv") as f:
    return {float(r["weight"]): r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_coco_guidance_sweep_end_to_end_and_resume(tmp_path):
  workdirs = cascade_fixtures.shared_tiny_cascade()
  _coco_folder(tmp_path)
  inception = str(tmp_path / "inception_random.safetensors")
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(0)), inception
  )
  outdir = tmp_path / "out"
  args = [
      f"--workdirs={workdirs[0]},{workdirs[1]}",
      "--config=configs/cascade.py:shapes",
      "--config.stage1.num_steps=2",
      "--config.stage2.num_steps=2",
      f"--coco_dir={tmp_path}",
      f"--inception={inception}",
      f"--clip_path={CLIP_CKPT}",
      "--weights=2,4",  # both guided: one compiled sampler per stage
      "--thresholds=dynamic",
      f"--num_prompts={NUM_PROMPTS}",
      "--batch_size=8",
      f"--outdir={outdir}",
  ]
  out = _run(args)
  assert "2 points sampled, 0 read from cache" in out, out[-2000:]
  rows = _rows(outdir)
  assert sorted(rows) == [2.0, 4.0]
  md = (outdir / "results.md").read_text()
  assert "CLIP score" in md and "FID (tf preprocessing" in md and "FID-4 vs 5 reference" in md
  assert (outdir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  refs = [p for p in os.listdir(outdir) if p.startswith("reference_")]
  assert refs == ["reference_paper_tf_5_seed0.npz"]
  ref_mtime = os.path.getmtime(outdir / refs[0])

  # Independent recomputation of one point's numbers from what it saved: reference images
  # cropped and resized here with PIL, the generated 32px images resized to 256 with PIL
  # bicubic, both through the same random-weights Inception; CLIP on the saved images.
  computer = fid.FIDComputer(inception, mode="tf", batch_size=8, progress=False)
  ref = []
  for name in sorted(os.listdir(tmp_path / "val2014")):
    with PIL.Image.open(tmp_path / "val2014" / name) as im:
      im = im.convert("RGB")
      s = min(im.size)
      box = ((im.size[0] - s) // 2, (im.size[1] - s) // 2)
      im = im.crop((*box, box[0] + s, box[1] + s)).resize((256, 256), PIL.Image.BICUBIC)
      ref.append(np.asarray(im))
  ref_stats = computer.statistics(np.stack(ref))
  row = rows[4.0]
  pdir = outdir / "points" / row["key"]
  with np.load(pdir / "samples.npz") as z:
    final = z["stage2"]
  assert final.shape == (NUM_PROMPTS, 32, 32, 3)
  big = np.stack([np.asarray(PIL.Image.fromarray(x).resize((256, 256), 3)) for x in final])
  want_fid = frechet.fid_from_statistics(computer.statistics(big), ref_stats)
  assert float(row["fd"]) == pytest.approx(want_fid, rel=1e-4)
  prompts = json.loads((pdir / "prompts.json").read_text())
  assert len(prompts) == NUM_PROMPTS and all(p.startswith("a red square") for p in prompts)
  want_clip = clip.CLIPScorer(CLIP_CKPT, batch_size=8, progress=False).score(final, prompts)
  assert float(row["clip_score"]) == pytest.approx(want_clip.clip_score, abs=1e-3)

  # Interrupted mid-run: w=4's metrics half-written, a crashed writer's temporary folder left.
  # The rerun recomputes w=4 only (same samples, same numbers), reuses w=2 and the reference.
  (pdir / "metrics.json").write_text((pdir / "metrics.json").read_text()[:40])
  (outdir / "points" / f"{atomic.TMP_PREFIX}{row['key']}-99-x").mkdir()
  kept = outdir / "points" / rows[2.0]["key"] / "metrics.json"
  kept_mtime = os.path.getmtime(kept)
  out = _run(args)
  assert "1 points sampled, 1 read from cache" in out, out[-2000:]
  again = _rows(outdir)
  assert float(again[4.0]["fd"]) == pytest.approx(float(row["fd"]), rel=1e-6)
  assert again[2.0]["fd"] == rows[2.0]["fd"]
  assert os.path.getmtime(kept) == kept_mtime
  assert os.path.getmtime(outdir / refs[0]) == ref_mtime


def test_coco_sweep_reference_stats_must_match_the_features(tmp_path):
  # Precomputed reference statistics of another extractor or mode are refused up front.
  stats = frechet.FrechetStats(np.zeros(2), np.eye(2), 10, "clean")
  computer = type("C", (), {"mode": "tf", "identity": {}})()
  from imagen_jax.evals import features

  feats = features.InceptionFeatures(computer)
  with pytest.raises(ValueError, match="preprocessing mode 'clean', expected 'tf'"):
    sweep.run_sweep(
        None,
        ["a"],
        [],
        [],
        str(tmp_path),
        sweep_stage=0,
        reference_stats=sweep.ReferenceStats(stats, {"x": 1}),
        features=feats,
        progress=False,
    )
  with pytest.raises(ValueError, match="not both"):
    sweep.run_sweep(
        None,
        ["a"],
        [],
        [],
        str(tmp_path),
        sweep_stage=0,
        reference_images=np.zeros((2, 8, 8, 3), np.uint8),
        reference_stats=sweep.ReferenceStats(stats, {"x": 1}),
        features=feats,
        progress=False,
    )


def test_coco_sweep_plan_from_flags():
  import types

  from configs import cascade as cascade_config

  cfg = cascade_config.get_config("shapes")
  stage = lambda sr: types.SimpleNamespace(is_sr=sr)  # noqa: E731
  model = types.SimpleNamespace(stages=[stage(False), stage(True)])
  base, k, points = sweep.plan(model, cfg, sweep_stage=2, weights=None, thresholds=["static"])
  assert len(base) == 2 and k == 1
  assert [p.weight for p in points] == list(sweep.SR_WEIGHTS)  # Fig. A.11's grid for an SR stage
  _, _, points = sweep.plan(model, cfg, sweep_stage=2, weights=["3"], aug_levels=["0.1", "0.3"])
  assert {(p.threshold, p.aug_level) for p in points} == {
      (t, a) for t in ("dynamic", "static") for a in (0.1, 0.3)
  }
  with pytest.raises(ValueError, match=r"sweep_stage=3 is not one of the stages 1..2"):
    sweep.plan(model, cfg, sweep_stage=3)
  with pytest.raises(ValueError, match="stage 1 is a base stage"):
    sweep.plan(model, cfg, sweep_stage=1, aug_levels=[0.1])
