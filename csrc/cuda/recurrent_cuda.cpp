// CUDA implementations of the recurrent ops (schemas: csrc/registration.cpp), registered with
// TORCH_LIBRARY_IMPL(fastrnn, CUDA). Same contract as the CPU kernels (csrc/cpu/recurrent.cpp):
// one layer, one direction, dense [T, B, I] or packed [N, I] input, the same workspace shapes
// (float32 for float16/bfloat16 input).
//
// Flow of a forward call (the general path):
//   1. xg = X W_ih^T + folded biases: one cuBLAS GEMM (ATen's handle and current stream).
//   2. per step: hg = h W_hh^T (cuBLAS, W_hh as it lies), then one fused pointwise kernel over the
//      active rows (kernels.cu) writing the new state, the output row and, in training, what
//      backward needs. The LSTM projection is one more GEMM a step.
// Inference on small dense batches runs every step in one persistent kernel instead.
// Backward: per step (in reverse) one pointwise kernel and one GEMM; the weight gradients, the
// bias gradients and the input gradient are single GEMMs / reductions over all steps.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cuda/kernels.cuh"
#include "recurrent_shape.h"

namespace fastrnn {
namespace {

using at::Tensor;
using OptT = c10::optional<at::Tensor>;
namespace fc = fastrnn::cuda;

// c10's storage types to CUDA's (same layout).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
typename CudaType<T>::type* ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<typename CudaType<T>::type*>(t.data_ptr<T>()) : nullptr;
}
template <typename A>
A* acc_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

struct Args {
  const char* op;
  Cell cell;
  fc::CellKind kind;
  RecurrentShape shape;
  Tensor x, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx;
  at::ScalarType dtype, acc;  // storage dtype; compute / workspace dtype
};

Args prepare(const char* op, Cell cell, bool relu, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
             const OptT& b_ih, const OptT& b_hh, const OptT& w_hr, const Tensor& hx, const OptT& cx,
             const OptT& batch_sizes, bool reverse) {
  Args a;
  a.op = op;
  a.cell = cell;
  a.kind = cell == Cell::LSTM ? fc::CellKind::LSTM
           : cell == Cell::GRU ? fc::CellKind::GRU
                               : (relu ? fc::CellKind::RNN_RELU : fc::CellKind::RNN_TANH);
  check_defined(input, op, "input");
  a.shape = validate_recurrent(op, cell, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse,
                               input.device(), /*allow_half=*/true);
  const RecurrentShape& s = a.shape;
  a.x = input.reshape({s.sched.N, s.I}).contiguous();
  a.w_ih = w_ih.contiguous();
  a.w_hh = w_hh.contiguous();
  if (b_ih.has_value() && b_ih->defined()) {
    a.b_ih = b_ih->contiguous();
    a.b_hh = b_hh->contiguous();
  }
  if (w_hr.has_value() && w_hr->defined()) a.w_hr = w_hr->contiguous();
  a.hx = hx.contiguous();
  if (cell == Cell::LSTM) a.cx = cx->contiguous();
  a.dtype = input.scalar_type();
  a.acc = a.dtype == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

// The per-step GEMMs call cuBLAS directly (ATen's handle, on the current stream): at::mm_out on
// row slices costs ~10 us of host time a call (dispatcher, views), more than a small step's GPU
// work. Row-major C[m, n] = A[m, k] B^T with B stored [n, k] ("nt"), or A[m, k] B with B stored
// [k, n] ("nn"); cuBLAS is column-major, so both are computed as C^T = op(B)^T A^T. float32
// accumulation for every dtype but float64; TF32 only where torch allows it for cuBLAS.
template <typename T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, c10::Half>) return CUDA_R_16F;
  return CUDA_R_16BF;
}

template <typename T>
void gemm(cublasOperation_t opa, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          float beta, T* c, int64_t ldc) {
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  constexpr cudaDataType_t dt = blas_type<T>();
  cublasStatus_t st;
  if constexpr (std::is_same_v<T, double>) {
    const double one = 1.0, be = beta;
    st = cublasGemmEx(handle, opa, CUBLAS_OP_N, int(m), int(n), int(k), &one, a, dt, int(lda), b, dt, int(ldb), &be, c,
                      dt, int(ldc), CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT);
  } else {
    const float one = 1.f;
    const cublasComputeType_t ct = std::is_same_v<T, float> && at::globalContext().allowTF32CuBLAS()
                                       ? CUBLAS_COMPUTE_32F_FAST_TF32
                                       : CUBLAS_COMPUTE_32F;
    st = cublasGemmEx(handle, opa, CUBLAS_OP_N, int(m), int(n), int(k), &one, a, dt, int(lda), b, dt, int(ldb), &beta,
                      c, dt, int(ldc), ct, CUBLAS_GEMM_DEFAULT);
  }
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "fastrnn: cublasGemmEx failed with status ", int(st));
}

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c, float beta = 0.f) {
  if (m > 0 && n > 0) gemm<T>(CUBLAS_OP_T, n, m, k, b, k, a, k, beta, c, n);
}

