// helpers_probe.cu -- test-only kernels that exercise the helpers of kernels/cupybn.cuh that no
// product kernel uses yet (block reductions, Welford/Chan, vector access, conversions).
// Executed by the emulator tests (tests/test_cuda_launcher.py) and compiled by the NVRTC gate.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cupybn.cuh"

namespace probe {

using cupybn::index_t;

// out[b] = sum of x[b * per_block, (b + 1) * per_block), reduced with block_reduce(SumOp).
template <typename A>
__global__ void block_sum(const A* __restrict__ x, index_t per_block, A* __restrict__ out) {
  __shared__ A scratch[32];
  const A* seg = x + (index_t)blockIdx.x * per_block;
  A s = A(0);
  for (index_t i = cupybn::linear_thread_id(); i < per_block; i += cupybn::block_threads())
    s = cupybn::add_rn(s, seg[i]);
  s = cupybn::block_reduce(s, cupybn::SumOp(), A(0), scratch);
  if (cupybn::linear_thread_id() == 0) out[blockIdx.x] = s;
}

// Mean, m2 and count of each segment through welford_push + block_reduce(WelfordOp).
template <typename A>
__global__ void block_welford(const A* __restrict__ x, index_t per_block, A* __restrict__ mean,
                              A* __restrict__ m2, long long* __restrict__ count) {
  __shared__ cupybn::Welford<A> scratch[32];
  const A* seg = x + (index_t)blockIdx.x * per_block;
  cupybn::Welford<A> w = cupybn::welford_empty<A>();
  for (index_t i = cupybn::linear_thread_id(); i < per_block; i += cupybn::block_threads())
    cupybn::welford_push(w, seg[i]);
  w = cupybn::block_reduce(w, cupybn::WelfordOp(), cupybn::welford_empty<A>(), scratch);
  if (cupybn::linear_thread_id() == 0) {
    mean[blockIdx.x] = w.mean;
    m2[blockIdx.x] = w.m2;
    count[blockIdx.x] = w.n;
  }
}

// y[i] = x[i] through load_vec / store_vec (T -> accumulation type -> T, exact), V per thread.
template <typename T>
__global__ void vec_copy(const T* __restrict__ x, T* __restrict__ y, index_t n) {
  constexpr int V = cupybn::vec_width<T>();
  const index_t step = (index_t)gridDim.x * blockDim.x * V;
  for (index_t i = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < n; i += step) {
    cupybn::acc_t<T> v[V];
    const int m = n - i < V ? (int)(n - i) : V;
    cupybn::load_vec<V>(x + i, m, v);
    cupybn::store_vec<V>(y + i, m, v);
  }
}

// y[i] = convert<T>(x[i]): float -> f16 / bf16 (round to nearest even) / float / double.
template <typename T>
__global__ void from_float(const float* __restrict__ x, T* __restrict__ y, index_t n) {
  const index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = cupybn::convert<T>(x[i]);
}

}  // namespace probe
