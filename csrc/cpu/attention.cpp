// CPU kernels for attention: scaled dot-product (flash-attention style) and additive (Bahdanau).
//
// Scaled dot-product, q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev]:
//   forward: per (b, h, block of query rows), key blocks are visited in turn; each block's
//     scores are one GEMM into a per-thread tile, masked, folded into a running row max and sum
//     (online softmax) and multiplied into the output rows by a second GEMM. Only the output and
//     the per-row log-sum-exp (lse) are written: nothing [L, S]-sized outlives a tile.
//   backward: the probabilities of each tile are recomputed from lse (P = exp(s - lse)), then
//     dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q: five
//     GEMMs per tile, again without an [L, S] buffer.
//   A query row whose every key is masked gets output 0 and lse = +inf (torch's CPU behaviour);
//   its probabilities recompute to 0, so it passes no gradient.
//
// Additive, qp [B, T, D] (W_q q + bias), kp [B, S, D] (W_k k), values [B, S, Dv], v [D]:
//   forward: e_ij = scale * v . tanh(qp_i + kp_j) for blocks of 4 query rows against one key at
//     a time (fastrnn/attention.h), masked softmax into the weights [B, T, S], context = weights @ values.
//   backward: dL/de from the saved weights (softmax backward), then one pass that recomputes tanh
//     tile by tile and accumulates d(qp), d(kp) and dv. The [B, T, S, D] tanh tensor the plain
//     formula keeps for backward never exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/gemm.h"
#include "fastrnn/attention.h"

// MKL's C entry point (the lower-case mkl_set_num_threads_local symbol is the Fortran one, by pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fastrnn {
namespace {

// Inside our own parallel regions each tile GEMM must run on its calling thread. torch turns
// MKL's dynamic threading off (mkl_set_dynamic(0)), so without this MKL would start a nested
// team per call: measured 4x slower with 2 threads than with 1. Thread-local, restored on exit.
class SerialBlasGuard {
 public:
  SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr && at::in_parallel_region()) {
      prev_ = MKL_Set_Num_Threads_Local(1);
      set_ = true;
    }
  }
  ~SerialBlasGuard() {
    if (set_) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  int prev_ = 0;
  bool set_ = false;
};

using OptTensor = c10::optional<at::Tensor>;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTRNN_NO_CLONES)
#define FASTRNN_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRNN_ATTN_CLONES
#endif

// ---------------------------------------------------------------------------------------
// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X^T when the flag says so.
// MKL's Fortran GEMM where the torch build has it (the same BLAS torch's own CPU flash attention
// calls per tile), at::mm on borrowed memory otherwise (and under set_gemm_backend('generic')).
// ---------------------------------------------------------------------------------------
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  TORCH_CHECK(m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX && ldb < INT_MAX && ldc < INT_MAX,
              "fastrnn attention: a tile GEMM dimension exceeds INT_MAX");
  if (has_blas() && gemm_backend_override().load() != 2) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    detail::fortran_gemm<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', int(n), int(m), int(k), alpha, b, int(ldb), a,
                            int(lda), beta, c, int(ldc));
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor av = ta ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                     : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor bv = tb ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(av, bv);
  if (alpha != T(1)) prod.mul_(alpha);
  if (beta == T(0))
    cv.copy_(prod);
  else
    cv.mul_(beta).add_(prod);
}

