// Row-major GEMM for the inside of the time loop, without the dispatcher.
//
// The torch wheel's libtorch_cpu exports MKL's Fortran sgemm_/dgemm_ and its packed-GEMM API
// (measured: packing W_hh once makes a B=16, H=256 step 2x faster than at::mm). Those symbols
// are MKL's and other torch builds (aarch64, OpenBLAS) lack them, so they are weak references:
// where they resolve to null, and when the generic path is forced for testing, the GEMM falls
// back to at::mm on borrowed memory, which is correct everywhere.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>

#include "cpu/isa.h"
#include "cpu/transpose.h"
#include "cpu/workspace.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fastrnn {

// 0 = best available, 1 = plain BLAS (no packing), 2 = generic (at::mm), 3 = oneDNN for every
// float32 GEMM whatever its size, 4 = the fused panel kernel for every forward it can run.
// Set from Python for tests.
inline std::atomic<int>& gemm_backend_override() {
  static std::atomic<int> v{0};
  return v;
}


inline bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }
inline bool has_packed_gemm() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// ---------------------------------------------------------------------------------------
// oneDNN through torch's own mkldnn::_linear_pointwise op. On AMD CPUs the MKL that torch
// bundles runs ~2.2x below oneDNN's JIT GEMM (measured here, Zen 5, 2 threads: 64x512x2048
// 320 us vs 730 us; 6400x512x2048 X W^T 42 ms vs 78 ms). The op goes through the dispatcher
// (~10 us a call), so it only pays for large products; small ones stay on MKL's packed GEMM.
// Builds without oneDNN lack the op and fall back to BLAS.
// ---------------------------------------------------------------------------------------
inline const c10::optional<c10::OperatorHandle>& onednn_linear_handle() {
  static const c10::optional<c10::OperatorHandle> h =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return h;
}
inline bool has_onednn() { return onednn_linear_handle().has_value(); }

// Whether oneDNN runs bfloat16 products on this CPU (torch's own check: AVX-512 BF16, AMX or the
// like). Where it does not (AVX2 alone), it refuses to create the primitive.
inline bool has_onednn_bf16() {
  static const bool yes = [] {
    const auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!has_onednn() || !h.has_value()) return false;
    try {
      torch::jit::Stack stack;
      h->callBoxed(stack);
      return stack.size() == 1 && stack[0].toBool();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return yes;
}

// Y[M, N] = X[M, K] W[N, K]^T (+ bias[N]); X may be a strided view.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.defined() ? c10::IValue(bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  c10::List<c10::optional<at::Scalar>> scalars;
  scalars.push_back(c10::nullopt);
  stack.emplace_back(scalars);
  stack.emplace_back(std::string(""));
  onednn_linear_handle()->callBoxed(stack);
  return std::move(stack[0]).toTensor();
}

// The panel kernels (fused forwards, backward's dh = dG W_hh; recurrent and variant cells) run every size whose W_hh is at
// most this many elements (64 MB in float32); a larger packed copy costs more memory than the
// per-step BLAS/oneDNN calls cost time. Measured single-threaded (CPU time, this project's AMD
// machine): at B=64, I=H=512 and B=32, I=H=1024 the fused path beats per-step oneDNN by 7-20%,
// inference and training. (Until the kernels were built with OpenMP, their teams ran on one
// thread, and oneDNN won above ~6M multiply-adds a step.)
constexpr int64_t kPanelMaxWeightElems = int64_t(16) << 20;

// Below this many multiply-adds the dispatcher's overhead outweighs oneDNN's faster kernel.
constexpr double kOnednnMinMacs = 1.0 * 1024 * 1024;

inline bool use_onednn_for(int64_t m, int64_t n, int64_t k, bool is_float) {
  int o = gemm_backend_override().load();
  if (!is_float || !has_onednn() || o == 1 || o == 2) return false;
  return o == 3 || double(m) * double(n) * double(k) >= kOnednnMinMacs;
}

// fast_linear: out = X W^T (+ bias), choosing oneDNN for large float32 products.
inline at::Tensor fast_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = at::Tensor()) {
  if (use_onednn_for(x.size(0), w.size(0), x.size(1), x.scalar_type() == at::kFloat) && x.size(0) > 0)
    return onednn_linear(x, w, bias);
  return bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
}

namespace detail {
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

template <typename T>
inline void fortran_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                         T beta, T* c, int ldc);
template <>
inline void fortran_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                                const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
inline void fortran_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
}  // namespace detail

