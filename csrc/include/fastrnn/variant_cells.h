// Framework-free pointwise math of the variant cells (../shared/SEMANTICS.md, "Variants"):
// LayerNorm LSTM / GRU, peephole LSTM and zoneout, one batch row per call. No torch headers.
//
// H = hidden size, G = gates (4 LSTM: i, f, g, o; 3 GRU: r, z, n), GH = G*H.
// "xg" [GH] is W_ih x of the row and "hg" [GH] is W_hh h (no biases in either).
// Zoneout: `keep` [S*H] (S = 2 for the LSTM: h then c; 1 for the GRU) holds d, 1 where the unit
// keeps its previous value (a training mask), or the constant p (eval), or 0 (no zoneout):
// state' = d*state + (1-d)*candidate, in that form so that a kept unit is bit-identical to its
// previous value and d = 0 gives the candidate exactly. Always given: no branch in the loops.
// Biases (bias_x, bias_h) are always given too (zeros when the layer has none).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastrnn/cells.h"

namespace fastrnn {

// nn.LayerNorm's default.
constexpr double kLayerNormEps = 1e-5;

template <typename T>
struct VariantParams {
  int64_t H = 0;
  const T* lnx_w = nullptr;  // [GH] LN gain/bias over W_ih x (null without LayerNorm)
  const T* lnx_b = nullptr;
  const T* lnh_w = nullptr;  // [GH] LN over W_hh h
  const T* lnh_b = nullptr;
  const T* lnc_w = nullptr;  // [H] LN over the new cell before tanh (LSTM)
  const T* lnc_b = nullptr;
  const T* bias_x = nullptr;  // [GH] LSTM: b_ih + b_hh; GRU: b_ih (null without biases)
  const T* bias_h = nullptr;  // [GH] GRU: b_hh
  const T* peep = nullptr;    // [3H] w_ci, w_cf, w_co (peephole LSTM)
  T eps = T(kLayerNormEps);
};

namespace vdetail {

// Sums with 16 independent partial sums, so the loops vectorise without -ffast-math.
template <typename T>
FASTRNN_INLINE T sum(int64_t n, const T* FASTRNN_RESTRICT x) {
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) acc[k] += x[j + k];
  T s = 0;
  for (; j < n; ++j) s += x[j];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

template <typename T>
FASTRNN_INLINE T dot(int64_t n, const T* FASTRNN_RESTRICT x, const T* FASTRNN_RESTRICT y) {
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) acc[k] += x[j + k] * y[j + k];
  T s = 0;
  for (; j < n; ++j) s += x[j] * y[j];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// Biased variance, two passes (as torch's layer_norm: no cancellation).
template <typename T>
FASTRNN_INLINE void moments(int64_t n, const T* FASTRNN_RESTRICT x, T eps, T& mean, T& rstd) {
  mean = sum(n, x) / T(n);
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) {
      T d = x[j + k] - mean;
      acc[k] += d * d;
    }
  T v = 0;
  for (; j < n; ++j) v += (x[j] - mean) * (x[j] - mean);
  for (int k = 0; k < 16; ++k) v += acc[k];
  rstd = T(1) / std::sqrt(v / T(n) + eps);
}

// dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)) with dxh = dy * w: LayerNorm's input
// gradient given the normalised values xh. dx may alias dy.
template <typename T>
FASTRNN_INLINE void layer_norm_backward(int64_t n, const T* dy, const T* FASTRNN_RESTRICT w,
                                        const T* FASTRNN_RESTRICT xh, T rstd, T* dx) {
  T a[16] = {}, b[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) {
      T d = dy[j + k] * w[j + k];
      a[k] += d;
      b[k] += d * xh[j + k];
    }
  T s1 = 0, s2 = 0;
  for (; j < n; ++j) {
    T d = dy[j] * w[j];
    s1 += d;
    s2 += d * xh[j];
  }
  for (int k = 0; k < 16; ++k) {
    s1 += a[k];
    s2 += b[k];
  }
  const T m1 = s1 / T(n), m2 = s2 / T(n);
  for (j = 0; j < n; ++j) dx[j] = rstd * (dy[j] * w[j] - m1 - xh[j] * m2);
}

// pre = LN_x(xg) + LN_h(hg) (+ bias_x + bias_h) or xg + hg (+ biases), per gate element;
// with Split the two sides go to pre (x side) and pre + GH (h side) apart (the GRU needs W_hn h).
template <bool Save, bool LN, bool Split, typename T>
FASTRNN_INLINE void gate_inputs(const VariantParams<T>& p, int64_t GH, const T* FASTRNN_RESTRICT xg,
                                const T* FASTRNN_RESTRICT hg, T* FASTRNN_RESTRICT pre, T* FASTRNN_RESTRICT xhat,
                                T* FASTRNN_RESTRICT hhat, T* FASTRNN_RESTRICT stats) {
  T* preh = Split ? pre + GH : pre;
  if constexpr (LN) {
    T mx, rx, mh, rh;
    moments(GH, xg, p.eps, mx, rx);
    moments(GH, hg, p.eps, mh, rh);
    for (int64_t k = 0; k < GH; ++k) {
      const T a = (xg[k] - mx) * rx, b = (hg[k] - mh) * rh;
      if (Save) {
        xhat[k] = a;
        hhat[k] = b;
      }
      const T vx = a * p.lnx_w[k] + p.lnx_b[k] + p.bias_x[k];
      const T vh = b * p.lnh_w[k] + p.lnh_b[k] + p.bias_h[k];
      if (Split) {
        pre[k] = vx;
        preh[k] = vh;
      } else {
        pre[k] = vx + vh;
      }
    }
    if (Save) {
      stats[0] = rx;
      stats[1] = rh;
    }
  } else {
    for (int64_t k = 0; k < GH; ++k) {
      const T vx = xg[k] + p.bias_x[k];
      const T vh = hg[k] + p.bias_h[k];
      if (Split) {
        pre[k] = vx;
        preh[k] = vh;
      } else {
        pre[k] = vx + vh;
      }
    }
  }
}

}  // namespace vdetail

