// A small GEMM for the recurrent product, on weights packed once per call into column panels.
//
// C[m, NR] (one panel) = A[m, K] @ Wp[K, NR]: Wp holds NR = V * L consecutive columns of the
// logical right-hand matrix, row k of the panel contiguous (so a k-step is V aligned vector loads
// and an FMA per row and vector). Written with GCC vector extensions, instantiated per ISA with
// that ISA's vector width (Native below; cpu/gemm.h's FASTRNN_ISA_KERNEL). No torch headers:
// shapes and pointers only.
//
// Why: at the batch sizes of recurrent nets (B = 1..64) a step's GEMM is a few microseconds of
// work; the BLAS libraries torch ships spend as much again in dispatch and threading, and
// torch's MKL takes a slow path on AMD CPUs. Panels also let each thread keep its own slice of
// W_hh in its core's L2 across all steps, and let the gate math of a panel's hidden
// units run right after its product, in the same thread, without a barrier.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastrnn/cells.h"

namespace fastrnn {
namespace panel {

// The layout vector: panels are packed in units of Vec<T>::L lanes (64 bytes), whatever the CPU.
template <typename T>
struct Vec {
  static constexpr int L = 64 / int(sizeof(T));
};

// The compute vector of the build that runs (the kernel entry points of cpu/gemm.h instantiate the
// loops once per ISA): NB bytes, 64 with AVX-512, 32 with AVX2, 16 for the baseline x86-64 build.
// A vector wider than the CPU's registers is no vector to GCC: it lives on the stack and every
// operation goes through memory, element by element for a scalar times a vector (measured, AVX2
// Zen 3, when every build used 64-byte vectors: a 1600x256x1024 product at 6 GFLOP/s, 20x below
// torch.mm). R: compute vectors per layout vector. kAcc: accumulators a micro-kernel keeps in
// registers (32 vector registers with AVX-512, 16 below; the rest hold the panel's row and A).
template <typename T, int NB>
struct Native {
  typedef T type __attribute__((vector_size(NB)));
  static constexpr int L = NB / int(sizeof(T));
  static constexpr int R = 64 / NB;
  static constexpr int kAcc = NB == 64 ? 24 : 12;
};

// Panels are kept in stripes: a panel of WS layout vectors, logically [K][WS * L], is stored as
// WS / S stripes of S layout vectors, each [K][S * L] contiguous, stripe q at q * K * S * L (an
// element's place: striped()). With AVX-512 a stripe is the whole panel (S = WS): the
// micro-kernel holds a whole row of it in registers and a k-step reads one 256-byte row. Below
// AVX-512 a stripe is one layout vector (S = 1): the micro-kernel takes a panel a column group at
// a time, and a group's k-steps then read consecutive memory, not 64 bytes of every 256 (which
// left most of each line read to be fetched again by the next group, from L2). Measured (AVX2,
// Zen 3, one thread, gemm_impl on both layouts in one binary, medians of 15, m x K x N):
// 64x2048x512 51 -> 90 GFLOP/s; 8x512x1024 62 -> 84; 64x512x2048 50 -> 64; 16x256x1024 55 -> 65.
constexpr int stripe_vecs(int NB, int WS) { return NB == 64 ? WS : 1; }

// Offset of element (k, j) in a panel of K rows stored in stripes of S layout vectors.
template <typename T>
FASTRNN_INLINE int64_t striped(int64_t K, int S, int64_t k, int64_t j) {
  const int64_t w = int64_t(S) * Vec<T>::L;
  return (j / w) * K * w + k * w + j % w;
}

// acc[i][v] += A[i, :K] @ the panel's compute vector V0 + v, for MR rows of A (row stride lda) and
// V compute vectors, in a panel stored in stripes of SC compute vectors, ss elements apart.
template <typename T, int NB, int V0, int V, int MR, int SC>
FASTRNN_INLINE void accumulate(typename Native<T, NB>::type (&acc)[MR][V], const T* FASTRNN_RESTRICT A, int64_t lda,
                               int64_t K, const T* FASTRNN_RESTRICT W, int64_t ss) {
  using vec = typename Native<T, NB>::type;
  constexpr int L = Native<T, NB>::L;
  // (The unroll pragmas keep acc and w in registers: GCC left the loops over v rolled in some
  // instantiations, and the arrays on the stack: AVX2 build, T=1000, B=8, H=128 LSTM inference
  // on one thread took 120 ms against 31 with them.)
  for (int64_t k = 0; k < K; ++k) {
    vec w[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v)
      std::memcpy(&w[v], W + ((V0 + v) / SC) * ss + (k * SC + (V0 + v) % SC) * L, sizeof(vec));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[i][v] += a * w[v];
    }
  }
}

// micro's product on compute vectors [V0, V0 + V) of its columns, all in registers.
template <typename T, int NB, int V0, int V, int MR, bool Add, int SC, bool Two>
FASTRNN_INLINE void micro_cols(const T* FASTRNN_RESTRICT A, int64_t lda, int64_t K, const T* FASTRNN_RESTRICT W,
                               int64_t ss, T* FASTRNN_RESTRICT C, int64_t ldc, const T* FASTRNN_RESTRICT A2,
                               int64_t lda2, int64_t K2, const T* FASTRNN_RESTRICT W2, int64_t ss2) {
  using vec = typename Native<T, NB>::type;
  constexpr int L = Native<T, NB>::L;
  vec acc[MR][V];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      if constexpr (Add)
        std::memcpy(&acc[i][v], C + i * ldc + (V0 + v) * L, sizeof(vec));
      else
        acc[i][v] = vec{};
    }
  accumulate<T, NB, V0, V, MR, SC>(acc, A, lda, K, W, ss);
  if constexpr (Two) accumulate<T, NB, V0, V, MR, SC>(acc, A2, lda2, K2, W2, ss2);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) std::memcpy(C + i * ldc + (V0 + v) * L, &acc[i][v], sizeof(vec));
}

