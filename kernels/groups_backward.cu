// groups_backward.cu -- backward of the contiguous-group norms (issue 6, GPU half): LayerNorm
// (and, through the same layout, GroupNorm / InstanceNorm).
//
// The input is the layout of fused_groups.cu: `groups` contiguous groups of `length` elements;
// element j of group grp has the affine index a = (grp % groups_per_sample) * (length / inner) + j / inner.
// mean / rstd: one value per group in the accumulation type A (float; double for double data).
// g = dy * weight[a] (dy when weight is null), xhat = (x - mean) * rstd, n = length:
//
//   groups_backward_reduce  block per group: sums[2 grp] = sum(g), sums[2 grp + 1] = sum(g * (x - mean)) * rstd
//                           (per-thread strided sums in a fixed order, then block_reduce's fixed shuffle
//                           tree: bitwise repeatable; no cross-block combine, no float atomics)
//   groups_backward_dx      elementwise: dx = ((g - (x - mean) * k) - sum(g) / n) * rstd, k = (sum(g xhat) / n) * rstd
//                           (the operation order of cupybn/_reference.py normalize_backward)
//   groups_backward_param_partial  dgamma / dbeta, stage 1: the input viewed as (samples, per_sample, inner);
//                           thread per affine index a (consecutive threads: consecutive a, coalesced for
//                           LayerNorm), blockIdx.y = a chunk of samples; partial sums of dy * xhat and dy
//                           into the workspace [chunk][a] (two planes)
//   groups_backward_param_combine  stage 2: thread per a adds the chunks in index order, writes P.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cupybn.cuh"

namespace cupybn {

constexpr int kGroupsBackwardThreads = 256;

template <typename A>
struct GroupGradSums {
  A g;   // sum(g)
  A gx;  // sum(g * (x - mean))
};

template <typename A>
__device__ __forceinline__ GroupGradSums<A> shfl_down(const GroupGradSums<A>& s, unsigned int delta) {
  GroupGradSums<A> r;
  r.g = __shfl_down_sync(0xffffffffu, s.g, delta);
  r.gx = __shfl_down_sync(0xffffffffu, s.gx, delta);
  return r;
}

struct GroupGradSumsOp {
  template <typename A>
  __device__ __forceinline__ GroupGradSums<A> operator()(const GroupGradSums<A>& a,
                                                         const GroupGradSums<A>& b) const {
    GroupGradSums<A> r;
    r.g = add_rn(a.g, b.g);
    r.gx = add_rn(a.gx, b.gx);
    return r;
  }
};

// g = dy * weight[a] in A.
template <typename T, typename P>
__device__ __forceinline__ acc_t<T> scaled_grad(const T* __restrict__ dy, const P* __restrict__ weight, index_t off,
                                                index_t grp, index_t j, index_t groups_per_sample,
                                                index_t per_group, index_t inner) {
  typedef acc_t<T> A;
  const A d = convert<A>(dy[off]);
  if (weight == nullptr) return d;
  const index_t a = (grp % groups_per_sample) * per_group + j / inner;
  return mul_rn(d, convert<A>(convert<acc_t<P>>(__ldg(weight + a))));
}

template <typename T, typename P>
__global__ void __launch_bounds__(kGroupsBackwardThreads)
    groups_backward_reduce(const T* __restrict__ dy, const T* __restrict__ x, index_t groups, index_t length,
                           index_t groups_per_sample, index_t inner, const acc_t<T>* __restrict__ mean,
                           const acc_t<T>* __restrict__ rstd, const P* __restrict__ weight,
                           acc_t<T>* __restrict__ sums) {
  typedef acc_t<T> A;
  __shared__ GroupGradSums<A> scratch[32];
  const index_t grp = (index_t)blockIdx.x;
  if (grp >= groups) return;  // uniform in the block
  const index_t per_group = length / inner;
  const A m = __ldg(mean + grp);
  const index_t base = grp * length;
  GroupGradSums<A> zero;
  zero.g = A(0);
  zero.gx = A(0);
  // blocked sums (cupybn.cuh): a thread adds length / 256 elements (65536 for a 2^24-element
  // group), and one float chain that long loses most of sum(g * (x - mean)), a sum that cancels
  Blocked<GroupGradSums<A>> acc = blocked_empty(zero);
  for (index_t j = (index_t)threadIdx.x; j < length; j += (index_t)blockDim.x) {
    const A g = scaled_grad(dy, weight, base + j, grp, j, groups_per_sample, per_group, inner);
    acc.cur.g = add_rn(acc.cur.g, g);
    acc.cur.gx = add_rn(acc.cur.gx, mul_rn(g, sub_rn(convert<A>(x[base + j]), m)));
    blocked_step(acc, GroupGradSumsOp(), zero);
  }
  GroupGradSums<A> s = blocked_result(acc, GroupGradSumsOp());
  s = block_reduce(s, GroupGradSumsOp(), zero, scratch);
  if (threadIdx.x != 0) return;
  sums[2 * grp] = s.g;
  sums[2 * grp + 1] = mul_rn(s.gx, __ldg(rstd + grp));
}

template <typename T, typename P>
__global__ void __launch_bounds__(kGroupsBackwardThreads)
    groups_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, index_t groups,
                       index_t length, index_t groups_per_sample, index_t inner, const acc_t<T>* __restrict__ mean,
                       const acc_t<T>* __restrict__ rstd, const P* __restrict__ weight,
                       const acc_t<T>* __restrict__ sums) {
  typedef acc_t<T> A;
  const index_t total = groups * length;
  const index_t per_group = length / inner;
  const A n = (A)length;
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t grp = i / length;
    const index_t j = i - grp * length;
    const A r = __ldg(rstd + grp);
    const A k = mul_rn(div_rn(__ldg(sums + 2 * grp + 1), n), r);
    const A mg = div_rn(__ldg(sums + 2 * grp), n);
    const A g = scaled_grad(dy, weight, i, grp, j, groups_per_sample, per_group, inner);
    const A d = sub_rn(convert<A>(x[i]), __ldg(mean + grp));
    dx[i] = convert<T>(mul_rn(sub_rn(sub_rn(g, mul_rn(d, k)), mg), r));
  }
}

