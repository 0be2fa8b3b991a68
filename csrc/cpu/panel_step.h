// The per-step product of the time loops on a weight packed into column panels
// (panel::gemm_impl): backward's dh = dG W_hh in both kernels and the variants' forward product.
// Where a step is a few microseconds of work, a BLAS call costs as much again in dispatch and
// threading; panels also let each thread of a persistent team start every step on its own slice
// of the weight, which stays in its core's cache across steps.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/gemm.h"
#include "cpu/pack_cache.h"
#include "cpu/team.h"
#include "fastrnn/panel_gemm.h"

namespace fastrnn {
namespace {  // each unit compiles its own ISA builds (FASTRNN_ISA_KERNEL)

FASTRNN_ISA_KERNEL(panel_gemm, panel::GemmArgs, panel::gemm_impl)

// C[m, N] (=, or += when accumulate) A[m, K] @ B, B = W [K, N] row-major (trans_b=false) or
// W [N, K] used transposed (trans_b=true). cache_layout >= 0 keeps the packing between calls
// under that layout id (cpu/pack_cache.h); -1 packs for this call only (a weight that changes
// every training step would miss the cache and pay for the copy).
template <typename T>
class PanelGemm {
 public:
  PanelGemm(const at::Tensor& w, bool trans_b, int64_t N, int64_t K, int cache_layout) : K_(K), N_(N) {
    auto pack = [&] { return pack_columns<T>(w, trans_b, N, K); };
    // (The cache key includes the stripe width of the build that runs, panel::stripe_vecs.)
    packed_ = cache_layout >= 0 ? cached_packing(w, 100000 * panel_stripe(panel::kGemmV) + cache_layout, pack) : pack();
    n_panels_ = packed_.size(0);
  }
  int64_t panels() const { return n_panels_; }
  // Panels [p0, p1) only, on the calling thread (a persistent team's share).
  void run_panels(const T* a, int64_t m, int64_t lda, T* c, int64_t ldc, bool accumulate, int64_t p0,
                  int64_t p1) const {
    if (m == 0 || p0 >= p1) return;
    panel_gemm(panel::GemmArgs<T>{a, lda, m, K_, N_, packed_.data_ptr<T>(), c, ldc, accumulate}, p0, p1);
  }
  // All panels, split over threads where that pays (team.h's threads_pay); bias [N] (or null)
  // added to every row of C (without accumulate).
  void run(const T* a, int64_t m, int64_t lda, T* c, int64_t ldc, bool accumulate, const T* bias = nullptr) const {
    if (m == 0) return;
    const panel::GemmArgs<T> g{a, lda, m, K_, N_, packed_.data_ptr<T>(), c, ldc, accumulate, bias};
    if (!threads_pay(double(m) * double(K_) * double(N_), double(K_) * double(N_) * double(sizeof(T)))) {
      panel_gemm(g, 0, n_panels_);
      return;
    }
    run_split(g, n_panels_);
  }

  // g over panels [0, n_panels) split over threads in units of a panel, or where there are too few
  // panels to even out the threads, of a panel's rows in pieces of >= 48 (a block of >= 48 rows
  // keeps the micro-kernel's rate; each piece reads the whole panel again). Each thread runs its
  // share, then takes what is left of the others' (team.h's StepUnits): a static split waited for
  // the slower core.
  static void run_split(const panel::GemmArgs<T>& g, int64_t n_panels) {
    const int64_t threads = at::get_num_threads();
    const int64_t pieces = n_panels >= 4 * threads
                               ? 1
                               : std::max<int64_t>(1, std::min(g.m / 48, (4 * threads + n_panels - 1) / n_panels));
    StepUnits units(threads);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        units.run(t, n_panels * pieces, 1, [&](int64_t u) {
          const int64_t p = u / pieces, r0 = g.m * (u % pieces) / pieces, r1 = g.m * (u % pieces + 1) / pieces;
          panel::GemmArgs<T> sub = g;
          sub.a = g.a + r0 * g.lda;
          sub.c = g.c + r0 * g.ldc;
          sub.m = r1 - r0;
          panel_gemm(sub, p, p + 1);
        });
    });
  }

 private:
  int64_t K_, N_, n_panels_ = 0;
  at::Tensor packed_;
};

}  // namespace
}  // namespace fastrnn