// Compute vectors [V0, VN) of micro's columns, as many at a time as the registers hold (kAcc / MR
// a row: with 6 rows, a whole 4-vector panel with AVX-512, 2 of its 8 compute vectors with AVX2).
template <typename T, int NB, int VN, int MR, bool Add, int SC, bool Two, int V0 = 0>
FASTRNN_INLINE void micro_groups(const T* A, int64_t lda, int64_t K, const T* W, int64_t ss, T* C, int64_t ldc,
                                 const T* A2, int64_t lda2, int64_t K2, const T* W2, int64_t ss2) {
  constexpr int per = Native<T, NB>::kAcc / MR > 0 ? Native<T, NB>::kAcc / MR : 1;
  constexpr int n = VN - V0 < per ? VN - V0 : per;
  micro_cols<T, NB, V0, n, MR, Add, SC, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2);
  if constexpr (V0 + n < VN)
    micro_groups<T, NB, VN, MR, Add, SC, Two, V0 + n>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2);
}

// C rows [0, MR) = A[MR rows] @ panel, or += when Add; A row stride lda, C row stride ldc. The
// panel is WS layout vectors wide, in stripes (stripe_vecs(NB, WS) layout vectors) ss elements
// apart; W points at its row 0 (a block of rows k0.. of a panel: its row k0 in stripe 0); the
// product takes the first V layout vectors (V < WS: the occupied columns of a panel that is partly
// past N). Two: a second product A2[MR, K2] @ W2 (a panel of the same width, stripes ss2 apart)
// is added in the same accumulators, as if A2 continued A's columns and W2 W's rows (the fused
// forward's x W_ih^T + h W_hh^T of a step, one pass, no partial sums stored).
// (Not a lambda called twice: GCC compiled that form so that a row rounded differently in a block
// of 2 rows than in a block of 5, and a float32 forward depended on the thread count, which
// splits a panel's rows; tests/test_threads.py.)
template <typename T, int NB, int V, int MR, bool Add = false, int WS = V, bool Two = false>
FASTRNN_INLINE void micro(const T* FASTRNN_RESTRICT A, int64_t lda, int64_t K, const T* FASTRNN_RESTRICT W,
                          int64_t ss, T* FASTRNN_RESTRICT C, int64_t ldc, const T* FASTRNN_RESTRICT A2 = nullptr,
                          int64_t lda2 = 0, int64_t K2 = 0, const T* FASTRNN_RESTRICT W2 = nullptr,
                          int64_t ss2 = 0) {
  constexpr int R = Native<T, NB>::R;
  micro_groups<T, NB, V * R, MR, Add, stripe_vecs(NB, WS) * R, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2,
                                                                     ss2);
}