// Stage 1 of dgamma / dbeta. workspace: 2 * chunks * per_sample values of A
// ([chunk][a] sums of dy * xhat, then [chunk][a] sums of dy).
template <typename T>
__global__ void __launch_bounds__(kGroupsBackwardThreads)
    groups_backward_param_partial(const T* __restrict__ dy, const T* __restrict__ x, index_t samples,
                                  index_t per_sample, index_t inner, index_t groups_per_sample,
                                  const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                  index_t samples_per_chunk, acc_t<T>* __restrict__ workspace) {
  typedef acc_t<T> A;
  const index_t a = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (a >= per_sample) return;
  const index_t chunk = (index_t)blockIdx.y;
  const index_t chunks = (index_t)gridDim.y;
  const index_t per_group = per_sample / groups_per_sample;
  const index_t q = a / per_group;
  const index_t s0 = chunk * samples_per_chunk;
  const index_t s1 = s0 + samples_per_chunk < samples ? s0 + samples_per_chunk : samples;
  A sw = A(0), sb = A(0);
  for (index_t s = s0; s < s1; ++s) {
    const index_t grp = s * groups_per_sample + q;
    const A m = __ldg(mean + grp);
    const A r = __ldg(rstd + grp);
    const index_t base = (s * per_sample + a) * inner;
    for (index_t i = 0; i < inner; ++i) {
      const A g = convert<A>(dy[base + i]);
      sw = add_rn(sw, mul_rn(mul_rn(sub_rn(convert<A>(x[base + i]), m), r), g));
      sb = add_rn(sb, g);
    }
  }
  workspace[chunk * per_sample + a] = sw;
  workspace[(chunks + chunk) * per_sample + a] = sb;
}

// Stage 2: the chunks of stage 1 added in index order.
template <typename A, typename P>
__global__ void __launch_bounds__(kGroupsBackwardThreads)
    groups_backward_param_combine(const A* __restrict__ workspace, index_t chunks, index_t per_sample,
                                  P* __restrict__ grad_weight, P* __restrict__ grad_bias) {
  const index_t a = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (a >= per_sample) return;
  A sw = A(0), sb = A(0);
  for (index_t c = 0; c < chunks; ++c) {
    sw = add_rn(sw, __ldcg(workspace + c * per_sample + a));
    sb = add_rn(sb, __ldcg(workspace + (chunks + c) * per_sample + a));
  }
  if (grad_weight != nullptr) grad_weight[a] = convert<P>(convert<acc_t<P>>(sw));
  if (grad_bias != nullptr) grad_bias[a] = convert<P>(convert<acc_t<P>>(sb));
}

}  // namespace cupybn
