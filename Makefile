# `make test` and `make bench` each bootstrap .venv, install pinned dependencies, build the
# extension (incrementally: build/ keeps ninja's state) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SRC := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: test bench build clean test-asan cuda-check example-forecast example-digits example-digits-video example-charlm

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

# The CUDA kernels compile without torch or a GPU: `make cuda-check` builds them with nvcc for
# sm_80 and sm_90 (object files only), and `make test` runs it first wherever nvcc is on the PATH.
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_CHECK_STAMP := build/cuda-check/.stamp
$(CUDA_CHECK_STAMP): csrc/cuda/kernels.cu csrc/cuda/kernels.cuh
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }
	mkdir -p build/cuda-check
	$(NVCC) -std=c++17 -O3 -Xcompiler -Wall -Werror all-warnings -gencode arch=compute_80,code=sm_80 \
		-gencode arch=compute_90,code=sm_90 -c csrc/cuda/kernels.cu -o build/cuda-check/kernels.o
	touch $@

cuda-check: $(CUDA_CHECK_STAMP)

test: $(BUILD_STAMP) $(if $(NVCC),$(CUDA_CHECK_STAMP))
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_cuda.py --out benchmarks/results/CUDA.md

# Examples on real data shipped inside packages (README, "Examples"); each writes a PNG to
# examples/results/ and times the same model on torch.nn layers. EXAMPLE_ARGS=--quick for a smoke run.
EXAMPLE_ARGS ?=
example-forecast: $(BUILD_STAMP)
	$(PY) examples/forecast.py $(EXAMPLE_ARGS)

example-digits: $(BUILD_STAMP)
	$(PY) examples/digits.py $(EXAMPLE_ARGS)

example-digits-video: $(BUILD_STAMP)
	$(PY) examples/digits.py --video $(EXAMPLE_ARGS)

example-charlm: $(BUILD_STAMP)
	$(PY) examples/charlm.py $(EXAMPLE_ARGS)

clean:
	rm -rf build $(BUILD_STAMP)

# AddressSanitizer + UBSan run of the kernel tests. The instrumented build goes to its own
# directory (build/asan/site, built in build/asan/cmake) instead of over the editable install,
# so `make test` keeps using the normal extension throughout (nothing to restore afterwards, and
# other processes importing fastrnn meanwhile are unaffected). scripts/asan_pytest.py points
# this pytest run (and the processes it starts) at the instrumented copy and refuses to run if
# that is not what got imported. libstdc++ is preloaded with libasan: otherwise ASan's
# __cxa_throw interceptor finds no real __cxa_throw (python does not link libstdc++) and aborts
# on the first C++ exception. --capture=sys keeps fd 2 uncaptured, so a sanitizer report is
# printed even when it kills the process. Symbolized reports need debug info in the library,
# which a Release build loses three ways: pybind11_add_module adds -flto (code generated at link
# time, where no -g is passed) unless CMAKE_INTERPROCEDURAL_OPTIMIZATION is defined, strips the
# module after linking in Release, and scikit-build-core strips on install; hence the three
# settings below (FASTRNN_SANITIZE itself adds -O1 -g).
ASAN_SITE := build/asan/site
ASAN_TESTS ?= tests/test_ops.py tests/test_errors.py tests/test_malformed_ops.py
test-asan: $(DEPS_STAMP)
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps --upgrade \
		--target $(ASAN_SITE) . -Ccmake.define.FASTRNN_SANITIZE=ON -Cbuild-dir=build/asan/cmake \
		-Ccmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PY) scripts/asan_pytest.py $(ASAN_SITE) -q --capture=sys -p no:logging $(PYTEST_ARGS) $(ASAN_TESTS)
