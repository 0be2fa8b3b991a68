# `make test` and `make bench` each bootstrap .venv, install pinned dependencies, build the
# extension (incrementally: build/ keeps ninja's state) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SRC := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: test bench build clean test-asan

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

# Editable install without build isolation: the extension links the torch in .venv.
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf build $(BUILD_STAMP)
