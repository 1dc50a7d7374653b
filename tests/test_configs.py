"""Stage configs: paper values (Imagen §4.1, App. F), `get_config("VARIANT,key=value")`,
command-line overrides, no file reads while building, no path-based config loaders."""

import builtins
import io
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base64, cascade, common, sr256, sr1024
from imagen_jax.text import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"base64": base64, "sr256": sr256, "sr1024": sr1024}
STAGES = tuple(MODULES)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_variant_builds_and_is_locked(stage, variant):
  c = MODULES[stage].get_config(variant)
  assert c.stage == stage and c.variant == variant
  for section in (
      "model",
      "diffusion",
      "text",
      "data",
      "optim",
      "train",
      "mesh",
      "distributed",
      "sample",
  ):
    assert section in c
  # The paper predicts eps; the CPU demo's stages predict x0 (configs/common.py says why).
  assert c.diffusion.target == ("x0" if variant == "shapes" else "eps")
  assert c.text.drop_prob == 0.1
  assert c.train.nonfinite in ("stop", "skip")
  # The text input's width and length come from the text block alone.
  assert "text_dim" not in c.model and "text_len" not in c.model
  assert registry.text_dim(c.text) > 0 and c.text.max_length > 0
  assert (c.lowres_size > 0) == (stage != "base64")
  assert json.loads(c.to_json())["stage"] == stage
  with pytest.raises(AttributeError, match="num_steps"):
    c.train.num_step = 3  # typo of num_steps: locked configs refuse new fields


def test_default_variant_is_tiny():
  assert base64.get_config().variant == "tiny" and base64.get_config(None).variant == "tiny"
  assert cascade.get_config().num_stages == 2  # shapes


def test_if_xl_sampling_matches_the_published_schedulers():
  # IF's scheduler_config.json files (diffusers' scripts/convert_if.py wrote them): learned-range
  # DDPM, dynamic thresholding at ratio 0.95, sample_max_value 1.5 (IF-I) and 1.0 (IF-II); the
  # pipelines' defaults: 100 / 50 steps, guidance 7 / 4, IF-II noise_level 250.
  c = cascade.get_config("if_xl")
  s1, s2 = c.stage1, c.stage2
  assert (s1.sampler, s1.num_steps, s1.guidance_weight, s1.percentile, s1.max_scale) == (
      "ddpm",
      100,
      7.0,
      95.0,
      1.5,
  )
  assert (s2.sampler, s2.num_steps, s2.guidance_weight, s2.percentile, s2.max_scale) == (
      "ddpm",
      50,
      4.0,
      95.0,
      1.0,
  )
  assert s2.aug_level == 0.25 and s1.threshold == s2.threshold == "dynamic"


@pytest.mark.parametrize("stage", STAGES)
def test_paper_settings(stage):
  c = MODULES[stage].get_config("paper")
  assert c.optim.name == ("adafactor" if stage == "base64" else "adam")
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
  assert c.optim.learning_rate == 1e-4 and c.optim.warmup_steps == 10_000
  assert c.optim.decay == "cosine"
  assert c.train.global_batch_size == 2048
  assert c.diffusion.schedule == ("linear_beta" if stage == "sr1024" else "cosine")
  assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
  assert c.text.name == "t5-v1_1-xxl" and registry.text_dim(c.text) == 4096
  # What fits the paper's pods (docs/results/scale.md): bf16 compute, remat, bf16 T5,
  # activation constraints; params and optimizer state stay float32.
  assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", True)
  assert (c.text.dtype, c.text.param_dtype) == ("bfloat16", "bfloat16")
  assert c.mesh.constrain_activations
  want_mesh = {"data": 1, "fsdp": -1} if stage == "base64" else {"data": -1, "fsdp": 16}
  assert {k: c.mesh.shape[k] for k in ("data", "fsdp")} == want_mesh
  if stage == "sr1024":  # trains on 256 crops of 1024 images, 64 crops of the 256 input
    assert (c.image_size, c.lowres_size, c.data.sr_crop_size) == (1024, 256, 256)