// C[m, N] = A[m, K] @ op(B) + beta * C, where op(B) = B^T for B stored [N, K] (trans_b) or
// B for B stored [K, N]. B is fixed for the object's lifetime (a weight); m varies per step.
template <typename T>
class WeightGemm {
 public:
  // pack_m: the row count to pack B for (MKL's packed format is tied to it); 0 = no packing.
  WeightGemm(const T* b, bool trans_b, int64_t n, int64_t k, int64_t max_m, int64_t pack_m)
      : b_(b), trans_b_(trans_b), n_(n), k_(k), packed_m_(pack_m) {
    int override_ = gemm_backend_override().load();
    if (max_m > 0 && n > 0 && k > 0 && use_onednn_for(max_m, n, k, std::is_same_v<T, float>)) {
      // oneDNN wants the weight as [N, K]; a stored [K, N] is transposed once per call.
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
      w_nk_ = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, opts)
                      : transposed<T>(at::from_blob(const_cast<T*>(b), {k, n}, opts));
    }
    mode_ = (override_ == 2 || !has_blas()) ? Mode::Generic : Mode::Blas;
    if constexpr (std::is_same_v<T, float>) {
      // MKL's packed format is documented for the m it was packed with; steps with another m
      // (the tail of a packed batch) take plain sgemm.
      if (mode_ == Mode::Blas && override_ == 0 && has_packed_gemm() && pack_m > 0 && n > 0 && k > 0) {
        size_t bytes = cblas_sgemm_pack_get_size(detail::kBMatrix, int(pack_m), int(n), int(k));
        packed_.reset(static_cast<float*>(std::malloc(bytes)));
        TORCH_CHECK(packed_ != nullptr, "fastrnn: out of memory packing a weight (", bytes, " bytes)");
        cblas_sgemm_pack(detail::kRowMajor, detail::kBMatrix, trans_b ? detail::kTrans : detail::kNoTrans,
                         int(pack_m), int(n), int(k), 1.0f, b, trans_b ? int(k) : int(n), packed_.get());
      }
    }
  }

  void run(const T* a, int64_t m, int64_t lda, T* c, int64_t ldc, T beta) const {
    if (m == 0 || n_ == 0) return;
    if (w_nk_.defined() && k_ > 0 && use_onednn_for(m, n_, k_, true)) {
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
      at::Tensor y = onednn_linear(at::from_blob(const_cast<T*>(a), {m, k_}, {lda, 1}, opts), w_nk_, at::Tensor());
      const T* yp = y.data_ptr<T>();
      for (int64_t i = 0; i < m; ++i) {
        T* ci = c + i * ldc;
        const T* yi = yp + i * n_;
        if (beta == T(0))
          std::memcpy(ci, yi, sizeof(T) * n_);
        else
          for (int64_t j = 0; j < n_; ++j) ci[j] = beta * ci[j] + yi[j];
      }
      return;
    }
    if (k_ == 0) {
      // BLAS would scale C by beta; keep the same meaning.
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n_; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (packed_ && m == packed_m_) {
        cblas_sgemm_compute(detail::kRowMajor, detail::kNoTrans, detail::kPacked, int(m), int(n_), int(k_), a,
                            int(lda), packed_.get(), int(n_), beta, c, int(ldc));
        return;
      }
    }
    if (mode_ == Mode::Blas) {
      // Row-major C = A op(B) is column-major C^T = op(B)^T A^T.
      detail::fortran_gemm<T>(trans_b_ ? 'T' : 'N', 'N', int(n_), int(m), int(k_), T(1), b_,
                              trans_b_ ? int(k_) : int(n_), a, int(lda), beta, c, int(ldc));
      return;
    }
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor av = at::from_blob(const_cast<T*>(a), {m, k_}, {lda, 1}, opts);
    at::Tensor bv = trans_b_ ? at::from_blob(const_cast<T*>(b_), {n_, k_}, {k_, 1}, opts).t()
                             : at::from_blob(const_cast<T*>(b_), {k_, n_}, {n_, 1}, opts);
    at::Tensor cv = at::from_blob(c, {m, n_}, {ldc, 1}, opts);
    if (beta == T(0)) {
      cv.copy_(at::mm(av, bv));
    } else {
      cv.mul_(beta).add_(at::mm(av, bv));
    }
  }

 private:
  enum class Mode { Blas, Generic };
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  const T* b_;
  bool trans_b_;
  int64_t n_, k_, packed_m_;
  Mode mode_ = Mode::Generic;
  std::unique_ptr<float, FreeDeleter> packed_;
  at::Tensor w_nk_;  // the weight as [N, K] for oneDNN, when it is used
};

// Rows per parallel_for chunk of a pointwise pass over rows `per_row` elements wide.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)); }

// dY^T X for dY [N, A], X [N, B] (contiguous rows): a weight gradient, summed over rows. oneDNN
// runs this long-K shape at MKL's speed unless both operands are K-contiguous, so for large
// float32 products they are transposed first (measured: 1600x768x256 3.3 ms with at::mm,
// 1.4 ms + two transposes with oneDNN; 6400x2048x512 67 ms vs 31 ms). dy_t caches dy's
// transpose (slot kScratchDgT) across calls that share dy (the LSTM's and RNN's dW_ih and dW_hh);
// X's goes to x_slot. weight_grad takes X as a tensor, weight_grad_rows by its rows.
template <typename T>
bool weight_grad_on_onednn(const at::Tensor& dy, int64_t B) {
  return dy.size(0) > 0 && use_onednn_for(dy.size(1), B, dy.size(0), std::is_same_v<T, float>);
}

