// batch_norm_backward.cu -- BatchNorm backward (issue 6, GPU half): two kernels.
//
// The input is viewed as the contiguous (A, C, L) array of moments.cu (A = N, L = prod(spatial));
// group c holds the n = A * L elements of channel c. With mean = save_mean (training) or
// running_mean (eval), invstd = save_invstd (training) or 1 / sqrt(running_var + eps) (eval,
// folded here: no host sync), w = weight (1 when null):
//
//   batch_norm_backward_reduce  per channel  sum_dy = sum(dy),  sum_dy_xhat = sum(dy * (x - mean)) * invstd
//                               -> sums[3c], sums[3c + 1] (accumulation type, for the dx kernel; sums[3c + 2]
//                                  the batch mean's rest past save_mean, see the epilogue),
//                                  grad_weight[c] = sum_dy_xhat, grad_bias[c] = sum_dy (weight dtype P)
//   batch_norm_backward_dx      elementwise, training: dx = ((dy - (x - mean) * k) - sum_dy / n) * scale
//                                                      k = (sum_dy_xhat / n) * invstd, scale = invstd * w
//                               eval:                  dx = dy * scale   (x is not read)
//
// (the operation order of cupybn/_reference.py grad_sums / normalize_backward, every operation
// rounded on its own: the *_rn helpers).
//
// Reduction: the work split of moments_forward (kernels/moments.cu): a 1-D grid of slots * splits
// blocks, block b on group c = b / splits and on its (b % splits)-th interleaved share of 16-byte
// "units" (V = 16 / sizeof(T) elements of a row), dy and x loaded with one 16-byte access each when
// aligned (load_vec handles row tails and misaligned rows). Float32 sums (float64 for float64 data);
// the block adds with a fixed shuffle tree (block_reduce). With splits > 1 every block stores its
// partial pair in the workspace, fences and takes an integer ticket; the block that draws the last
// ticket adds ALL partials of the group in index order (lane k of warp 0: partials k, k + 32, ...,
// then a fixed shuffle tree) and resets the ticket to zero: bitwise repeatable, no float atomics,
// counters zero again on exit (no memset; graph-capture safe).
//
// dx: the tiling of batch_norm_normalize (kernels/batch_norm.cu): threadIdx.x walks V-element
// column vectors of the (N, C * L) matrix, threadIdx.y / blockIdx.y walk rows, the per-channel
// coefficients are computed once per owned column and amortized over the rows.
//
// Traffic: training reads dy and x twice (reduce + dx) and writes dx once; eval reads dy once
// and writes dx once (plus one dy + x read when grad_weight / grad_bias are asked for).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cupybn.cuh"

namespace cupybn {

constexpr int kBackwardThreads = 256;

// What `var_or_invstd` holds (the same codes as batch_norm.cu's StatsKind).
constexpr int kBackwardRunningVar = 0;
constexpr int kBackwardInvStd = 1;

// The two sums of a group.
template <typename A>
struct GradSums {
  A dy;   // sum(dy)
  A dyx;  // sum(dy * (x - mean))
  A xm;   // sum(x - mean): the batch mean's offset from save_mean (training)
};

template <typename A>
__device__ __forceinline__ GradSums<A> shfl_down(const GradSums<A>& s, unsigned int delta) {
  GradSums<A> r;
  r.dy = __shfl_down_sync(0xffffffffu, s.dy, delta);
  r.dyx = __shfl_down_sync(0xffffffffu, s.dyx, delta);
  r.xm = __shfl_down_sync(0xffffffffu, s.xm, delta);
  return r;
}

struct GradSumsOp {
  template <typename A>
  __device__ __forceinline__ GradSums<A> operator()(const GradSums<A>& a, const GradSums<A>& b) const {
    GradSums<A> r;
    r.dy = add_rn(a.dy, b.dy);
    r.dyx = add_rn(a.dyx, b.dyx);
    r.xm = add_rn(a.xm, b.xm);
    return r;
  }
};

// |a| <= |b| on the bits (no float compare or abs: nothing -ftz can touch; a NaN a is never <=).
__device__ __forceinline__ bool magnitude_le(float a, float b) {
  return (__float_as_uint(a) & 0x7fffffffu) <= (__float_as_uint(b) & 0x7fffffffu);
}
__device__ __forceinline__ bool magnitude_le(double a, double b) {
  return ((unsigned long long)__double_as_longlong(a) & 0x7fffffffffffffffull) <=
         ((unsigned long long)__double_as_longlong(b) & 0x7fffffffffffffffull);
}

// A parameter gradient in the parameter's dtype (through its accumulation type: double -> half
// goes via float).
template <typename P, typename A>
__device__ __forceinline__ P to_param(A v) {
  return convert<P>(convert<acc_t<P>>(v));
}

template <typename A, typename S>
__device__ __forceinline__ A channel_invstd(const S* __restrict__ var_or_invstd, index_t c, int stats_kind, A eps) {
  const A stat = convert<A>(__ldg(var_or_invstd + c));
  return stats_kind == kBackwardRunningVar ? div_rn(A(1), sqrt_rn(add_rn(stat, eps))) : stat;
}

// T: storage type of dy and x. S: type of mean / var_or_invstd. P: type of grad_weight / grad_bias.
// workspace: splits > 1 only, 3 * gridDim.x partials [dy sums][dy*(x-mean) sums][x-mean sums] (acc type).
// counters: slots unsigned ints, zero on entry, zero again on exit.
template <typename T, typename S, typename P>
__global__ void __launch_bounds__(kBackwardThreads)
    batch_norm_backward_reduce(const T* __restrict__ dy, const T* __restrict__ x, index_t A_extent, index_t C,
                               index_t L, int splits, const S* __restrict__ mean,
                               const S* __restrict__ var_or_invstd, int stats_kind, acc_t<T> eps,
                               acc_t<T>* __restrict__ sums, P* __restrict__ grad_weight, P* __restrict__ grad_bias,
                               void* workspace, unsigned int* counters) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();
  __shared__ GradSums<A> scratch[32];
  __shared__ int is_last;

