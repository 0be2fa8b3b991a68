// CUDA kernels of the recurrent ops (declarations and layout: kernels.cuh). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <utility>

#include "kernels.cuh"

namespace fastrnn {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return v; }

// sigmoid(-inf) = 1 / (1 + inf) = 0 exactly, as torch.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) { return int((n + kThreads - 1) / kThreads); }

// The (row, unit) pair of this thread in a step kernel (one thread per element of [rows, H]);
// false past the end.
__device__ __forceinline__ bool row_unit(int64_t rows, int64_t H, int64_t& idx, int64_t& b, int64_t& j) {
  idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H) return false;
  b = idx / H;
  j = idx % H;
  return true;
}

// ------------------------------------------------------------------------------ step forward
template <typename T>
__global__ void step_forward_kernel(StepForward<T> a) {
  using A = typename Acc<T>::type;
  const int64_t H = a.H;
  int64_t idx, b, j;
  if (!row_unit(a.rows, H, idx, b, j)) return;
  const int G = gates_per_unit(a.cell);
  const T* xr = a.xg + b * G * H;
  const T* hr = a.hg + b * G * H;
  A* ws = a.ws_gates ? a.ws_gates + b * G * H : nullptr;
  A hnew;
  if (a.cell == CellKind::LSTM) {
    const A i = sigmoid(to_acc(xr[j]) + to_acc(hr[j]));
    const A f = sigmoid(to_acc(xr[H + j]) + to_acc(hr[H + j]));
    const A g = tanh_(to_acc(xr[2 * H + j]) + to_acc(hr[2 * H + j]));
    const A o = sigmoid(to_acc(xr[3 * H + j]) + to_acc(hr[3 * H + j]));
    const A c = f * a.c[idx] + i * g;
    a.c[idx] = c;
    hnew = o * tanh_(c);
    if (ws) {
      ws[j] = i;
      ws[H + j] = f;
      ws[2 * H + j] = g;
      ws[3 * H + j] = o;
      a.ws_aux[idx] = c;
    }
    if (a.ws_hpre) a.ws_hpre[idx] = hnew;
  } else if (a.cell == CellKind::GRU) {
    const A r = sigmoid(to_acc(xr[j]) + to_acc(hr[j]));
    const A z = sigmoid(to_acc(xr[H + j]) + to_acc(hr[H + j]));
    const A hn = to_acc(hr[2 * H + j]) + (a.b_hn ? to_acc(a.b_hn[j]) : A(0));
    const A n = tanh_(to_acc(xr[2 * H + j]) + r * hn);
    hnew = (A(1) - z) * n + z * to_acc(a.h[idx]);
    if (ws) {
      ws[j] = r;
      ws[H + j] = z;
      ws[2 * H + j] = n;
      a.ws_aux[idx] = hn;
    }
  } else {
    const A v = to_acc(xr[j]) + to_acc(hr[j]);
    // relu keeps a NaN (as torch's clamp_min / relu do); v > 0 would turn it into 0.
    hnew = a.cell == CellKind::RNN_TANH ? tanh_(v) : (v < A(0) ? A(0) : v);
  }
  const T hv = from_acc<T>(hnew);
  if (a.out) a.out[idx] = hv;
  if (a.h) a.h[idx] = hv;
}