// ---------------------------------------------------------------------------------------
// Variant LSTM, one row. h [H], c [H]: in h_{t-1}, c_{t-1}; out h_t, c_t (in place).
//   scratch [5H]: pre-activations (4H) and the new candidate cell c' (H)
//   Save: gates [4H] i, f, g, o (activations); cells [H] c_t (carried, after zoneout);
//         xhat [4H], hhat [4H], chat [H] normalised values and stats [3] their 1/std (LN only)
// ---------------------------------------------------------------------------------------
template <bool Save, bool LN, bool Peep, typename T>
FASTRNN_INLINE void vlstm_forward_row(const VariantParams<T>& p, const T* FASTRNN_RESTRICT xg,
                                      const T* FASTRNN_RESTRICT hg, T* FASTRNN_RESTRICT h, T* FASTRNN_RESTRICT c,
                                      const T* FASTRNN_RESTRICT keep, T* FASTRNN_RESTRICT scratch,
                                      T* FASTRNN_RESTRICT gates, T* FASTRNN_RESTRICT cells, T* FASTRNN_RESTRICT xhat,
                                      T* FASTRNN_RESTRICT hhat, T* FASTRNN_RESTRICT chat, T* FASTRNN_RESTRICT stats) {
  const int64_t H = p.H, GH = 4 * H;
  T* pre = scratch;
  T* cn = scratch + GH;
  vdetail::gate_inputs<Save, LN, false, T>(p, GH, xg, hg, pre, xhat, hhat, stats);
  for (int64_t j = 0; j < H; ++j) {
    const T cp = c[j];
    const T i = math::sigmoid(pre[j] + (Peep ? p.peep[j] * cp : T(0)));
    const T f = math::sigmoid(pre[H + j] + (Peep ? p.peep[H + j] * cp : T(0)));
    const T g = math::tanh(pre[2 * H + j]);
    cn[j] = f * cp + i * g;
    if (Save) {
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
    }
  }
  T mc = 0, rc = 1;
  if (LN) {
    vdetail::moments(H, cn, p.eps, mc, rc);
    if (Save) stats[2] = rc;
  }
  for (int64_t j = 0; j < H; ++j) {
    const T cc = cn[j];
    T y = cc;
    if (LN) {
      const T ch = (cc - mc) * rc;
      if (Save) chat[j] = ch;
      y = ch * p.lnc_w[j] + p.lnc_b[j];
    }
    const T o = math::sigmoid(pre[3 * H + j] + (Peep ? p.peep[2 * H + j] * cc : T(0)));
    const T ht = o * math::tanh(y);
    if (Save) gates[3 * H + j] = o;
    const T kh = keep[j], kc = keep[H + j];
    const T hn = kh * h[j] + (T(1) - kh) * ht;
    const T cnew = kc * c[j] + (T(1) - kc) * cc;
    h[j] = hn;
    c[j] = cnew;
    if (Save) cells[j] = cnew;
  }
}

