#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA torch (the device tool's machines): build fastrnn
# with its CUDA kernels, run the CUDA tests and the GPU benchmark. Logs and the
# benchmark table go to $OUT (default: build/gpu-check). Usage: scripts/gpu_check.sh [--quick]
set -uo pipefail
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
# Known issue (2026-11-23): the GPU machine's g++ (/opt/gcc, GCC 13.3) links libstdc++
# statically, so _C carries its own std::ostream beside the shared libstdc++ torch loads, and
# formatting an integer into an error message crashes (test_bad_input_is_rejected, in a child
# process). Passing the shared libstdc++.so.6 first on the link line did not stop it. The check
# below reports which copy _C uses.
echo "C++ compiler: $(command -v g++) ($(g++ -dumpfullversion))"
start=$(date +%s)
python3 -m pip install -v --no-build-isolation --no-deps -e . -Ccmake.define.FASTRNN_CUDA=ON \
  -Ccmake.define.FASTRNN_CUDA_ARCHITECTURES=90 -Ccmake.define.FASTRNN_CXX_OPT=-O1 -Cbuild.verbose=true 2>&1 \
  | while IFS= read -r l; do printf '%s %s\n' "$(( $(date +%s) - start ))" "$l"; done >"$OUT/build.log" \
  || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
so=$(python3 -c "import importlib.util as u; print(u.find_spec('fastrnn._C').origin)")
echo "libstdc++ number formatting in _C: $(readelf --dyn-syms -W "$so" | grep -c ' UND _ZNSo9_M_insertIlEERSoT_') undefined (from libstdc++.so),"\
  "$(readelf --dyn-syms -W "$so" | grep '_ZNSo9_M_insertIlEERSoT_' | grep -vc ' UND ') defined inside"
ldd "$so" | grep -i "stdc++"
python3 -c "import fastrnn; print(fastrnn.build_info())"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda.py ${PYTEST_EXTRA:-} 2>&1 | tee "$OUT/test_cuda.log" | tail -40
[ -n "${SKIP_BENCH:-}" ] && exit 0
timeout ${BENCH_TIMEOUT:-220} python3 benchmarks/bench_cuda.py "$@" --out "$OUT/CUDA.md" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" | tail -60