template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c, float beta = 0.f) {
  if (m > 0 && n > 0) gemm<T>(CUBLAS_OP_N, n, m, k, b, n, a, k, beta, c, n);
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

struct ForwardOut {
  Tensor output, hy, cy, ws0, ws1, ws2;
};

template <typename T>
bool try_persistent(const Args& a, const Tensor& xg, const Tensor& b_hn, ForwardOut& o, cudaStream_t stream) {
  using CT = typename CudaType<T>::type;
  const RecurrentShape& s = a.shape;
  const int device = a.x.device().index();
  if (!fc::persistent_fits<CT>(a.kind, s.sched.B, s.H, device)) return false;
  fc::Persistent<CT> p;
  p.cell = a.kind;
  p.steps = s.sched.T;
  p.B = s.sched.B;
  p.H = s.H;
  p.reverse = s.sched.reverse;
  p.xg = ptr<T>(xg);
  p.w_hh = ptr<T>(a.w_hh);
  p.b_hn = ptr<T>(b_hn);
  p.hx = ptr<T>(a.hx);
  p.cx = ptr<T>(a.cx);
  p.out = ptr<T>(o.output);
  p.hy = ptr<T>(o.hy);
  p.cy = ptr<T>(o.cy);
  // Scratch: h ping-pong buffers and the barrier counter (one allocation).
  Tensor scratch = at::empty({2 * s.sched.B * s.H + 1}, a.x.options().dtype(at::kFloat));
  p.hbuf = scratch.data_ptr<float>();
  p.barrier = reinterpret_cast<unsigned*>(p.hbuf + 2 * s.sched.B * s.H);
  const cudaError_t e = fc::persistent_forward<CT>(p, device, stream);
  if (e == cudaErrorNotSupported || e == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return false;
  }
  check_launch(e, a.op);
  return true;
}

template <typename T>
ForwardOut forward_impl(const Args& a, bool train) {
  using CT = typename CudaType<T>::type;
  using A = typename fc::Acc<CT>::type;
  const RecurrentShape& s = a.shape;
  const Schedule& sc = s.sched;
  const int64_t N = sc.N, B = sc.B, H = s.H, P = s.P, GH = s.G * s.H;
  const bool proj = a.w_hr.defined();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions opts = a.x.options(), aopts = opts.dtype(a.acc);

  Tensor b_hn;
  const Tensor bias = folded_bias(a.cell, a.shape.H, a.b_ih, a.b_hh, b_hn);
  const Tensor xg = bias.defined() ? at::addmm(bias, a.x, a.w_ih.t()) : at::mm(a.x, a.w_ih.t());

  ForwardOut o;
  o.output = at::empty(sc.lead_with(P), opts);
  const bool dense = sc.lead.size() == 2;
  if constexpr (!std::is_same_v<T, double>) {
    if (!train && dense && !proj) {
      o.hy = at::empty({B, P}, opts);
      o.cy = a.cell == Cell::LSTM ? at::empty({B, H}, opts) : at::empty({0}, opts);
      if (try_persistent<T>(a, xg, b_hn, o, stream)) {
        o.ws0 = o.ws1 = o.ws2 = at::empty({0}, aopts);
        return o;
      }
    }
  }
  const Tensor out = o.output.view({N, P});
  Tensor h = a.hx.clone();  // [B, P] the state; the final one is hy
  Tensor c = a.cell == Cell::LSTM ? a.cx.to(a.acc, /*non_blocking=*/false, /*copy=*/true) : Tensor();
  Tensor hg = at::empty({B, GH}, opts);
  Tensor hpre = proj ? at::empty({B, H}, opts) : Tensor();
  if (train && a.cell != Cell::RNN) {
    o.ws0 = at::empty({N, GH}, aopts);
    o.ws1 = at::empty({N, H}, aopts);
  }
  if (train && proj) o.ws2 = at::empty({N, H}, aopts);

  for (int64_t step = 0; step < sc.T; ++step) {
    const int64_t t = sc.time_at(step), bs = sc.bs[t], r0 = sc.off[t];
    gemm_nt<T>(bs, GH, P, h.data_ptr<T>(), a.w_hh.data_ptr<T>(), hg.data_ptr<T>());
    fc::StepForward<CT> k;
    k.cell = a.kind;
    k.rows = bs;
    k.H = H;
    k.xg = ptr<T>(xg) + r0 * GH;
    k.hg = ptr<T>(hg);
    k.b_hn = ptr<T>(b_hn);
    if (c.defined()) k.c = acc_ptr<A>(c);
    if (proj) {
      k.out = ptr<T>(hpre);
    } else {
      k.h = ptr<T>(h);
      k.out = ptr<T>(out) + r0 * P;
    }
    if (o.ws0.defined()) {
      k.ws_gates = acc_ptr<A>(o.ws0) + r0 * GH;
      k.ws_aux = acc_ptr<A>(o.ws1) + r0 * H;
    }
    if (o.ws2.defined()) k.ws_hpre = acc_ptr<A>(o.ws2) + r0 * H;
    check_launch(fc::step_forward<CT>(k, stream), a.op);
    if (proj) {
      T* out_t = out.data_ptr<T>() + r0 * P;
      gemm_nt<T>(bs, P, H, hpre.data_ptr<T>(), a.w_hr.data_ptr<T>(), out_t);
      C10_CUDA_CHECK(cudaMemcpyAsync(h.data_ptr<T>(), out_t, bs * P * sizeof(T), cudaMemcpyDeviceToDevice, stream));
    }
  }
  o.hy = h;
  o.cy = c.defined() ? c.to(a.dtype) : at::empty({0}, opts);
  for (Tensor* t : {&o.ws0, &o.ws1, &o.ws2})
    if (!t->defined()) *t = at::empty({0}, aopts);
  return o;
}

ForwardOut forward(const Args& a, bool train) {
  c10::cuda::CUDAGuard guard(a.x.device());
  ForwardOut o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastrnn_cuda_forward",
                                  [&] { o = forward_impl<scalar_t>(a, train); });
  return o;
}