  const int tid = (int)threadIdx.x;
  const unsigned int slot = blockIdx.x / (unsigned int)splits;
  const int split = (int)(blockIdx.x - slot * (unsigned int)splits);
  const index_t c = (index_t)slot;

  GradSums<A> zero;
  zero.dy = A(0);
  zero.dyx = A(0);
  zero.xm = A(0);
  // blocked sums (cupybn.cuh): with many huge channels a thread adds tens of thousands of
  // elements, and one float chain that long loses much of the cancelling sums
  Blocked<GradSums<A>> acc = blocked_empty(zero);
  const A m = convert<A>(__ldg(mean + c));
  {
    const index_t per_row = (L + V - 1) / V;
    const index_t units = A_extent * per_row;
    const index_t row_stride = C * L;
    const index_t step = (index_t)splits * blockDim.x;
    const index_t step_a = step / per_row, step_j = step - step_a * per_row;
    index_t u = (index_t)split * blockDim.x + tid;
    index_t a = u / per_row, j = u - a * per_row;
    for (; u < units; u += step) {
      const index_t col = j * V;
      const int n = L - col < V ? (int)(L - col) : V;
      const index_t off = a * row_stride + c * L + col;
      A g[V], v[V];
      load_vec<V>(dy + off, n, g);
      load_vec<V>(x + off, n, v);
      // load_vec zero-fills a tail: those lanes add dy = 0 (and 0 * (0 - mean) = 0)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A d = k < n ? sub_rn(v[k], m) : A(0);
        acc.cur.dy = add_rn(acc.cur.dy, g[k]);
        acc.cur.dyx = add_rn(acc.cur.dyx, mul_rn(g[k], d));
        acc.cur.xm = add_rn(acc.cur.xm, d);
      }
      blocked_step(acc, GradSumsOp(), zero);  // per vector: runs of kFoldBlock * V elements
      a += step_a;
      j += step_j;
      if (j >= per_row) {
        j -= per_row;
        ++a;
      }
    }
  }
  GradSums<A> s = blocked_result(acc, GradSumsOp());
  s = block_reduce(s, GradSumsOp(), zero, scratch);  // valid in thread 0

  if (splits > 1) {
    A* ws_dy = reinterpret_cast<A*>(workspace);
    A* ws_dyx = ws_dy + (index_t)gridDim.x;
    A* ws_xm = ws_dyx + (index_t)gridDim.x;
    if (tid == 0) {
      ws_dy[blockIdx.x] = s.dy;
      ws_dyx[blockIdx.x] = s.dyx;
      ws_xm[blockIdx.x] = s.xm;
      __threadfence();  // the partial is visible device-wide before the ticket is
    }
    if (!last_block_to_arrive(counters + slot, (unsigned int)splits, &is_last, tid == 0)) return;  // uniform
    if (tid < 32) {
      GradSums<A> fold = zero;
      const index_t first = (index_t)slot * splits;
      for (int k = tid; k < splits; k += 32) {
        fold.dy = add_rn(fold.dy, __ldcg(ws_dy + first + k));
        fold.dyx = add_rn(fold.dyx, __ldcg(ws_dyx + first + k));
        fold.xm = add_rn(fold.xm, __ldcg(ws_xm + first + k));
      }
      s = warp_reduce(fold, GradSumsOp());  // fixed order: lane k takes lane k + delta
    }
    if (tid == 0) counters[slot] = 0u;  // every ticket of this group is drawn: reset for the next launch
  }

  if (tid != 0) return;
  const A invstd = channel_invstd<A>(var_or_invstd, c, stats_kind, eps);
  // Training: save_mean is the batch mean rounded to A (moments.cu keeps the rest in save_offset
  // for the forward's normalize). Recover that rest, off = mean(x - save_mean) (x - save_mean is
  // exact near the mean), and use the precise mean, as the forward did:
  //   sum(dy * (x - mean)) = sum(dy * (x - save_mean)) - off * sum(dy).
  // Only when off is within save_mean's rounding: a save_mean that is not this batch's mean
  // (a caller's own statistics) is used as given, as ATen does.
  A off = A(0);
  if (stats_kind == kBackwardInvStd) {
    const A cnt = (A)(A_extent * L);
    const A o = div_rn(s.xm, cnt);
    const A bound = mul_rn(m, sizeof(A) == 4 ? A(1.0 / 4194304.0) : A(1.0 / 2251799813685248.0));
    if (magnitude_le(o, bound)) off = o;
  }
  const A dyx = sub_rn(s.dyx, mul_rn(off, s.dy));
  const A dyxh = mul_rn(dyx, invstd);
  if (sums != nullptr) {
    sums[3 * c] = s.dy;
    sums[3 * c + 1] = dyxh;
    sums[3 * c + 2] = off;
  }
  if (grad_weight != nullptr) grad_weight[c] = to_param<P>(dyxh);
  if (grad_bias != nullptr) grad_bias[c] = to_param<P>(s.dy);
}