// Backward of one row of one step.
//   gates [4H], cprev [H] (c_{t-1} as carried), xhat/hhat/chat/stats: saved by the forward
//   dh [H]: in dL/dh_t; out the part of dL/dh_{t-1} that bypasses W_hh (zoneout's d * dh)
//   dc [H]: in dL/dc_t; out dL/dc_{t-1}
//   dp [4H]: out dL/d(pre-activations) (= dL/d(LN_x out) = dL/d(LN_h out) = dL/d(biases))
//   dhg [4H]: out dL/d(W_hh h) (LN only; without LN it is dp)
//   dyc [H]: out dL/d(LN_c out) (LN only)     dpeep [3H]: out this row's peephole gradients
//   scratch [H]
template <bool LN, bool Peep, typename T>
FASTRNN_INLINE void vlstm_backward_row(const VariantParams<T>& p, const T* FASTRNN_RESTRICT gates,
                                       const T* FASTRNN_RESTRICT cprev, const T* FASTRNN_RESTRICT hhat,
                                       const T* FASTRNN_RESTRICT chat, const T* FASTRNN_RESTRICT stats,
                                       const T* FASTRNN_RESTRICT keep, T* FASTRNN_RESTRICT dh,
                                       T* FASTRNN_RESTRICT dc, T* FASTRNN_RESTRICT dp, T* FASTRNN_RESTRICT dhg,
                                       T* FASTRNN_RESTRICT dyc, T* FASTRNN_RESTRICT dpeep,
                                       T* FASTRNN_RESTRICT scratch) {
  const int64_t H = p.H, GH = 4 * H;
  T* dcn = scratch;
  for (int64_t j = 0; j < H; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const T cc = f * cprev[j] + i * g;
    const T y = LN ? chat[j] * p.lnc_w[j] + p.lnc_b[j] : cc;
    const T ty = math::tanh(y);
    const T kh = keep[j];
    const T dht = (T(1) - kh) * dh[j];
    dp[3 * H + j] = dht * ty * o * (T(1) - o);
    const T dy = dht * o * (T(1) - ty * ty);
    if (LN) dyc[j] = dy;
    dcn[j] = dy;
  }
  if (LN) vdetail::layer_norm_backward(H, dcn, p.lnc_w, chat, stats[2], dcn);
  for (int64_t j = 0; j < H; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j];
    const T cp = cprev[j], dct = dc[j];
    const T kh = keep[j], kc = keep[H + j];
    const T dop = dp[3 * H + j];
    const T dcc = dcn[j] + (T(1) - kc) * dct + (Peep ? dop * p.peep[2 * H + j] : T(0));
    const T di = dcc * g * i * (T(1) - i);
    const T df = dcc * cp * f * (T(1) - f);
    dp[j] = di;
    dp[H + j] = df;
    dp[2 * H + j] = dcc * i * (T(1) - g * g);
    dc[j] = dcc * f + kc * dct + (Peep ? di * p.peep[j] + df * p.peep[H + j] : T(0));
    if (Peep) {
      dpeep[j] = di * cp;
      dpeep[H + j] = df * cp;
      dpeep[2 * H + j] = dop * (f * cp + i * g);
    }
    dh[j] = kh * dh[j];
  }
  if (LN) vdetail::layer_norm_backward(GH, dp, p.lnh_w, hhat, stats[1], dhg);
}