// ----------------------------------------------------------------------------- step backward
template <typename T>
__global__ void step_backward_kernel(StepBackward<T> a) {
  using A = typename Acc<T>::type;
  const int64_t H = a.H;
  int64_t idx, b, j;
  if (!row_unit(a.rows, H, idx, b, j)) return;
  const int G = gates_per_unit(a.cell);
  A dh = to_acc(a.dh[idx]);
  if (a.grad_out) dh += to_acc(a.grad_out[idx]);
  T* dg = a.dg + b * G * H;
  if (a.cell == CellKind::LSTM) {
    const A* gt = a.gates + b * G * H;
    const A i = gt[j], f = gt[H + j], g = gt[2 * H + j], o = gt[3 * H + j];
    const A c = a.aux[idx];
    const A c_prev = b < a.n_prev ? a.prev_c[idx] : to_acc(a.init_c[idx]);
    const A tc = tanh_(c);
    const A dct = a.dc[idx] + dh * o * (A(1) - tc * tc);
    a.dc[idx] = dct * f;
    dg[j] = from_acc<T>(dct * g * i * (A(1) - i));
    dg[H + j] = from_acc<T>(dct * c_prev * f * (A(1) - f));
    dg[2 * H + j] = from_acc<T>(dct * i * (A(1) - g * g));
    dg[3 * H + j] = from_acc<T>(dh * tc * o * (A(1) - o));
  } else if (a.cell == CellKind::GRU) {
    const A* gt = a.gates + b * G * H;
    const A r = gt[j], z = gt[H + j], n = gt[2 * H + j];
    const A hn = a.aux[idx];
    const A h_prev = to_acc(b < a.n_prev ? a.prev_h[idx] : a.init_h[idx]);
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dz = dh * (h_prev - n) * z * (A(1) - z);
    const A dr = dn * hn * r * (A(1) - r);
    T* dgh = a.dg_h + b * G * H;
    dg[j] = dgh[j] = from_acc<T>(dr);
    dg[H + j] = dgh[H + j] = from_acc<T>(dz);
    dg[2 * H + j] = from_acc<T>(dn);
    dgh[2 * H + j] = from_acc<T>(dn * r);
    a.dh[idx] = from_acc<T>(dh * z);
  } else {
    const A y = to_acc(a.y[idx]);
    // tanh' = 1 - y^2; relu passes the gradient where y > 0 and where y is NaN (as torch).
    const A d = a.cell == CellKind::RNN_TANH ? dh * (A(1) - y * y) : (y > A(0) || y != y ? dh : A(0));
    dg[j] = from_acc<T>(d);
  }
}

template <typename T>
__global__ void add_into_kernel(T* dst, const T* src, int64_t n) {
  using A = typename Acc<T>::type;
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n) dst[k] = from_acc<T>(A(to_acc(dst[k])) + A(to_acc(src[k])));
}

template <typename T>
__global__ void gather_rows_kernel(T* dst, const T* src_a, const T* src_b, const int* idx, int64_t n,
                                   int64_t width) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n * width) return;
  const int64_t r = k / width, c = k % width;
  const int s = idx[r];
  dst[k] = s >= 0 ? src_a[int64_t(s) * width + c] : src_b[int64_t(-1 - s) * width + c];
}

