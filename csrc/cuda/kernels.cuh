// CUDA kernels of the recurrent ops, free of torch headers: `make cuda-check` compiles
// kernels.cu with nvcc alone (sm_80, sm_90), and the torch glue (recurrent_cuda.cpp) calls the
// launchers below with raw pointers and the current stream.
//
// Layout: every matrix row-major and contiguous. T is the storage type (float, double, __half,
// __nv_bfloat16); gate math, the LSTM cell state and the workspace saved for backward are in
// Acc<T> (double for double, float otherwise). Gate order as torch.nn: LSTM (i, f, g, o), GRU
// (r, z, n).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastrnn {
namespace cuda {

#ifdef __CUDACC__
#define FASTRNN_HD __host__ __device__
#else
#define FASTRNN_HD
#endif

enum class CellKind : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

FASTRNN_HD inline int gates_per_unit(CellKind c) { return c == CellKind::LSTM ? 4 : (c == CellKind::GRU ? 3 : 1); }

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// One step's pointwise forward over `rows` active rows (a prefix of the batch).
template <typename T>
struct StepForward {
  using A = typename Acc<T>::type;
  CellKind cell = CellKind::LSTM;
  int64_t rows = 0, H = 0;
  const T* xg = nullptr;    // [rows, G*H] x W_ih^T + folded biases (GRU: b_hn not folded)
  const T* hg = nullptr;    // [rows, G*H] h_prev W_hh^T
  const T* b_hn = nullptr;  // GRU: [H], or null without biases
  A* c = nullptr;           // LSTM: cell state [rows, H], updated in place
  T* h = nullptr;           // state [rows, H]: GRU reads h_prev here; all write h' here (LSTM: without projection)
  T* out = nullptr;         // output rows [rows, H]; LSTM with projection: o*tanh(c) (projected afterwards)
  A* ws_gates = nullptr;    // training: gate activations [rows, G*H]
  A* ws_aux = nullptr;      // training: LSTM c_t, GRU W_hn h + b_hn, LSTM with projection unused [rows, H]
  A* ws_hpre = nullptr;     // training, LSTM with projection: o*tanh(c) [rows, H]
};

// One step's pointwise backward. The state the step started from is row b of the previous step
// (prev_* rows) for b < n_prev, else the initial state (init_*): packed sequences start or end
// at different steps.
template <typename T>
struct StepBackward {
  using A = typename Acc<T>::type;
  CellKind cell = CellKind::LSTM;
  int64_t rows = 0, H = 0, n_prev = 0;
  const T* grad_out = nullptr;  // [rows, H] added to dh, or null (LSTM with projection: dh is the total)
  T* dh = nullptr;              // [rows, H] gradient of h' from later steps; GRU: replaced by dh' * z
  A* dc = nullptr;              // LSTM: [rows, H] in: dc', out: dc_prev
  const A* gates = nullptr;     // [rows, G*H] activations
  const A* aux = nullptr;       // LSTM c_t / GRU W_hn h + b_hn [rows, H]
  const A* prev_c = nullptr;    // LSTM: c of the previous step's rows
  const T* init_c = nullptr;    // LSTM: cx
  const T* prev_h = nullptr;    // GRU: output rows of the previous step
  const T* init_h = nullptr;    // GRU: hx
  const T* y = nullptr;         // RNN: this step's output rows
  T* dg = nullptr;              // [rows, G*H] gradient of the gate pre-activations (input side)
  T* dg_h = nullptr;            // GRU: [rows, G*H] hidden side (the n part times r)
};

template <typename T>
cudaError_t step_forward(const StepForward<T>& a, cudaStream_t stream);
template <typename T>
cudaError_t step_backward(const StepBackward<T>& a, cudaStream_t stream);

// dst[r, :] = src_a[idx[r], :] if idx[r] >= 0 else src_b[-1 - idx[r], :]; each row `width` wide.
template <typename T>
cudaError_t gather_rows(T* dst, const T* src_a, const T* src_b, const int* idx, int64_t n, int64_t width,
                        cudaStream_t stream);

// dst[i] += src[i] for i < n (accumulated in Acc<T>).
template <typename T>
cudaError_t add_into(T* dst, const T* src, int64_t n, cudaStream_t stream);

// Persistent small-batch inference (dense input, no projection): one launch runs every step.
// Each block keeps the W_hh rows of its hidden units in registers for the whole sequence and the
// blocks meet at a grid barrier once a step (after Diamos et al. 2016, "Persistent RNNs").
template <typename T>
struct Persistent {
  CellKind cell = CellKind::LSTM;
  int64_t steps = 0, B = 0, H = 0;
  bool reverse = false;
  const T* xg = nullptr;     // [steps, B, G*H] as StepForward::xg
  const T* w_hh = nullptr;   // [G*H, H]
  const T* b_hn = nullptr;   // GRU, or null
  const T* hx = nullptr;     // [B, H]
  const T* cx = nullptr;     // LSTM [B, H]
  T* out = nullptr;          // [steps, B, H]
  T* hy = nullptr;           // [B, H]
  T* cy = nullptr;           // LSTM [B, H]
  float* hbuf = nullptr;     // scratch [2, B, H]
  unsigned* barrier = nullptr;  // scratch, one counter; zeroed by the launcher
};

// Whether the persistent kernel takes this shape on `device` (its registers, shared memory and
// co-resident blocks); false: use the per-step path.
template <typename T>
bool persistent_fits(CellKind cell, int64_t B, int64_t H, int device);
template <typename T>
cudaError_t persistent_forward(const Persistent<T>& a, int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrnn
