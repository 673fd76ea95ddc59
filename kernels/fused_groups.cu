// fused_groups.cu -- LayerNorm, GroupNorm and InstanceNorm forward: normalize contiguous groups.
//
// Layer, group and instance norm all normalize *contiguous* groups of L elements of a
// C-contiguous input: group g is x[g * L .. g * L + L), and its element j gets
//
//     y = (x - mean_g) * (invstd_g * weight[a]) + bias[a],     a = affine index of (g, j)
//
// They differ only in L and in which parameter an element takes ("affine index"):
//
//     norm            groups     L                  groups_per_sample  inner     a
//     layer norm      rows       prod(norm. shape)  1                  1         j
//     group norm      N * G      C / G * spatial    G                  spatial   (g % G) * C/G + j / spatial
//     instance norm   N * C      spatial            C                  spatial   g % C
//
// i.e. a = (g % groups_per_sample) * (L / inner) + j / inner for all three (affine_index below).
//
// Two kernels share the per-vector normalize (normalize_vector) and the Welford/Chan reduction
// helpers of cupybn.cuh with the BatchNorm statistics kernel (kernels/moments.cu):
//
// * fused_groups: a *team* of threads owns a group (blockDim.x threads: a warp, or the whole
//   block; blockDim.y teams per block). Pass 1 reads the group once with 16-byte vectors,
//   folds each vector into a Welford state (on x - pivot, pivot = the group's first element, as
//   moments.cu does) and keeps the shifted values on chip (`keep`): in registers for a warp per
//   group (short rows, at most 4 vectors per lane), in shared memory for a block per group. The
//   team combines its states (warp shuffles, or block_reduce). Pass 2 normalizes from the
//   on-chip copy and writes y once: one launch, x read once, y written once. With
//   kKeepNothing (a group too large for shared memory) pass 2 re-reads x: one launch, x read
//   twice.
//   Instance norm's running statistics: each team writes its group's (mean, var) to the
//   workspace, each block takes an integer ticket; the last block averages the per-instance
//   statistics over the batch *in sample order* (deterministic, no float atomics) and updates
//   running_mean / running_var in place, then resets its counter (zero on entry and exit).
//
// * normalize_groups: the normalize step of the split path (few, very large groups: the
//   statistics come from moments_forward over the (1, groups, L) view, many blocks per group).
//   A grid-stride loop over the 16-byte vectors of all groups.
//
// Numerics: acc_t<T> accumulation; (x - pivot) is exact for data near the group mean, and the
// normalize subtracts the group mean of the shifted data, so a float32 group of mean 1e4 and
// std 1e-2 normalizes to ~1e-6. Every operation is rounded on its own (*_rn helpers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cupybn.cuh"

namespace cupybn {

// Threads per block of fused_groups (a team of up to 512 threads, or up to 16 warp teams).
constexpr int kFusedThreads = 512;
constexpr int kMaxTeams = 16;
// Threads per block of the warp-per-group variant (8 warps: planner.FUSED_MAX_TEAMS // 2).
constexpr int kWarpBlockThreads = 256;
// Shared memory that holds the staged groups of a block (planner.FUSED_SMEM_LIMIT).
constexpr int kStageBytes = 32 * 1024;
// Where pass 1 keeps the group for pass 2 (`keep`, chosen by the planner).
enum Keep : int {
  kKeepNothing = 0,    // re-read x (groups too large for shared memory): x read twice
  kKeepShared = 1,     // shared memory `stage`, accumulation type (a block per group)
  kKeepRegisters = 2,  // registers: a warp per group, at most kRegisterVectors vectors per lane
};
constexpr int kRegisterVectors = 4;  // planner.FUSED_WARP_VECTORS
// Threads per block of normalize_groups.
constexpr int kGroupNormalizeThreads = 256;

// Type of the running statistics (instance norm only), chosen at run time so that the running
// dtype does not multiply the instantiations: it is touched once per channel, in one block.
enum RunningType : int { kRunF16 = 0, kRunBF16 = 1, kRunF32 = 2, kRunF64 = 3 };

__device__ __forceinline__ double load_running(const void* p, index_t i, int type) {
  switch (type) {
    case kRunF16: return convert<double>(reinterpret_cast<const __half*>(p)[i]);
    case kRunBF16: return convert<double>(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
    case kRunF32: return convert<double>(reinterpret_cast<const float*>(p)[i]);
    default: return reinterpret_cast<const double*>(p)[i];
  }
}

// Stores v (computed in float for f16/bf16/f32 running statistics, double for f64) as `type`.
__device__ __forceinline__ void store_running(void* p, index_t i, int type, double v) {
  switch (type) {
    case kRunF16: reinterpret_cast<__half*>(p)[i] = convert<__half>(narrow_rn(v)); break;
    case kRunBF16: reinterpret_cast<__nv_bfloat16*>(p)[i] = convert<__nv_bfloat16>(narrow_rn(v)); break;
    case kRunF32: reinterpret_cast<float*>(p)[i] = narrow_rn(v); break;
    default: reinterpret_cast<double*>(p)[i] = v; break;
  }
}

// Elements in vector u of a group of L (V, or fewer for the last one).
template <int V>
__device__ __forceinline__ int vector_count(index_t L, index_t u) {
  return L - u * V < V ? (int)(L - u * V) : V;
}

// v = x[0 .. n) - pivot in the accumulation type (16-byte load when aligned and whole).
template <int V, typename T, typename A>
__device__ __forceinline__ void load_shifted(const T* __restrict__ p, int n, A pivot, A (&v)[V]) {
  load_vec<V>(p, n, v);
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = sub_rn(v[k], pivot);
}

// Where the affine parameters of element j of group g are (see the table above).
struct AffineMap {
  index_t groups_per_sample, inner, per_group;  // per_group = L / inner
  __device__ __forceinline__ index_t first(index_t g) const { return (g % groups_per_sample) * per_group; }
};

// The one normalize step of every norm: v[k] (k < n) holds x - pivot of elements col .. col + n - 1
// of group g; y = (v - center) * (invstd * weight[a]) + (bias[a] - offset * invstd * weight[a]).
// `offset` is the exact remainder of the mean (split path; 0 in the fused kernel).
template <int V, typename A, typename P>
__device__ __forceinline__ void normalize_vector(A (&v)[V], int n, index_t g, index_t col, A center, A offset,
                                                 A invstd, const P* __restrict__ weight,
                                                 const P* __restrict__ bias, const AffineMap& map) {
  index_t a = map.first(g) + col / map.inner;  // affine index of the first element
  index_t in_channel = col - (col / map.inner) * map.inner;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < n) {
      const A scale = weight != nullptr ? mul_rn(invstd, convert<A>(__ldg(weight + a))) : invstd;
      A shift = bias != nullptr ? convert<A>(__ldg(bias + a)) : A(0);
      if (!is_zero(offset)) shift = sub_rn(shift, mul_rn(offset, scale));
      v[k] = normalize_rn(v[k], center, scale, shift);
      if (++in_channel == map.inner) {
        in_channel = 0;
        ++a;
      }
    }
  }
}