// The oneDNN product, given X^T [B, N]. col_sums (or null, a contiguous [A] tensor) += dY's
// column sums (a bias gradient), taken as dY is transposed; where dy_t holds dY's transpose
// already, they were taken then (the caller passes col_sums to one of the calls sharing dY).
template <typename T>
at::Tensor onednn_weight_grad(const at::Tensor& dy, const at::Tensor& xt, at::Tensor* dy_t, at::Tensor* col_sums) {
  TORCH_INTERNAL_ASSERT(dy.stride(1) == 1);
  at::Tensor local;
  at::Tensor& dyt = dy_t ? *dy_t : local;
  if (!dyt.defined()) dyt = transposed<T>(dy, kScratchDgT, col_sums ? col_sums->data_ptr<T>() : nullptr);
  return onednn_linear(dyt, xt, at::Tensor());
}

template <typename T>
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x, at::Tensor* dy_t = nullptr,
                       ScratchSlot x_slot = kScratchXT, at::Tensor* col_sums = nullptr) {
  TORCH_INTERNAL_ASSERT(x_slot != kScratchDgT);
  if (weight_grad_on_onednn<T>(dy, x.size(1)))
    return onednn_weight_grad<T>(dy, transposed<T>(x, x_slot), dy_t, col_sums);
  if (col_sums) col_sums->add_(dy.sum(0));
  return at::mm(dy.t(), x);
}

// row(r) points at X's row r (B contiguous elements, anywhere): X^T is built straight from the
// rows (oneDNN), or X gathered into gather_slot (at::mm). col_sums as onednn_weight_grad's.
template <typename T, typename Row>
at::Tensor weight_grad_rows(const at::Tensor& dy, const Row& row, int64_t B, at::Tensor* dy_t, ScratchSlot x_slot,
                            ScratchSlot gather_slot, at::Tensor* col_sums = nullptr) {
  TORCH_INTERNAL_ASSERT(x_slot != kScratchDgT);
  const int64_t N = dy.size(0);
  if (weight_grad_on_onednn<T>(dy, B)) {
    at::Tensor xt = scratch(x_slot, {B, N}, dy.options());
    transpose_rows_into<T>(row, N, B, xt.data_ptr<T>(), N);
    return onednn_weight_grad<T>(dy, xt, dy_t, col_sums);
  }
  if (col_sums) col_sums->add_(dy.sum(0));
  at::Tensor x = scratch(gather_slot, {N, B}, dy.options());
  T* xp = x.data_ptr<T>();
  for (int64_t r = 0; r < N; ++r) std::memcpy(xp + r * B, row(r), sizeof(T) * B);
  return at::mm(dy.t(), x);
}

// One kernel family: impl<T, NB> built for AVX-512 (64-byte vectors), AVX2 (32) and the baseline
// ISA (16), and the entry point that runs the build kernel_vector_bytes() names (the CPU's widest;
// FASTRNN_FORCE_GENERIC_ISA / fastrnn._C.set_isa cap it). Each build's loops are compiled with its
// own vector width: GCC's target_clones would compile one source, and so one width, for all.
#if FASTRNN_ISA_BUILDS
#define FASTRNN_ISA_BUILD(name, suffix, isa, NB, Args, impl)                        \
  __attribute__((target(isa), noinline)) void name##suffix(const Args<float>& s, int64_t b,  \
                                                           int64_t e) {                      \
    impl<float, NB>(s, b, e);                                                                \
  }                                                                                          \
  __attribute__((target(isa), noinline)) void name##suffix(const Args<double>& s, int64_t b, \
                                                           int64_t e) {                      \
    impl<double, NB>(s, b, e);                                                               \
  }
#define FASTRNN_ISA_KERNEL(name, Args, impl)                                                 \
  FASTRNN_ISA_BUILD(name, _v4, "arch=x86-64-v4", 64, Args, impl)                             \
  FASTRNN_ISA_BUILD(name, _v3, "arch=x86-64-v3", 32, Args, impl)                             \
  template <typename T>                                                                      \
  __attribute__((noinline)) void name##_baseline(const Args<T>& s, int64_t b, int64_t e) {   \
    impl<T, 16>(s, b, e);                                                                    \
  }                                                                                          \
  template <typename T>                                                                      \
  void name(const Args<T>& s, int64_t b, int64_t e) {                                        \
    switch (kernel_vector_bytes()) {                                                         \
      case 64: name##_v4(s, b, e); break;                                                    \
      case 32: name##_v3(s, b, e); break;                                                    \
      default: name##_baseline(s, b, e); break;                                              \
    }                                                                                        \
  }
#else
#define FASTRNN_ISA_KERNEL(name, Args, impl)                \
  template <typename T>                                     \
  void name(const Args<T>& s, int64_t b, int64_t e) {       \
    impl<T, 16>(s, b, e);                                   \
  }
#endif

}  // namespace fastrnn
