// Transposes for the backward's long-K GEMMs (gemm.h's weight_grad), and per-thread scratch
// reused across calls.
//
// oneDNN runs the weight gradients (dG^T X over all rows) at full speed only with both operands
// K-contiguous, so each backward chunk transposes dG, X and h_prev. Element-wise, that transpose
// cost more than the GEMMs' headroom: torch's .t().contiguous() of a 1024x2048 float chunk takes
// ~0.95 ms here against 0.10 ms for a plain copy, and fresh output buffers add their page faults.
// Here the transpose runs in 8x8 register tiles (AVX2 shuffles, 4x4 for double) inside blocks of
// 256 source rows x 16 columns, split over threads, into buffers each thread keeps between calls.
// The block shape matters more than the tiles: the power-of-two row strides of these matrices
// put a square block's rows in one cache set (measured, 1024x2048 float, 2 threads: 64x64
// blocks 0.75 ms, 32x32 0.62 ms, 256x16 0.24 ms).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTRNN_X86_TRANSPOSE 1
#endif

#include "cpu/isa.h"
#include "cpu/workspace.h"

namespace fastrnn {
namespace transpose_detail {

constexpr int64_t kBlockR = 256, kBlockC = 16;

// dst[c * ldd + r] = row(r)[c] over rows [r0, r1), columns [c0, c1); sums[c] += row(r)[c] where
// sums is given.
template <typename T, typename Row>
inline void block_scalar(const Row& row, T* dst, int64_t ldd, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                         T* sums) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = row(r);
    for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[c];
    if (sums)
      for (int64_t c = c0; c < c1; ++c) sums[c] += src[c];
  }
}

#if FASTRNN_X86_TRANSPOSE
// One 8x8 (float) or 4x4 (double) tile: source rows s[i] + c, destination rows d + j * ldd; the
// tile's column sums added to sums[0..8) (or 4) where sums is given.
__attribute__((target("avx2"))) inline void tile(const float* const* s, int64_t c, float* d, int64_t ldd,
                                                 float* sums) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s[i] + c);
  if (sums) {
    const __m256 a = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3]));
    const __m256 b = _mm256_add_ps(_mm256_add_ps(r[4], r[5]), _mm256_add_ps(r[6], r[7]));
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), _mm256_add_ps(a, b)));
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

__attribute__((target("avx2"))) inline void tile(const double* const* s, int64_t c, double* d, int64_t ldd,
                                                 double* sums) {
  const __m256d r0 = _mm256_loadu_pd(s[0] + c), r1 = _mm256_loadu_pd(s[1] + c), r2 = _mm256_loadu_pd(s[2] + c),
                r3 = _mm256_loadu_pd(s[3] + c);
  if (sums)
    _mm256_storeu_pd(sums, _mm256_add_pd(_mm256_loadu_pd(sums),
                                         _mm256_add_pd(_mm256_add_pd(r0, r1), _mm256_add_pd(r2, r3))));
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
                t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(d + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(d + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(d + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}

template <typename T, typename Row>
__attribute__((target("avx2"))) void block_avx2(const Row& row, T* dst, int64_t ldd, int64_t r0, int64_t r1,
                                                int64_t c0, int64_t c1, T* sums) {
  constexpr int64_t V = 32 / sizeof(T);
  const int64_t rv = r0 + (r1 - r0) / V * V, cv = c0 + (c1 - c0) / V * V;
  const T* rows[V];
  for (int64_t r = r0; r < rv; r += V) {
    for (int64_t i = 0; i < V; ++i) rows[i] = row(r + i);
    for (int64_t c = c0; c < cv; c += V) tile(rows, c, dst + c * ldd + r, ldd, sums ? sums + c : nullptr);
  }
  block_scalar<T>(row, dst, ldd, rv, r1, c0, c1, sums);
  block_scalar<T>(row, dst, ldd, r0, rv, cv, c1, sums);
}

inline bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

}  // namespace transpose_detail

// dst [C, R] (row stride ldd) = X^T for X [R, C] given by its rows: row(r) points at row r's C
// contiguous elements (rows may lie anywhere: the h_prev of a packed batch is gathered as it is
// transposed). Split over threads. The baseline ISA (FASTRNN_FORCE_GENERIC_ISA) and non-x86
// builds take the scalar blocks. colsum (or null): colsum[c] += the sum of X's column c, from
// the loads the transpose makes anyway (the backward's bias gradients: a separate pass over
// dG's 8 MB chunk took 4.4 ms of a training call at T=100, B=64, I=H=512), summed per share of
// the rows and the shares in order, so a result does not depend on which thread ran first.
template <typename T, typename Row>
void transpose_rows_into(const Row& row, int64_t R, int64_t C, T* dst, int64_t ldd, T* colsum = nullptr) {
  using namespace transpose_detail;
  if (R <= 0 || C <= 0) return;
  const int64_t rb = (R + kBlockR - 1) / kBlockR, cb = (C + kBlockC - 1) / kBlockC, nb = rb * cb;
#if FASTRNN_X86_TRANSPOSE
  const bool vec = have_avx2() && isa_override() != IsaOverride::Baseline;
#else
  const bool vec = false;
#endif
  // ~256 KB of a chunk per share: a thread pays off only for a few blocks.
  const int64_t grain = std::max<int64_t>(1, (int64_t(256) << 10) / (kBlockR * kBlockC * int64_t(sizeof(T))));
  const int64_t shares = std::clamp<int64_t>((nb + grain - 1) / grain, 1, std::max(1, at::get_num_threads()));
  std::vector<T> part(colsum ? size_t(shares * C) : 0, T(0));
  at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t sh = s0; sh < s1; ++sh) {
      T* sums = colsum ? part.data() + sh * C : nullptr;
      for (int64_t b = nb * sh / shares; b < nb * (sh + 1) / shares; ++b) {
        const int64_t r0 = (b / cb) * kBlockR, c0 = (b % cb) * kBlockC;
        const int64_t r1 = std::min(R, r0 + kBlockR), c1 = std::min(C, c0 + kBlockC);
#if FASTRNN_X86_TRANSPOSE
        if (vec) {
          block_avx2<T>(row, dst, ldd, r0, r1, c0, c1, sums);
          continue;
        }
#endif
        block_scalar<T>(row, dst, ldd, r0, r1, c0, c1, sums);
      }
    }
  });
  if (colsum)
    for (int64_t sh = 0; sh < shares; ++sh)
      for (int64_t c = 0; c < C; ++c) colsum[c] += part[sh * C + c];
}

