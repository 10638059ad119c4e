# Quick start: `make pretrain` (tiny DeepSeek-V3 pre-training) and `make test`. Both create .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: pretrain test aot clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

pretrain: $(VENV)/.installed
	$(PY) -m experiments.pretrain --config tiny $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --durations=30 tests   # two workers: the CI machine has 2 cores

# The whole deviceless compile matrix (tests/aot, marker aot_full): every train-step point for 8 H100s and 4-chip TPU
# v5p / v6e slices; `make test` runs a representative subset of it.
aot: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 -m aot_full tests/aot

# The scaling study on real topologies, compile-only (experiments/scaling_real.py): DeepSeek-V3 671B on 2048 H100s in
# the V3 report's layout and on a TPU v5p-1024 slice, V2-Lite on 8 H100s / v5e-16 / v6e-8, `small` on one chip of
# each. About an hour on 2 cores; rows, CSV and figures into $(OUT)/scaling_real.
.PHONY: scaling-real
scaling-real: $(VENV)/.installed-test
	$(PY) -m experiments.scaling_real --out $(OUT)/scaling_real $(ARGS)

# Every GPU number still owed (experiments/gpu_check.py): under 10 minutes on one H100/H200, JSON and logs into $(OUT).
# No install step (a GPU machine may have no network): `make gpu-check PY=python3` runs an image's own interpreter.
OUT ?= bench_results
.PHONY: gpu-check
gpu-check:
	$(PY) -m experiments.gpu_check --out $(OUT) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