// ---------------------------------------------------------------------------------------
// Variant GRU, one row. h [H]: in h_{t-1}, out h_t (in place).
//   scratch [6H]: input-side and hidden-side pre-activations
//   Save: gates [3H] r, z, n; hn [H] the hidden-side n input (multiplied by r);
//         xhat [3H], hhat [3H], stats [2] (LN only)
// ---------------------------------------------------------------------------------------
template <bool Save, bool LN, typename T>
FASTRNN_INLINE void vgru_forward_row(const VariantParams<T>& p, const T* FASTRNN_RESTRICT xg,
                                     const T* FASTRNN_RESTRICT hg, T* FASTRNN_RESTRICT h,
                                     const T* FASTRNN_RESTRICT keep, T* FASTRNN_RESTRICT scratch,
                                     T* FASTRNN_RESTRICT gates, T* FASTRNN_RESTRICT hn_out, T* FASTRNN_RESTRICT xhat,
                                     T* FASTRNN_RESTRICT hhat, T* FASTRNN_RESTRICT stats) {
  const int64_t H = p.H, GH = 3 * H;
  T* gi = scratch;
  T* gh = scratch + GH;
  vdetail::gate_inputs<Save, LN, true, T>(p, GH, xg, hg, gi, xhat, hhat, stats);
  for (int64_t j = 0; j < H; ++j) {
    const T r = math::sigmoid(gi[j] + gh[j]);
    const T z = math::sigmoid(gi[H + j] + gh[H + j]);
    const T hn = gh[2 * H + j];
    const T n = math::tanh(gi[2 * H + j] + r * hn);
    const T hp = h[j];
    const T ht = (T(1) - z) * n + z * hp;
    const T k = keep[j];
    h[j] = k * hp + (T(1) - k) * ht;
    if (Save) {
      gates[j] = r;
      gates[H + j] = z;
      gates[2 * H + j] = n;
      hn_out[j] = hn;
    }
  }
}

//   dh [H]: in dL/dh_t; out the part of dL/dh_{t-1} that bypasses W_hh
//   dgi [3H]: out dL/d(input-side pre-activations)   dgp [3H]: out dL/d(hidden-side pre-activations)
//   dhg [3H]: out dL/d(W_hh h) (LN only; without LN it is dgp)
template <bool LN, typename T>
FASTRNN_INLINE void vgru_backward_row(const VariantParams<T>& p, const T* FASTRNN_RESTRICT gates,
                                      const T* FASTRNN_RESTRICT hn, const T* FASTRNN_RESTRICT hprev,
                                      const T* FASTRNN_RESTRICT hhat, const T* FASTRNN_RESTRICT stats,
                                      const T* FASTRNN_RESTRICT keep, T* FASTRNN_RESTRICT dh,
                                      T* FASTRNN_RESTRICT dgi, T* FASTRNN_RESTRICT dgp, T* FASTRNN_RESTRICT dhg) {
  const int64_t H = p.H;
  for (int64_t j = 0; j < H; ++j) {
    const T r = gates[j], z = gates[H + j], n = gates[2 * H + j];
    const T k = keep[j];
    const T d = dh[j];
    const T dht = (T(1) - k) * d;
    const T dn = dht * (T(1) - z) * (T(1) - n * n);
    const T dz = dht * (hprev[j] - n) * z * (T(1) - z);
    const T dr = dn * hn[j] * r * (T(1) - r);
    dgi[j] = dr;
    dgi[H + j] = dz;
    dgi[2 * H + j] = dn;
    dgp[j] = dr;
    dgp[H + j] = dz;
    dgp[2 * H + j] = dn * r;
    dh[j] = dht * z + k * d;
  }
  if (LN) vdetail::layer_norm_backward(3 * H, dgp, p.lnh_w, hhat, stats[1], dhg);
}

