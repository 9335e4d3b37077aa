# Two entry points for a newcomer; both create .venv and install the project on first use.
#   make demo   the main job: build data from a model's own samples, train it with MPO, evaluate
#   make test   the test suite (CPU, a tiny random InternVL, no downloads)
#   make vllm-venv   vLLM's CPU build in its own environment, for the tests against a real vLLM server
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .cache/vllm-venv

.PHONY: setup demo test vllm-venv

$(BIN)/mpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(BIN)/mpo

setup: $(BIN)/mpo

demo: setup
	$(BIN)/mpo demo

# pytest exits 5 when it collects nothing (e.g. `make test PYTEST_ARGS="-k nomatch"`): not a failure.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The vLLM tests use $MPO_VLLM_VENV (default .cache/vllm-venv) and skip without it (CI requires it).
vllm-venv:
	scripts/setup_vllm.sh $(VLLM_VENV)