// T: storage type of x and y. P: type of weight / bias. kRegisters: the warp-per-group variant
// (keep == kKeepRegisters only; no shared staging buffer, so it costs no shared memory), else the
// block-per-group variant (kKeepShared / kKeepNothing; no register cache). Block (team, teams): team == 32 (a warp
// per group, up to kMaxTeams teams) or teams == 1 (a block per group, team a multiple of 32).
// keep == kKeepRegisters: team == 32 and ceil(L / V) <= 32 * kRegisterVectors; kKeepShared:
// teams * ceil(L / V) * V accumulation-type values fit in kStageBytes (the planner checks both).
// workspace (running statistics only): 2 * groups values of acc_t<T>; counters: 1 word.
template <typename T, typename P, bool kRegisters>
__global__ void __launch_bounds__(kRegisters ? kWarpBlockThreads : kFusedThreads)
    fused_groups(const T* __restrict__ x, T* __restrict__ y, index_t groups, index_t L,
                 index_t groups_per_sample, index_t inner, const P* __restrict__ weight,
                 const P* __restrict__ bias, acc_t<T> eps, int zero_var_rule, int keep, void* running_mean,
                 void* running_var, int running_type, double momentum, void* workspace_bytes,
                 unsigned int* counters) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();
  // staged groups (accumulation type): static, so its size is known to the compiler and the
  // emulator checks every index against it
  __shared__ A stage[kRegisters ? 1 : kStageBytes / sizeof(A)];
  __shared__ Welford<A> scratch[32];
  __shared__ A team_center[kMaxTeams];
  __shared__ A team_invstd[kMaxTeams];
  __shared__ int is_last;
  A* workspace = reinterpret_cast<A*>(workspace_bytes);  // [mean of each group][var of each group]

  const int lane = (int)threadIdx.x, team = (int)threadIdx.y, team_size = (int)blockDim.x;
  const index_t g = (index_t)blockIdx.x * blockDim.y + team;
  const bool real = g < groups;
  const index_t per_row = (L + V - 1) / V;  // vectors per group
  const index_t row = (index_t)team * per_row * V;  // the team's first element in `stage`
  const T* xg = x + g * L;

  // pass 1: read the group once, Welford on x - pivot, keep it on chip (registers or shared memory)
  const A pivot = real && L > 0 ? convert<A>(__ldg(xg)) : A(0);
  Welford<A> w = welford_empty<A>();
  constexpr int kCache = kRegisters ? kRegisterVectors : 1;
  A cache[kCache][V];  // kRegisters: a lane's vectors u = lane + i * 32, in registers
  if (kRegisters) {
    // the lane's <= 4 vectors: centered two passes over the registers (one division per lane)
    A sum = A(0);
    long long count = 0;
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const index_t u = lane + (index_t)i * team_size;
      if (real && u < per_row) {
        const int n = vector_count<V>(L, u);
        load_shifted<V>(xg + u * V, n, pivot, cache[i]);
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (k < n) sum = add_rn(sum, cache[i][k]);
        count += n;
      }
    }
    if (count > 0) {
      w.n = count;
      w.mean = div_rn(sum, (A)count);
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const index_t u = lane + (index_t)i * team_size;
        if (real && u < per_row) {
          const int n = vector_count<V>(L, u);
#pragma unroll
          for (int k = 0; k < V; ++k)
            if (k < n) {
              const A d = sub_rn(cache[i][k], w.mean);
              w.m2 = add_rn(w.m2, mul_rn(d, d));
            }
        }
      }
    }
  } else if (real) {
    // blocked (cupybn.cuh): on the long path a thread folds up to L / (512 V) vectors (8192 for a
    // 2^24-element float32 group), and one Welford chain that long drifts
    Blocked<Welford<A>> acc = blocked_empty(welford_empty<A>());
    for (index_t u = lane; u < per_row; u += team_size) {
      const int n = vector_count<V>(L, u);
      A v[V];
      load_shifted<V>(xg + u * V, n, pivot, v);
      if (keep == kKeepShared) {
#pragma unroll
        for (int k = 0; k < V; ++k) stage[row + u * V + k] = v[k];
      }
      welford_push_vector<V>(acc.cur, v, n);
      blocked_step(acc, WelfordOp(), welford_empty<A>());
    }
    w = blocked_result(acc, WelfordOp());
  }
  // the team's statistics (fixed combine order: deterministic)
  if (team_size == 32)
    w = warp_reduce(w, WelfordOp());
  else
    w = block_reduce(w, WelfordOp(), welford_empty<A>(), scratch);
  if (lane == 0) {
    const A var = w.n > 0 ? div_rn(w.m2, (A)w.n) : A(0);
    team_center[team] = w.mean;
    team_invstd[team] = inverse_std(var, eps, zero_var_rule);
    if (running_mean != nullptr && real) {
      workspace[g] = add_rn(pivot, w.mean);
      workspace[groups + g] = var;
      __threadfence();  // visible device-wide before this block's ticket
    }
  }
  __syncthreads();

  // pass 2: normalize from registers, shared memory, or x (kKeepNothing), write y once
  if (real) {
    const A center = team_center[team], invstd = team_invstd[team];
    const AffineMap map = {groups_per_sample, inner, L / inner};
    T* yg = y + g * L;
    if (kRegisters) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const index_t u = lane + (index_t)i * team_size;
        if (u < per_row) {
          const int n = vector_count<V>(L, u);
          normalize_vector<V>(cache[i], n, g, u * V, center, A(0), invstd, weight, bias, map);
          store_vec<V>(yg + u * V, n, cache[i]);
        }
      }
    } else {
      for (index_t u = lane; u < per_row; u += team_size) {
        const int n = vector_count<V>(L, u);
        A v[V];
        if (keep == kKeepShared) {
#pragma unroll
          for (int k = 0; k < V; ++k) v[k] = stage[row + u * V + k];
        } else {
          load_shifted<V>(xg + u * V, n, pivot, v);
        }
        normalize_vector<V>(v, n, g, u * V, center, A(0), invstd, weight, bias, map);
        store_vec<V>(yg + u * V, n, v);
      }
    }
  }

  if (running_mean == nullptr) return;  // uniform: no barrier follows otherwise
  // instance norm running statistics: the last block averages over the batch, in sample order
  const int tid = linear_thread_id();
  if (!last_block_to_arrive(counters, gridDim.x, &is_last, tid == 0)) return;  // sees every block's statistics
  const index_t channels = groups_per_sample, samples = groups / groups_per_sample;
  const double unbias = (double)L / ((double)L - 1.0);
  for (index_t c = tid; c < channels; c += block_threads()) {
    A mean = A(0), var = A(0);
    for (index_t s = 0; s < samples; ++s) {
      mean = add_rn(mean, __ldcg(workspace + s * channels + c));
      var = add_rn(var, __ldcg(workspace + groups + s * channels + c));
    }
    mean = div_rn(mean, (A)samples);
    var = div_rn(var, (A)samples);
    if (running_type == kRunF64) {
      const double keep = 1.0 - momentum;
      const double m = add_rn(mul_rn(keep, load_running(running_mean, c, running_type)), mul_rn(momentum, convert<double>(mean)));
      const double v = add_rn(mul_rn(keep, load_running(running_var, c, running_type)),
                              mul_rn(momentum, mul_rn(convert<double>(var), unbias)));
      store_running(running_mean, c, running_type, m);
      store_running(running_var, c, running_type, v);
    } else {  // float arithmetic for f16 / bf16 / f32 running statistics (acc_t<R>)
      const float keep = narrow_rn(1.0 - momentum), factor = narrow_rn(momentum);
      const float old_m = narrow_rn(load_running(running_mean, c, running_type));
      const float old_v = narrow_rn(load_running(running_var, c, running_type));
      const float m = add_rn(mul_rn(keep, old_m), mul_rn(factor, convert<float>(mean)));
      const float v = add_rn(mul_rn(keep, old_v), mul_rn(factor, mul_rn(convert<float>(var), narrow_rn(unbias))));
      store_running(running_mean, c, running_type, widen(m));
      store_running(running_var, c, running_type, widen(v));
    }
  }
  if (tid == 0) counters[0] = 0u;  // every ticket is drawn: reset for the next launch
}

