// broken_kernels.cu -- a catalogue of deliberately broken kernels.  The emulator must report each one (an error
// naming the bug, with file:line where it has one) or expose it through a wrong, schedule-dependent result;
// never hang and never pass silently.  tests/test_emulator.py finds lines through the "@tag" comments.
#include <cuda_runtime.h>
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

namespace broken {

// Missing __syncthreads() between the steps of a shared-memory tree reduction: a thread reads a partial sum
// that another thread has not produced yet.  Wrong result (depending on the schedule), no error.
__global__ void missing_syncthreads(const float* x, float* out) {
  __shared__ float s[256];
  s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) s[threadIdx.x] += s[threadIdx.x + st];
    // BUG: __syncthreads() missing here
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// Early exit before a barrier: threads with i >= n return, the rest wait at __syncthreads().
__global__ void early_return(const float* x, float* out, int n) {
  __shared__ float s[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;  // BUG: must still reach the barrier
  s[threadIdx.x] = x[i];
  __syncthreads();  // @early-barrier
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int k = 0; k < (int)blockDim.x && blockIdx.x * blockDim.x + k < (unsigned)n; ++k) t += s[k];
    out[blockIdx.x] = t;
  }
}

// Two different barriers in divergent branches.
__global__ void divergent_barriers(float* out) {
  __shared__ float s[256];
  if (threadIdx.x < 64) {
    s[threadIdx.x] = 1.f;
    __syncthreads();  // @div-A
  } else {
    s[threadIdx.x] = 2.f;
    __syncthreads();  // @div-B
  }
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Legacy warp-synchronous reduction (no __syncwarp() between the steps): wrong under independent thread
// scheduling (Volta+), which the emulator models by never running a warp in lockstep.
__global__ void warp_reduce_no_syncwarp(const float* x, float* out) {
  __shared__ volatile float s[64];
  const int t = threadIdx.x;
  s[t] = x[t];
  s[t + 32] = 0.f;
  __syncwarp();
  s[t] += s[t + 16];  // BUG: needs __syncwarp() between every step
  s[t] += s[t + 8];
  s[t] += s[t + 4];
  s[t] += s[t + 2];
  s[t] += s[t + 1];
  if (t == 0) *out = s[0];
}

// Full-mask shuffle after some lanes of the warp returned.
__global__ void shfl_after_exit(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;  // BUG: lanes >= n are named by the full mask below
  float v = x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);  // @shfl
  if ((threadIdx.x & 31) == 0) atomicAdd(out, v);
}

// Half a warp at a block barrier, the other half at a warp barrier: deadlock.
__global__ void warp_vs_block(float* out) {
  if ((threadIdx.x & 31) < 16) __syncthreads();  // @deadlock
  else __syncwarp();
  out[threadIdx.x] = 1.f;
}

// Reading past the end of a buffer (guard page after every emulator allocation).
__global__ void oob_read(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i + 1024];  // @oob-read  BUG: off by 1024 elements
}

// Reading before the start of a buffer (guard page before every allocation).
__global__ void oob_underflow(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i - 7];  // BUG: stencil without a boundary check
}

// Writing past the end.
__global__ void oob_write(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  y[n + i] = 1.0f;  // @oob-write  BUG: n is the buffer length
}

// Index out of bounds of a __shared__ array (no guard page there: caught by the bounds check).
__global__ void shared_oob(const float* x, float* out) {
  __shared__ float s[256];
  s[threadIdx.x + 1] = x[threadIdx.x];  // @shared-oob  BUG: thread 255 writes s[256]
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// float4 loads from a pointer that is not 16-byte aligned ("misaligned address" on the GPU).
__global__ void misaligned_float4(const float* x, float* out, int offset) {
  const float4 v = reinterpret_cast<const float4*>(x + offset)[threadIdx.x];  // @misaligned
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// Inter-block ordering assumption: "the block with the last index runs last and sums all partials".
__global__ void last_block_by_index(const float* x, float* partial, float* out, int n) {
  __shared__ float s[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  for (unsigned st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) s[threadIdx.x] += s[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
  if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) {  // BUG: no ordering between blocks
    __threadfence();
    float t = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) t += partial[b];
    *out = t;
  }
}

// Spin-wait on a flag set by another block: fine on a GPU where both blocks happen to be resident, but not
// guaranteed outside a cooperative launch.  Without co-residency block 0 spins forever (watchdog).
__global__ void spin_on_other_block(unsigned* flag, float* out) {
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0)
      while (atomicAdd(flag, 0u) == 0u) {  // @spin
      }
  } else if (threadIdx.x == 0) {
    atomicExch(flag, 1u);
  }
  out[blockIdx.x] = 1.f;
}

// grid.sync() in a kernel launched without cudaLaunchCooperativeKernel.
__global__ void grid_sync_not_cooperative(float* out) {
  cg::grid_group grid = cg::this_grid();
  out[grid.thread_rank()] = 1.f;
  grid.sync();  // @grid-noncoop
  out[grid.thread_rank()] += 1.f;
}

// One block skips the grid barrier that every other block waits at.
__global__ void grid_sync_block_skips(float* out) {
  cg::grid_group grid = cg::this_grid();
  if (blockIdx.x == 0) return;  // BUG
  out[grid.thread_rank()] = 1.f;
  grid.sync();  // @grid-skip
  out[grid.thread_rank()] += 1.f;
}

// One thread of one block skips the grid barrier.
__global__ void grid_sync_thread_skips(float* out) {
  cg::grid_group grid = cg::this_grid();
  if (blockIdx.x == 1 && threadIdx.x == 5) return;  // BUG
  grid.sync();  // @grid-thread-skip
  out[grid.thread_rank()] = 1.f;
}

// Block 0 calls grid.sync() once more than the others.
__global__ void grid_sync_extra(float* out) {
  cg::grid_group grid = cg::this_grid();
  if (blockIdx.x == 0) grid.sync();
  grid.sync();
  out[grid.thread_rank()] = 1.f;
}

// 32-bit index arithmetic on a tensor with more than 2^31 elements: row * row_len wraps (as on the GPU).
__global__ void gather_row_i32(const float* x, float* y, int row, int row_len) {
  const float* p = x + row * row_len;  // @int32-index  BUG: needs (long long)row * row_len
  y[threadIdx.x] = p[threadIdx.x];
}

// Integer division by zero (garbage on the GPU; an arithmetic exception here).
__global__ void int_div_zero(const int* x, int* y) { y[threadIdx.x] = 1000 / x[threadIdx.x]; }

// Unbounded recursion overflows the (64 KiB) per-thread stack.
__device__ int deep(int n) {
  volatile char pad[512];
  pad[n & 511] = (char)n;
  return n ? deep(n - 1) + pad[n & 511] : 0;
}
__global__ void stack_overflow(int* out, int depth) { out[threadIdx.x] = deep(depth); }

// __trap() reports its site.
__global__ void traps(float* out) {
  if (threadIdx.x == 3) __trap();  // @trap
  out[threadIdx.x] = 1.f;
}

}  // namespace broken