constexpr int kMR = 6;

// Rows [0, m) split into ceil(m / kMR) blocks of near-equal size (block i is rows
// [row_block(m, i), row_block(m, i + 1))): every block of m >= 4 rows keeps >= 4 rows, where the
// micro-kernel runs at its full FMA rate. Measured single-threaded (AVX-512, 256x64 panels):
// 8 rows as 6 + 2 ran at 189 GFLOP/s, as 4 + 4 at 245; 14, 20 and 32 rows 5-17% faster.
inline int64_t row_blocks(int64_t m) { return (m + kMR - 1) / kMR; }
inline int64_t row_block(int64_t m, int64_t i) { return m * i / row_blocks(m); }

// C[m, V*L] = A[m, K] @ panel (+= when Add; + A2[m, K2] @ W2 when Two, see micro) for
// m <= kMR rows; a panel of WS layout vectors, stripes ss (ss2) elements apart.
template <typename T, int NB, int V, bool Add = false, int WS = V, bool Two = false>
FASTRNN_INLINE void product_rows(const T* A, int64_t lda, int64_t m, int64_t K, const T* W, int64_t ss, T* C,
                                 int64_t ldc, const T* A2 = nullptr, int64_t lda2 = 0, int64_t K2 = 0,
                                 const T* W2 = nullptr, int64_t ss2 = 0) {
  static_assert(kMR == 6, "product_rows handles up to 6 rows");
  switch (m) {
    case 6: micro<T, NB, V, 6, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    case 5: micro<T, NB, V, 5, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    case 4: micro<T, NB, V, 4, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    case 3: micro<T, NB, V, 3, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    case 2: micro<T, NB, V, 2, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    case 1: micro<T, NB, V, 1, Add, WS, Two>(A, lda, K, W, ss, C, ldc, A2, lda2, K2, W2, ss2); break;
    default: break;
  }
}

// Asks the cache for m rows of G gate segments of n elements (gate g of row i at
// x + i * ld + g * H): a fused step's input projections, which come from a chunk buffer of
// megabytes (L3), so that they arrive while the block's product runs. Measured (AMD EPYC Zen 4,
// T=100, B=16, I=100, H=300 inference): on one thread these loads were 10% of the run (unaligned
// where H % 16 != 0, each spanning two lines), time loop 14.9 -> 13.1 ms (H=304: 12.6 -> 12.9);
// two threads, the call 11.7-12.2 -> 9.5-9.9 ms, the GRU's 8.9-9.8 -> 7.7-8.5 ms.
template <typename T>
FASTRNN_INLINE void prefetch_gate_rows(const T* x, int64_t ld, int64_t m, int64_t G, int64_t H, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t q = 0; q < n + kLine; q += kLine) __builtin_prefetch(x + i * ld + g * H + (q < n ? q : n - 1));
}

// ---------------------------------------------------------------------------------------
// Dot-product form for weights stored [N, K] row-major (nn.Linear layout), for a few rows of A:
// C[i, r] = sum_k A[i, k] W[r, k] for i < MR, r < NR. Used where packing W would cost more than
// the product itself (a single step: T = 1, a frame at a time), so W is read where it lies.
// ---------------------------------------------------------------------------------------
// The sum of a vector's lanes, halving it (high half onto low) down to one lane: a few
// extract-and-add steps, not a chain of L scalar adds (which, four rows a call, made a B = 1 step
// latency-bound at ~60 GB/s of L2-resident weights instead of ~100).
template <typename T, int N>
FASTRNN_INLINE T hsum_lanes(const T* s) {
  if constexpr (N == 1) {
    return s[0];
  } else {
    typedef T half __attribute__((vector_size(N / 2 * sizeof(T))));
    half lo, hi;
    std::memcpy(&lo, s, sizeof(half));
    std::memcpy(&hi, s + N / 2, sizeof(half));
    lo += hi;
    T h[N / 2];
    std::memcpy(h, &lo, sizeof(half));
    return hsum_lanes<T, N / 2>(h);
  }
}

