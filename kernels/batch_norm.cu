// batch_norm.cu -- BatchNorm normalize kernel (eval forward now; training reuses it, issue 4).
//
// A contiguous input of shape (N, C, *spatial) is viewed as a matrix of `rows` = N rows and
// `cols` = C * inner columns, inner = prod(spatial) (1 for (N, C) input). Column j belongs to
// channel c = j / inner. Every element is
//
//     y = (x - center[c]) * scale[c] + shift[c]
//
// with, in eval mode (kStats == kRunningVar, running statistics folded in the kernel, so one
// launch and no host sync):
//
//     center = running_mean[c]
//     scale  = (1 / sqrt(running_var[c] + eps)) * weight[c]      (weight None -> 1)
//     shift  = bias[c]                                           (bias None -> 0)
//
// except where center * scale is not finite (see channel_affine: torch's x * scale + (shift -
// center * scale) then, as torch's NaN rule for a zero running variance with eps == 0 needs),
// and in training (kStats == kInvStd) `var_or_invstd` already holds 1/sqrt(var + eps) from the
// statistics kernel (kernels/moments.cu), `mean` the batch mean rounded to acc_t<T> and `offset`
// the exact remainder (batch mean - mean), folded into the shift:
//
//     center = mean[c], scale = invstd[c] * weight[c], shift = bias[c] - offset[c] * scale
//
// (`offset` is null in eval).
//
// Why subtract first: (x - mean) is exact when x is near the mean (Sterbenz), so a float32
// channel with mean 1e4 and std 1e-2 keeps every significant bit; the folded form
// x * scale + (bias - mean * scale) cancels catastrophically there. Every operation is rounded
// on its own (no FMA, whatever the compiler's contraction setting; see the *_rn helpers), so the
// result is reproducible bit for bit by NumPy in the accumulation type: the emulator tests and
// the GPU tests check exactly that.
//
// Work split (the planner, cupybn/_cuda/planner.py, chooses grid and block):
//   * block (bx, by): threadIdx.x walks columns, threadIdx.y walks rows;
//   * each thread owns V = vec_width<T>() consecutive columns, computes their (center, scale,
//     shift) once, and then walks the rows r = blockIdx.y * by + threadIdx.y, stepping by
//     gridDim.y * by, so the per-channel math is amortized over all the rows it visits;
//   * the V elements of a row move with one 16-byte load and store when aligned (load_vec /
//     store_vec handle misaligned rows and the tail of a row element by element).
// Each element of x is read once and each element of y written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cupybn.cuh"

namespace cupybn {

// Threads per block of the normalize kernel (bx * by <= kNormalizeThreads; see the planner).
constexpr int kNormalizeThreads = 256;

// What `var_or_invstd` holds.
enum StatsKind : int {
  kRunningVar = 0,  // running variance: the kernel computes 1 / sqrt(var + eps) (eval)
  kInvStd = 1,      // inverse standard deviation, already computed (training, issue 4)
};

// y = (x - center) * scale + shift for one channel, in the accumulation type A.
template <typename A>
struct ChannelAffine {
  A center, scale, shift;
};

template <int kStats, typename A, typename S, typename P>
__device__ __forceinline__ ChannelAffine<A> channel_affine(index_t c, const S* __restrict__ mean,
                                                           const S* __restrict__ var_or_invstd,
                                                           const P* __restrict__ weight,
                                                           const P* __restrict__ bias, A eps,
                                                           const S* __restrict__ offset) {
  const A stat = convert<A>(__ldg(var_or_invstd + c));
  const A invstd = kStats == kRunningVar ? div_rn(A(1), sqrt_rn(add_rn(stat, eps))) : stat;
  ChannelAffine<A> a;
  a.center = convert<A>(__ldg(mean + c));
  a.scale = weight != nullptr ? mul_rn(invstd, convert<A>(__ldg(weight + c))) : invstd;
  a.shift = bias != nullptr ? convert<A>(__ldg(bias + c)) : A(0);
  if (offset != nullptr) a.shift = sub_rn(a.shift, mul_rn(convert<A>(__ldg(offset + c)), a.scale));
  if (kStats == kRunningVar) {
    // torch's eval kernel computes x * scale + (shift - center * scale) for every channel. With
    // finite values that is the subtract-first form up to rounding, but not where center * scale
    // is inf or NaN (a running variance of 0 with eps == 0 makes scale inf): there torch gives
    // NaN wherever x * inf meets an infinite constant of the other sign, or 0 * inf, where
    // (x - center) * inf gives -inf / NaN / inf by x's side of the mean. Such a channel takes
    // torch's form (x - 0 is x exactly). Once per channel per thread, outside the row loop.
    const A folded = mul_rn(a.center, a.scale);
    if (!is_finite(folded)) {
      a.shift = sub_rn(a.shift, folded);
      a.center = A(0);
    }
  }
  return a;
}

// T: storage type of x and y. S: type of mean / var_or_invstd. P: type of weight / bias.
// Arithmetic runs in acc_t<T> (float, or double for double data), whatever S and P are.
template <typename T, typename S, typename P, int kStats>
__global__ void __launch_bounds__(kNormalizeThreads)
    batch_norm_normalize(const T* __restrict__ x, T* __restrict__ y, index_t rows, index_t cols,
                         index_t inner, const S* __restrict__ mean, const S* __restrict__ var_or_invstd,
                         const P* __restrict__ weight, const P* __restrict__ bias, acc_t<T> eps,
                         const S* __restrict__ offset) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();

  const index_t col0 = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (col0 >= cols) return;  // no barrier below: leaving early is safe
  const int n = cols - col0 < V ? (int)(cols - col0) : V;

  // The affine transform of each owned column. Neighbouring columns usually share a channel
  // (inner >= V); then the channel math runs once and is copied.
  ChannelAffine<A> aff[V];
  index_t c = col0 / inner;
  index_t in_channel = col0 - c * inner;  // position of the column inside its channel
  aff[0] = channel_affine<kStats>(c, mean, var_or_invstd, weight, bias, eps, offset);
#pragma unroll
  for (int k = 1; k < V; ++k) {
    if (k < n && ++in_channel == inner) {
      in_channel = 0;
      ++c;
      aff[k] = channel_affine<kStats>(c, mean, var_or_invstd, weight, bias, eps, offset);
    } else {
      aff[k] = aff[k - 1];
    }
  }

  const index_t row_step = (index_t)gridDim.y * blockDim.y;
  for (index_t r = (index_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    const index_t offset = r * cols + col0;
    A v[V];
    load_vec<V>(x + offset, n, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = normalize_rn(v[k], aff[k].center, aff[k].scale, aff[k].shift);
    store_vec<V>(y + offset, n, v);
  }
}

}  // namespace cupybn