// A tensor whose last dimension is contiguous and whose rows do not overlap (what the GEMMs
// read through a leading dimension); other layouts are copied into fresh row-major memory.
// (Not t.contiguous(): torch calls a tensor contiguous whatever the strides of its size-1
// dimensions, so a single query row made by .mT, [.., 1, E] with row stride 1, came back as it
// was and the GEMMs read it with a leading dimension below E: wrong values.)
at::Tensor rows_contiguous(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  const bool ok = (t.stride(-1) == 1 || n <= 1) && t.stride(-2) >= std::max<int64_t>(1, n);
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// Strided 4-D view: element (b, h, i, j) at p[b*s0 + h*s1 + i*s2 + j] (last stride 1).
template <typename T>
struct View4 {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const T* at(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// A mask expanded (as a view) to [B, H, L, S]: bool (true = attend) or additive of type T.
struct MaskView {
  const void* p = nullptr;
  bool is_bool = false;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

MaskView mask_view(const OptTensor& mask, at::IntArrayRef full) {
  MaskView m;
  if (!mask.has_value() || !mask->defined()) return m;
  at::Tensor e = mask->expand(full);
  m.p = e.data_ptr();
  m.is_bool = e.scalar_type() == at::kBool;
  m.s0 = e.stride(0);
  m.s1 = e.stride(1);
  m.s2 = e.stride(2);
  m.s3 = e.stride(3);
  return m;
}

// Adds the mask of row (b, h, i), keys [j0, j0 + n), and the causal limit (keys j > i masked)
// to the scores s[0, n).
template <typename T>
void apply_mask_row(T* s, int64_t n, const MaskView& m, int64_t b, int64_t h, int64_t i, int64_t j0, bool causal) {
  if (m.p != nullptr) {
    const int64_t off = b * m.s0 + h * m.s1 + i * m.s2 + j0 * m.s3;
    if (m.is_bool) {
      const bool* mp = static_cast<const bool*>(m.p) + off;
      for (int64_t c = 0; c < n; ++c)
        if (!mp[c * m.s3]) s[c] = attn::neg_inf<T>();
    } else {
      const T* mp = static_cast<const T*>(m.p) + off;
      for (int64_t c = 0; c < n; ++c) s[c] += mp[c * m.s3];
    }
  }
  if (causal)
    for (int64_t c = std::max<int64_t>(0, i - j0 + 1); c < n; ++c) s[c] = attn::neg_inf<T>();
}

// ---------------------------------------------------------------------------------------
// Vectorised row loops (widest ISA the CPU has; see recurrent.cpp for the clones scheme).
// ---------------------------------------------------------------------------------------
FASTRNN_ATTN_CLONES float row_max_isa(const float* s, int64_t n) { return attn::row_max(s, n); }
FASTRNN_ATTN_CLONES double row_max_isa(const double* s, int64_t n) { return attn::row_max(s, n); }
FASTRNN_ATTN_CLONES float exp_shift_sum_isa(float* s, int64_t n, float m) { return attn::exp_shift_sum(s, n, m); }
FASTRNN_ATTN_CLONES double exp_shift_sum_isa(double* s, int64_t n, double m) { return attn::exp_shift_sum(s, n, m); }
FASTRNN_ATTN_CLONES float dot_isa(const float* a, const float* b, int64_t n) { return attn::dot(a, b, n); }
FASTRNN_ATTN_CLONES double dot_isa(const double* a, const double* b, int64_t n) { return attn::dot(a, b, n); }
FASTRNN_ATTN_CLONES void exp_minus_lse_isa(float* s, int64_t n, float l) { attn::exp_minus_lse(s, n, l); }
FASTRNN_ATTN_CLONES void exp_minus_lse_isa(double* s, int64_t n, double l) { attn::exp_minus_lse(s, n, l); }
FASTRNN_ATTN_CLONES void softmax_grad_row_isa(const float* p, float* dp, int64_t n, float delta) {
  attn::softmax_grad_row(p, dp, n, delta);
}
FASTRNN_ATTN_CLONES void softmax_grad_row_isa(const double* p, double* dp, int64_t n, double delta) {
  attn::softmax_grad_row(p, dp, n, delta);
}

// ---------------------------------------------------------------------------------------
// Scaled dot-product attention
// ---------------------------------------------------------------------------------------
struct SdpaArgs {
  at::Tensor q, k, v, mask;  // q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev]; rows contiguous
  int64_t B = 0, H = 0, L = 0, S = 0, E = 0, Ev = 0;
  bool causal = false;
  double scale = 1.0;
};

// Query rows per block, keys per block: torch's CPU flash attention picks the same sizes.
inline int64_t q_block(int64_t L) { return L >= 768 ? 256 : (L >= 192 ? 64 : 32); }
constexpr int64_t kKeyBlock = 512;

void check_mask_arg(const char* op, const at::Tensor& mask, const at::Tensor& ref, at::IntArrayRef full,
                    const char* full_meaning) {
  check_cpu(mask, op, "attn_mask");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == ref.scalar_type(), op,
                    ": attn_mask must be bool (true = attend) or have the dtype of query (", ref.scalar_type(),
                    "), got ", mask.scalar_type());
  bool ok = mask.dim() <= int64_t(full.size());
  for (int64_t d = 1; ok && d <= mask.dim(); ++d) {
    const int64_t ms = mask.size(-d), fs = full[full.size() - d];
    ok = ms == 1 || ms == fs;
  }
  TORCH_CHECK(ok, op, ": attn_mask of shape ", shape_str(mask.sizes()), " is not broadcastable to ", full_meaning,
              " = ", shape_str(full));
}

SdpaArgs sdpa_prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const OptTensor& mask, bool causal, double scale) {
  check_operands(op, {{q, "query", 4}, {k, "key", 4}, {v, "value", 4}});
  SdpaArgs a;
  a.B = q.size(0);
  a.H = q.size(1);
  a.L = q.size(2);
  a.E = q.size(3);
  a.S = k.size(2);
  a.Ev = v.size(3);
  check_shape(k, op, "key", {a.B, a.H, a.S, a.E}, "[batch, heads, src_len, query.size(-1)]");
  check_shape(v, op, "value", {a.B, a.H, a.S, a.Ev}, "[batch, heads, key.size(2), value_dim]");
  if (mask.has_value() && mask->defined()) {
    check_mask_arg(op, *mask, q, {a.B, a.H, a.L, a.S}, "[batch, heads, tgt_len, src_len]");
    TORCH_CHECK(!causal, op, ": attn_mask must be None when is_causal=True");
    a.mask = *mask;
  }
  a.causal = causal;
  a.scale = scale;
  a.q = rows_contiguous(q);
  a.k = rows_contiguous(k);
  a.v = rows_contiguous(v);
  return a;
}

template <typename T>
void sdpa_forward_kernel(const SdpaArgs& a, T* out, T* lse) {
  const int64_t B = a.B, H = a.H, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const int64_t BQ = q_block(L), BK = std::min<int64_t>(kKeyBlock, std::max<int64_t>(S, 1));
  const int64_t nqb = (L + BQ - 1) / BQ;
  const View4<T> Q = view4<T>(a.q), K = view4<T>(a.k), V = view4<T>(a.v);
  const MaskView M = mask_view(a.mask.defined() ? OptTensor(a.mask) : OptTensor(), {B, H, L, S});
  const T scale = T(a.scale);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t w0, int64_t w1) {
    SerialBlasGuard serial;
    std::vector<T> sbuf(BQ * BK), mrow(BQ), lrow(BQ);
    // Rows with a NaN or +inf score (a non-finite query or key) and every row of a call with a
    // NaN or infinite scale: their softmax is NaN, as torch's, not the zeros of a row with no
    // key attended (torch scales the query first, so an infinite scale leaves no row finite).
    const char bad_scale = !std::isfinite(a.scale);
    std::vector<char> nonfinite(BQ);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / (H * nqb), h = (w / nqb) % H, q0 = (w % nqb) * BQ;
      const int64_t mq = std::min(BQ, L - q0);
      T* O = out + ((b * H + h) * L + q0) * Ev;
      std::fill(O, O + mq * Ev, T(0));
      std::fill(mrow.begin(), mrow.end(), attn::neg_inf<T>());
      std::fill(lrow.begin(), lrow.end(), T(0));
      std::fill(nonfinite.begin(), nonfinite.end(), bad_scale);
      const int64_t kend = a.causal ? std::min(S, q0 + mq) : S;
      for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        T* s = sbuf.data();
        gemm<T>(false, true, mq, nk, E, scale, Q.at(b, h, q0), Q.s2, K.at(b, h, k0), K.s2, T(0), s, nk);
        for (int64_t r = 0; r < mq; ++r) {
          T* sr = s + r * nk;
          apply_mask_row(sr, nk, M, b, h, q0 + r, k0, a.causal);
          const T bmax = row_max_isa(sr, nk);
          bool nan = false;
          for (int64_t c = 0; c < nk; ++c) nan |= std::isnan(sr[c]);
          if (nan || bmax == std::numeric_limits<T>::infinity()) nonfinite[r] = 1;
          const T mnew = std::max(mrow[r], bmax);
          if (mnew == attn::neg_inf<T>()) {  // no key of this row attended so far
            std::fill(sr, sr + nk, T(0));
            continue;
          }
          const T alpha = std::exp(mrow[r] - mnew);  // 0 when mrow was -inf
          const T sum = exp_shift_sum_isa(sr, nk, mnew);
          if (alpha != T(1)) {
            T* orow = O + r * Ev;
            for (int64_t c = 0; c < Ev; ++c) orow[c] *= alpha;
          }
          lrow[r] = lrow[r] * alpha + sum;
          mrow[r] = mnew;
        }
        gemm<T>(false, false, mq, Ev, nk, T(1), s, nk, V.at(b, h, k0), V.s2, T(1), O, Ev);
      }
      T* lse_rows = lse + (b * H + h) * L + q0;
      for (int64_t r = 0; r < mq; ++r) {
        T* orow = O + r * Ev;
        if (nonfinite[r]) {
          std::fill(orow, orow + Ev, std::numeric_limits<T>::quiet_NaN());
          lse_rows[r] = std::numeric_limits<T>::quiet_NaN();
        } else if (lrow[r] > T(0)) {
          const T inv = T(1) / lrow[r];
          for (int64_t c = 0; c < Ev; ++c) orow[c] *= inv;
          lse_rows[r] = mrow[r] + std::log(lrow[r]);
        } else {
          std::fill(orow, orow + Ev, T(0));
          lse_rows[r] = std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const OptTensor& attn_mask, bool is_causal,
                                                double scale) {
  const char* op = "fastrnn.sdpa_forward";
  SdpaArgs a = sdpa_prepare(op, query, key, value, attn_mask, is_causal, scale);
  at::Tensor out = at::empty({a.B, a.H, a.L, a.Ev}, a.q.options());
  at::Tensor lse = at::empty({a.B, a.H, a.L}, a.q.options());
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "sdpa_forward",
                             [&] { sdpa_forward_kernel<scalar_t>(a, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()); });
  return {out, lse};
}

template <typename T>
void sdpa_backward_kernel(const SdpaArgs& a, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                          T* dq, T* dk, T* dv) {
  const int64_t B = a.B, H = a.H, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const int64_t BQ = q_block(L), BK = std::min<int64_t>(kKeyBlock, std::max<int64_t>(S, 1));
  const int64_t nqb = (L + BQ - 1) / BQ;
  const View4<T> Q = view4<T>(a.q), K = view4<T>(a.k), V = view4<T>(a.v);
  const View4<T> dO = view4<T>(grad_out), O = view4<T>(out);
  const T* LSE = lse.data_ptr<T>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const MaskView M = mask_view(a.mask.defined() ? OptTensor(a.mask) : OptTensor(), {B, H, L, S});
  const T scale = T(a.scale);
  // Work items are (b, h, chunk of query blocks). dK and dV of a head sum over all its query
  // blocks: with one chunk per head a thread owns them outright; when there are fewer heads than
  // threads, each chunk accumulates into its own partial dK/dV, summed afterwards.
  const int64_t BH = B * H;
  const int64_t threads = at::get_num_threads();
  const int64_t nchunk = BH == 0 ? 1 : std::max<int64_t>(1, std::min(nqb, (threads + BH - 1) / BH));
  at::Tensor part_k, part_v;
  if (nchunk > 1) {
    part_k = at::zeros({BH, nchunk, S, E}, a.q.options());
    part_v = at::zeros({BH, nchunk, S, Ev}, a.q.options());
  }
  const int64_t per_chunk = (nqb + nchunk - 1) / nchunk;
  at::parallel_for(0, BH * nchunk, 1, [&](int64_t w0, int64_t w1) {
    SerialBlasGuard serial;
    std::vector<T> pbuf(BQ * BK), dpbuf(BQ * BK), delta(BQ);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bh = w / nchunk, chunk = w % nchunk, b = bh / H, h = bh % H;
      T* dK = nchunk > 1 ? part_k.data_ptr<T>() + (bh * nchunk + chunk) * S * E : dk + bh * S * E;
      T* dV = nchunk > 1 ? part_v.data_ptr<T>() + (bh * nchunk + chunk) * S * Ev : dv + bh * S * Ev;
      if (nchunk == 1) {
        std::fill(dK, dK + S * E, T(0));
        std::fill(dV, dV + S * Ev, T(0));
      }
      for (int64_t qb = chunk * per_chunk; qb < std::min(nqb, (chunk + 1) * per_chunk); ++qb) {
        const int64_t q0 = qb * BQ, mq = std::min(BQ, L - q0);
        T* dQ = dq + (bh * L + q0) * E;
        std::fill(dQ, dQ + mq * E, T(0));
        for (int64_t r = 0; r < mq; ++r) {
          const T* go = dO.at(b, h, q0 + r);
          const T* o = O.at(b, h, q0 + r);
          delta[r] = dot_isa(go, o, Ev);
        }
        const int64_t kend = a.causal ? std::min(S, q0 + mq) : S;
        for (int64_t k0 = 0; k0 < kend; k0 += BK) {
          const int64_t nk = std::min(BK, kend - k0);
          T* p = pbuf.data();
          T* dp = dpbuf.data();
          gemm<T>(false, true, mq, nk, E, scale, Q.at(b, h, q0), Q.s2, K.at(b, h, k0), K.s2, T(0), p, nk);
          for (int64_t r = 0; r < mq; ++r) {
            T* pr = p + r * nk;
            apply_mask_row(pr, nk, M, b, h, q0 + r, k0, a.causal);
            exp_minus_lse_isa(pr, nk, LSE[b * ls0 + h * ls1 + (q0 + r) * ls2]);
          }
          gemm<T>(true, false, nk, Ev, mq, T(1), p, nk, dO.at(b, h, q0), dO.s2, T(1), dV + k0 * Ev, Ev);
          gemm<T>(false, true, mq, nk, Ev, T(1), dO.at(b, h, q0), dO.s2, V.at(b, h, k0), V.s2, T(0), dp, nk);
          for (int64_t r = 0; r < mq; ++r) softmax_grad_row_isa(p + r * nk, dp + r * nk, nk, delta[r]);
          gemm<T>(false, false, mq, E, nk, scale, dp, nk, K.at(b, h, k0), K.s2, T(1), dQ, E);
          gemm<T>(true, false, nk, E, mq, scale, dp, nk, Q.at(b, h, q0), Q.s2, T(1), dK + k0 * E, E);
        }
      }
    }
  });
  if (nchunk > 1) {
    at::from_blob(dk, {BH, S, E}, a.q.options()).copy_(part_k.sum(1));
    at::from_blob(dv, {BH, S, Ev}, a.q.options()).copy_(part_v.sum(1));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& grad_output, const at::Tensor& query,
                                                             const at::Tensor& key, const at::Tensor& value,
                                                             const OptTensor& attn_mask, const at::Tensor& output,
                                                             const at::Tensor& lse, bool is_causal, double scale) {
  const char* op = "fastrnn.sdpa_backward";
  SdpaArgs a = sdpa_prepare(op, query, key, value, attn_mask, is_causal, scale);
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const Named& n : std::initializer_list<Named>{{&grad_output, "grad_output"}, {&output, "output"}, {&lse, "lse"}}) {
    check_defined(*n.first, op, n.second);
    check_cpu(*n.first, op, n.second);
    check_dtype(*n.first, op, n.second, query, "query");
  }
  check_shape(grad_output, op, "grad_output", {a.B, a.H, a.L, a.Ev}, "[batch, heads, tgt_len, value_dim]");
  check_shape(output, op, "output", {a.B, a.H, a.L, a.Ev}, "[batch, heads, tgt_len, value_dim]");
  check_shape(lse, op, "lse", {a.B, a.H, a.L}, "[batch, heads, tgt_len]");
  at::Tensor go = rows_contiguous(grad_output), o = rows_contiguous(output);
  at::Tensor dq = at::empty({a.B, a.H, a.L, a.E}, a.q.options());
  at::Tensor dk = at::empty({a.B, a.H, a.S, a.E}, a.q.options());
  at::Tensor dv = at::empty({a.B, a.H, a.S, a.Ev}, a.q.options());
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "sdpa_backward", [&] {
    sdpa_backward_kernel<scalar_t>(a, go, o, lse, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                   dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------
// Additive (Bahdanau) attention
// ---------------------------------------------------------------------------------------
struct AdditiveArgs {
  at::Tensor qp, kp, values, v, mask;  // qp [B, T, D], kp [B, S, D], values [B, S, Dv], v [D]
  int64_t B = 0, T = 0, S = 0, D = 0, Dv = 0;
  double scale = 1.0;
};

AdditiveArgs additive_prepare(const char* op, const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& values,
                              const at::Tensor& v, const OptTensor& mask, double scale) {
  check_operands(op, {{qp, "query_proj", 3}, {kp, "key_proj", 3}, {values, "values", 3}, {v, "v", 1}});
  AdditiveArgs a;
  a.B = qp.size(0);
  a.T = qp.size(1);
  a.D = qp.size(2);
  a.S = kp.size(1);
  a.Dv = values.size(2);
  check_shape(kp, op, "key_proj", {a.B, a.S, a.D}, "[batch, src_len, query_proj.size(-1)]");
  check_shape(values, op, "values", {a.B, a.S, a.Dv}, "[batch, key_proj.size(1), value_dim]");
  check_shape(v, op, "v", {a.D}, "[query_proj.size(-1)]");
  if (mask.has_value() && mask->defined()) {
    check_mask_arg(op, *mask, qp, {a.B, a.T, a.S}, "[batch, tgt_len, src_len]");
    a.mask = *mask;
  }
  a.qp = rows_contiguous(qp);
  a.kp = rows_contiguous(kp);
  a.values = values;
  a.v = v.contiguous();
  a.scale = scale;
  return a;
}

// Energies and softmax weights of query rows [i0, i1) of batch b: w [T, S] rows of that batch.
constexpr int kRows = 4;

template <typename T, int R>
FASTRNN_INLINE void additive_weights_rows(const T* qp, int64_t qs1, const T* kp, int64_t ks1, const T* v, int64_t S,
                                          int64_t D, T scale, T* wr) {
  const T* q[R];
  for (int r = 0; r < R; ++r) q[r] = qp + r * qs1;
  T e[R];
  for (int64_t j = 0; j < S; ++j) {
    attn::additive_energies<T, R>(q, kp + j * ks1, v, D, e);
    for (int r = 0; r < R; ++r) wr[r * S + j] = e[r] * scale;
  }
}

template <typename T>
FASTRNN_INLINE void additive_weights_impl(const T* qp, int64_t qs0, int64_t qs1, const T* kp, int64_t ks0,
                                          int64_t ks1, const T* v, const MaskView& m, int64_t T_, int64_t S,
                                          int64_t D, T scale, T* w, int64_t b, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, i1 - i);
    const T* q = qp + b * qs0 + i * qs1;
    const T* k = kp + b * ks0;
    T* wr = w + (b * T_ + i) * S;
    static_assert(kRows == 4, "the switch below handles up to 4 rows");
    switch (nr) {
      case 4: additive_weights_rows<T, 4>(q, qs1, k, ks1, v, S, D, scale, wr); break;
      case 3: additive_weights_rows<T, 3>(q, qs1, k, ks1, v, S, D, scale, wr); break;
      case 2: additive_weights_rows<T, 2>(q, qs1, k, ks1, v, S, D, scale, wr); break;
      default: additive_weights_rows<T, 1>(q, qs1, k, ks1, v, S, D, scale, wr); break;
    }
    for (int64_t r = 0; r < nr; ++r) {
      T* row = wr + r * S;
      apply_mask_row(row, S, m, b, 0, i + r, 0, false);
      attn::softmax_row(row, S);
    }
  }
}

struct AdditiveFwd {
  const void *qp, *kp, *v;
  int64_t qs0, qs1, ks0, ks1, T, S, D;
  double scale;
  MaskView m;
  void* w;
};

FASTRNN_ATTN_CLONES void additive_weights(const AdditiveFwd& f, float*, int64_t b, int64_t i0, int64_t i1) {
  additive_weights_impl<float>(static_cast<const float*>(f.qp), f.qs0, f.qs1, static_cast<const float*>(f.kp), f.ks0,
                               f.ks1, static_cast<const float*>(f.v), f.m, f.T, f.S, f.D, float(f.scale),
                               static_cast<float*>(f.w), b, i0, i1);
}
FASTRNN_ATTN_CLONES void additive_weights(const AdditiveFwd& f, double*, int64_t b, int64_t i0, int64_t i1) {
  additive_weights_impl<double>(static_cast<const double*>(f.qp), f.qs0, f.qs1, static_cast<const double*>(f.kp),
                                f.ks0, f.ks1, static_cast<const double*>(f.v), f.m, f.T, f.S, f.D, f.scale,
                                static_cast<double*>(f.w), b, i0, i1);
}

std::tuple<at::Tensor, at::Tensor> additive_attention_forward(const at::Tensor& query_proj, const at::Tensor& key_proj,
                                                              const at::Tensor& values, const at::Tensor& v,
                                                              const OptTensor& mask, double scale) {
  const char* op = "fastrnn.additive_attention_forward";
  AdditiveArgs a = additive_prepare(op, query_proj, key_proj, values, v, mask, scale);
  at::Tensor weights = at::empty({a.B, a.T, a.S}, a.qp.options());
  AdditiveFwd f{a.qp.data_ptr(), a.kp.data_ptr(), a.v.data_ptr(), a.qp.stride(0), a.qp.stride(1), a.kp.stride(0),
                a.kp.stride(1), a.T, a.S, a.D, a.scale,
                mask_view(a.mask.defined() ? OptTensor(a.mask.expand({a.B, a.T, a.S}).unsqueeze(1)) : OptTensor(),
                          {a.B, 1, a.T, a.S}),
                weights.data_ptr()};
  // Work items: (batch, block of query rows); the rows of one item share each key's loads.
  const int64_t nib = (a.T + kRows - 1) / kRows;
  AT_DISPATCH_FLOATING_TYPES(a.qp.scalar_type(), "additive_attention_forward", [&] {
    at::parallel_for(0, a.B * nib, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / nib, i0 = (w % nib) * kRows;
        additive_weights(f, static_cast<scalar_t*>(nullptr), b, i0, std::min(a.T, i0 + kRows));
      }
    });
  });
  at::Tensor context = at::bmm(weights, a.values);
  return {context, weights};
}

