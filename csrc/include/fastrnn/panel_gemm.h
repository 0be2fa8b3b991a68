// A small GEMM for the recurrent product, on weights packed once per call into column panels.
//
// C[m, NR] (one panel) = A[m, K] @ Wp[K, NR]: Wp holds NR = V * L consecutive columns of the
// logical right-hand matrix, row k of the panel contiguous (so a k-step is V aligned vector loads
// and an FMA per row and vector). Written with GCC vector extensions: the caller's target_clones
// compile it to AVX-512, AVX2 or SSE. No torch headers: shapes and pointers only.
//
// Why: at the batch sizes of recurrent nets (B = 1..64) a step's GEMM is a few microseconds of
// work; the BLAS libraries torch ships spend as much again in dispatch and threading, and
// torch's MKL takes a slow path on AMD CPUs. Panels also let each thread own a fixed slice of
// W_hh that stays in its core's L2 across all steps, and let the gate math of a panel's hidden
// units run right after its product, in the same thread, without a barrier.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastrnn/cells.h"

namespace fastrnn {
namespace panel {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int L = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int L = 8;
};

// C rows [0, MR) += or = A[MR rows] @ panel; A row stride lda, C row stride ldc.
template <typename T, int V, int MR>
FASTRNN_INLINE void micro(const T* FASTRNN_RESTRICT A, int64_t lda, int64_t K, const T* FASTRNN_RESTRICT W,
                          T* FASTRNN_RESTRICT C, int64_t ldc) {
  using vec = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  vec acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec w[V];
    for (int v = 0; v < V; ++v) std::memcpy(&w[v], W + (k * V + v) * L, sizeof(vec));
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
      for (int v = 0; v < V; ++v) acc[i][v] += a * w[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) std::memcpy(C + i * ldc + v * L, &acc[i][v], sizeof(vec));
}

constexpr int kMR = 6;

// C[m, V*L] = A[m, K] @ panel for m <= kMR rows.
template <typename T, int V>
FASTRNN_INLINE void product_rows(const T* A, int64_t lda, int64_t m, int64_t K, const T* W, T* C, int64_t ldc) {
  static_assert(kMR == 6, "product_rows handles up to 6 rows");
  switch (m) {
    case 6: micro<T, V, 6>(A, lda, K, W, C, ldc); break;
    case 5: micro<T, V, 5>(A, lda, K, W, C, ldc); break;
    case 4: micro<T, V, 4>(A, lda, K, W, C, ldc); break;
    case 3: micro<T, V, 3>(A, lda, K, W, C, ldc); break;
    case 2: micro<T, V, 2>(A, lda, K, W, C, ldc); break;
    case 1: micro<T, V, 1>(A, lda, K, W, C, ldc); break;
    default: break;
  }
}

}  // namespace panel
}  // namespace fastrnn