def test_text_block_is_the_registry_one():
  # One definition of the text settings: the stage config's block has exactly its fields.
  c = base64.get_config("paper")
  assert set(c.text.keys()) == set(registry.default_text_config().keys())
  want = registry.default_text_config(
      "t5-v1_1-xxl", max_length=128, dtype="bfloat16", param_dtype="bfloat16"
  )
  assert c.text.to_dict() == want.to_dict()


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown variant 'huge'; allowed: paper, tiny, shapes"):
    base64.get_config("huge")
  with pytest.raises(ValueError, match="unknown variant 'tiny'; allowed: shapes, paper"):
    cascade.get_config("tiny")


def test_knobs_name_the_per_variant_numbers():
  # Every per-variant number has a knob, and each knob names the field that number fills.
  for variant, numbers in common._VARIANTS.items():
    assert set(numbers) == set(common.KNOBS), variant
  # sr256 paper has no stage-specific values on top (the base stage sets its mesh, _PAPER_MESH)
  c = MODULES["sr256"].get_config("paper")
  for knob, path in common.KNOBS.items():
    node = c
    for name in path.split("."):
      node = node[name]
    assert node == common._VARIANTS["paper"][knob], knob


def test_arg_overrides():
  c = base64.get_config("paper,batch=256")
  assert c.train.global_batch_size == 256 and c.train.num_steps == 2_500_000
  c = sr256.get_config(
      "tiny,num_steps=5,lr=3e-4,optim.name=adafactor,diffusion.aug_level=(0.0, 0.5),"
      "mesh.shape.fsdp=2,adafactor_relative=true,text.path=/ckpt/t5,image_size=32"
  )
  assert c.train.num_steps == 5 and c.optim.learning_rate == 3e-4
  assert c.optim.name == "adafactor" and c.diffusion.aug_level == (0.0, 0.5)
  assert c.mesh.shape.fsdp == 2 and c.optim.adafactor_multiply_by_parameter_scale is True
  assert c.text.path == "/ckpt/t5" and c.image_size == 32
  assert c.is_locked
  # A knob wins over the shapes demo's own values, and a list fits a tuple field.
  c = base64.get_config("shapes,num_steps=7,diffusion.aug_level=[0.0, 0.2]")
  assert c.train.num_steps == 7 and c.diffusion.aug_level == (0.0, 0.2)
  assert base64.get_config("shapes").train.num_steps == 2500
  # No variant: the default one.
  assert base64.get_config("batch=4").variant == "tiny"
  c = cascade.get_config("paper,num_stages=2,stage2.aug_level=0.2,seed=3")
  assert (c.num_stages, c.stage2.aug_level, c.seed) == (2, 0.2, 3)


def test_bad_overrides_name_the_key_and_what_is_allowed():
  with pytest.raises(ValueError, match=r"unknown config key 'bacth'; allowed: .*batch.*train"):
    base64.get_config("paper,bacth=256")
  with pytest.raises(ValueError, match=r"'train.num_step'.*no field 'num_step'.*num_steps"):
    base64.get_config("paper,train.num_step=5")
  with pytest.raises(ValueError, match="unknown config key 'stage'"):
    base64.get_config("paper,stage=sr256")  # set by the module
  with pytest.raises(ValueError, match="'optim.name.x'.*optim.name is not a section"):
    base64.get_config("paper,optim.name.x=1")
  with pytest.raises(ValueError, match="'batch': cannot set train.global_batch_size = 'lots'"):
    base64.get_config("paper,batch=lots")
  with pytest.raises(ValueError, match="'batch' in 'paper,batch' is not key=value"):
    base64.get_config("paper,batch")
  with pytest.raises(ValueError, match=r"unknown config key 'stage9.w'; allowed: .*stage1"):
    cascade.get_config("shapes,stage9.w=2")


def test_parse_arg_and_values():
  variant, kv = common.parse_arg(
      "paper, a=1,b=(1, 2),c=x,d=[3, (4, 5)],e='p,q',f=False,g=None", common.VARIANTS, "tiny"
  )
  assert variant == "paper"
  assert kv == [
      ("a", 1),
      ("b", (1, 2)),
      ("c", "x"),
      ("d", [3, (4, 5)]),
      ("e", "p,q"),
      ("f", False),
      ("g", None),
  ]
  assert common.parse_arg(None, common.VARIANTS, "tiny") == ("tiny", [])
  assert common.parse_value("1e-4") == 1e-4 and common.parse_value("t5-v1_1-xxl") == "t5-v1_1-xxl"