template <typename T, int R>
FASTRNN_INLINE void additive_grad_rows(const T* qp, int64_t qs1, const T* kp, int64_t ks1, const T* v, const T* g,
                                       int64_t S, int64_t D, T* dqp, T* dkp, T* dv) {
  const T* q[R];
  T* dq[R];
  for (int r = 0; r < R; ++r) {
    q[r] = qp + r * qs1;
    dq[r] = dqp + r * D;
  }
  for (int64_t j = 0; j < S; ++j) {
    T gj[R];
    bool any = false;
    for (int r = 0; r < R; ++r) {
      gj[r] = g[r * S + j];
      any |= gj[r] != T(0);
    }
    if (!any) continue;  // masked keys (and exact zeros) contribute nothing
    attn::additive_energies_grad<T, R>(q, kp + j * ks1, v, gj, D, dq, dkp + j * D, dv);
  }
}

template <typename T>
FASTRNN_INLINE void additive_grad_impl(const T* qp, int64_t qs0, int64_t qs1, const T* kp, int64_t ks0, int64_t ks1,
                                       const T* v, const T* g, int64_t T_, int64_t S, int64_t D, T* dqp, T* dkp,
                                       T* dv, int64_t b, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, i1 - i);
    const T* q = qp + b * qs0 + i * qs1;
    const T* k = kp + b * ks0;
    const T* gr = g + (b * T_ + i) * S;
    T* dq = dqp + (b * T_ + i) * D;
    switch (nr) {
      case 4: additive_grad_rows<T, 4>(q, qs1, k, ks1, v, gr, S, D, dq, dkp, dv); break;
      case 3: additive_grad_rows<T, 3>(q, qs1, k, ks1, v, gr, S, D, dq, dkp, dv); break;
      case 2: additive_grad_rows<T, 2>(q, qs1, k, ks1, v, gr, S, D, dq, dkp, dv); break;
      default: additive_grad_rows<T, 1>(q, qs1, k, ks1, v, gr, S, D, dq, dkp, dv); break;
    }
  }
}

