# Two entry points for a newcomer; both create .venv and install the project on first use.
#   make demo   the main job: build data from a model's own samples, train it with MPO, evaluate
#   make test   the test suite (CPU, a tiny random InternVL, no downloads)
#   make vllm-venv   vLLM's CPU build in its own environment, for the tests against a real vLLM server
#   make verl-venv   verl 0.9.1 in its own environment, for the tests of the online-RL export against verl
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .cache/vllm-venv
VERL_VENV ?= .cache/verl-venv

.PHONY: setup demo test vllm-venv verl-venv

$(BIN)/mpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(BIN)/mpo
	@echo "mpo and mpo-data are installed in $(VENV): run 'source $(VENV)/bin/activate' to use them"

setup: $(BIN)/mpo

# The suite also races TRL's DPOTrainer (`mpo bench --against trl`), an optional extra.
$(VENV)/.trl: $(BIN)/mpo
	$(BIN)/pip install --quiet -e .[trl]
	touch $(VENV)/.trl

demo: setup
	$(BIN)/mpo demo

# pytest exits 5 when it collects nothing (e.g. `make test PYTEST_ARGS="-k nomatch"`): not a failure.
test: $(VENV)/.trl
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The vLLM tests use $MPO_VLLM_VENV (default .cache/vllm-venv) and skip without it (CI requires it).
vllm-venv:
	scripts/setup_vllm.sh $(VLLM_VENV)

# The verl tests use $MPO_VERL_VENV (default .cache/verl-venv) and skip without it (CI requires it).
verl-venv:
	scripts/setup_verl.sh $(VERL_VENV)
