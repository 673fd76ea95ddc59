// Shim for the emulator build: the parts of cooperative groups that kernels here use -- the grid (with its
// grid-wide barrier, which needs a cooperative launch), the thread block, and static warp tiles.
// NVRTC sees the real header.
#pragma once
#include "../cuda_cpu.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync(CUDA_CPU_SITE) const { ::cuda_cpu::detail::syncthreads(::cuda_cpu::detail::B_SYNC, 0, file, line); }
  static unsigned thread_rank() { return ::cuda_cpu::detail::linear_tid(); }
  static unsigned num_threads() { return blockDim.x * blockDim.y * blockDim.z; }
  static unsigned size() { return num_threads(); }
  static dim3 group_index() { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  static dim3 thread_index() { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
  static dim3 dim_threads() { return blockDim; }
  static dim3 group_dim() { return blockDim; }
};

class grid_group {
 public:
  // Grid-wide barrier.  Only valid in a cooperative launch: elsewhere the emulator reports an error.
  void sync(CUDA_CPU_SITE) const { ::cuda_cpu::detail::grid_sync(file, line); }
  bool is_valid() const { return ::cuda_cpu::detail::launch_is_cooperative() != 0; }
  static unsigned long long block_rank() {
    return blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
  }
  static unsigned long long num_blocks() { return (unsigned long long)gridDim.x * gridDim.y * gridDim.z; }
  static unsigned long long num_threads() { return num_blocks() * thread_block::num_threads(); }
  static unsigned long long size() { return num_threads(); }
  static unsigned long long thread_rank() {
    return block_rank() * thread_block::num_threads() + thread_block::thread_rank();
  }
  static dim3 block_index() { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  static dim3 dim_blocks() { return gridDim; }
  static dim3 group_dim() { return gridDim; }
};

inline grid_group this_grid() { return grid_group(); }
inline thread_block this_thread_block() { return thread_block(); }

// A static partition of a warp into tiles of N (a power of two <= 32) consecutive threads.  Collectives use the
// tile's own lane mask, as the CUDA implementation does.
template <unsigned N>
class thread_block_tile {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "tile size must be a power of two <= 32");
  static unsigned lane() { return ::cuda_cpu::detail::linear_tid() & 31u; }

 public:
  static unsigned build_mask() { return N == 32 ? 0xffffffffu : ((1u << N) - 1u) << (lane() & ~(N - 1)); }
  void sync(CUDA_CPU_SITE) const { __syncwarp(build_mask(), file, line); }
  static unsigned thread_rank() { return lane() & (N - 1); }
  static unsigned num_threads() { return N; }
  static unsigned size() { return N; }
  static unsigned meta_group_rank() { return ::cuda_cpu::detail::linear_tid() / N; }
  static unsigned meta_group_size() { return (thread_block::num_threads() + N - 1) / N; }
  template <class T> T shfl(T v, int src, CUDA_CPU_SITE) const {
    return __shfl_sync(build_mask(), v, src, N, file, line);
  }
  template <class T> T shfl_down(T v, unsigned d, CUDA_CPU_SITE) const {
    return __shfl_down_sync(build_mask(), v, d, N, file, line);
  }
  template <class T> T shfl_up(T v, unsigned d, CUDA_CPU_SITE) const {
    return __shfl_up_sync(build_mask(), v, d, N, file, line);
  }
  template <class T> T shfl_xor(T v, int m, CUDA_CPU_SITE) const {
    return __shfl_xor_sync(build_mask(), v, m, N, file, line);
  }
  int any(int p, CUDA_CPU_SITE) const { return __any_sync(build_mask(), p, file, line); }
  int all(int p, CUDA_CPU_SITE) const { return __all_sync(build_mask(), p, file, line); }
  unsigned ballot(int p, CUDA_CPU_SITE) const {
    return __ballot_sync(build_mask(), p, file, line) >> (N == 32 ? 0 : (lane() & ~(N - 1)));
  }
};

template <unsigned N, class Parent>
inline thread_block_tile<N> tiled_partition(const Parent&) { return thread_block_tile<N>(); }

template <class Group>
inline void sync(const Group& g, CUDA_CPU_SITE) { g.sync(file, line); }

}  // namespace cooperative_groups
