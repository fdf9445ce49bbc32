# Two commands for a fresh machine: `make demo` and `make test`. Both (re)build .venv when pyproject changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
# On a GPU host: make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.selpo-installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench bench-env venv vllm-env server serve files clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[prefect,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selpo run configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# TRL only for the training-speed comparison, never in the project's venv (benchmarks/train_speed.py).
bench-env:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --upgrade pip
	.venv-bench/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-bench/bin/python -m pip install -q "trl==1.16.0" "transformers==5.20.2" pyarrow pyyaml tqdm accelerate
	.venv-bench/bin/python -m pip install -q --no-deps -e .

# The Prefect UI: `make server` in one terminal (API + UI on 127.0.0.1:4200), `make serve` in another (the
# deployments, and runs/ over HTTP on 127.0.0.1:4201 for the artifacts' links). PORT=N for another port.
PORT ?= 4200
server: $(STAMP)
	$(BIN)/selpo server --port $(PORT)

serve: $(STAMP)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PORT)/api} $(BIN)/selpo serve

files: $(STAMP)
	$(BIN)/selpo files

# vLLM cannot share a venv with Prefect (conflicting pins): it gets its own, used by the generate stage as a
# subprocess (generate.vllm_python). GPU hosts only.
vllm-env:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q -e ".[vllm]"

clean:
	rm -rf runs .pytest_cache .ruff_cache
