// Framework-free pointwise math of the attention kernels: softmax rows and the additive
// (Bahdanau) energy and its gradient, over raw pointers.
//
// No torch headers here, like cells.h: the CPU backend supplies the GEMMs and the threading.
// Shapes are per call; D = hidden size of the additive projection, n = keys in a row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fastrnn/cells.h"

namespace fastrnn {
namespace attn {

// exp that is exactly 0 for x below float's range (so masked -inf scores contribute nothing,
// not exp_approx's clamped 1e-38), branch-free so the loops vectorise.
FASTRNN_INLINE float exp_flush(float x) {
  float r = math::exp_approx(x);
  return x < -87.3f ? 0.0f : r;
}
FASTRNN_INLINE double exp_flush(double x) { return std::exp(x); }

template <typename T>
FASTRNN_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Reductions run in kLanes partial results so the loops vectorise: a plain `sum += x` loop is
// a serial dependency GCC may not reorder (no -ffast-math here).
constexpr int kLanes = 16;

// The largest of s[0, n) (-inf for n = 0).
template <typename T>
FASTRNN_INLINE T row_max(const T* FASTRNN_RESTRICT s, int64_t n) {
  T part[kLanes];
  for (int w = 0; w < kLanes; ++w) part[w] = neg_inf<T>();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int w = 0; w < kLanes; ++w) part[w] = s[c + w] > part[w] ? s[c + w] : part[w];
  for (; c < n; ++c) part[0] = s[c] > part[0] ? s[c] : part[0];
  T m = part[0];
  for (int w = 1; w < kLanes; ++w) m = part[w] > m ? part[w] : m;
  return m;
}

// s[c] = exp(s[c] - m) in place; returns the sum. m must be finite.
template <typename T>
FASTRNN_INLINE T exp_shift_sum(T* FASTRNN_RESTRICT s, int64_t n, T m) {
  T part[kLanes];
  for (int w = 0; w < kLanes; ++w) part[w] = T(0);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int w = 0; w < kLanes; ++w) {
      T e = exp_flush(s[c + w] - m);
      s[c + w] = e;
      part[w] += e;
    }
  for (; c < n; ++c) {
    T e = exp_flush(s[c] - m);
    s[c] = e;
    part[0] += e;
  }
  T sum = T(0);
  for (int w = 0; w < kLanes; ++w) sum += part[w];
  return sum;
}

// s[c] = exp(s[c] - lse) in place (the probabilities of a row whose log-sum-exp is known);
// lse = +inf marks a row with every key masked: all zeros.
template <typename T>
FASTRNN_INLINE void exp_minus_lse(T* FASTRNN_RESTRICT s, int64_t n, T lse) {
  if (!(lse < std::numeric_limits<T>::infinity())) {
    for (int64_t c = 0; c < n; ++c) s[c] = T(0);
    return;
  }
  for (int64_t c = 0; c < n; ++c) s[c] = exp_flush(s[c] - lse);
}

// ds[c] = p[c] * (dp[c] - delta): the softmax backward of one row (delta = sum_c p dp).
template <typename T>
FASTRNN_INLINE void softmax_grad_row(const T* FASTRNN_RESTRICT p, T* FASTRNN_RESTRICT dp, int64_t n, T delta) {
  for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
}

// Softmax of one row in place with fully masked rows (max = -inf) set to zeros. A row of NaN
// (a NaN query or scale) has no max either: it stays NaN, as torch's softmax gives (a NaN
// among finite entries makes the sum NaN below).
template <typename T>
FASTRNN_INLINE void softmax_row(T* FASTRNN_RESTRICT s, int64_t n) {
  T m = row_max(s, n);
  if (m == neg_inf<T>()) {
    bool nan = false;
    for (int64_t c = 0; c < n; ++c) nan |= s[c] != s[c];
    const T fill = nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
    for (int64_t c = 0; c < n; ++c) s[c] = fill;
    return;
  }
  T inv = T(1) / exp_shift_sum(s, n, m);
  for (int64_t c = 0; c < n; ++c) s[c] *= inv;
}