template <typename T, int NB>
FASTRNN_INLINE T hsum(typename Native<T, NB>::type v) {
  T s[Native<T, NB>::L];
  std::memcpy(s, &v, sizeof(v));
  return hsum_lanes<T, Native<T, NB>::L>(s);
}

template <typename T, int NB, int MR, int NR>
FASTRNN_INLINE void dot_rows(const T* FASTRNN_RESTRICT A, int64_t lda, const T* FASTRNN_RESTRICT W, int64_t ldw,
                             int64_t K, T* FASTRNN_RESTRICT C, int64_t ldc) {
  using vec = typename Native<T, NB>::type;
  constexpr int L = Native<T, NB>::L;
  vec acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[i][r] = vec{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    vec w[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) std::memcpy(&w[r], W + r * ldw + k, sizeof(vec));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      vec a;
      std::memcpy(&a, A + i * lda + k, sizeof(vec));
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[i][r] += a * w[r];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      T s = hsum<T, NB>(acc[i][r]);
      for (int64_t q = k; q < K; ++q) s += A[i * lda + q] * W[r * ldw + q];
      C[i * ldc + r] = s;
    }
}

constexpr int kDotMR = 4;

// C[i, r] for i < m <= kDotMR rows of A and r < n rows of W (any n); NW rows of W at a time, as
// many as keep MR * NW accumulators in registers, and at least 8 of them: each is a chain of
// dependent FMAs, and with fewer a row of one or two (B = 1, 2: streaming) waited on their
// latency. Measured (AVX2 Zen 3, one thread, B = 1, W [2048, 256]): 2 rows of W at a time
// 54.9 us, 8 rows 48.9 us; W [4096, 512] 263 -> 213 us. (Each C[i, r] sums in the same order
// whatever NW is.)
template <typename T, int NB, int MR>
FASTRNN_INLINE void dot_block_m(const T* A, int64_t lda, const T* W, int64_t ldw, int64_t n, int64_t K, T* C,
                                int64_t ldc) {
  constexpr int NW = MR == 1 ? 8 : MR == 2 ? 4 : NB == 64 ? 4 : 2;
  int64_t r = 0;
  for (; r + NW <= n; r += NW) dot_rows<T, NB, MR, NW>(A, lda, W + r * ldw, ldw, K, C + r, ldc);
  for (; r < n; ++r) dot_rows<T, NB, MR, 1>(A, lda, W + r * ldw, ldw, K, C + r, ldc);
}

template <typename T, int NB>
FASTRNN_INLINE void dot_block(const T* A, int64_t lda, int64_t m, const T* W, int64_t ldw, int64_t n, int64_t K,
                              T* C, int64_t ldc) {
  static_assert(kDotMR == 4, "dot_block handles up to 4 rows");
  switch (m) {
    case 4: dot_block_m<T, NB, 4>(A, lda, W, ldw, n, K, C, ldc); break;
    case 3: dot_block_m<T, NB, 3>(A, lda, W, ldw, n, K, C, ldc); break;
    case 2: dot_block_m<T, NB, 2>(A, lda, W, ldw, n, K, C, ldc); break;
    case 1: dot_block_m<T, NB, 1>(A, lda, W, ldw, n, K, C, ldc); break;
    default: break;
  }
}

// C[m, N] (=, or += when accumulate) A[m, K] @ B for B [K, N] packed in column panels of
// NR = kGemmV * L columns (panel p holds columns [p*NR, (p+1)*NR) at p * K * NR, in stripes
// (see stripe_vecs), zero past N): panels [p0, p1) only, so threads can split them. For the
// per-step products at sizes where a BLAS call costs more in dispatch and threading than the
// product itself.
constexpr int kGemmV = 4;

template <typename T>
struct GemmArgs {
  const T* a;
  int64_t lda, m, K, N;
  const T* bp;
  T* c;
  int64_t ldc;
  bool accumulate;
  const T* bias = nullptr;  // [N], added to every row of C (not with accumulate)
};