// Split path normalize: statistics per group from moments_forward (save_mean, save_invstd,
// save_offset over the (1, groups, L) view). Thread = one 16-byte vector of one group,
// grid-stride over all groups * ceil(L / V) vectors.
template <typename T, typename P>
__global__ void __launch_bounds__(kGroupNormalizeThreads)
    normalize_groups(const T* __restrict__ x, T* __restrict__ y, index_t groups, index_t L,
                     index_t groups_per_sample, index_t inner, const acc_t<T>* __restrict__ mean,
                     const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ offset,
                     const P* __restrict__ weight, const P* __restrict__ bias) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();
  const index_t per_row = (L + V - 1) / V;
  const index_t units = groups * per_row;
  const AffineMap map = {groups_per_sample, inner, L / inner};
  const index_t step = (index_t)gridDim.x * blockDim.x;
  for (index_t u = (index_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += step) {
    const index_t g = u / per_row;
    const index_t col = (u - g * per_row) * V;
    const int n = L - col < V ? (int)(L - col) : V;
    const index_t at = g * L + col;
    A v[V];
    load_vec<V>(x + at, n, v);
    normalize_vector<V>(v, n, g, col, __ldg(mean + g), __ldg(offset + g), __ldg(invstd + g), weight, bias, map);
    store_vec<V>(y + at, n, v);
  }
}

}  // namespace cupybn
