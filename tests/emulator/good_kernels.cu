// good_kernels.cu -- correct kernels for the emulator's self-tests (tests/test_emulator.py).  Valid CUDA: only
// what NVRTC provides is used, like the project's kernels.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>
#include <stdint.h>

namespace cg = cooperative_groups;

namespace good {

// ------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); the result is valid in every thread.
__device__ float block_sum(float v) {
  __shared__ float warp_part[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < (int)(blockDim.x >> 5) ? warp_part[lane] : 0.0f;
    w = warp_sum(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// partial[b] = sum of x over the grid-stride slice of block b.
__global__ void __launch_bounds__(1024) block_reduce(const float* __restrict__ x, float* __restrict__ partial,
                                                     int64_t n) {
  float acc = 0.0f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    acc += __ldg(&x[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Single-launch sum: each block publishes its partial, and the block that finishes last (whichever it is)
// combines all partials in index order, so the result does not depend on the schedule.
__global__ void last_block_sum(const float* __restrict__ x, float* partial, unsigned* ticket, float* out,
                               int64_t n) {
  __shared__ bool is_last;
  float acc = 0.0f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    acc += x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
    __threadfence();  // the partial is visible device-wide before the ticket is taken
    is_last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;  // wraps to 0: ready for the next launch
  }
  __syncthreads();
  if (is_last) {
    __threadfence();
    float t = 0.0f;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) t += partial[b];
    t = block_sum(t);
    if (threadIdx.x == 0) *out = t;
  }
}

// Cooperative two-phase: partial sums, grid barrier, block 0 combines, grid barrier, every block scales its slice.
__global__ void coop_normalize(const float* __restrict__ x, float* partial, float* total, float* __restrict__ y,
                               int n) {
  cg::grid_group grid = cg::this_grid();
  float acc = 0.0f;
  for (int i = (int)grid.thread_rank(); i < n; i += (int)grid.size()) acc += x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  grid.sync();
  if (blockIdx.x == 0) {
    float t = 0.0f;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) t += partial[b];
    t = block_sum(t);
    if (threadIdx.x == 0) *total = t;
  }
  grid.sync();
  const float inv = 1.0f / *total;
  for (int i = (int)grid.thread_rank(); i < n; i += (int)grid.size()) y[i] = x[i] * inv;
}

// Cooperative: every thread adds 1 atomically; after the grid barrier all of them see the full count.
__global__ void coop_atomic_count(unsigned* counter, unsigned* seen) {
  cg::grid_group grid = cg::this_grid();
  atomicAdd(counter, 1u);
  grid.sync();
  seen[grid.thread_rank()] = atomicAdd(counter, 0u);
}

// Cross-block handoff through global memory without a grid barrier: block 0 publishes data and raises a flag,
// the other blocks spin on the flag.  Correct only if all blocks are co-resident (a cooperative launch).
__global__ void coop_flag_handoff(volatile float* data, unsigned* flag, float* out) {
  if (blockIdx.x == 0) {
    data[threadIdx.x] = 1.0f + threadIdx.x;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicExch(flag, 1u);
  } else {
    if (threadIdx.x == 0)
      while (atomicAdd(flag, 0u) == 0u) {
      }
    __syncthreads();
    __threadfence();
    out[blockIdx.x * blockDim.x + threadIdx.x] = data[threadIdx.x];
  }
}

// ------------------------------------------------------------------ traffic
__global__ void copy(const float* __restrict__ x, float* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i];
}
__global__ void scale(const float* __restrict__ x, const float* __restrict__ s, float* __restrict__ y, int n) {
  const float f = *s;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i] * f;
}
// Cooperative: sum, grid barrier, then x is read again (a second pass over x in one launch).
__global__ void coop_read_twice(const float* __restrict__ x, float* partial, float* __restrict__ y, int n) {
  cg::grid_group grid = cg::this_grid();
  float acc = 0.0f;
  for (int i = (int)grid.thread_rank(); i < n; i += (int)grid.size()) acc += x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  grid.sync();
  for (int i = (int)grid.thread_rank(); i < n; i += (int)grid.size()) y[i] = x[i] - partial[0];
}
// Cooperative, one element per thread kept in a register across the grid barrier: x is read once.
__global__ void coop_read_once(const float* __restrict__ x, float* partial, float* __restrict__ y, int n) {
  cg::grid_group grid = cg::this_grid();
  const int i = (int)grid.thread_rank();
  const float v = i < n ? x[i] : 0.0f;
  const float acc = block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  grid.sync();
  if (i < n) y[i] = v - partial[0];
}

// ------------------------------------------------------------------ scheduling
// order[k] = the k-th block to start; per_thread[linear tid] = arrival rank of the thread inside its block.
__global__ void record_order(unsigned* ticket, unsigned* order, unsigned* per_thread) {
  __shared__ unsigned arrivals;
  if (threadIdx.x == 0) order[atomicAdd(ticket, 1u)] = blockIdx.x;
  if (threadIdx.x == 0) arrivals = 0;
  __syncthreads();
  per_thread[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(&arrivals, 1u);
}

// ------------------------------------------------------------------ conversions (grid-stride)
#define GRID_STRIDE(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                               i += (int64_t)gridDim.x * blockDim.x)
__global__ void f32_to_f16(const float* x, __half* y, int64_t n) { GRID_STRIDE(i, n) y[i] = __float2half_rn(x[i]); }
__global__ void f16_to_f32(const __half* x, float* y, int64_t n) { GRID_STRIDE(i, n) y[i] = __half2float(x[i]); }
__global__ void f32_to_bf16(const float* x, __nv_bfloat16* y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = __float2bfloat16(x[i]);
}
__global__ void bf16_to_f32(const __nv_bfloat16* x, float* y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = __bfloat162float(x[i]);
}
__global__ void f64_to_f32(const double* x, float* y, int64_t n) { GRID_STRIDE(i, n) y[i] = __double2float_rn(x[i]); }
__global__ void f64_to_f16(const double* x, __half* y, int64_t n) { GRID_STRIDE(i, n) y[i] = __double2half(x[i]); }
__global__ void f64_to_bf16(const double* x, __nv_bfloat16* y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = __double2bfloat16(x[i]);
}
// one-rounding fused multiply-add on 16-bit types
__global__ void hfma_f16(const __half* a, const __half* b, const __half* c, __half* y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = __hfma(a[i], b[i], c[i]);
}

// ------------------------------------------------------------------ warp intrinsics
// out[t*4 + k]: shfl idx (reversed), up 3 (width 8), down 5 (width 16), xor 6 (width 8); bits: ballot, any, all,
// __syncthreads_count, __syncthreads_and, __syncthreads_or.
__global__ void warp_semantics(float* out, unsigned* bits) {
  const int lane = threadIdx.x & 31;
  const float v = (float)threadIdx.x;
  out[threadIdx.x * 4 + 0] = __shfl_sync(0xffffffffu, v, 31 - lane);
  out[threadIdx.x * 4 + 1] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  out[threadIdx.x * 4 + 2] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  out[threadIdx.x * 4 + 3] = __shfl_xor_sync(0xffffffffu, v, 6, 8);
  unsigned b = __ballot_sync(0xffffffffu, (lane % 3) == 0);
  int any = __any_sync(0xffffffffu, lane == 7);
  int all = __all_sync(0xffffffffu, lane < 31);
  int cnt = __syncthreads_count(threadIdx.x % 5 == 0);
  int and_ = __syncthreads_and(threadIdx.x < 1000);
  int or_ = __syncthreads_or(threadIdx.x == 17);
  __syncwarp();
  if (threadIdx.x == 0) { bits[0] = b; bits[1] = any; bits[2] = all; bits[3] = cnt; bits[4] = and_; bits[5] = or_; }
}

// ------------------------------------------------------------------ shared memory
// Shared memory is uninitialized on the GPU; the emulator poisons it (0xFF bytes) at each block start.
// (A __shared__ variable never written anywhere is constant-folded to 0 by g++, since static storage is
// zero-initialized in C++; so this kernel writes it on a path that is never taken at run time.)
__global__ void uninit_shared(unsigned* out, int never) {
  __shared__ unsigned s[64];
  extern __shared__ unsigned char dyn_bytes[];
  if ((int)threadIdx.x == never) s[threadIdx.x] = 0;
  out[threadIdx.x] = s[threadIdx.x];
  out[64 + threadIdx.x] = reinterpret_cast<unsigned*>(dyn_bytes)[threadIdx.x];
}

// Two extern __shared__ arrays of different types alias the same dynamic buffer (as in CUDA).
__global__ void dyn_smem_alias(float* out) {
  extern __shared__ float dyn_f[];
  extern __shared__ double dyn_d[];
  dyn_d[threadIdx.x] = 0.5 * threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = dyn_f[2 * ((threadIdx.x + 1) % blockDim.x) + 1];  // high word of the neighbour's double
}

// ------------------------------------------------------------------ what kernel files use (compile coverage)
struct __align__(16) Params {  // passed by value
  float eps;
  int n;
  double momentum;
};
static_assert(alignof(float4) == 16 && sizeof(__half2) == 4 && alignof(double2) == 16, "vector layout");

template <class T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

// A vectorized path (float4 loads through reinterpret_cast) with a scalar fallback for unaligned pointers.
template <int VEC>
__global__ void __launch_bounds__(256, 2) vec_scale(const float* __restrict__ x, float* __restrict__ y, size_t n,
                                                    float a) {
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % (VEC * sizeof(float))) == 0 &&
                       (reinterpret_cast<uintptr_t>(y) % (VEC * sizeof(float))) == 0;
  if (VEC == 4 && aligned) {
    for (size_t v = tid; v < n / 4; v += (size_t)gridDim.x * blockDim.x) {
      float4 q = __ldg(reinterpret_cast<const float4*>(x) + v);
      q.x *= a; q.y *= a; q.z *= a; q.w *= a;
      reinterpret_cast<float4*>(y)[v] = q;
    }
    for (size_t i = n / 4 * 4 + tid; i < n; i += (size_t)gridDim.x * blockDim.x) y[i] = x[i] * a;
  } else {
    for (size_t i = tid; i < n; i += (size_t)gridDim.x * blockDim.x) y[i] = x[i] * a;
  }
}
template __global__ void vec_scale<4>(const float*, float*, size_t, float);

// out: 32 floats of results checked by the test; flags: int results.
__global__ void intrinsics(const float4* __restrict__ q, const __half* h, const __nv_bfloat16* b, Params p,
                           long long big, unsigned* counter, int* flags, float* out) {
  const int t = threadIdx.x;
  float4 v = __ldg(q);
  if (t == 0) {
    out[0] = __fdividef(v.x, v.y);
    out[1] = rsqrtf(v.z);
    out[2] = fmaf(v.x, v.y, v.z);
    out[3] = __half2float(__hadd(h[0], h[1]));
    out[4] = __bfloat162float(__float2bfloat16(__bfloat162float(b[0]) * 2.0f));
    out[5] = __double2float_rn(p.momentum);
    out[6] = fmaxf(v.x, __int_as_float(0x7fc00000));  // NaN operand ignored
    out[7] = fminf(v.x, v.w);
    out[8] = max(v.x, v.w);
    out[9] = (float)max(1.5, 2.5);
    out[10] = (float)rsqrt(4.0);
    out[11] = sqrtf(v.w);
    out[12] = (float)(big >> 32);
    out[13] = to_float(__float2half_rn(0.1f));
    out[14] = __half2float(__hmax(h[0], __ushort_as_half(0x7e00)));  // NaN operand ignored
    out[15] = (float)p.n + p.eps;
    const int4 iv = make_int4(1, 2, 3, -4);
    const uint4 uv = make_uint4(5u, 6u, 7u, 8u);
    const double2 dv = make_double2(0.25, -0.5);
    out[17] = (float)(iv.w + (int)uv.z) + (float)min(dv.x, dv.y) + min(2.0f, 1.5f);  // -4 + 7 - 0.5 + 1.5
    flags[0] = isnan(out[6]) ? 1 : 0;
    flags[1] = isinf(1.0f / v.y - 1.0f / v.y) ? 1 : 0;
    flags[2] = isfinite(out[0]) ? 1 : 0;
    flags[3] = isnan(__longlong_as_double(0x7ff8000000000000ll)) ? 1 : 0;
  }
  // atomics
  atomicAdd(counter, 1u);
  atomicInc(counter + 1, 3u);  // counts 0,1,2,3,0,...
  unsigned old = atomicCAS(counter + 2, 0u, 7u);
  (void)old;
  atomicExch(counter + 3, 42u);
  // block votes
  const int cnt = __syncthreads_count(t < 10);
  const int all = __syncthreads_and(t >= 0);
  const int any = __syncthreads_or(t == 63);
  // warp tile (cooperative groups)
  cg::thread_block block = cg::this_thread_block();
  cg::thread_block_tile<32> tile = cg::tiled_partition<32>(block);
  float s = (float)tile.thread_rank();
  for (int o = 16; o > 0; o >>= 1) s += tile.shfl_down(s, o);
  block.sync();
  if (t == 0) {
    flags[4] = cnt;
    flags[5] = all;
    flags[6] = any;
    out[16] = s;  // 0 + 1 + ... + 31
    flags[7] = (int)block.size();
  }
}

}  // namespace good

// ------------------------------------------------------------------ 64-bit indexing
// y[i] = x[base + i]: base is a 64-bit element offset (past 2^31 in the test).
__global__ void gather_at(const float* __restrict__ x, float* __restrict__ y, long long base, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[base + i];
}

// Plain, non-template, global-namespace kernel with many scalar types (signature test).
__global__ void many_types(float* a, const double* b, const __nv_bfloat16* c, const __half* d, const float4* e,
                           int i32, unsigned u32, long long i64, size_t u64, float f32, double f64, bool flag,
                           __half h, __nv_bfloat16 bf, float2 v2) {
  if (threadIdx.x == 0) {
    a[0] = (float)i32;
    a[1] = (float)u32;
    a[2] = (float)i64;
    a[3] = (float)u64;
    a[4] = f32;
    a[5] = (float)f64;
    a[6] = flag ? 1.0f : 0.0f;
    a[7] = __half2float(h);
    a[8] = __bfloat162float(bf);
    a[9] = v2.x + 10.0f * v2.y;
  }
}
