# The two commands a newcomer needs: `make demo` (a complete local job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCAL_DIR ?= .local

.PHONY: setup fixtures demo test validate lint

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed

$(LOCAL_DIR)/models/tiny-gemma3/model.safetensors: scripts/make_tiny.py $(BIN)/.installed
	$(BIN)/python scripts/make_tiny.py --out $(LOCAL_DIR)

fixtures: $(LOCAL_DIR)/models/tiny-gemma3/model.safetensors

demo: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py

validate: fixtures
	BACKEND=local LOCAL_DIR=$(LOCAL_DIR) $(BIN)/python main.py --validate

test: setup
	$(BIN)/python -m pytest -q tests

# The Dockerfile linted, and the image's pins (requirements.txt + requirements-gpu.txt) resolved
# together against the package registry without installing anything.
lint: setup
	$(BIN)/hadolint Dockerfile
	$(BIN)/pip install --dry-run --ignore-installed --quiet -r requirements.txt -r requirements-gpu.txt
