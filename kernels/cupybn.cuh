// cupybn.cuh -- device helpers shared by every cupybn kernel.
//
// Every norm in cupybn is "reduce groups of elements, then normalize each element with its
// group's statistics". This header holds the pieces those kernels share:
//
//   * index_t, accumulation types and the 16-byte vector width of each storage type;
//   * conversions between the storage types (f16, bf16, f32, f64) and the accumulation types;
//   * IEEE round-to-nearest arithmetic that neither -ftz=true nor FMA contraction can change;
//   * 16-byte vector loads / stores with alignment and tail handling;
//   * Welford accumulation and Chan's parallel combine;
//   * warp and block reductions.
//
// Plain CUDA C++: NVRTC compiles it with the real CUDA headers, the CPU emulator (tests/emulator)
// compiles it with g++ and its shims. NVRTC has no <stdint.h>, so the header spells 64-bit
// integers `long long` (CUDA's and g++'s long long are both 64-bit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cupybn {

// ------------------------------------------------------------------------------------ types

// Element offsets are 64-bit everywhere: a tensor may hold more than 2^31 elements.
typedef long long index_t;

// Accumulation type: float for f16, bf16 and f32 data, double for f64 data (the CPU path's rule).
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };
template <typename T> using acc_t = typename Acc<T>::type;

// Elements of T in one 16-byte vector: 8 for f16/bf16, 4 for f32, 2 for f64.
template <typename T> __host__ __device__ constexpr int vec_width() { return 16 / (int)sizeof(T); }

// ------------------------------------------------------------------------------------ IEEE arithmetic
//
// CuPy always appends -ftz=true to NVRTC's options, which turns every float32 add/mul/div/sqrt
// into its flush-to-zero form, and nvcc/NVRTC contract a*b+c into an FMA where they see one.
// Both would make the GPU differ from the CPU path (NumPy/torch keep subnormals and round every
// operation). These helpers pin each operation to one IEEE round-to-nearest instruction with no
// .ftz: inline PTX for float; for double the *_rn intrinsics (FTZ never applies to double, the
// intrinsics only stop contraction). The emulator build (g++, -ffp-contract=off) uses plain C++.
#ifdef CUDA_CPU_EMULATION
__device__ __forceinline__ float add_rn(float a, float b) { return a + b; }
__device__ __forceinline__ float sub_rn(float a, float b) { return a - b; }
__device__ __forceinline__ float mul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ float div_rn(float a, float b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return sqrtf(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return a + b; }
__device__ __forceinline__ double sub_rn(double a, double b) { return a - b; }
__device__ __forceinline__ double mul_rn(double a, double b) { return a * b; }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }
__device__ __forceinline__ double sqrt_rn(double a) { return sqrt(a); }
__device__ __forceinline__ float narrow_rn(double a) { return (float)a; }
__device__ __forceinline__ double widen(float a) { return (double)a; }
#else
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sqrt_rn(float a) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
// double -> float keeping float subnormals (cvt may otherwise take the .ftz form).
__device__ __forceinline__ float narrow_rn(double a) {
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
  return r;
}
// float -> double (exact) keeping float subnormals (a plain cast becomes cvt.ftz.f64.f32).
__device__ __forceinline__ double widen(float a) {
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
  return r;
}
#endif

// x == 0 (either sign) without a float compare: under -ftz=true `x == 0.f` becomes setp.eq.ftz,
// which calls every subnormal zero.
__device__ __forceinline__ bool is_zero(float a) { return (__float_as_uint(a) & 0x7fffffffu) == 0u; }
__device__ __forceinline__ bool is_zero(double a) { return a == 0.0; }