// ------------------------------------------------------------------------------------ backward
struct BackwardOut {
  Tensor grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr, grad_hx, grad_cx;
};

// The rows each row's step started from (Schedule::prev_row; -1 - b for the initial state of b).
Tensor prev_rows(const Schedule& sc, const at::Device& device) {
  Tensor idx = at::empty({sc.N}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int* p = idx.data_ptr<int>();
  for (int64_t t = 0; t < sc.T; ++t)
    for (int64_t b = 0; b < sc.bs[t]; ++b) {
      const int64_t r = sc.prev_row(t, b);
      p[sc.off[t] + b] = int(r >= 0 ? r : -1 - b);
    }
  return idx.to(device, /*non_blocking=*/true);
}

template <typename T>
BackwardOut backward_impl(const Args& a, const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                          const Tensor& output, const Tensor& gates, const Tensor& aux, const Tensor& proj_input) {
  using CT = typename CudaType<T>::type;
  using A = typename fc::Acc<CT>::type;
  const RecurrentShape& s = a.shape;
  const Schedule& sc = s.sched;
  const int64_t N = sc.N, B = sc.B, H = s.H, P = s.P, GH = s.G * s.H, T_ = sc.T;
  const bool proj = a.w_hr.defined();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions opts = a.x.options();

  const Tensor gout = grad_output.reshape({N, P}).contiguous();
  const Tensor out = output.reshape({N, P}).contiguous();
  const Tensor ws_g = gates.defined() && gates.numel() ? gates.contiguous() : Tensor();
  const Tensor ws_a = aux.defined() && aux.numel() ? aux.contiguous() : Tensor();
  Tensor dh = grad_hy.contiguous().clone();  // [B, P]
  Tensor dc = a.cell == Cell::LSTM ? grad_cy.to(a.acc, false, /*copy=*/true).contiguous() : Tensor();
  Tensor dg = at::empty({N, GH}, opts);
  Tensor dg_h = a.cell == Cell::GRU ? at::empty({N, GH}, opts) : dg;
  // With a projection, the gradient of each output row (grad_output + the recurrent dh) is kept
  // for dW_hr: grad_output copied once here, dh added a step at a time (a kernel, no dispatcher).
  Tensor dh_tot = proj ? gout.clone() : Tensor();
  Tensor dhpre = proj ? at::empty({B, H}, opts) : Tensor();

  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = sc.time_at(step), bs = sc.bs[t], r0 = sc.off[t];
    const int64_t tp = sc.reverse ? t + 1 : t - 1;  // the step this one started from
    const bool has_prev = tp >= 0 && tp < T_;
    const int64_t n_prev = has_prev ? std::min(bs, sc.bs[tp]) : 0, p0 = has_prev ? sc.off[tp] : 0;
    fc::StepBackward<CT> k;
    k.cell = a.kind;
    k.rows = bs;
    k.H = H;
    k.n_prev = n_prev;
    if (proj) {
      CT* tot = ptr<T>(dh_tot) + r0 * P;
      check_launch(fc::add_into<CT>(tot, ptr<T>(dh), bs * P, stream), a.op);
      gemm_nn<T>(bs, H, P, reinterpret_cast<const T*>(tot), a.w_hr.data_ptr<T>(), dhpre.data_ptr<T>());
      k.dh = ptr<T>(dhpre);
    } else {
      k.grad_out = ptr<T>(gout) + r0 * P;
      k.dh = ptr<T>(dh);
    }
    if (ws_g.defined()) {
      k.gates = acc_ptr<A>(ws_g) + r0 * GH;
      k.aux = acc_ptr<A>(ws_a) + r0 * H;
    }
    if (a.cell == Cell::LSTM) {
      k.dc = acc_ptr<A>(dc);
      k.prev_c = acc_ptr<A>(ws_a) + p0 * H;
      k.init_c = ptr<T>(a.cx);
    } else if (a.cell == Cell::GRU) {
      k.prev_h = ptr<T>(out) + p0 * P;
      k.init_h = ptr<T>(a.hx);
      k.dg_h = ptr<T>(dg_h) + r0 * GH;
    } else {
      k.y = ptr<T>(out) + r0 * P;
    }
    k.dg = ptr<T>(dg) + r0 * GH;
    check_launch(fc::step_backward<CT>(k, stream), a.op);
    // dh_prev = dG_h W_hh (+ the GRU's direct term dh' * z, left in dh by the kernel)
    gemm_nn<T>(bs, P, GH, dg_h.data_ptr<T>() + r0 * GH, a.w_hh.data_ptr<T>(), dh.data_ptr<T>(),
               a.cell == Cell::GRU ? 1.f : 0.f);
  }

  BackwardOut g;
  g.grad_input = at::mm(dg, a.w_ih).view(sc.lead_with(s.I));
  g.grad_w_ih = at::mm(dg.t(), a.x);
  // dW_hh = sum over rows of dG_h^T h_prev: h_prev is the output row of the step before, or hx.
  const bool dense = sc.lead.size() == 2;
  if (dense) {
    const int64_t M = N - B;  // rows whose step has a previous step
    const Tensor dg_first = sc.reverse ? dg_h.narrow(0, N - B, B) : dg_h.narrow(0, 0, B);
    g.grad_w_hh = at::mm(dg_first.t(), a.hx);
    if (M > 0) {
      const Tensor dg_rest = sc.reverse ? dg_h.narrow(0, 0, M) : dg_h.narrow(0, B, M);
      const Tensor h_rest = sc.reverse ? out.narrow(0, B, M) : out.narrow(0, 0, M);
      g.grad_w_hh.addmm_(dg_rest.t(), h_rest);
    }
  } else {
    const Tensor idx = prev_rows(sc, a.x.device());
    Tensor h_prev = at::empty({N, P}, opts);
    check_launch(fc::gather_rows<CT>(ptr<T>(h_prev), ptr<T>(out), ptr<T>(a.hx), idx.data_ptr<int>(), N, P, stream),
                 a.op);
    g.grad_w_hh = at::mm(dg_h.t(), h_prev);
  }
  g.grad_b_ih = dg.sum(0);
  g.grad_b_hh = a.cell == Cell::GRU ? dg_h.sum(0) : g.grad_b_ih.clone();
  g.grad_w_hr = proj ? at::mm(dh_tot.t(), proj_input.contiguous().to(a.dtype)) : at::empty({0}, opts);
  g.grad_hx = dh;
  g.grad_cx = dc.defined() ? dc.to(a.dtype) : at::empty({0}, opts);
  return g;
}

