// Large scratch, workspace and gradient tensors: on transparent huge pages, and kept for reuse.
//
// A fresh 40 MB tensor costs ~15 ms of page faults on first touch with 4 KiB pages (measured
// here: empty+fill of 6400x1536 floats, 16.9 ms; 2.4 ms on huge pages), and a training step
// of a big layer touches a few hundred MB of new workspace. Allocations of 2 MiB and more
// are therefore 2 MiB-aligned and advised MADV_HUGEPAGE (this is what torch's own
// THP_MEM_ALLOC_ENABLE=1 does, for our tensors only).
//
// Freed blocks go to a pool and the next request of about the same size (up to 1.5x) takes one
// back: a training loop asks for the same workspace every iteration, and memory given back to
// the OS is not free to take again. Measured on this project's VM (LSTM T=100, B=64, I=H=512, training
// forward, 30 calls): with every workspace fresh from the OS, one call in five ran its time loop
// 2.5x slower throughout (127-205 ms against 62-75; the fault count was the same, each fault cost
// more); inference, which allocates no workspace, never did. The pool holds at most
// FASTRNN_POOL_MB (default 256) MB of free blocks, oldest given back first; 0 turns it off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {

class BigBlockPool {
 public:
  static BigBlockPool& get() {
    static BigBlockPool* pool = new BigBlockPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }
  // The smallest pooled block of at least `bytes` and at most 1.5x that (sequences of varying
  // length ask for varying sizes), or null; *got is set to the block's size.
  void* take(size_t bytes, size_t* got) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->first >= bytes && it->first <= bytes + bytes / 2 && (best == free_.end() || it->first < best->first))
        best = it;
    if (best == free_.end()) return nullptr;
    void* p = best->second;
    *got = best->first;
    cached_ -= best->first;
    free_.erase(best);
    return p;
  }
  void give(void* p, size_t bytes) {
    if (bytes > limit_) {
      std::free(p);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(bytes, p);
    cached_ += bytes;
    while (cached_ > limit_) {
      cached_ -= free_.front().first;
      std::free(free_.front().second);
      free_.pop_front();
    }
  }
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  BigBlockPool() {
    const char* mb = std::getenv("FASTRNN_POOL_MB");
    limit_ = size_t(mb ? std::strtoull(mb, nullptr, 10) : 256) << 20;
  }
  std::mutex mu_;
  std::deque<std::pair<size_t, void*>> free_;  // oldest first
  size_t cached_ = 0, limit_ = 0;
};

// Tensors of 256 KiB and more come from the pool (a 1 MiB weight gradient taken fresh costs
// ~0.2 ms of page faults, 4x a whole single-step backward); 2 MiB and more on huge pages.
inline at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  constexpr size_t kHuge = size_t(2) << 20, kMin = size_t(256) << 10, kGrain = size_t(64) << 10;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
#if defined(__linux__)
  if (bytes >= kMin && opts.device().is_cpu()) {
    const bool huge = bytes >= kHuge;
    const size_t grain = huge ? kHuge : kGrain;
    size_t block = (bytes + grain - 1) / grain * grain;
    void* p = BigBlockPool::get().take(block, &block);
    if (p == nullptr) {
      p = std::aligned_alloc(huge ? kHuge : 64, block);
      if (p != nullptr && huge) madvise(p, block, MADV_HUGEPAGE);  // advisory: ignored where THP is off
    }
    if (p != nullptr)
      return at::from_blob(p, sizes, [block](void* q) { BigBlockPool::get().give(q, block); }, opts);
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace fastrnn