// x is neither inf nor NaN, on the bits (exponent not all ones): no float compare for -ftz or
// fast-math to change.
__device__ __forceinline__ bool is_finite(float a) { return (__float_as_uint(a) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool is_finite(double a) {
  return ((unsigned long long)__double_as_longlong(a) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// 1 / sqrt(var + eps) of a group; with zero_var_rule (batch and instance norm, ATen's rule) 0 when
// var == 0 and eps == 0. Layer and group norm use the plain formula (any eps, even negative).
template <typename A>
__device__ __forceinline__ A inverse_std(A var, A eps, int zero_var_rule) {
  if (zero_var_rule && is_zero(var) && is_zero(eps)) return A(0);
  return div_rn(A(1), sqrt_rn(add_rn(var, eps)));
}

// The normalize step of every norm (batch, instance, layer, group): (v - center) * scale + shift,
// each operation rounded on its own. Subtracting first keeps data near its mean exact (Sterbenz).
template <typename A>
__device__ __forceinline__ A normalize_rn(A v, A center, A scale, A shift) {
  return add_rn(mul_rn(sub_rn(v, center), scale), shift);
}

// ------------------------------------------------------------------------------------ conversions
//
// convert<To>(v) for the storage types f16, bf16, f32, f64 and the accumulation types f32, f64.
// Every conversion used here is exact except narrowing, which rounds to nearest even.

template <typename To> struct Convert;

template <> struct Convert<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
  __device__ __forceinline__ static float from(double v) { return narrow_rn(v); }
  __device__ __forceinline__ static float from(__half v) { return __half2float(v); }
  // bf16 -> f32 is a 16-bit shift; done by hand so no .ftz conversion can touch bf16 subnormals.
  __device__ __forceinline__ static float from(__nv_bfloat16 v) {
    return __uint_as_float((unsigned int)__bfloat16_as_ushort(v) << 16);
  }
};

template <> struct Convert<double> {
  __device__ __forceinline__ static double from(float v) { return widen(v); }
  __device__ __forceinline__ static double from(double v) { return v; }
  __device__ __forceinline__ static double from(__half v) { return widen(__half2float(v)); }
  __device__ __forceinline__ static double from(__nv_bfloat16 v) { return widen(Convert<float>::from(v)); }
};

template <> struct Convert<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};

template <> struct Convert<__nv_bfloat16> {
  // Round to nearest even on the bits, as the CPU path does; keeps float subnormals (which are
  // bf16 subnormals) and quiets NaN, whatever -ftz says.
  __device__ __forceinline__ static __nv_bfloat16 from(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16((unsigned short)((u >> 16) | 0x40u));
    u += 0x7fffu + ((u >> 16) & 1u);
    return __ushort_as_bfloat16((unsigned short)(u >> 16));
  }
};

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  return Convert<To>::from(v);
}

// ------------------------------------------------------------------------------------ vector access
//
// A thread that owns V = vec_width<T>() consecutive elements moves them with one 16-byte access
// when it can, else element by element:
//   * `n < V` is the tail of a row (only the first n elements exist);
//   * a pointer that is not 16-byte aligned (a view that starts one element in, or a row whose
//     length is not a multiple of V) cannot use a vector access.
// The two pointers of a copy are checked independently: x may be misaligned while y is not.

template <typename T, int V>
union Pack16 {
  int4 raw;
  T e[V];
};

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull;
}

// out[k] = convert<A>(p[k]) for k < n; out[k] = 0 for n <= k < V.
template <int V, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, int n, A (&out)[V]) {
  static_assert(V * sizeof(T) == 16, "load_vec moves 16 bytes");
  if (n == V && is_aligned16(p)) {
    Pack16<T, V> pk;
    pk.raw = __ldg(reinterpret_cast<const int4*>(p));
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = convert<A>(pk.e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = k < n ? convert<A>(__ldg(p + k)) : A(0);
  }
}

// p[k] = convert<T>(in[k]) for k < n; nothing is written at or past p + n.
template <int V, typename T, typename A>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int n, const A (&in)[V]) {
  static_assert(V * sizeof(T) == 16, "store_vec moves 16 bytes");
  if (n == V && is_aligned16(p)) {
    Pack16<T, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.e[k] = convert<T>(in[k]);
    *reinterpret_cast<int4*>(p) = pk.raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) p[k] = convert<T>(in[k]);
  }
}