BackwardOut backward(const Args& a, const Tensor& grad_output, const Tensor& grad_hy, const OptT& grad_cy,
                     const Tensor& output, const Tensor& ws0, const Tensor& ws1, const Tensor& ws2) {
  validate_recurrent_backward(a.op, a.cell, a.shape, a.x, a.x.device(), a.acc, a.w_hr.defined(), grad_output, grad_hy,
                              grad_cy, output, ws0, ws1, ws2);
  c10::cuda::CUDAGuard guard(a.x.device());
  BackwardOut g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastrnn_cuda_backward", [&] {
    g = backward_impl<scalar_t>(a, grad_output, grad_hy, grad_cy.has_value() ? *grad_cy : Tensor(), output, ws0, ws1,
                                ws2);
  });
  return g;
}

// ----------------------------------------------------------------------------------------
// Op entry points
// ----------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& input, const Tensor& w_ih,
                                                                        const Tensor& w_hh, const OptT& b_ih,
                                                                        const OptT& b_hh, const OptT& w_hr,
                                                                        const Tensor& hx, const Tensor& cx,
                                                                        const OptT& batch_sizes, bool reverse,
                                                                        bool train) {
  Args a = prepare("fastrnn.lstm_forward", Cell::LSTM, false, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx,
                   batch_sizes, reverse);
  ForwardOut o = forward(a, train);
  return {o.output, o.hy, o.cy, o.ws0, o.ws1, o.ws2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& w_ih,
    const Tensor& w_hh, const OptT& w_hr, const Tensor& hx, const Tensor& cx, const OptT& batch_sizes, bool reverse,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& proj_input,
    std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.lstm_backward", Cell::LSTM, false, input, w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr,
                   hx, cx, batch_sizes, reverse);
  BackwardOut g = backward(a, grad_output, grad_hy, grad_cy, output, gates, cells, proj_input);
  drop_unmasked(g, GradMask(output_mask), input.options());
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_w_hr, g.grad_hx, g.grad_cx};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                                       const OptT& b_ih, const OptT& b_hh, const Tensor& hx,
                                                       const OptT& batch_sizes, bool reverse, bool train) {
  Args a = prepare("fastrnn.gru_forward", Cell::GRU, false, input, w_ih, w_hh, b_ih, b_hh, c10::nullopt, hx,
                   c10::nullopt, batch_sizes, reverse);
  ForwardOut o = forward(a, train);
  return {o.output, o.hy, o.ws0, o.ws1};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& hx, const OptT& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& hn, std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.gru_backward", Cell::GRU, false, input, w_ih, w_hh, c10::nullopt, c10::nullopt,
                   c10::nullopt, hx, c10::nullopt, batch_sizes, reverse);
  const Tensor none = at::empty({0}, input.options());
  BackwardOut g = backward(a, grad_output, grad_hy, c10::nullopt, output, gates, hn, none);
  drop_unmasked(g, GradMask(output_mask), input.options());
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_hx};
}

