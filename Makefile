# Two entry points: `make demo` and `make test`. Both create .venv on first use, and both build the native op
# library (`make ext`) when a C++ compiler is present. `make demo` carries on with the torch ops when the build fails;
# `make test` stops there (a suite that silently skips the native-op proofs proves less than it says), unless
# TEXTCRAFTOR_NO_EXT=1 asks for the torch ops on purpose (the native tests then skip, and are allowed to).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-faults test-latest constraints bench install clean ext ext-if-possible ext-for-tests

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reproducible installs: constraints.txt pins every dependency to the versions the suite last passed with (pip -c;
# a change to it reinstalls). torch first, the local CPU wheel when no CUDA is present (an unpinned torch is a
# multi-GB CUDA build), then pinned to what was installed so that no dependency's range can replace it.
# `make test-latest` runs the same recipe in .venv-latest with PIN_ARGS set to upgrade everything instead.
CONSTRAINTS := constraints.txt
PIN_ARGS ?= -c $(CONSTRAINTS)

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	  else $(BIN)/pip install -q torch==2.13.0; fi; fi
	@$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q $(PIN_ARGS) -c $(VENV)/torch-pin.txt -e ".[dev]"
	@$(BIN)/python -c "import importlib.metadata as m; print('installed:', ', '.join(d + ' ' + m.version(d) for d in \
	  ('torch', 'diffusers', 'transformers', 'kernels', 'deepspeed', 'bitsandbytes', 'triton', 'wandb') if any(m.distributions(name=d))))"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) ext-if-possible
	$(BIN)/textcraftor-fast demo

# The native op library: csrc/ -> textcraftor_fast/_native/libtextcraftor_ops.so (docs/native_ops.md), built
# with CMake against the venv's torch; CMake comes from the package registry when the machine lacks it.
# Incremental; `make ext EXT_JOBS=1` on a busy machine.
EXT_BUILD := build-ext
EXT_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

ext: $(STAMP)
	@cmake=$$(command -v cmake || echo $(BIN)/cmake); \
	if [ ! -x "$$cmake" ]; then $(BIN)/pip install -q cmake && cmake=$(BIN)/cmake; fi; \
	set -x; "$$cmake" -S . -B $(EXT_BUILD) -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(BIN)/python) \
	  && "$$cmake" --build $(EXT_BUILD) --parallel $(EXT_JOBS)

# What `make demo` and `make bench` run: the library when it can be built, else a note and the torch ops.
ext-if-possible: $(STAMP)
	@if [ -n "$$TEXTCRAFTOR_NO_EXT" ]; then echo "TEXTCRAFTOR_NO_EXT is set: native ops not built, using the torch ops"; \
	elif command -v $${CXX:-c++} >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory ext || echo "native ops not built (see above): continuing with the torch ops"; \
	else echo "native ops not built (no C++ compiler): continuing with the torch ops"; fi

# What `make test` runs: where a C++ compiler exists, a failed build is a failed `make test`.
ext-for-tests: $(STAMP)
	@if [ -n "$$TEXTCRAFTOR_NO_EXT" ]; then echo "TEXTCRAFTOR_NO_EXT is set: native ops not built; their tests skip"; \
	elif command -v $${CXX:-c++} >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory ext || { echo; \
	    echo "make test: the native op library failed to build (the error is above). Fix the build (docs/native_ops.md:"; \
	    echo "  a C++17 compiler and CMake >= 3.18; 'make ext' retries it), or run the suite without it on purpose:"; \
	    echo "  TEXTCRAFTOR_NO_EXT=1 make test"; exit 1; } >&2; \
	else echo "native ops not built (no C++ compiler): their tests skip"; fi

# The OpenAI BPE file the shipped tokenizer was converted from, as the open_clip_torch wheel carries it: the
# tokenizer test rebuilds the shipped vocabulary from it (downloaded from the registry, never imported).
OPEN_CLIP_WHEEL := .cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl

$(OPEN_CLIP_WHEEL): | $(BIN)/python
	$(BIN)/pip download -q --no-deps open_clip_torch==3.3.0 -d .cache/wheels

# One pytest worker per core (pytest-xdist), a whole test file per worker (module fixtures are built once; the
# launches each take a free port), files in collection order (tests/conftest.py puts the longest first; xdist's
# default reorder by test count would start the one-test demo files last). Each worker pins one thread; runs that
# set their own thread count (the demo's 2-thread check) wait passively instead of spinning while the other worker
# holds a core.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) $(OPEN_CLIP_WHEEL) ext-for-tests
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile \
	  --no-loadscope-reorder --durations=15 --benchmark-disable -p no:cacheprovider --ignore=tests/faults tests benchmarks

# Distributed faults (tests/faults/, docs/reliability.md): hung ranks, a rank killed while rank 0 writes a checkpoint,
# two nodes on loopback, under torchrun and the deepspeed launcher. One test at a time (each launches two ranks and
# times them against distributed.timeout_s); about 10 minutes on 2 cores. CI runs it after `make test`.
test-faults: $(STAMP) ext-for-tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=0 -p no:cacheprovider tests/faults

# The newest versions pyproject.toml allows (torch stays the machine's wheel), in a venv of their own, then the whole
# suite: upgrades are tried on purpose, never by a fresh clone. When it is green, `make constraints` records them.
LATEST_VENV := .venv-latest

test-latest:
	rm -f $(LATEST_VENV)/.installed
	$(MAKE) --no-print-directory test VENV=$(LATEST_VENV) EXT_BUILD=build-ext-latest \
	  PIN_ARGS="--upgrade --upgrade-strategy eager"

constraints:
	@test -f $(LATEST_VENV)/.installed || { echo "no $(LATEST_VENV): run make test-latest first" >&2; exit 1; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST_VENV)/bin/pip freeze --all --exclude-editable | grep -viE '^(torch|pip)=='; } \
	  > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

# Every suite timed (the SD1.5-scale CPU step and memory suites take most of it), then benchmarks/REPORT.md.
bench: $(STAMP) ext-if-possible
	$(BIN)/python -m pytest -q -s --benchmark-only --benchmark-json=benchmarks/results/latest.json \
	  -p no:cacheprovider benchmarks
	$(BIN)/python benchmarks/report.py benchmarks/results/latest.json

clean:
	rm -rf $(VENV) $(LATEST_VENV) outputs build *.egg-info $(EXT_BUILD) build-ext-latest textcraftor_fast/_native
