# The two commands a newcomer needs: `make demo` (a complete local job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCAL_DIR ?= .local
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup setup-gguf consumer fixtures demo demo-vision test test-all test-fresh validate lint

# Wheels only: nothing here compiles, so a fresh machine is set up in about a minute. The project itself is
# installed editable (pyproject.toml), which puts `gemma-job` in $(BIN); its dependencies are requirements.txt's.
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed

# GGUF export only: llama-cpp-python compiles llama.cpp (about 6 min on 2 cores, once; pip keeps the
# wheel), and its converter comes from the same sdist. A GGUF request without it is refused at pre-flight.
$(BIN)/.gguf-installed: requirements-gguf.txt scripts/fetch_llama_convert.py $(BIN)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -r requirements-gguf.txt
	$(BIN)/python scripts/fetch_llama_convert.py
	touch $@

setup-gguf: $(BIN)/.gguf-installed

# A second environment with the inference service's pinned PEFT and transformers, in which
# tests/test_consumers.py loads what the job exports.
CONSUMER := .venv-consumer
$(CONSUMER)/.installed: requirements-consumer.txt
	$(PYTHON) -m venv $(CONSUMER)
	$(CONSUMER)/bin/pip install -q -r requirements-consumer.txt
	touch $@

consumer: $(CONSUMER)/.installed

$(LOCAL_DIR)/models/tiny-gemma3/model.safetensors: scripts/make_tiny.py scripts/tiny_gemma4.py scripts/tiny_gemma3n.py $(BIN)/.installed
	$(BIN)/python scripts/make_tiny.py --out $(LOCAL_DIR)

fixtures: $(LOCAL_DIR)/models/tiny-gemma3/model.safetensors

demo: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py

# An image+text job: the tiny Gemma 3 with its SigLIP tower learns to name the colour of the shape it is shown.
demo-vision: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py --config examples/local_vision.json

validate: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py --validate

# Complete: the GGUF tests need llama.cpp, and the consumer tests the inference service's versions.
# TEST_WORKERS processes, each with one thread (the tiny model's ops are too small to split: two threads
# in each worker would only contend), a test file to each at a time, the longest files first (conftest.py).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# `make test`: every test but the slow ones (whole jobs over about 10 s: tests/conftest.py's `slow` marker), the
# edit-and-test loop; `make test-all`: every test, as CI runs them.
test: setup setup-gguf consumer
	$(PYTEST) -m "not slow" tests

test-all: setup setup-gguf consumer
	$(PYTEST) tests

# The tests about the process itself (JSON log lines from the first byte, SIGTERM and its checkpoint, kill -9 and
# a rerun, exit codes) with every job in a fresh interpreter, as production starts it, not forked from
# tests/prefork's warm server (about 3 min on 2 cores). CI runs it after `make test`.
FRESH := tests/test_logs.py tests/test_main.py tests/test_kill.py \
	tests/test_reliability.py::test_sigterm_saves_a_checkpoint_and_exits_1
test-fresh: setup setup-gguf consumer
	PREFORK=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(FRESH)

# The imports' order checked (ruff), the Dockerfile linted, and the image's pins (requirements.txt, -gguf and -gpu) resolved together
# against the package registry without installing (nor compiling) anything.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/pip install --dry-run --ignore-installed --quiet -r requirements.txt -r requirements-gguf.txt -r requirements-gpu.txt