std::tuple<Tensor, Tensor> rnn_forward(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih,
                                       const OptT& b_hh, const Tensor& hx, const OptT& batch_sizes, bool reverse,
                                       bool relu) {
  Args a = prepare("fastrnn.rnn_forward", Cell::RNN, relu, input, w_ih, w_hh, b_ih, b_hh, c10::nullopt, hx,
                   c10::nullopt, batch_sizes, reverse);
  ForwardOut o = forward(a, false);
  return {o.output, o.hy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& hx, const OptT& batch_sizes, bool reverse, bool relu, const Tensor& output,
    std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.rnn_backward", Cell::RNN, relu, input, w_ih, w_hh, c10::nullopt, c10::nullopt,
                   c10::nullopt, hx, c10::nullopt, batch_sizes, reverse);
  const Tensor none = at::empty({0}, input.options());
  BackwardOut g = backward(a, grad_output, grad_hy, c10::nullopt, output, none, none, none);
  drop_unmasked(g, GradMask(output_mask), input.options());
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_hx};
}

}  // namespace
}  // namespace fastrnn

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("lstm_forward", &fastrnn::lstm_forward);
  m.impl("lstm_backward", &fastrnn::lstm_backward);
  m.impl("gru_forward", &fastrnn::gru_forward);
  m.impl("gru_backward", &fastrnn::gru_backward);
  m.impl("rnn_forward", &fastrnn::rnn_forward);
  m.impl("rnn_backward", &fastrnn::rnn_backward);
}
