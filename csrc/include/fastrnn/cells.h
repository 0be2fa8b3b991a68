// Framework-free pointwise math of the recurrent cells: one batch row per call.
//
// No torch headers here: this file compiles on its own (and with nvcc), so a kernel
// backend only has to supply the GEMMs around it. Shapes are per row; H = hidden size.
// "xg" is the input projection W_ih x (+ biases that can be folded in), "hg" the
// recurrent product W_hh h of the same step. Gate order follows torch.nn.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define FASTRNN_RESTRICT __restrict__
#define FASTRNN_INLINE inline __attribute__((always_inline))
#else
#define FASTRNN_RESTRICT
#define FASTRNN_INLINE inline
#endif

namespace fastrnn {
namespace math {

// The float math below is written once for a float and for a GCC vector of floats (F): the
// LSTM row runs either as a loop the compiler vectorises, or a whole vector of units at a time
// (the fused CPU kernel's panels), with the same operations in the same order either way.
// splat(F, s): s as an F; pow2(n): 2^n for integral-valued n in float's exponent range.
FASTRNN_INLINE float splat(float, float s) { return s; }
FASTRNN_INLINE float pow2(float n) {
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}
#if defined(__GNUC__) && !defined(__CUDACC__)
template <typename F>
FASTRNN_INLINE F splat(F, float s) {
  return F{} + s;
}
template <typename F>
FASTRNN_INLINE F pow2(F n) {
  typedef int32_t I __attribute__((vector_size(sizeof(F))));
  I bits = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}
#endif

// Branch-free float exp (Cephes polynomial, ~1 ulp on the clamped range) so that the
// gate loops vectorise; std::exp calls do not. Past float's range it is inf, as std::exp:
// sigmoid(-inf) must be exactly 0, or a state that overflowed to inf gives 1e-38 * inf = inf
// where torch.nn gives 0 * inf = NaN.
template <typename F>
FASTRNN_INLINE F exp_approx(F x) {
  const auto overflow = x > 88.7228391f;
  x = x < -87.3f ? splat(x, -87.3f) : (x > 88.3f ? splat(x, 88.3f) : x);
  // round-to-nearest of x*log2(e) with the 1.5*2^23 trick (no libm call).
  const float magic = 12582912.0f;
  F n = (x * 1.44269504088896341f + magic) - magic;
  F r = x - n * 0.693359375f - n * -2.12194440e-4f;
  F p = splat(x, 1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return overflow ? splat(x, HUGE_VALF) : p * pow2(n);
}

template <typename F>
FASTRNN_INLINE F sigmoid(F x) {
  return 1.0f / (1.0f + exp_approx(-x));
}

// A rational minimax form, p(x) / q(x) with p odd of degree 13 and q even of degree 6 (the
// coefficients of Eigen's fast float tanh); below |x| = 4e-4, tanh(x) rounds to x itself, and
// from |x| = 7.9 on the result is exactly +-1. (float32's tanh is within an ulp of 1 there and
// rounds to 1 from 9.01, where p / q stayed a few ulp below, 0.99999976 with FMAs: a saturated
// LSTM gate's gradient 1 - tanh^2 did not vanish as torch's does, and an infinite input gave inf
// where torch gives NaN; found by a fuzzing helper.) Measured over every float to 20: within
// 4.9 ulp of tanh (2.9e-7 relative) where FMAs contract it, 6.9 ulp (4.1e-7) without. The exp
// form it replaced (5.4 ulp) needed a division and a Taylor branch near 0 for relative accuracy;
// this is half the work: an LSTM step's gate math went from ~150 to ~105 cycles a vector of
// units (AMD Zen 4). NaN passes through (the comparisons are false).
template <typename F>
FASTRNN_INLINE F tanh(F a) {
  constexpr float kClamp = 7.90531110763549805f;
  F x = a > kClamp ? splat(a, kClamp) : a;
  x = x < -kClamp ? splat(a, -kClamp) : x;
  const F x2 = x * x;
  F p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  F q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  const F ax = a < 0.0f ? -a : a;
  F r = ax < 0.0004f ? a : p / q;
  r = a >= kClamp ? splat(a, 1.0f) : r;
  return a <= -kClamp ? splat(a, -1.0f) : r;
}

FASTRNN_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FASTRNN_INLINE double tanh(double x) { return std::tanh(x); }

// NaN passes through, as in torch.relu (x > 0 ? x : 0 would turn it into 0).
template <typename T>
FASTRNN_INLINE T relu(T x) {
  return x < T(0) ? T(0) : x;
}

}  // namespace math

enum class Nonlinearity : int { Tanh = 0, Relu = 1 };

// ---------------------------------------------------------------------------------------
// LSTM. Gate order i, f, g, o. n units of one row.
//   xg: W_ih x + b_ih + b_hh, gate k of unit j at xg[k*xs + j]
//   hg: W_hh h, gate k of unit j at hg[k*hs + j]
//   c [n]: in c_{t-1}, out c_t      r [n]: out o * tanh(c_t)  (h_t, or the input of W_hr)
//   gates (gate k at gates[k*gs + j]), cell [n]: activations saved for backward (only when Save)
// ---------------------------------------------------------------------------------------
// V = T: one unit per iteration (a loop the compiler vectorises); V = a vector of L floats: L
// units per iteration, n a multiple of L (the fused kernel's full panels).
template <typename V, typename T>
FASTRNN_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
FASTRNN_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

template <bool Save, typename T, typename V = T>
FASTRNN_INLINE void lstm_forward_row(int64_t n, const T* FASTRNN_RESTRICT xg, int64_t xs,
                                     const T* FASTRNN_RESTRICT hg, int64_t hs, T* FASTRNN_RESTRICT c,
                                     T* FASTRNN_RESTRICT r, T* FASTRNN_RESTRICT gates, int64_t gs,
                                     T* FASTRNN_RESTRICT cell) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  for (int64_t j = 0; j < n; j += L) {
    V i = math::sigmoid(load<V>(xg + j) + load<V>(hg + j));
    V f = math::sigmoid(load<V>(xg + xs + j) + load<V>(hg + hs + j));
    V g = math::tanh(load<V>(xg + 2 * xs + j) + load<V>(hg + 2 * hs + j));
    V o = math::sigmoid(load<V>(xg + 3 * xs + j) + load<V>(hg + 3 * hs + j));
    V cn = f * load<V>(c + j) + i * g;
    store(c + j, cn);
    store(r + j, o * math::tanh(cn));
    if (Save) {
      store(gates + j, i);
      store(gates + gs + j, f);
      store(gates + 2 * gs + j, g);
      store(gates + 3 * gs + j, o);
      store(cell + j, cn);
    }
  }
}

//   gates [4H], cell [H] c_t, cell_prev [H] c_{t-1}: saved by forward
//   dr [H]: dL/d(o * tanh(c_t))      dc [H]: in dL/dc_t from step t+1, out dL/dc_{t-1}
//   dg [4H]: out dL/d(pre-activation gates)
template <typename T>
FASTRNN_INLINE void lstm_backward_row(int64_t H, const T* FASTRNN_RESTRICT gates, const T* FASTRNN_RESTRICT cell,
                                      const T* FASTRNN_RESTRICT cell_prev, const T* FASTRNN_RESTRICT dr,
                                      T* FASTRNN_RESTRICT dc, T* FASTRNN_RESTRICT dg) {
  for (int64_t j = 0; j < H; ++j) {
    T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    T tc = math::tanh(cell[j]);
    T dcc = dc[j] + dr[j] * o * (T(1) - tc * tc);
    dg[j] = dcc * g * i * (T(1) - i);
    dg[H + j] = dcc * cell_prev[j] * f * (T(1) - f);
    dg[2 * H + j] = dcc * i * (T(1) - g * g);
    dg[3 * H + j] = dr[j] * tc * o * (T(1) - o);
    dc[j] = dcc * f;
  }
}

// ---------------------------------------------------------------------------------------
// GRU. Gate order r, z, n. n units of one row.
//   xg: W_i x + b_i with b_hr and b_hz folded in, gate k at xg[k*xs + j]
//   hg: W_h h (no bias), gate k at hg[k*hs + j]      b_hn [n] or null
//   h_prev [n], h_out [n]: h_{t-1} and h_t (may be the same memory)
//   gates (k*gs + j) r, z, n and hn_out [n] (W_hn h + b_hn): saved for backward when Save
// ---------------------------------------------------------------------------------------
// V: as lstm_forward_row's (a GCC vector of T, n_units a multiple of its lanes; the same
// formulas on vectors).
template <bool Save, typename T, typename V = T>
FASTRNN_INLINE void gru_forward_row(int64_t n_units, const T* FASTRNN_RESTRICT xg, int64_t xs,
                                    const T* FASTRNN_RESTRICT hg, int64_t hs, const T* FASTRNN_RESTRICT b_hn,
                                    const T* h_prev, T* h_out, T* FASTRNN_RESTRICT gates, int64_t gs,
                                    T* FASTRNN_RESTRICT hn_out) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  for (int64_t j = 0; j < n_units; j += L) {
    V r = math::sigmoid(load<V>(xg + j) + load<V>(hg + j));
    V z = math::sigmoid(load<V>(xg + xs + j) + load<V>(hg + hs + j));
    V hn = load<V>(hg + 2 * hs + j) + (b_hn ? load<V>(b_hn + j) : V{});
    V n = math::tanh(load<V>(xg + 2 * xs + j) + r * hn);
    store(h_out + j, (T(1) - z) * n + z * load<V>(h_prev + j));
    if (Save) {
      store(gates + j, r);
      store(gates + gs + j, z);
      store(gates + 2 * gs + j, n);
      store(hn_out + j, hn);
    }
  }
}

