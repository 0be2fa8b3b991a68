// Large scratch and workspace tensors: on transparent huge pages, and kept for reuse.
//
// A fresh 40 MB tensor costs ~15 ms of page faults on first touch with 4 KiB pages (measured
// here: empty+fill of 6400x1536 floats, 16.9 ms; 2.4 ms on huge pages), and a training step
// of a big layer touches a few hundred MB of new workspace. Allocations of 2 MiB and more
// are therefore 2 MiB-aligned and advised MADV_HUGEPAGE (this is what torch's own
// THP_MEM_ALLOC_ENABLE=1 does, for our tensors only).
//
// Freed blocks go to a pool and the next request of the same rounded size takes one back: a
// training loop asks for the same workspace every iteration, and memory given back to the OS
// is not free to take again. Measured on this project's VM (LSTM T=100, B=64, I=H=512, training
// forward, 30 calls): with every workspace fresh from the OS, one call in five ran its time loop
// 2.5x slower throughout (127-205 ms against 62-75; the fault count was the same, each fault cost
// more); inference, which allocates no workspace, never did. The pool holds at most
// FASTRNN_POOL_MB (default 512) MB of free blocks, oldest given back first; 0 turns it off.
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
  // A block of exactly `bytes` (a multiple of 2 MiB) from the pool, or null.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->first == bytes) {
        void* p = it->second;
        cached_ -= bytes;
        free_.erase(it);
        return p;
      }
    return nullptr;
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
    limit_ = size_t(mb ? std::strtoull(mb, nullptr, 10) : 512) << 20;
  }
  std::mutex mu_;
  std::deque<std::pair<size_t, void*>> free_;  // oldest first
  size_t cached_ = 0, limit_ = 0;
};

inline at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
#if defined(__linux__)
  if (bytes >= kHuge && opts.device().is_cpu()) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = BigBlockPool::get().take(rounded);
    if (p == nullptr) {
      p = std::aligned_alloc(kHuge, rounded);
      if (p != nullptr) madvise(p, rounded, MADV_HUGEPAGE);  // advisory: ignored where THP is off
    }
    if (p != nullptr)
      return at::from_blob(p, sizes, [rounded](void* q) { BigBlockPool::get().give(q, rounded); }, opts);
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace fastrnn