// ------------------------------------------------------------------------------ persistent
// Block j owns hidden units [j*J, j*J + J): the G*J rows of W_hh that feed them sit in registers
// (warp w holds rows w*RPW .. w*RPW+RPW-1; lane l holds columns l, l+32, ..., KPT of them). A
// step: load h_prev [B, H] into shared memory, each warp forms its rows' dot products with every
// batch row and reduces them across lanes, then the block's threads do the gate math for its
// units, write h' and the output, and the grid meets at a barrier before the next step reads h'.
constexpr int kMaxWarps = 16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// All blocks resident (cooperative launch). `target`: blocks * (barriers so far).
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    // (a signed difference: correct across the counter's wrap at 2^32 arrivals)
    while (int(*static_cast<volatile unsigned*>(counter) - target) < 0) {
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T, int KPT, int RPW, int MAXB>
__global__ void __launch_bounds__(kMaxWarps * 32, 1) persistent_kernel(Persistent<T> p, int J) {
  extern __shared__ float smem[];
  constexpr int HP = 32 * KPT;
  const int G = gates_per_unit(p.cell);
  const int B = int(p.B), H = int(p.H);
  const int u0 = blockIdx.x * J;
  const int nJ = min(J, H - u0);
  const int R = G * J;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* hs = smem;                     // [B][HP] h_prev, zero beyond H
  float* pre = hs + B * HP;             // [nw*RPW][MAXB] dot products of the block's rows

  float w[RPW][KPT];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    const bool valid = r < R && (r % J) < nJ;
    const int64_t row = valid ? int64_t(r / J) * H + u0 + r % J : 0;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int k = lane + 32 * i;
      w[rr][i] = (valid && k < H) ? to_acc(p.w_hh[row * H + k]) : 0.f;
    }
  }
  // The gate math: one (unit, batch row) pair per thread (the plan guarantees J*B <= threads),
  // which keeps its LSTM cell state in a register and loads its input-side gate values for the
  // next step before waiting at the barrier.
  const bool pw = int(threadIdx.x) < nJ * B;
  const int pb = pw ? threadIdx.x / nJ : 0, pu = pw ? threadIdx.x % nJ : 0, unit = u0 + pu;
  float c_state = (pw && p.cell == CellKind::LSTM) ? to_acc(p.cx[int64_t(pb) * H + unit]) : 0.f;
  float xv[4] = {0.f, 0.f, 0.f, 0.f};
  auto load_x = [&](int t) {
    if (!pw) return;
    const T* xr = p.xg + (int64_t(t) * B + pb) * G * H;
#pragma unroll
    for (int g = 0; g < 4; ++g)
      if (g < G) xv[g] = to_acc(xr[g * H + unit]);
  };

  const int steps = int(p.steps);
  load_x(p.reverse ? steps - 1 : 0);
  for (int s = 0; s < steps; ++s) {
    const int t = p.reverse ? steps - 1 - s : s;
    const float* hsrc = p.hbuf + int64_t((s + 1) & 1) * B * H;  // written by step s - 1
    // h_prev into shared memory, eight independent loads in flight per thread (L2 latency).
    constexpr int U = 8;
    const int total = B * HP;
    for (int e0 = threadIdx.x; e0 < total; e0 += U * blockDim.x) {
      float v[U];
#pragma unroll
      for (int q = 0; q < U; ++q) {
        const int e = e0 + q * blockDim.x;
        v[q] = 0.f;
        if (e < total) {
          const int b = e / HP, k = e % HP;
          if (k < H) v[q] = s == 0 ? to_acc(p.hx[int64_t(b) * H + k]) : __ldcg(hsrc + int64_t(b) * H + k);
        }
      }
#pragma unroll
      for (int q = 0; q < U; ++q) {
        const int e = e0 + q * blockDim.x;
        if (e < total) hs[e] = v[q];
      }
    }
    __syncthreads();

    float acc[RPW][MAXB];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
      for (int b = 0; b < MAXB; ++b) acc[rr][b] = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
#pragma unroll
      for (int b = 0; b < MAXB; ++b) {
        if (b < B) {
          const float hv = hs[b * HP + lane + 32 * i];
#pragma unroll
          for (int rr = 0; rr < RPW; ++rr) acc[rr][b] = fmaf(w[rr][i], hv, acc[rr][b]);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
      for (int b = 0; b < MAXB; ++b) {
        if (b < B) {
          const float v = warp_sum(acc[rr][b]);
          if (lane == 0) pre[(warp * RPW + rr) * MAXB + b] = v;
        }
      }
    __syncthreads();

    if (pw) {
      auto hh = [&](int g) { return pre[(g * J + pu) * MAXB + pb]; };
      float hnew;
      if (p.cell == CellKind::LSTM) {
        const float i = sigmoid(xv[0] + hh(0)), f = sigmoid(xv[1] + hh(1)), g = tanh_(xv[2] + hh(2)),
                    o = sigmoid(xv[3] + hh(3));
        c_state = f * c_state + i * g;
        hnew = o * tanh_(c_state);
      } else if (p.cell == CellKind::GRU) {
        const float r = sigmoid(xv[0] + hh(0)), z = sigmoid(xv[1] + hh(1));
        const float hn = hh(2) + (p.b_hn ? to_acc(p.b_hn[unit]) : 0.f);
        const float n = tanh_(xv[2] + r * hn);
        hnew = (1.f - z) * n + z * hs[pb * HP + unit];
      } else {
        const float v = xv[0] + hh(0);
        hnew = p.cell == CellKind::RNN_TANH ? tanh_(v) : (v < 0.f ? 0.f : v);
      }
      const T hv = from_acc<T>(hnew);
      p.out[(int64_t(t) * B + pb) * H + unit] = hv;
      // The next step reads the state as stored (rounded to T), as the per-step path does.
      p.hbuf[int64_t(s & 1) * B * H + int64_t(pb) * H + unit] = to_acc(hv);
      if (s == steps - 1) {
        p.hy[int64_t(pb) * H + unit] = hv;
        if (p.cell == CellKind::LSTM) p.cy[int64_t(pb) * H + unit] = from_acc<T>(c_state);
      }
    }
    if (s + 1 < steps) {
      load_x(p.reverse ? steps - 2 - s : s + 1);
      grid_barrier(p.barrier, unsigned(gridDim.x) * unsigned(s + 1));
    }
  }
}

struct PersistentPlan {
  int kpt = 0, rpw = 1, maxb = 1, J = 0, blocks = 0, warps = 0;
  size_t smem = 0;
};

PersistentPlan plan_persistent(CellKind cell, int64_t B, int64_t H, int sms) {
  PersistentPlan pl;
  if (B < 1 || B > 16 || H < 1 || H > 1024 || sms < 1) return pl;
  pl.kpt = H <= 64 ? 2 : H <= 256 ? 8 : H <= 512 ? 16 : 32;
  pl.rpw = pl.kpt == 32 ? 2 : 1;
  pl.maxb = B == 1 ? 1 : B <= 4 ? 4 : 16;
  pl.J = int((H + sms - 1) / sms);
  pl.blocks = int((H + pl.J - 1) / pl.J);
  const int rows = gates_per_unit(cell) * pl.J;
  pl.warps = (rows + pl.rpw - 1) / pl.rpw;
  if (pl.warps > kMaxWarps || pl.J * B > pl.warps * 32) {  // (the gate math: a thread per unit and row)
    pl.kpt = 0;
    return pl;
  }
  pl.smem = sizeof(float) * (size_t(B) * 32 * pl.kpt + size_t(pl.warps) * pl.rpw * pl.maxb);
  return pl;
}

template <typename T, int KPT, int RPW>
void* kernel_for_maxb(int maxb) {
  if (maxb == 1) return reinterpret_cast<void*>(&persistent_kernel<T, KPT, RPW, 1>);
  if (maxb == 4) return reinterpret_cast<void*>(&persistent_kernel<T, KPT, RPW, 4>);
  return reinterpret_cast<void*>(&persistent_kernel<T, KPT, RPW, 16>);
}

template <typename T>
void* kernel_for(const PersistentPlan& pl) {
  switch (pl.kpt) {
    case 2: return kernel_for_maxb<T, 2, 1>(pl.maxb);
    case 8: return kernel_for_maxb<T, 8, 1>(pl.maxb);
    case 16: return kernel_for_maxb<T, 16, 1>(pl.maxb);
    default: return kernel_for_maxb<T, 32, 2>(pl.maxb);
  }
}

// A kernel's dynamic shared-memory limit is one setting of the process (per device): calls are
// serialised from checking the plan to the launch, and the limit only ever goes up, so one thread
// cannot lower it under another's launch.
std::mutex& persistent_mutex() {
  static std::mutex mu;
  return mu;
}

// The plan for the current device, and whether all its blocks fit at once (one per SM at least).
// Caller holds persistent_mutex(). A failed query leaves no CUDA error pending.
template <typename T>
bool fits_locked(const PersistentPlan& pl, int sms) {
  if (pl.kpt == 0) return false;
  const void* k = kernel_for<T>(pl);
  static std::map<std::pair<int, const void*>, size_t> smem_set;  // the limit set so far
  int max_smem = 0, dev = 0, per_sm = 0;
  bool ok = cudaGetDevice(&dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
            pl.smem <= size_t(max_smem);
  if (ok) {
    size_t& set = smem_set[{dev, k}];
    if (pl.smem > set) {
      ok = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.smem)) == cudaSuccess;
      if (ok) set = pl.smem;
    }
  }
  ok = ok && cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, pl.warps * 32, pl.smem) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  return ok && per_sm >= 1 && pl.blocks <= per_sm * sms;
}

