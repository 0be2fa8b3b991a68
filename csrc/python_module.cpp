// The Python extension module. Importing it loads this library, which registers the
// fastrnn ops with the dispatcher; the module itself only reports build facts and exposes
// a test switch for the GEMM backend.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/gemm.h"

namespace py = pybind11;

namespace {

std::string cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "sse";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "generic";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrnn native library: fused recurrent kernels registered as torch.ops.fastrnn.*";
  m.def("build_info", [] {
    py::dict d;
    d["cpu_isa"] = cpu_isa();
    d["isa_builds"] = bool(FASTRNN_ISA_BUILDS);  // AVX-512 and AVX2 builds of the kernels beside the baseline
    d["num_threads"] = at::get_num_threads();
    d["blas"] = fastrnn::has_blas();
    d["packed_gemm"] = fastrnn::has_packed_gemm();
    d["onednn_gemm"] = fastrnn::has_onednn();
#ifdef FASTRNN_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    return d;
  });
  m.def(
      "set_gemm_backend",
      [](const std::string& name) {
        int v = name == "auto" ? 0 : name == "blas" ? 1 : name == "generic" ? 2 : name == "onednn" ? 3 : name == "fused" ? 4 : -1;
        if (v < 0)
          throw py::value_error("gemm backend must be 'auto', 'blas', 'generic', 'onednn' or 'fused', got '" + name + "'");
        fastrnn::gemm_backend_override().store(v);
      },
      py::arg("name"),
      "Select the GEMMs: 'auto' (oneDNN for large float32 products, packed MKL for small ones), 'blas' "
      "(plain sgemm/dgemm), 'generic' (at::mm; the path for torch builds without MKL) 'onednn' (oneDNN "
      "for every float32 product) or 'fused' (the fused panel forward wherever it applies). For tests.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        int v = name == "auto" ? 0 : name == "baseline" ? 1 : name == "avx2" ? 2 : -1;
        if (v < 0) throw py::value_error("isa must be 'auto', 'avx2' or 'baseline', got '" + name + "'");
        fastrnn::isa_override_flag().store(v);
      },
      py::arg("name"),
      "Run the kernels built for the widest ISA this CPU has ('auto'), for at most AVX2 ('avx2'; the same as "
      "'auto' on a CPU without AVX-512) or for the baseline x86-64 ('baseline'). For tests.");
  m.def("get_isa", [] {
    using fastrnn::IsaOverride;
    const IsaOverride o = fastrnn::isa_override();
    return std::string(o == IsaOverride::Baseline ? "baseline" : o == IsaOverride::Avx2 ? "avx2" : "auto");
  });
  m.def("kernel_vector_bytes", [] { return fastrnn::kernel_vector_bytes(); },
        "The vector width (bytes) of the kernel build that runs now: 64 (AVX-512), 32 (AVX2) or 16 (baseline).");
  m.def("get_gemm_backend", [] {
    int v = fastrnn::gemm_backend_override().load();
    return std::string(v == 0 ? "auto" : v == 1 ? "blas" : v == 2 ? "generic" : v == 3 ? "onednn" : "fused");
  });
}
