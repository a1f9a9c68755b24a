# `make demo`, `make test`, `make bench`. The first use creates .venv with Python >= 3.12.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.12 python3.13 python3; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo $$p; break; fi; done)
VENV := .venv
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test bench venv

$(VENV)/.base: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found (set PYTHON=/path/to/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.base

demo: $(VENV)/.base
	$(VENV)/bin/pcp-jax demo

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q -x -n 2 --dist loadfile --durations=15 tests

# GPU benchmarks run on a CUDA machine (benchmarks/, not installed; results in docs/BENCHMARKS.md):
#   bash benchmarks/run.sh kernels         GDN vs FLA, attention vs cuDNN, MoE vs tokamax / transformers, checks first
#   bash benchmarks/run.sh prefill         end-to-end prefill: GPU-vs-jnp check, qwen3.5-9b, transformers + FLA
#   pcp-jax bench --preset qwen3.5-9b --tokens 8192,32768,131072 [--cp N]
# On a CPU-only machine `make bench` runs the prefill benchmark of the demo preset at cp=1 and cp=4
# (virtual devices sharing the same cores: it exercises the code, it does not show a speed-up).
bench: $(VENV)/.base
	$(VENV)/bin/pcp-jax bench --preset demo --tokens 2048,8192 --cp 1
	$(VENV)/bin/pcp-jax bench --preset demo --tokens 2048,8192 --cp 4
