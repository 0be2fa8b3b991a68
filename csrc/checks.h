// Argument checks shared by the kernels. Every message names the op, the tensor and the
// constraint, and every check runs before a kernel touches memory.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <initializer_list>
#include <string>
#include <vector>

namespace fastrnn {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got device ",
              t.device());
}

// On the device of the kernel that runs (CUDA kernels: input's device).
inline void check_device(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  if (device.is_cpu()) return check_cpu(t, op, name);
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (input's device), got ", t.device());
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D tensor of shape ",
              shape_str(t.sizes()));
}

inline void check_shape(const at::Tensor& t, const char* op, const char* name, std::vector<int64_t> expected,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ", meaning, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                        const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " and ", ref_name,
                    " must have the same dtype, got ", t.scalar_type(), " and ", ref.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name, bool allow_bf16 = false,
                           bool allow_half = false) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || (allow_bf16 && s == at::kBFloat16) ||
                        (allow_half && s == at::kHalf),
                    op, ": ", name,
                    allow_half   ? " must be float32, float64, float16 or bfloat16, got "
                    : allow_bf16 ? " must be float32, float64 or bfloat16, got "
                                 : " must be float32 or float64, got ",
                    s);
}

// The operands of one op: each defined and on the kernel's device (the CPU unless given), the
// first float32/float64 (or bfloat16 / float16 where the op has such a kernel) and the others
// of its dtype, each of rank `dim` (-1: checked elsewhere). Checks run in that order over all of
// them, so the first problem reported is the same whichever tensor has it.
struct Operand {
  const at::Tensor& t;
  const char* name;
  int64_t dim;
};

inline void check_operands(const char* op, std::initializer_list<Operand> operands, bool allow_bf16 = false,
                           const at::Device& device = at::Device(at::kCPU), bool allow_half = false) {
  for (const Operand& o : operands) {
    check_defined(o.t, op, o.name);
    check_device(o.t, op, o.name, device);
  }
  const Operand& ref = *operands.begin();
  check_floating(ref.t, op, ref.name, allow_bf16, allow_half);
  for (const Operand& o : operands)
    if (&o != &ref) check_dtype(o.t, op, o.name, ref.t, ref.name);
  for (const Operand& o : operands)
    if (o.dim >= 0) check_dim(o.t, op, o.name, o.dim);
}

}  // namespace fastrnn