//   dh [H]: in dL/dh_t; out the direct part of dL/dh_{t-1} (z * dh), the W_hh part is added by GEMM
//   dgx [3H]: dL/d(input-side pre-activations)    dgh [3H]: dL/d(W_h h + b_h)
template <typename T>
FASTRNN_INLINE void gru_backward_row(int64_t H, const T* FASTRNN_RESTRICT gates, const T* FASTRNN_RESTRICT hn,
                                     const T* FASTRNN_RESTRICT h_prev, T* FASTRNN_RESTRICT dh,
                                     T* FASTRNN_RESTRICT dgx, T* FASTRNN_RESTRICT dgh) {
  for (int64_t j = 0; j < H; ++j) {
    T r = gates[j], z = gates[H + j], n = gates[2 * H + j];
    T d = dh[j];
    T dn = d * (T(1) - z) * (T(1) - n * n);
    T dz = d * (h_prev[j] - n) * z * (T(1) - z);
    T dr = dn * hn[j] * r * (T(1) - r);
    dgx[j] = dr;
    dgx[H + j] = dz;
    dgx[2 * H + j] = dn;
    dgh[j] = dr;
    dgh[H + j] = dz;
    dgh[2 * H + j] = dn * r;
    dh[j] = d * z;
  }
}

// ---------------------------------------------------------------------------------------
// Elman RNN: h_t = act(xg + hg), xg [H] with both biases folded in; h may alias hg.
// ---------------------------------------------------------------------------------------
// V: as lstm_forward_row's, for tanh (relu's loop is the compiler's to vectorise).
template <typename T, typename V = T>
FASTRNN_INLINE void rnn_forward_row(int64_t H, Nonlinearity act, const T* FASTRNN_RESTRICT xg, const T* hg, T* h) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  if (act == Nonlinearity::Tanh) {
    for (int64_t j = 0; j < H; j += L) store(h + j, math::tanh(load<V>(xg + j) + load<V>(hg + j)));
  } else {
    for (int64_t j = 0; j < H; ++j) h[j] = math::relu(xg[j] + hg[j]);
  }
}

//   h [H]: h_t (the layer output)    dh [H]: dL/dh_t    dg [H]: out dL/d(pre-activation)
template <typename T>
FASTRNN_INLINE void rnn_backward_row(int64_t H, Nonlinearity act, const T* FASTRNN_RESTRICT h,
                                     const T* FASTRNN_RESTRICT dh, T* FASTRNN_RESTRICT dg) {
  if (act == Nonlinearity::Tanh) {
    for (int64_t j = 0; j < H; ++j) dg[j] = dh[j] * (T(1) - h[j] * h[j]);
  } else {
    // torch's relu backward (threshold_backward): zero where h <= 0, so a NaN h passes dh on
    for (int64_t j = 0; j < H; ++j) dg[j] = h[j] <= T(0) ? T(0) : dh[j];
  }
}

}  // namespace fastrnn
