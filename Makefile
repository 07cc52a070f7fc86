# The two commands a newcomer needs: `make demo` (a complete local job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCAL_DIR ?= .local
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup consumer fixtures demo test validate lint

$(BIN)/.installed: requirements.txt requirements-dev.txt scripts/fetch_llama_convert.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama-cpp-python compiles llama.cpp (about 6 min on 2 cores): for any x86-64 CPU, not only this one.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python scripts/fetch_llama_convert.py
	touch $@

setup: $(BIN)/.installed

# A second environment with the inference service's pinned PEFT and transformers, in which
# tests/test_consumers.py loads what the job exports.
CONSUMER := .venv-consumer
$(CONSUMER)/.installed: requirements-consumer.txt
	$(PYTHON) -m venv $(CONSUMER)
	$(CONSUMER)/bin/pip install -q -r requirements-consumer.txt
	touch $@

consumer: $(CONSUMER)/.installed

$(LOCAL_DIR)/models/tiny-gemma3/model.safetensors: scripts/make_tiny.py $(BIN)/.installed
	$(BIN)/python scripts/make_tiny.py --out $(LOCAL_DIR)

fixtures: $(LOCAL_DIR)/models/tiny-gemma3/model.safetensors

demo: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py

validate: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py --validate

test: setup consumer
	$(BIN)/python -m pytest -q tests

# The Dockerfile linted, and the image's pins (requirements.txt + requirements-gpu.txt) resolved
# together against the package registry without installing anything.
lint: setup
	$(BIN)/hadolint Dockerfile
	$(BIN)/pip install --dry-run --ignore-installed --quiet -r requirements.txt -r requirements-gpu.txt