// ------------------------------------------------------------------------------------ Welford / Chan
//
// Running mean and sum of squared deviations (m2) of n values. The count is an integer so it
// stays exact past 2^24 elements per group.

template <typename A>
struct Welford {
  A mean;
  A m2;
  long long n;
};

template <typename A>
__device__ __forceinline__ Welford<A> welford_empty() {
  Welford<A> w;
  w.mean = A(0);
  w.m2 = A(0);
  w.n = 0;
  return w;
}

// Adds one value.
template <typename A>
__device__ __forceinline__ void welford_push(Welford<A>& w, A x) {
  w.n += 1;
  const A d = sub_rn(x, w.mean);
  w.mean = add_rn(w.mean, div_rn(d, (A)w.n));
  w.m2 = add_rn(w.m2, mul_rn(d, sub_rn(x, w.mean)));
}

// Chan et al.'s combine of two disjoint sets; an empty side returns the other unchanged, so the
// result of combining in a fixed order does not depend on which partials happen to be empty.
template <typename A>
__device__ __forceinline__ Welford<A> welford_combine(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  Welford<A> r;
  r.n = a.n + b.n;
  const A fb = div_rn((A)b.n, (A)r.n);  // share of b in the union
  const A d = sub_rn(b.mean, a.mean);
  r.mean = add_rn(a.mean, mul_rn(d, fb));
  r.m2 = add_rn(add_rn(a.m2, b.m2), mul_rn(mul_rn(mul_rn(d, d), (A)a.n), fb));
  return r;
}

// Adds the first n (1 <= n <= V) values of v: their mean and m2 by two passes in registers, then
// one Chan combine, so a thread pays one division per vector instead of one per element
// (Welford's division per element would make the f16/bf16 kernel compute-bound).
template <int V, typename A>
__device__ __forceinline__ void welford_push_vector(Welford<A>& w, const A (&v)[V], int n) {
  A sum = v[0];
#pragma unroll
  for (int k = 1; k < V; ++k)
    if (k < n) sum = add_rn(sum, v[k]);
  // a whole vector divides by a power of two (exact, a multiply); a tail by n
  const A mean = n == V ? mul_rn(sum, A(1) / A(V)) : div_rn(sum, (A)n);
  A m2 = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (k < n) {
      const A d = sub_rn(v[k], mean);
      m2 = add_rn(m2, mul_rn(d, d));
    }
  Welford<A> b;
  b.mean = mean;
  b.m2 = m2;
  b.n = n;
  w = welford_combine(w, b);
}

// ------------------------------------------------------------------------------------ blocked accumulation
//
// A thread that folds thousands of items into one running state (a Welford state, a float sum)
// rounds every fold against a total that keeps growing while the items stay small, so the error
// of a chain of k folds grows like k (sqrt(k) at best), and with coarse data (float32 at a large
// mean: a few distinct values per standard deviation) the roundings do not even average out.
// Measured in the emulator on one 2^24-element float32 group (mean 1, std 1e-6): 8192 vectors
// per thread (the long fused path, moments_forward with >= 1024 such groups) put 8.6e-6 of
// relative error into the variance, against ~1e-7 for 16 vectors per thread.
//
// Blocked<S> keeps every chain short: items go into `cur`; every kFoldBlock items `cur` is
// combined into `mid` (and cleared), every kFoldBlock of those `mid` into `total`. Each state is
// combined only with states of a similar size (Chan's formula for Welford: each block centred on
// its own mean), the chains are at most kFoldBlock long up to kFoldBlock^3 items per thread, and a
// thread with at most kFoldBlock items gets bitwise the result of one plain chain (combining with
// an empty state returns the other side unchanged). The per-item work is one counter increment
// and a rarely taken branch.
constexpr int kFoldBlock = 64;

