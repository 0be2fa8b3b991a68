// Packed copies of recurrent weights, kept between calls.
//
// Packing W_hh costs about ten B=1 steps, so a model run over many short sequences (streaming, a
// decoder loop) should pack once. A hit must be the same live tensor *and* byte-identical to the
// copy taken at packing time: version counters miss writes through .data, and inference tensors
// have none, so the check is a memcmp (a read of W, ~4x cheaper than repacking it). One cache
// serves every kernel (the layout key tells packings of one weight apart); at most 16 entries and
// FASTRNN_PACK_CACHE_MB (default 256) MB, each entry counting its copy and its packing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/isa.h"
#include "cpu/workspace.h"
#include "fastrnn/panel_gemm.h"

namespace fastrnn {

struct PackCacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  const void* data = nullptr;
  int64_t layout = 0;
  at::Tensor copy, packed;
};

struct PackCache {
  std::mutex mu;
  std::vector<PackCacheEntry> entries;
};

// One cache for the process (an inline function's static is one object across translation units;
// a static inside the template below would be one per instantiation).
inline PackCache& pack_cache() {
  static PackCache c;
  return c;
}

// memcmp(a, b, n) == 0, the halves (256 KB pieces) read by the team's threads at once: the check
// is a read of W and its copy, bound by memory bandwidth, and one core's share of it is not the
// machine's (measured, I=H=1024, a 2-core Xeon: 4.6 ms of a 106 ms inference call on one thread).
inline bool same_bytes(const void* a, const void* b, size_t n) {
  constexpr size_t kPiece = size_t(256) << 10;
  if (n <= kPiece || at::in_parallel_region() || at::get_num_threads() == 1) return std::memcmp(a, b, n) == 0;
  const int64_t pieces = static_cast<int64_t>((n + kPiece - 1) / kPiece);
  std::atomic<bool> same{true};
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1 && same.load(std::memory_order_relaxed); ++p) {
      const size_t off = static_cast<size_t>(p) * kPiece, len = std::min(kPiece, n - off);
      if (std::memcmp(static_cast<const char*>(a) + off, static_cast<const char*>(b) + off, len) != 0)
        same.store(false, std::memory_order_relaxed);
    }
  });
  return same.load();
}

// pack() -> the packing of w in the caller's layout (an id unique to that layout, its
// parameters included: callers encode e.g. gates and panel width in it).
template <typename Pack>
at::Tensor cached_packing(const at::Tensor& w, int64_t layout, const Pack& pack) {
  std::mutex& mu = pack_cache().mu;
  std::vector<PackCacheEntry>& cache = pack_cache().entries;
  constexpr size_t kMaxEntries = 64;
  const size_t bytes = w.nbytes();
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end();) {
      if (it->weight.expired()) {
        it = cache.erase(it);
        continue;
      }
      if (it->weight._unsafe_get_target() == w.unsafeGetTensorImpl() && it->data == w.data_ptr() &&
          it->layout == layout && it->copy.scalar_type() == w.scalar_type() && it->copy.numel() == w.numel()) {
        if (same_bytes(it->copy.data_ptr(), w.data_ptr(), bytes)) return it->packed;
        cache.erase(it);
        break;
      }
      ++it;
    }
  }
  at::Tensor packed = pack();
  at::Tensor copy = w.clone();
  static const size_t max_bytes = [] {
    const char* mb = std::getenv("FASTRNN_PACK_CACHE_MB");
    return size_t(mb ? std::strtoull(mb, nullptr, 10) : 256) << 20;
  }();
  std::lock_guard<std::mutex> lock(mu);
  auto entry_bytes = [](const PackCacheEntry& e) { return e.copy.nbytes() + e.packed.nbytes(); };
  size_t total = copy.nbytes() + packed.nbytes();
  for (const auto& e : cache) total += entry_bytes(e);
  while (!cache.empty() && (cache.size() >= kMaxEntries || total > max_bytes)) {
    total -= entry_bytes(cache.front());
    cache.erase(cache.begin());
  }
  if (copy.nbytes() + packed.nbytes() > max_bytes) return packed;  // too big to keep
  cache.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), w.data_ptr(), layout, copy, packed});
  return packed;
}

// The stripe width (panel::stripe_vecs) of a panel of WS layout vectors in the kernel build that
// runs: packing and kernels agree as long as fastrnn._C.set_isa is not called while a call runs.
inline int panel_stripe(int WS) { return panel::stripe_vecs(kernel_vector_bytes(), WS); }