int sm_count(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return sms;
}

}  // namespace

template <typename T>
cudaError_t step_forward(const StepForward<T>& a, cudaStream_t stream) {
  if (a.rows * a.H == 0) return cudaSuccess;
  step_forward_kernel<T><<<blocks_for(a.rows * a.H), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t step_backward(const StepBackward<T>& a, cudaStream_t stream) {
  if (a.rows * a.H == 0) return cudaSuccess;
  step_backward_kernel<T><<<blocks_for(a.rows * a.H), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_rows(T* dst, const T* src_a, const T* src_b, const int* idx, int64_t n, int64_t width,
                        cudaStream_t stream) {
  if (n * width == 0) return cudaSuccess;
  gather_rows_kernel<T><<<blocks_for(n * width), kThreads, 0, stream>>>(dst, src_a, src_b, idx, n, width);
  return cudaGetLastError();
}

template <typename T>
cudaError_t add_into(T* dst, const T* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  add_into_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

template <typename T>
bool persistent_fits(CellKind cell, int64_t B, int64_t H, int device) {
  const int sms = sm_count(device);
  std::lock_guard<std::mutex> lock(persistent_mutex());
  return fits_locked<T>(plan_persistent(cell, B, H, sms), sms);
}

template <typename T>
cudaError_t persistent_forward(const Persistent<T>& a, int device, cudaStream_t stream) {
  const int sms = sm_count(device);
  const PersistentPlan pl = plan_persistent(a.cell, a.B, a.H, sms);
  std::lock_guard<std::mutex> lock(persistent_mutex());
  if (!fits_locked<T>(pl, sms)) return cudaErrorNotSupported;
  cudaError_t e = cudaMemsetAsync(a.barrier, 0, sizeof(unsigned), stream);
  if (e != cudaSuccess) return e;
  Persistent<T> p = a;
  int J = pl.J;
  void* args[] = {&p, &J};
  return cudaLaunchCooperativeKernel(kernel_for<T>(pl), dim3(pl.blocks), dim3(pl.warps * 32), args, pl.smem, stream);
}

#define FASTRNN_INSTANTIATE(T)                                                                                   \
  template cudaError_t step_forward<T>(const StepForward<T>&, cudaStream_t);                                   \
  template cudaError_t step_backward<T>(const StepBackward<T>&, cudaStream_t);                                 \
  template cudaError_t gather_rows<T>(T*, const T*, const T*, const int*, int64_t, int64_t, cudaStream_t); \
  template cudaError_t add_into<T>(T*, const T*, int64_t, cudaStream_t);

FASTRNN_INSTANTIATE(float)
FASTRNN_INSTANTIATE(double)
FASTRNN_INSTANTIATE(__half)
FASTRNN_INSTANTIATE(__nv_bfloat16)

#define FASTRNN_INSTANTIATE_PERSISTENT(T)                                                    \
  template bool persistent_fits<T>(CellKind, int64_t, int64_t, int);                        \
  template cudaError_t persistent_forward<T>(const Persistent<T>&, int, cudaStream_t);

FASTRNN_INSTANTIATE_PERSISTENT(float)
FASTRNN_INSTANTIATE_PERSISTENT(__half)
FASTRNN_INSTANTIATE_PERSISTENT(__nv_bfloat16)

}  // namespace cuda
}  // namespace fastrnn