template <typename S>
struct Blocked {
  S cur, mid, total;
  int cur_items, mid_blocks;
};

template <typename S>
__device__ __forceinline__ Blocked<S> blocked_empty(const S& identity) {
  Blocked<S> b;
  b.cur = b.mid = b.total = identity;
  b.cur_items = b.mid_blocks = 0;
  return b;
}

// Call after folding one item into b.cur.
template <typename S, typename Op>
__device__ __forceinline__ void blocked_step(Blocked<S>& b, Op op, const S& identity) {
  if (++b.cur_items < kFoldBlock) return;
  b.mid = op(b.mid, b.cur);
  b.cur = identity;
  b.cur_items = 0;
  if (++b.mid_blocks < kFoldBlock) return;
  b.total = op(b.total, b.mid);
  b.mid = identity;
  b.mid_blocks = 0;
}

// Everything folded so far (the largest part first).
template <typename S, typename Op>
__device__ __forceinline__ S blocked_result(const Blocked<S>& b, Op op) {
  return op(op(b.total, b.mid), b.cur);
}

// Reduction operators for warp_reduce / block_reduce.
struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(const V& a, const V& b) const { return add_rn(a, b); }
};
struct WelfordOp {
  template <typename A>
  __device__ __forceinline__ Welford<A> operator()(const Welford<A>& a, const Welford<A>& b) const {
    return welford_combine(a, b);
  }
};

// ------------------------------------------------------------------------------------ warp / block reductions
//
// Shuffles move at most 8 bytes, so a Welford state travels field by field.

template <typename V>
__device__ __forceinline__ V shfl_down(V v, unsigned int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
template <typename A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& w, unsigned int delta) {
  Welford<A> r;
  r.mean = __shfl_down_sync(0xffffffffu, w.mean, delta);
  r.m2 = __shfl_down_sync(0xffffffffu, w.m2, delta);
  r.n = __shfl_down_sync(0xffffffffu, w.n, delta);
  return r;
}

// Reduces v over the 32 lanes of a full warp; the result is valid in lane 0. Lane k combines
// with lane k + delta (never the reverse), so the order of operations is fixed and the result
// is deterministic even for the non-commutative-in-rounding Chan combine.
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (unsigned int delta = 16; delta > 0; delta >>= 1) v = op(v, shfl_down(v, delta));
  return v;
}

__device__ __forceinline__ int block_threads() { return (int)(blockDim.x * blockDim.y * blockDim.z); }
__device__ __forceinline__ int linear_thread_id() {
  return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

// Last-block-done ticket. Call from every thread of the block after the threads that wrote this
// block's partial results have fenced them (__threadfence). One thread (`leader`, true in exactly
// one thread: the caller has that test in registers already) takes a ticket from `counter`; the
// result, true in every thread, says whether this block is the last of `expected` blocks to
// arrive, and then every other block's partials are visible to it. `flag` points at one int of
// shared memory. Contains __syncthreads (a non-last block may return right after it).
__device__ __forceinline__ bool last_block_to_arrive(unsigned int* counter, unsigned int expected, int* flag,
                                                     bool leader) {
  if (leader) *flag = atomicAdd(counter, 1u) == expected - 1u;
  __syncthreads();
  if (!*flag) return false;
  __threadfence();  // see every other block's partials
  return true;
}

// Reduces v over the whole block; the result is valid in thread 0 (linear id). The block must
// hold a multiple of 32 threads (full warps), at most 1024. `scratch` points at 32 entries of
// shared memory; the function ends with a barrier, so scratch may be reused right after it.
// Every thread of the block must call it (it contains __syncthreads).
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity, V* scratch) {
  const int tid = linear_thread_id();
  const int lane = tid & 31, warp = tid >> 5;
  const int warps = block_threads() >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();  // every warp's partial is in scratch
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : identity;
    v = warp_reduce(v, op);
  }
  __syncthreads();  // warp 0 has read scratch before anyone writes it again
  return v;
}

}  // namespace cupybn
