"""COCO FID-30K and DrawBench scripts end to end on tiny synthetic stand-ins.

Both scripts run as subprocesses (as users run them) on tiny random cascade stages; the COCO
run uses a random-weights FID InceptionV3 (numbers meaningless, plumbing real).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax.evals import coco, convert_weights, drawbench
from tests import cascade_fixtures


@pytest.fixture(scope="module")
def workdirs():
  return cascade_fixtures.shared_tiny_cascade()


def _run(script, args):
  out = subprocess.run(
      [sys.executable, os.path.join(cascade_fixtures.REPO, "experiments", script)] + args,
      capture_output=True,
      text=True,
      cwd=cascade_fixtures.REPO,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def _fake_coco(root, num_images=5):
  rng = np.random.default_rng(0)
  (root / "val2014").mkdir()
  images, anns = [], []
  for i in range(num_images):
    name = f"COCO_val2014_{i:012d}.jpg"
    h, w = (30, 44) if i % 2 else (48, 36)  # landscape and portrait: centre crop both ways
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        root / "val2014" / name
    )
    images.append({"id": 100 + i, "file_name": name})
    anns += [
        {"id": 10 * i + j, "image_id": 100 + i, "caption": f"a  photo {i} number {j}"}
        for j in range(2)
    ]
  (root / "annotations").mkdir()
  (root / "annotations" / "captions_val2014.json").write_text(
      json.dumps({"images": images, "annotations": anns})
  )


def test_coco_protocols_and_resize_conventions(tmp_path):
  _fake_coco(tmp_path)
  anns, files = coco.load_captions(str(tmp_path / "annotations" / "captions_val2014.json"))
  assert anns[0]["caption"] == "a photo 0 number 0"  # whitespace normalised
  prompts, refs = coco.draw(anns, files, "paper", 4, seed=0)
  assert len(set(prompts)) == 4 and len(refs) == 5  # paper: all val images are the reference
  assert coco.draw(anns, files, "paper", 4, seed=0) == (prompts, refs)
  prompts, refs = coco.draw(anns, files, "pairs", 3, seed=0)
  assert len(set(refs)) == 3
  for p, r in zip(prompts, refs):  # each prompt is a caption of its own reference image
    assert f"photo {int(r[-8:-4])} " in p
  with pytest.raises(ValueError, match="num_samples=99"):
    coco.draw(anns, files, "pairs", 99, seed=0)
  with pytest.raises(ValueError, match="'coco'"):
    coco.draw(anns, files, "coco", 1, seed=0)
  img = coco.load_reference_image(str(tmp_path / "val2014" / refs[0]))
  assert img.shape == (256, 256, 3) and img.dtype == np.uint8


def test_coco_fid30k_script_end_to_end(workdirs, tmp_path):
  _fake_coco(tmp_path)
  weights = str(tmp_path / "inception_random.safetensors")
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(0)), weights
  )
  args = [
      f"--workdirs={workdirs[0]},{workdirs[1]}",
      "--config=configs/cascade.py:shapes",
      "--config.stage1.num_steps=2",
      "--config.stage2.num_steps=2",
      f"--coco_dir={tmp_path}",
      f"--inception={weights}",
      "--protocol=paper",
      "--num_samples=4",
      "--batch_size=8",
      "--chunk=4",
      f"--outdir={tmp_path / 'out'}",
  ]
  out = _run("coco_fid30k.py", args)
  assert re.search(
      r"FID-4 \(paper protocol, tf preprocessing, 5 reference images\): [\d.]+", out
  ), out
  report = json.loads((tmp_path / "out" / "fid.json").read_text())
  assert report["num_reference"] == 5 and np.isfinite(report["fid"])
  assert os.path.dirname(report["samples_dir"]) == str(tmp_path / "out" / "samples")
  with np.load(os.path.join(report["samples_dir"], "chunk_000000.npz")) as z:
    assert z["images"].shape == (4, 256, 256, 3)  # generated 32px resized to 256
  # Rerun into the same folder with another chunk size: its own chunks, one image per prompt.
  out = _run("coco_fid30k.py", [a for a in args if a != "--chunk=4"] + ["--chunk=3"])
  assert "FID-4 (paper protocol" in out, out
  rerun = json.loads((tmp_path / "out" / "fid.json").read_text())
  assert rerun["samples_dir"] != report["samples_dir"]
  assert sorted(os.listdir(rerun["samples_dir"])) == ["chunk_000000.npz", "chunk_000003.npz"]


def test_drawbench_script_writes_sheet_and_grids(workdirs, tmp_path):
  tsv = tmp_path / "prompts.tsv"
  tsv.write_text(
      "# a comment\nColors\tA red colored car.\nCounting\tThree cats.\n"
      "Colors\tA black colored car.\n"
  )
  out_dir = tmp_path / "db"
  _run(
      "drawbench.py",
      [
          f"--prompts={tsv}",
          f"--workdirs_a={workdirs[0]},{workdirs[1]}",
          "--config_a.stage1.num_steps=2",
          "--config_a.stage2.num_steps=2",
          "--config_b.stage1.num_steps=2",
          "--config_b.stage2.num_steps=2",
          "--config_b.stage1.guidance_weight=1",
          "--name_a=w3",
          "--name_b=w1",
          "--k=2",
          "--batch_size=8",
          f"--outdir={out_dir}",
      ],
  )
  page = (out_dir / "rating_sheet.html").read_text()
  assert page.count("data:image/png;base64,") == 3 * 2 * 2
  assert "http" not in page.replace("https://imagen", "")  # self-contained: nothing fetched
  assert "exportCSV" in page and 'name="alignment_2"' in page and 'name="fidelity_0"' in page
  sides = json.loads((out_dir / "rating_sheet.html.sides.json").read_text())
  assert len(sides["a_on_left"]) == 3 and sides["model_a"] == "w3"
  items = json.loads(re.search(r"const ITEMS = (\[.*?\]);", page).group(1))
  for item, a_left in zip(items, sides["a_on_left"]):
    assert (item["left"], item["right"]) == (("w3", "w1") if a_left else ("w1", "w3"))
  assert sorted(os.listdir(out_dir / "grids")) == ["Colors.png", "Counting.png"]


def test_drawbench_prompt_file_errors_name_the_line(tmp_path):
  bad = tmp_path / "bad.tsv"
  bad.write_text("Colors\tA red car.\nno tab here\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: expected"):
    drawbench.read_prompts(str(bad))


def test_drawbench_sides_are_seeded_and_mixed():
  a, b = drawbench.assign_sides(200, 1), drawbench.assign_sides(200, 1)
  np.testing.assert_array_equal(a, b)
  assert 60 < a.sum() < 140


def test_rating_sheet_survives_markup_in_prompts(tmp_path):
  items = [("Text", 'A sign that says "</script><b>hi"'), ("Colors", "a red car")]
  a = np.zeros((2, 1, 8, 8, 3), np.uint8)
  path = str(tmp_path / "sheet.html")
  sides = drawbench.write_rating_sheet(path, items, a, a + 255, "A", "B", seed=0)
  page = open(path).read()
  assert page.count("</script>") == 1 and "&lt;/script&gt;" in page
  meta = json.loads(re.search(r"const ITEMS = (\[.*?\]);", page).group(1))
  assert meta[0]["prompt"] == items[0][1]
  assert [m["left"] == "A" for m in meta] == sides["a_on_left"]
  with pytest.raises(ValueError, match="different names"):
    drawbench.write_rating_sheet(path, items, a, a, "A", "A", seed=0)