// ---------------------------------------------------------------------------------------
// Without LayerNorm every unit's math is independent of the others, so it can run on a slice of
// units right after the recurrent product of those units (the fused panel forward). n units:
//   xg: W_ih x of the row, gate k of unit j at xg[k*xs + j]; bias (b_ih + b_hh) the same way
//   hg: W_hh h, gate k at hg[k*hs + j]      peep: w_ci, w_cf, w_co at peep[k*xs + j] (or null)
//   hprev [n], hout [n] (h_{t-1}, h_t; distinct memory)   c [n]: c_{t-1} in, c_t out
//   keep: d for h at keep[j], for c at keep[xs + j]; read only when Zone (without zoneout the
//         blend with the old state is skipped: h_t and c_t are the cell's own)
//   Save: gates (gate k at gates[k*xs + j]), cells [n] c_t
// ---------------------------------------------------------------------------------------
template <bool Save, bool Peep, bool Zone, typename T>
FASTRNN_INLINE void vlstm_forward_units(int64_t n, const T* FASTRNN_RESTRICT xg, int64_t xs,
                                        const T* FASTRNN_RESTRICT bias, const T* FASTRNN_RESTRICT hg, int64_t hs,
                                        const T* FASTRNN_RESTRICT peep, const T* FASTRNN_RESTRICT hprev,
                                        T* FASTRNN_RESTRICT hout, T* FASTRNN_RESTRICT c,
                                        const T* FASTRNN_RESTRICT keep, T* FASTRNN_RESTRICT gates,
                                        T* FASTRNN_RESTRICT cells) {
  for (int64_t j = 0; j < n; ++j) {
    const T cp = c[j];
    const T i = math::sigmoid(xg[j] + bias[j] + hg[j] + (Peep ? peep[j] * cp : T(0)));
    const T f = math::sigmoid(xg[xs + j] + bias[xs + j] + hg[hs + j] + (Peep ? peep[xs + j] * cp : T(0)));
    const T g = math::tanh(xg[2 * xs + j] + bias[2 * xs + j] + hg[2 * hs + j]);
    const T cc = f * cp + i * g;
    const T o = math::sigmoid(xg[3 * xs + j] + bias[3 * xs + j] + hg[3 * hs + j] + (Peep ? peep[2 * xs + j] * cc : T(0)));
    const T ht = o * math::tanh(cc);
    T cnew = cc;
    if (Zone) {
      const T kh = keep[j], kc = keep[xs + j];
      hout[j] = kh * hprev[j] + (T(1) - kh) * ht;
      cnew = kc * cp + (T(1) - kc) * cc;
    } else {
      hout[j] = ht;
    }
    c[j] = cnew;
    if (Save) {
      gates[j] = i;
      gates[xs + j] = f;
      gates[2 * xs + j] = g;
      gates[3 * xs + j] = o;
      cells[j] = cnew;
    }
  }
}

//   GRU: bias_x (b_ih) and bias_h (b_hh) at [k*xs + j]; Save: gates r, z, n and hn [n]
template <bool Save, bool Zone, typename T>
FASTRNN_INLINE void vgru_forward_units(int64_t n, const T* FASTRNN_RESTRICT xg, int64_t xs,
                                       const T* FASTRNN_RESTRICT bias_x, const T* FASTRNN_RESTRICT bias_h,
                                       const T* FASTRNN_RESTRICT hg, int64_t hs, const T* FASTRNN_RESTRICT hprev,
                                       T* FASTRNN_RESTRICT hout, const T* FASTRNN_RESTRICT keep,
                                       T* FASTRNN_RESTRICT gates, T* FASTRNN_RESTRICT hn_out) {
  for (int64_t j = 0; j < n; ++j) {
    const T r = math::sigmoid(xg[j] + bias_x[j] + hg[j] + bias_h[j]);
    const T z = math::sigmoid(xg[xs + j] + bias_x[xs + j] + hg[hs + j] + bias_h[xs + j]);
    const T hn = hg[2 * hs + j] + bias_h[2 * xs + j];
    const T nn = math::tanh(xg[2 * xs + j] + bias_x[2 * xs + j] + r * hn);
    const T hp = hprev[j];
    const T ht = (T(1) - z) * nn + z * hp;
    if (Zone) {
      const T k = keep[j];
      hout[j] = k * hp + (T(1) - k) * ht;
    } else {
      hout[j] = ht;
    }
    if (Save) {
      gates[j] = r;
      gates[xs + j] = z;
      gates[2 * xs + j] = nn;
      hn_out[j] = hn;
    }
  }
}

}  // namespace fastrnn
