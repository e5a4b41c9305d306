# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the local CPU wheel when no CUDA is present; an unpinned torch is a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	  else $(BIN)/pip install -q torch==2.13.0; fi; fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/textcraftor-fast demo

# The OpenAI BPE file the shipped tokenizer was converted from, as the open_clip_torch wheel carries it: the
# tokenizer test rebuilds the shipped vocabulary from it (downloaded from the registry, never imported).
OPEN_CLIP_WHEEL := .cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl

$(OPEN_CLIP_WHEEL): | $(BIN)/python
	$(BIN)/pip download -q --no-deps open_clip_torch==3.3.0 -d .cache/wheels

test: $(STAMP) $(OPEN_CLIP_WHEEL)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --benchmark-disable -p no:cacheprovider tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pytest -q --benchmark-only --benchmark-json=benchmarks/results/latest.json benchmarks

clean:
	rm -rf $(VENV) outputs build *.egg-info