// W [G*H, K] (W_hh, K = H; or W_ih, K = I) -> panels [n_panels][K][gate g, unit u] of U units,
// in stripes (panel::striped), zero past the last unit: the layout of the fused forward kernels
// (a thread multiplies h, and x where the input product is fused in, by a panel and has all G
// gates of U units at once).
template <typename T>
at::Tensor pack_gate_panels(const at::Tensor& w, int64_t G, int64_t H, int64_t U) {
  const int64_t NR = G * U, n_panels = (H + U - 1) / U, K = w.size(1);
  const int64_t SW = int64_t(panel_stripe(int(NR / panel::Vec<T>::L))) * panel::Vec<T>::L;  // a stripe's row
  at::Tensor wp = empty_big({n_panels, K, NR}, w.options());
  const T* src0 = w.data_ptr<T>();
  T* dst = wp.data_ptr<T>();
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if ((p + 1) * U > H) std::fill(dst + p * K * NR, dst + (p + 1) * K * NR, T(0));  // units past H
      for (int64_t g = 0; g < G; ++g)
        for (int64_t u = 0; u < U && p * U + u < H; ++u) {
          const T* src = src0 + (g * H + p * U + u) * K;
          T* d = dst + p * K * NR + panel::striped<T>(K, int(SW / panel::Vec<T>::L), 0, g * U + u);
          for (int64_t k = 0; k < K; ++k) d[k * SW] = src[k];
        }
    }
  });
  return wp;
}

// The column panels of panel::gemm_impl, [n_panels][K][NR] in stripes, zero past N, for a [K, N]
// matrix given by its rows (row(k): N contiguous elements, anywhere) or, with Cols, by its
// columns (col(j): K contiguous elements; a weight [N, K] used transposed). Loops in the order
// that reads the source contiguously. Not zero-filled, only the columns past N are (a fresh zeroed
// 16 MB took ~1 ms of a backward's setup at I=H=1024).
template <typename T, bool Cols, typename Src>
void pack_panels(T* dst, int64_t K, int64_t N, const Src& src) {
  constexpr int64_t NR = panel::kGemmV * panel::Vec<T>::L;
  const int S = panel_stripe(panel::kGemmV);
  const int64_t SW = int64_t(S) * panel::Vec<T>::L, n_panels = (N + NR - 1) / NR;
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nc = std::min<int64_t>(NR, N - p * NR);
      for (int64_t q0 = 0; q0 < NR; q0 += SW) {  // a stripe: the panel's columns [q0, q0 + SW)
        T* d = dst + p * K * NR + panel::striped<T>(K, S, 0, q0);
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(SW, nc - q0)), j0 = p * NR + q0;
        if (n < SW)
          for (int64_t k = 0; k < K; ++k) std::fill(d + k * SW + n, d + (k + 1) * SW, T(0));
        if constexpr (Cols) {
          for (int64_t q = 0; q < n; ++q) {
            const T* c = src(j0 + q);
            for (int64_t k = 0; k < K; ++k) d[k * SW + q] = c[k];
          }
        } else if (n > 0) {
          for (int64_t k = 0; k < K; ++k) std::memcpy(d + k * SW, src(k) + j0, sizeof(T) * n);
        }
      }
    }
  });
}

// B = W [K, N] row-major (trans_b=false) or W [N, K] used transposed (trans_b=true) -> column
// panels for panel::gemm_impl, in the pool (no page faults: backward packs W_hh every call).
template <typename T>
at::Tensor pack_columns(const at::Tensor& weight, bool trans_b, int64_t N, int64_t K) {
  constexpr int64_t NR = panel::kGemmV * panel::Vec<T>::L;
  at::Tensor packed = empty_big({(N + NR - 1) / NR, K, NR}, weight.options());
  const T* w = weight.data_ptr<T>();
  if (trans_b)
    pack_panels<T, true>(packed.data_ptr<T>(), K, N, [&](int64_t j) { return w + j * K; });
  else
    pack_panels<T, false>(packed.data_ptr<T>(), K, N, [&](int64_t k) { return w + k * N; });
  return packed;
}

// The gate panels in T, kept between calls. w may be of another dtype (the bfloat16 W_hh of a
// bfloat16 call, packed in float32): the cache holds on to the weight as given.
template <typename T>
at::Tensor gate_panels(const at::Tensor& w, int64_t G, int64_t H, int64_t U) {
  constexpr auto compute = c10::CppTypeToScalarType<T>::value;
  const int S = panel_stripe(int(G * U / panel::Vec<T>::L));
  return cached_packing(w, 100000 * S + 1000 + G * 100 + U, [&] {
    return pack_gate_panels<T>(w.scalar_type() == compute ? w : w.to(compute), G, H, U);
  });
}

}  // namespace fastrnn