struct AdditiveBwd {
  const void *qp, *kp, *v, *g;
  int64_t qs0, qs1, ks0, ks1, T, S, D;
  void* dqp;
};

FASTRNN_ATTN_CLONES void additive_grad(const AdditiveBwd& f, float* dkp, float* dv, int64_t b, int64_t i0, int64_t i1) {
  additive_grad_impl<float>(static_cast<const float*>(f.qp), f.qs0, f.qs1, static_cast<const float*>(f.kp), f.ks0,
                            f.ks1, static_cast<const float*>(f.v), static_cast<const float*>(f.g), f.T, f.S, f.D,
                            static_cast<float*>(f.dqp), dkp, dv, b, i0, i1);
}
FASTRNN_ATTN_CLONES void additive_grad(const AdditiveBwd& f, double* dkp, double* dv, int64_t b, int64_t i0,
                                       int64_t i1) {
  additive_grad_impl<double>(static_cast<const double*>(f.qp), f.qs0, f.qs1, static_cast<const double*>(f.kp), f.ks0,
                             f.ks1, static_cast<const double*>(f.v), static_cast<const double*>(f.g), f.T, f.S, f.D,
                             static_cast<double*>(f.dqp), dkp, dv, b, i0, i1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& query_proj,
    const at::Tensor& key_proj, const at::Tensor& values, const at::Tensor& v, const at::Tensor& weights,
    double scale) {
  const char* op = "fastrnn.additive_attention_backward";
  AdditiveArgs a = additive_prepare(op, query_proj, key_proj, values, v, c10::nullopt, scale);
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const Named& n : std::initializer_list<Named>{{&grad_context, "grad_context"}, {&grad_weights, "grad_weights"},
                                                     {&weights, "weights"}}) {
    check_defined(*n.first, op, n.second);
    check_cpu(*n.first, op, n.second);
    check_dtype(*n.first, op, n.second, query_proj, "query_proj");
  }
  check_shape(grad_context, op, "grad_context", {a.B, a.T, a.Dv}, "[batch, tgt_len, value_dim]");
  check_shape(grad_weights, op, "grad_weights", {a.B, a.T, a.S}, "[batch, tgt_len, src_len]");
  check_shape(weights, op, "weights", {a.B, a.T, a.S}, "[batch, tgt_len, src_len]");
  const int64_t B = a.B, T_ = a.T, S = a.S, D = a.D;
  // dL/dweights, then the softmax backward: g = scale * w * (dw - rowsum(w * dw)).
  at::Tensor g = at::baddbmm(grad_weights, grad_context, a.values.transpose(1, 2));
  g = (g - (g * weights).sum(-1, true)).mul_(weights).mul_(scale).contiguous();
  at::Tensor grad_values = at::bmm(weights.transpose(1, 2), grad_context);
  at::Tensor dqp = at::zeros({B, T_, D}, a.qp.options());
  at::Tensor dkp = at::zeros({B, S, D}, a.qp.options());
  // Work items: (batch, chunk of query rows). d(kp) of a batch sums over all its query rows: with
  // one chunk per batch a thread owns it; with fewer batches than threads each chunk has its own
  // partial. dv sums over everything: one partial per work item.
  const int64_t threads = at::get_num_threads();
  const int64_t nib = (T_ + kRows - 1) / kRows;
  const int64_t nchunk = B == 0 ? 1 : std::max<int64_t>(1, std::min(nib, (threads + B - 1) / B));
  const int64_t per_chunk = (nib + nchunk - 1) / nchunk * kRows;
  at::Tensor part_k = nchunk > 1 ? at::zeros({B, nchunk, S, D}, a.qp.options()) : at::Tensor();
  at::Tensor part_v = at::zeros({B * nchunk, D}, a.qp.options());
  AdditiveBwd f{a.qp.data_ptr(), a.kp.data_ptr(), a.v.data_ptr(), g.data_ptr(), a.qp.stride(0), a.qp.stride(1),
                a.kp.stride(0), a.kp.stride(1), T_, S, D, dqp.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES(a.qp.scalar_type(), "additive_attention_backward", [&] {
    scalar_t* dk_base = nchunk > 1 ? part_k.data_ptr<scalar_t>() : dkp.data_ptr<scalar_t>();
    scalar_t* dv_base = part_v.data_ptr<scalar_t>();
    at::parallel_for(0, B * nchunk, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / nchunk, c = w % nchunk;
        const int64_t i0 = c * per_chunk, i1 = std::min(T_, i0 + per_chunk);
        if (i0 >= i1) continue;
        additive_grad(f, dk_base + (nchunk > 1 ? w : b) * S * D, dv_base + w * D, b, i0, i1);
      }
    });
  });
  if (nchunk > 1) dkp.copy_(part_k.sum(1));
  at::Tensor dv = part_v.sum(0);
  return {dqp, dkp, grad_values, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("sdpa_forward", &sdpa_forward);
  m.impl("sdpa_backward", &sdpa_backward);
  m.impl("additive_attention_forward", &additive_attention_forward);
  m.impl("additive_attention_backward", &additive_attention_backward);
}

}  // namespace fastrnn