// sum_c a[c] * b[c], in kLanes partial sums.
template <typename T>
FASTRNN_INLINE T dot(const T* FASTRNN_RESTRICT a, const T* FASTRNN_RESTRICT b, int64_t n) {
  T part[kLanes];
  for (int w = 0; w < kLanes; ++w) part[w] = T(0);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int w = 0; w < kLanes; ++w) part[w] += a[c + w] * b[c + w];
  for (; c < n; ++c) part[0] += a[c] * b[c];
  T sum = T(0);
  for (int w = 0; w < kLanes; ++w) sum += part[w];
  return sum;
}

// ---------------------------------------------------------------------------------------
// Additive energies of R query rows against one key:
//   e[r] = sum_d v[d] * tanh(q[r][d] + k[d])
//   q[r] [D] (the query projection plus bias), k [D] (the key projection), v [D].
// Partial sums run in kLanes lanes, as in the reductions above.
// ---------------------------------------------------------------------------------------

template <typename T, int R>
FASTRNN_INLINE void additive_energies(const T* const* q, const T* FASTRNN_RESTRICT k, const T* FASTRNN_RESTRICT v,
                                      int64_t D, T* e) {
  T acc[R][kLanes];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < kLanes; ++w) acc[r][w] = T(0);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int r = 0; r < R; ++r) {
      const T* FASTRNN_RESTRICT qr = q[r] + d;
      for (int w = 0; w < kLanes; ++w) acc[r][w] += v[d + w] * math::tanh(qr[w] + k[d + w]);
    }
  }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r) acc[r][0] += v[d] * math::tanh(q[r][d] + k[d]);
  for (int r = 0; r < R; ++r) {
    T s = T(0);
    for (int w = 0; w < kLanes; ++w) s += acc[r][w];
    e[r] = s;
  }
}

// Gradient of the additive energies of R query rows against one key, recomputing tanh:
//   with t = tanh(q[r][d] + k[d]) and u = g[r] * v[d] * (1 - t^2):
//   dq[r][d] += u, dk[d] += sum_r u, dv[d] += sum_r g[r] * t.
// g[r] = dL/de of (row r, this key), already multiplied by the energy scale.
template <typename T, int R>
FASTRNN_INLINE void additive_energies_grad(const T* const* q, const T* FASTRNN_RESTRICT k,
                                           const T* FASTRNN_RESTRICT v, const T* g, int64_t D, T* const* dq,
                                           T* FASTRNN_RESTRICT dk, T* FASTRNN_RESTRICT dv) {
  T gr[R];
  for (int r = 0; r < R; ++r) gr[r] = g[r];
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    const int64_t n = D - d0 < kLanes ? D - d0 : kLanes;
    if (n == kLanes) {
      T dks[kLanes], dvs[kLanes];
      for (int w = 0; w < kLanes; ++w) dks[w] = dvs[w] = T(0);
      for (int r = 0; r < R; ++r) {
        const T* FASTRNN_RESTRICT qr = q[r] + d0;
        T* FASTRNN_RESTRICT dqr = dq[r] + d0;
        for (int w = 0; w < kLanes; ++w) {
          T t = math::tanh(qr[w] + k[d0 + w]);
          T u = gr[r] * v[d0 + w] * (T(1) - t * t);
          dqr[w] += u;
          dks[w] += u;
          dvs[w] += gr[r] * t;
        }
      }
      for (int w = 0; w < kLanes; ++w) {
        dk[d0 + w] += dks[w];
        dv[d0 + w] += dvs[w];
      }
    } else {
      for (int64_t d = d0; d < D; ++d)
        for (int r = 0; r < R; ++r) {
          T t = math::tanh(q[r][d] + k[d]);
          T u = gr[r] * v[d] * (T(1) - t * t);
          dq[r][d] += u;
          dk[d] += u;
          dv[d] += gr[r] * t;
        }
    }
  }
}

}  // namespace attn
}  // namespace fastrnn
