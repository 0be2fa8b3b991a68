// Large scratch and workspace tensors on transparent huge pages.
//
// A fresh 40 MB tensor costs ~15 ms of page faults on first touch with 4 KiB pages (measured
// here: empty+fill of 6400x1536 floats, 16.9 ms; 2.4 ms on huge pages), and a training step
// of a big layer touches a few hundred MB of new workspace. Allocations of 2 MiB and more
// are therefore 2 MiB-aligned and advised MADV_HUGEPAGE (this is what torch's own
// THP_MEM_ALLOC_ENABLE=1 does, for our tensors only). Freed with the tensor; nothing is cached.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {

inline at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
#if defined(__linux__)
  if (bytes >= kHuge && opts.device().is_cpu()) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (p != nullptr) {
      madvise(p, rounded, MADV_HUGEPAGE);  // advisory: ignored where THP is off
      return at::from_blob(p, sizes, [](void* q) { std::free(q); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace fastrnn