// dst [C, R] (row stride ldd) = src [R, C] (row stride lds)^T.
template <typename T>
void transpose_into(const T* src, int64_t R, int64_t C, int64_t lds, T* dst, int64_t ldd) {
  transpose_rows_into<T>([src, lds](int64_t r) { return src + r * lds; }, R, C, dst, ldd);
}

// ---------------------------------------------------------------------------------------
// Scratch: buffers a thread keeps between calls, one per slot, grown as needed. A backward call
// of fastrnns-default size touches ~20 MB of temporaries a chunk; taken fresh, each costs its
// page faults again on every call. A slot's buffer is handed out as a tensor sharing its storage,
// so a caller that still holds it when the slot grows keeps the old buffer alive (never a
// dangling pointer); a thread reusing a slot while an earlier tensor from it is in use is a bug.
// Buffers above kScratchMaxBytes are not kept (allocated fresh each time), so a thread keeps at
// most kSlots * kScratchMaxBytes.
// ---------------------------------------------------------------------------------------
enum ScratchSlot : int { kScratchDgx, kScratchDgh, kScratchHprev, kScratchDgT, kScratchXT, kScratchHT, kSlots };
constexpr size_t kScratchMaxBytes = size_t(32) << 20;

inline at::Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local std::array<at::Tensor, kSlots> bufs;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const auto dtype = c10::typeMetaToScalarType(opts.dtype());
  const size_t bytes = size_t(numel) * c10::elementSize(dtype);
  if (bytes > kScratchMaxBytes || !opts.device().is_cpu()) return empty_big(sizes, opts);
  at::Tensor& buf = bufs[slot];
  if (!buf.defined() || size_t(buf.nbytes()) < bytes) {
    // Round up so a slightly larger next call does not reallocate.
    const size_t cap = std::min(kScratchMaxBytes, std::max<size_t>(bytes + bytes / 4, 4096));
    buf = empty_big({int64_t(cap)}, opts.dtype(at::kByte));
  }
  return buf.narrow(0, 0, int64_t(bytes)).view(dtype).view(sizes);
}

// a [R, C] (rows contiguous) -> a^T [C, R], contiguous: in the given scratch slot, or (kSlots)
// a tensor of its own; colsum (or null) += a's column sums (transpose_rows_into).
template <typename T>
at::Tensor transposed(const at::Tensor& a, ScratchSlot slot = kSlots, T* colsum = nullptr) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && a.stride(1) == 1);
  const int64_t R = a.size(0), C = a.size(1);
  at::Tensor out = slot == kSlots ? empty_big({C, R}, a.options()) : scratch(slot, {C, R}, a.options());
  const T* src = a.data_ptr<T>();
  const int64_t lds = a.stride(0);
  transpose_rows_into<T>([src, lds](int64_t r) { return src + r * lds; }, R, C, out.data_ptr<T>(), R, colsum);
  return out;
}

}  // namespace fastrnn