// Per-channel coefficients of dx = ((dy - (x - center) * k) - mdy) * scale.
template <typename A>
struct GradAffine {
  A center, k, mdy, scale;
};

template <typename A, typename S, typename P>
__device__ __forceinline__ GradAffine<A> grad_affine(index_t c, const S* __restrict__ mean,
                                                     const S* __restrict__ var_or_invstd, int stats_kind,
                                                     const P* __restrict__ weight, A eps,
                                                     const A* __restrict__ sums, A count, int train) {
  const A invstd = channel_invstd<A>(var_or_invstd, c, stats_kind, eps);
  GradAffine<A> g;
  g.scale = weight != nullptr ? mul_rn(invstd, convert<A>(__ldg(weight + c))) : invstd;
  if (train) {
    g.center = convert<A>(__ldg(mean + c));
    g.k = mul_rn(div_rn(__ldg(sums + 3 * c + 1), count), invstd);
    // (x - save_mean - off) * k folded into the constant term: mdy - off * k (exact when off == 0)
    g.mdy = sub_rn(div_rn(__ldg(sums + 3 * c), count), mul_rn(__ldg(sums + 3 * c + 2), g.k));
  } else {
    g.center = A(0);
    g.k = A(0);
    g.mdy = A(0);
  }
  return g;
}

// dx over the (rows, cols) = (N, C * inner) matrix; train: sums from batch_norm_backward_reduce,
// count = N * inner (as a float of the accumulation type).
template <typename T, typename S, typename P>
__global__ void __launch_bounds__(kBackwardThreads)
    batch_norm_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, index_t rows,
                           index_t cols, index_t inner, const S* __restrict__ mean,
                           const S* __restrict__ var_or_invstd, int stats_kind, const P* __restrict__ weight,
                           acc_t<T> eps, const acc_t<T>* __restrict__ sums, acc_t<T> count, int train) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();

  const index_t col0 = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (col0 >= cols) return;  // no barrier below
  const int n = cols - col0 < V ? (int)(cols - col0) : V;

  GradAffine<A> aff[V];
  index_t c = col0 / inner;
  index_t in_channel = col0 - c * inner;
  aff[0] = grad_affine(c, mean, var_or_invstd, stats_kind, weight, eps, sums, count, train);
#pragma unroll
  for (int k = 1; k < V; ++k) {
    if (k < n && ++in_channel == inner) {
      in_channel = 0;
      ++c;
      aff[k] = grad_affine(c, mean, var_or_invstd, stats_kind, weight, eps, sums, count, train);
    } else {
      aff[k] = aff[k - 1];
    }
  }

  const index_t row_step = (index_t)gridDim.y * blockDim.y;
  for (index_t r = (index_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    const index_t off = r * cols + col0;
    A g[V];
    load_vec<V>(dy + off, n, g);
    if (train) {
      A v[V];
      load_vec<V>(x + off, n, v);
#pragma unroll
      for (int k = 0; k < V; ++k)
        g[k] = mul_rn(sub_rn(sub_rn(g[k], mul_rn(sub_rn(v[k], aff[k].center), aff[k].k)), aff[k].mdy),
                      aff[k].scale);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) g[k] = mul_rn(g[k], aff[k].scale);
    }
    store_vec<V>(dx + off, n, g);
  }
}

}  // namespace cupybn