def _parse(monkeypatch, argv):
  # config_flags reads the override flags from sys.argv when it parses --config.
  monkeypatch.setattr("sys.argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


def test_command_line_overrides_and_typos(monkeypatch):
  monkeypatch.chdir(ROOT)  # the relative path of the usage line
  c = _parse(
      monkeypatch,
      [
          "prog",
          "--config=configs/sr256.py:paper,batch=256,optim.name=adafactor",
          "--config.train.num_steps=5",
          "--config.mesh.shape.fsdp=2",
      ],
  )
  assert c.train.global_batch_size == 256 and c.optim.name == "adafactor"
  assert c.train.num_steps == 5 and c.mesh.shape.fsdp == 2
  with pytest.raises(Exception, match="num_step"):
    _parse(monkeypatch, ["prog", "--config=configs/sr256.py:tiny", "--config.train.num_step=5"])
  with pytest.raises(Exception, match="unknown config key 'bacth'"):
    _parse(monkeypatch, ["prog", "--config=configs/sr256.py:tiny,bacth=5"])


def test_main_takes_config_arg_and_overrides():
  # imagen_jax.train's own flags, parsed in a fresh process from the repo root.
  code = (
      "import sys; from absl import flags; from imagen_jax.train import main; "
      "flags.FLAGS(sys.argv); c = main._CONFIG.value; "
      "print(c.stage, c.train.global_batch_size, c.train.num_steps, c.is_locked)"
  )
  argv = [
      "--config=configs/base64.py:paper,batch=256",
      "--config.train.num_steps=5",
      "--workdir=/nonexistent",
  ]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["base64", "256", "5", "True"]


def test_building_a_config_reads_no_files(monkeypatch):
  args = [(mod.get_config, v) for mod in MODULES.values() for v in common.VARIANTS] + [
      (base64.get_config, "paper,text_name=t5-efficient-tiny,text.path=/no/such/ckpt"),
      (sr1024.get_config, "tiny,text_name=flan-t5-xl"),
      (cascade.get_config, "shapes"),
      (cascade.get_config, "paper"),
  ]
  for get_config, arg in args:  # imports happen here, before files are off limits
    get_config(arg)

  def no_files(*a, **k):
    raise AssertionError(f"a file was touched while building a config: {a}")

  for target, name in [
      (builtins, "open"),
      (io, "open"),
      (os, "open"),
      (os, "stat"),
      (os, "listdir"),
      (os, "scandir"),
      (os.path, "exists"),
      (os.path, "isfile"),
      (os.path, "isdir"),
  ]:
    monkeypatch.setattr(target, name, no_files)
  for get_config, arg in args:
    c = get_config(arg)
    assert c.is_locked
  monkeypatch.undo()
  c = base64.get_config("paper,text_name=t5-efficient-tiny,text.path=/no/such/ckpt")
  assert c.text.name == "t5-efficient-tiny"  # its width is resolved where it is used:
  with pytest.raises(Exception, match="/no/such/ckpt"):
    registry.text_dim(c.text)


def _call_args(text: str, start: int) -> str:
  """The text of the call whose '(' is at `start`, up to its matching ')'."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start : i + 1]
  return text[start:]


def test_no_path_based_config_loaders():
  # Configs are imported (`from configs import base64`), never executed from a file path.
  this = os.path.abspath(__file__)
  loaders = re.compile(r"(spec_from_file_location|run_path|SourceFileLoader)\s*\(")
  offenders = []
  for top in ("imagen_jax", "experiments", "benchmarks", "tests", "launch", "configs"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        path = os.path.join(dirpath, name)
        if not name.endswith((".py", ".sh")) or os.path.abspath(path) == this:
          continue
        with open(path, encoding="utf-8") as f:
          text = f.read()
        for m in loaders.finditer(text):
          call = _call_args(text, m.end() - 1)
          if re.search(r"configs|common\.py|(base64|sr256|sr1024|cascade)\.py", call):
            offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group(1)}{call[:80]}")
  assert not offenders, "path-based config loaders:\n" + "\n".join(offenders)