// A panel longer than kGemmKC rows of K (kGemmKC * NR * 4 bytes = 256 KiB in float32) no longer
// stays in a core's L2 while every block of rows reads it, so it is taken kGemmKC rows at a time
// for up to kGemmMC rows of A (balanced into blocks), their partial sums kept in the tile. Measured single-threaded
// (AVX-512, backward's dh = dG W_hh): K = 4096, 32 rows 234 -> 250 GFLOP/s; K = 2048, 64 rows
// 230 -> 238.
constexpr int64_t kGemmKC = 1024;
constexpr int64_t kGemmMC = 48;

// Vectors of panel p that hold columns below N: kGemmV, or fewer for a last panel partly past N.
template <typename T>
FASTRNN_INLINE int panel_vecs(int64_t N, int64_t p) {
  constexpr int64_t L = Vec<T>::L, NR = kGemmV * L;
  const int64_t nc = N - p * NR < NR ? N - p * NR : NR;
  return int((nc + L - 1) / L);
}

// product_rows on a kGemmV-vector panel's first `vecs` vectors: a last panel partly past N runs
// only its occupied columns (P = 96: 2 panels as 64 + 32 columns, not 128).
template <typename T, int NB, bool Add>
FASTRNN_INLINE void product_vecs(int vecs, const T* A, int64_t lda, int64_t m, int64_t K, const T* W, int64_t ss,
                                 T* C, int64_t ldc) {
  static_assert(kGemmV == 4, "product_vecs handles panels of up to 4 vectors");
  switch (vecs) {
    case 4: product_rows<T, NB, 4, Add>(A, lda, m, K, W, ss, C, ldc); break;
    case 3: product_rows<T, NB, 3, Add, 4>(A, lda, m, K, W, ss, C, ldc); break;
    case 2: product_rows<T, NB, 2, Add, 4>(A, lda, m, K, W, ss, C, ldc); break;
    case 1: product_rows<T, NB, 1, Add, 4>(A, lda, m, K, W, ss, C, ldc); break;
    default: break;
  }
}

template <typename T, int NB>
FASTRNN_INLINE void gemm_impl(const GemmArgs<T>& g, int64_t p0, int64_t p1) {
  constexpr int NR = kGemmV * Vec<T>::L;
  constexpr int64_t SW = int64_t(stripe_vecs(NB, kGemmV)) * Vec<T>::L;  // a stripe's row
  alignas(64) T tile[kGemmMC * NR];
  const int64_t KC = g.K > 2 * kGemmKC ? kGemmKC : g.K, MC = kGemmMC, ss = g.K * SW;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * NR, nc = g.N - c0 < NR ? g.N - c0 : NR;
    const int vecs = panel_vecs<T>(g.N, p);
    const T* panel = g.bp + p * g.K * NR;
    for (int64_t m0 = 0; m0 < g.m; m0 += MC) {
      const int64_t mc = g.m - m0 < MC ? g.m - m0 : MC;
      const T* a = g.a + m0 * g.lda;
      for (int64_t k0 = 0; k0 < g.K; k0 += KC) {
        const int64_t kc = g.K - k0 < KC ? g.K - k0 : KC;
        for (int64_t ib = 0, nb = row_blocks(mc); ib < nb; ++ib) {
          const int64_t i0 = row_block(mc, ib), mr = row_block(mc, ib + 1) - i0;
          const T* ai = a + i0 * g.lda + k0;
          const T* wk = panel + k0 * SW;
          T* ti = tile + i0 * NR;
          if (k0 == 0)
            product_vecs<T, NB, false>(vecs, ai, g.lda, mr, kc, wk, ss, ti, NR);
          else
            product_vecs<T, NB, true>(vecs, ai, g.lda, mr, kc, wk, ss, ti, NR);
        }
      }
      for (int64_t i = 0; i < mc; ++i) {
        T* crow = g.c + (m0 + i) * g.ldc + c0;
        const T* trow = tile + i * NR;
        if (g.accumulate)
          for (int64_t q = 0; q < nc; ++q) crow[q] += trow[q];
        else if (g.bias)
          for (int64_t q = 0; q < nc; ++q) crow[q] = trow[q] + g.bias[c0 + q];
        else
          std::memcpy(crow, trow, sizeof(T) * nc);
      }
    }
  }
}

}  // namespace panel
}  // namespace fastrnn
