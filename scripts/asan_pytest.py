"""Run pytest against the AddressSanitizer/UBSan build of fastrnn (used by `make test-asan`).

Usage: LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
       python scripts/asan_pytest.py SITE_DIR [pytest args...]

SITE_DIR holds a non-editable install of the sanitizer build (`pip install --target SITE_DIR`).
The normal editable install in .venv is left alone: its import redirect (scikit-build-core's
meta path finder) is removed from this process only, and SITE_DIR is put first on sys.path,
so `import fastrnn` here loads the instrumented library and every other process still gets
the normal one. The script refuses to run tests if the library it imported is not the
instrumented one or if the ASan runtime is not loaded, so a green run means the checks ran.
"""
from __future__ import annotations

import os
import sys


def _asan_runtime_loaded() -> bool:
    with open("/proc/self/maps") as f:
        return any("libasan" in line for line in f)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    site = os.path.abspath(sys.argv[1])
    if not os.path.isdir(os.path.join(site, "fastrnn")):
        print(f"asan_pytest: {site} has no fastrnn package (build it first)", file=sys.stderr)
        return 2
    # Drop the editable install's redirecting finder; the staged copy wins. Child processes the
    # tests start (test_malformed_ops runs its table in one) inherit the same choice through the
    # environment: PYTHONPATH, and scikit-build-core's SKBUILD_EDITABLE_SKIP (the finder steps aside
    # for a build directory listed there).
    finders = [f for f in sys.meta_path if type(f).__name__ == "ScikitBuildRedirectingFinder"]
    sys.meta_path[:] = [f for f in sys.meta_path if f not in finders]
    skip = [getattr(f, "path", None) for f in finders]
    skip = [p for p in skip if p] + [p for p in os.environ.get("SKBUILD_EDITABLE_SKIP", "").split(os.pathsep) if p]
    os.environ["SKBUILD_EDITABLE_SKIP"] = os.pathsep.join(skip)
    os.environ["PYTHONPATH"] = os.pathsep.join([site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p])
    sys.path.insert(0, site)
    for name in [m for m in sys.modules if m == "fastrnn" or m.startswith("fastrnn.")]:
        del sys.modules[name]

    import fastrnn
    from fastrnn import _C

    so = os.path.realpath(_C.__file__)
    if not so.startswith(site + os.sep):
        print(f"asan_pytest: imported {so}, not the sanitizer build under {site}", file=sys.stderr)
        return 2
    if not _asan_runtime_loaded():
        print("asan_pytest: the ASan runtime is not loaded (LD_PRELOAD libasan.so)", file=sys.stderr)
        return 2
    import subprocess

    child = subprocess.run([sys.executable, "-c", "import fastrnn._C as c; print(c.__file__)"], capture_output=True,
                           text=True, cwd=site)
    if child.returncode != 0 or not os.path.realpath(child.stdout.strip()).startswith(site + os.sep):
        print(f"asan_pytest: a child process does not import the sanitizer build: {child.stdout}{child.stderr}",
              file=sys.stderr)
        return 2
    print(f"asan_pytest: fastrnn from {os.path.dirname(fastrnn.__file__)}, _C = {so} (child processes too)",
          flush=True)

    import pytest

    # -p no:cacheprovider: the staged package must not write into the source tree's cache.
    return int(pytest.main(["-p", "no:cacheprovider", *sys.argv[2:]]))


if __name__ == "__main__":
    sys.exit(main())
