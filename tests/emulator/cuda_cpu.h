// cuda_cpu.h -- lets g++ compile unmodified CUDA C++ device code so that the emulator can run it on the CPU.
//
// emulator/__init__.py force-includes this header into a g++ build of a kernel file:
//   g++ -std=c++17 -I<emulator>/include -include cuda_cpu.h -x c++ glue.cpp   (glue.cpp #includes the .cu)
// and links the result with cuda_cpu_rt.cpp (fiber scheduler, barriers, memory tracking) into one .so.
// Every emulated CUDA thread is a fiber; the fibers of one block run on one OS thread, so "__shared__" can
// simply be "thread_local": one copy per OS thread == one copy per resident block.
//
// What a kernel file may use is what NVRTC gives it with <cuda_fp16.h>, <cuda_bf16.h>, <cuda_runtime.h>,
// <cooperative_groups.h> and <stdint.h>.  The standard library headers included below are for this header's own
// use; build() rejects kernel files that use std:: themselves (NVRTC has no standard library).
#ifndef CUDA_CPU_H
#define CUDA_CPU_H
#ifdef __CUDACC__
#error "cuda_cpu.h is for the host-compiler (g++) emulation build only"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <stdint.h>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define CUDA_CPU_EMULATION 1

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// (defined after every standard header: libstdc++ spells an attribute __noinline__)
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is a native g++ keyword.
// Block-scope "thread_local" implies static: one instance per OS thread == per resident block.
// "extern __shared__ T name[];" becomes "extern thread_local T name[];": build() defines every such undefined
// TLS symbol as an alias of one 227 KiB buffer, so all dynamic shared memory arrays alias, as on the GPU.
#define __shared__ thread_local

// ---------------------------------------------------------------- vector types (layout and alignment as CUDA's)
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
#define CC_VEC1(T, N, A) struct __attribute__((aligned(A))) N##1 { T x; }; \
  inline N##1 make_##N##1(T x) { return N##1{x}; }
#define CC_VEC2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define CC_VEC3(T, N) struct N##3 { T x, y, z; }; \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define CC_VEC4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
#define CC_VECS(T, N, S) CC_VEC1(T, N, S) CC_VEC2(T, N, 2 * S) CC_VEC3(T, N) \
  CC_VEC4(T, N, (4 * S > 16 ? 16 : 4 * S))
CC_VECS(signed char, char, 1)
CC_VECS(unsigned char, uchar, 1)
CC_VECS(short, short, 2)
CC_VECS(unsigned short, ushort, 2)
CC_VECS(int, int, 4)
CC_VECS(float, float, 4)
CC_VECS(long long, longlong, 8)
CC_VECS(unsigned long long, ulonglong, 8)
CC_VECS(double, double, 8)
CC_VEC1(unsigned int, uint, 4)
CC_VEC2(unsigned int, uint, 8)
CC_VEC4(unsigned int, uint, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef CC_VEC1
#undef CC_VEC2
#undef CC_VEC3
#undef CC_VEC4
#undef CC_VECS

// ---------------------------------------------------------------- runtime interface
namespace cuda_cpu {
namespace detail {
struct Fiber;
struct Worker;
// Everything the runtime keeps in TLS lives in this one struct, so that poisoning the module's TLS block
// (i.e. all __shared__ variables) at each block start can skip it.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  Fiber* fiber;
  Worker* worker;
};
inline thread_local ThreadState tls{};

enum WarpKind : int {
  W_SHFL_IDX = 0, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNCWARP,
  W_REDUCE_ADD, W_REDUCE_MIN, W_REDUCE_MAX, W_REDUCE_UMIN, W_REDUCE_UMAX, W_MATCH_ANY
};
struct WarpOp {
  int kind;
  unsigned mask;
  int param;   // srcLane / delta / laneMask
  int width;
  int size;    // bytes of the exchanged value (<= 8)
  unsigned char in[8];
  unsigned char out[8];
  const char* file;
  int line;
};
enum BarrierOp : int { B_SYNC = 0, B_COUNT, B_AND, B_OR, B_GRID };
void warp_op(WarpOp* op);
int syncthreads(int op, int pred, const char* file, int line);
void grid_sync(const char* file, int line);  // cooperative_groups::grid_group::sync()
int launch_is_cooperative();
void yield();                                // no-op outside a fiber
unsigned activemask();
[[noreturn]] void trap(const char* what, const char* file, int line);

inline unsigned linear_tid() {
  return tls.thread_idx.x + tls.block_dim.x * (tls.thread_idx.y + tls.block_dim.y * tls.thread_idx.z);
}

// ---- float <-> half / bfloat16 conversions, bit-exact with the GPU's (round to nearest even, NaN -> canonical)
inline unsigned f2u(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned long long d2u(double d) { unsigned long long u; std::memcpy(&u, &d, 8); return u; }
inline double u2d(unsigned long long u) { double d; std::memcpy(&d, &u, 8); return d; }
inline unsigned short f32_to_f16(float f) {
  unsigned x = f2u(f);
  unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fff;                               // NaN -> canonical NaN (as cvt.rn.f16.f32)
  if (x >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);    // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                            // half subnormal or zero
    float t = u2f(x) + 0.5f;                                        // the FPU does the RNE at 2^-24
    return (unsigned short)(sign | (f2u(t) - 0x3f000000u));
  }
  unsigned odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;                                           // rebias (-112<<23) + rounding
  return (unsigned short)(sign | (x >> 13));
}
inline float f16_to_f32(unsigned short h) {
  unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float r = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -r : r;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline unsigned short f32_to_bf16(float f) {
  unsigned x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}
inline float bf16_to_f32(unsigned short b) { return u2f((unsigned)b << 16); }
// double -> float rounded to odd: the inexact results get their last bit set, so that a following RNE to a format
// with at most 22 significant bits (half, bfloat16) rounds exactly like one direct RNE from double would
// (what __double2half / __double2bfloat16 do; float-then-half would round twice).
inline float f64_to_f32_odd(double d) {
  float f = (float)d;
  if (d != d || (double)f == d || std::isinf(d)) return f;
  if (std::fabs((double)f) > std::fabs(d)) f = std::nextafter(f, 0.0f);  // truncate toward zero ...
  return u2f(f2u(f) | 1u);                                               // ... and make it sticky
}
inline unsigned short f64_to_f16(double d) { return f32_to_f16(f64_to_f32_odd(d)); }
inline unsigned short f64_to_bf16(double d) { return f32_to_bf16(f64_to_f32_odd(d)); }
// a*b+c for half/bfloat16 operands, rounded once (as the GPU's hfma): a*b is exact in double, TwoSum gives the
// rounding error of the addition, which is folded into the last bit (round to odd) before the final rounding.
inline double fma_odd(double a, double b, double c) {
  double p = a * b, s = p + c, bb = s - p, err = (p - (s - bb)) + (c - bb);
  if (err != 0 && !(d2u(s) & 1u) && std::isfinite(s)) s = std::nextafter(s, err > 0 ? HUGE_VAL : -HUGE_VAL);
  return s;
}
}  // namespace detail
}  // namespace cuda_cpu

// ---------------------------------------------------------------- built-in variables
#define threadIdx (::cuda_cpu::detail::tls.thread_idx)
#define blockIdx (::cuda_cpu::detail::tls.block_idx)
#define blockDim (::cuda_cpu::detail::tls.block_dim)
#define gridDim (::cuda_cpu::detail::tls.grid_dim)
constexpr int warpSize = 32;

// Call sites of barriers and warp operations are recorded through default arguments, so that divergence and
// deadlock reports can name file:line.
#define CUDA_CPU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

// ---------------------------------------------------------------- synchronization
inline void __syncthreads(CUDA_CPU_SITE) { ::cuda_cpu::detail::syncthreads(::cuda_cpu::detail::B_SYNC, 0, file, line); }
inline int __syncthreads_count(int p, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::syncthreads(::cuda_cpu::detail::B_COUNT, p, file, line);
}
inline int __syncthreads_and(int p, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::syncthreads(::cuda_cpu::detail::B_AND, p, file, line);
}
inline int __syncthreads_or(int p, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::syncthreads(::cuda_cpu::detail::B_OR, p, file, line);
}
// Fibers of one block interleave only inside runtime calls, so fences matter only between blocks running on
// different OS threads (workers > 1, cooperative launches); there they are real fences.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { ::cuda_cpu::detail::yield(); }
[[noreturn]] inline void __trap(CUDA_CPU_SITE) { ::cuda_cpu::detail::trap("__trap()", file, line); }
[[noreturn]] inline void __brkpt(CUDA_CPU_SITE) { ::cuda_cpu::detail::trap("__brkpt()", file, line); }
inline unsigned __activemask() { return ::cuda_cpu::detail::activemask(); }
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
inline unsigned __lanemask_lt() { return (1u << (::cuda_cpu::detail::linear_tid() & 31)) - 1u; }
inline unsigned __lanemask_le() { return (2u << (::cuda_cpu::detail::linear_tid() & 31)) - 1u; }
inline unsigned __lanemask_gt() { return ~__lanemask_le(); }
inline unsigned __lanemask_ge() { return ~__lanemask_lt(); }
inline unsigned __lanemask_eq() { return 1u << (::cuda_cpu::detail::linear_tid() & 31); }

// ---------------------------------------------------------------- warp intrinsics
namespace cuda_cpu {
namespace detail {
template <class T>
inline T warp_xchg(int kind, unsigned mask, T v, int param, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles exchange trivially-copyable values of at most 8 bytes");
  WarpOp op;
  op.kind = kind; op.mask = mask; op.param = param; op.width = width; op.size = (int)sizeof(T);
  std::memset(op.in, 0, 8);
  std::memcpy(op.in, &v, sizeof(T));
  op.file = file; op.line = line;
  warp_op(&op);
  T r;
  std::memcpy(&r, op.out, sizeof(T));
  return r;
}
}  // namespace detail
}  // namespace cuda_cpu
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg(::cuda_cpu::detail::W_SHFL_IDX, mask, var, srcLane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg(::cuda_cpu::detail::W_SHFL_UP, mask, var, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg(::cuda_cpu::detail::W_SHFL_DOWN, mask, var, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg(::cuda_cpu::detail::W_SHFL_XOR, mask, var, laneMask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_BALLOT, mask, pred != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int pred, CUDA_CPU_SITE) {
  return (int)::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_ANY, mask, pred != 0, 0, 32, file, line);
}
inline int __all_sync(unsigned mask, int pred, CUDA_CPU_SITE) {
  return (int)::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_ALL, mask, pred != 0, 0, 32, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, CUDA_CPU_SITE) {
  (void)::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_SYNCWARP, mask, 0u, 0, 32, file, line);
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_REDUCE_ADD, mask, v, 0, 32, file, line);
}
inline int __reduce_add_sync(unsigned mask, int v, CUDA_CPU_SITE) {
  return (int)::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_REDUCE_ADD, mask, (unsigned)v, 0, 32,
                                                       file, line);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_REDUCE_UMIN, mask, v, 0, 32, file, line);
}
inline int __reduce_min_sync(unsigned mask, int v, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<int>(::cuda_cpu::detail::W_REDUCE_MIN, mask, v, 0, 32, file, line);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<unsigned>(::cuda_cpu::detail::W_REDUCE_UMAX, mask, v, 0, 32, file, line);
}
inline int __reduce_max_sync(unsigned mask, int v, CUDA_CPU_SITE) {
  return ::cuda_cpu::detail::warp_xchg<int>(::cuda_cpu::detail::W_REDUCE_MAX, mask, v, 0, 32, file, line);
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, CUDA_CPU_SITE) {
  return (unsigned)::cuda_cpu::detail::warp_xchg<unsigned long long>(
      ::cuda_cpu::detail::W_MATCH_ANY, mask, (unsigned long long)v, 0, 32, file, line);
}

// ---------------------------------------------------------------- atomics
// Device-wide and relaxed on the GPU; seq_cst here.  A failed atomicCAS yields the fiber so that spin locks
// between threads of one block make progress.
#define CC_ATOMIC_INT(T)                                                                               \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                   \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicMin(T* a, T v) {                                                                      \
    T o = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                        \
    while (v < o && !__atomic_compare_exchange_n(a, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                                \
    return o;                                                                                          \
  }                                                                                                    \
  inline T atomicMax(T* a, T v) {                                                                      \
    T o = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                        \
    while (v > o && !__atomic_compare_exchange_n(a, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                                \
    return o;                                                                                          \
  }                                                                                                    \
  inline T atomicCAS(T* a, T cmp, T v) {                                                               \
    T o = cmp;                                                                                         \
    if (!__atomic_compare_exchange_n(a, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))             \
      ::cuda_cpu::detail::yield();                                                                     \
    return o;                                                                                          \
  }
CC_ATOMIC_INT(int)
CC_ATOMIC_INT(unsigned int)
CC_ATOMIC_INT(unsigned long long)
CC_ATOMIC_INT(long long)
#undef CC_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  unsigned short o = cmp;
  if (!__atomic_compare_exchange_n(a, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) ::cuda_cpu::detail::yield();
  return o;
}
namespace cuda_cpu {
namespace detail {
template <class F, class U, class Op>
inline F atomic_rmw(F* a, Op op) {
  static_assert(sizeof(F) == sizeof(U), "");
  U* ua = reinterpret_cast<U*>(a);
  U o = __atomic_load_n(ua, __ATOMIC_SEQ_CST), n;
  F of, nf;
  do {
    std::memcpy(&of, &o, sizeof(F));
    nf = op(of);
    std::memcpy(&n, &nf, sizeof(F));
  } while (!__atomic_compare_exchange_n(ua, &o, n, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return of;
}
}  // namespace detail
}  // namespace cuda_cpu
inline float atomicAdd(float* a, float v) {
  return ::cuda_cpu::detail::atomic_rmw<float, unsigned>(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::cuda_cpu::detail::atomic_rmw<double, unsigned long long>(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  return ::cuda_cpu::detail::atomic_rmw<float, unsigned>(a, [v](float) { return v; });
}
inline unsigned atomicInc(unsigned* a, unsigned v) {
  return ::cuda_cpu::detail::atomic_rmw<unsigned, unsigned>(a, [v](unsigned o) { return o >= v ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned v) {
  return ::cuda_cpu::detail::atomic_rmw<unsigned, unsigned>(
      a, [v](unsigned o) { return (o == 0u || o > v) ? v : o - 1u; });
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// ---------------------------------------------------------------- loads/stores with cache hints: plain accesses
// (fibers switch only inside runtime calls, so no value can be cached across another fiber's store)
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- math / bit intrinsics
// Exact IEEE versions: the GPU's fast approximations (__fdividef, __expf, rsqrtf) differ in the last ulps, and
// nvcc contracts a*b+c into FMA by default while this build does not (-ffp-contract=off).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return (float)(1.0 / sqrt((double)x)); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline int __double2hiint(double d) { return (int)(__double_as_longlong(d) >> 32); }
inline int __double2loint(double d) { return (int)__double_as_longlong(d); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((long long)(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo));
}
inline float __double2float_rn(double d) { return (float)d; }
inline float __double2float_rz(double d) {
  float f = (float)d;
  return (std::isfinite(d) && std::fabs((double)f) > std::fabs(d)) ? std::nextafter(f, 0.0f) : f;
}
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline int __double2int_rz(double x) { return (int)x; }
inline long long __double2ll_rn(double x) { return (long long)nearbyint(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __ull2float_rn(unsigned long long x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline double __ll2double_rn(long long x) { return (double)x; }
inline double __ull2double_rn(unsigned long long x) { return (double)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return (unsigned)((v << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return (unsigned)(v >> (s & 31));
}
// CUDA's global min/max overloads (the float/double ones are fminf/fmaxf: a NaN operand is ignored)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
// isnan/isinf/isfinite/signbit for float and double come from <cmath> (global via <math.h>), as in device code.

// ---------------------------------------------------------------- __half / __nv_bfloat16
// Layout-compatible with cuda_fp16.h / cuda_bf16.h; implicit float conversions and arithmetic operators as in
// the default (no __CUDA_NO_HALF_OPERATORS__) configuration.  + - * / round through float, which is exact:
// float has more than 2p+2 significant bits for p = 11 (half) and 8 (bfloat16).  Conversions from double and
// from integers round once, like __double2half / __int2half_rn.
#define CC_16BIT_TYPE(T, RAW, TO, FROM, FROM64)                                                  \
  struct RAW { unsigned short x; };                                                              \
  struct __attribute__((aligned(2))) T {                                                         \
    unsigned short __x;                                                                          \
    T() = default;                                                                               \
    constexpr T(RAW r) : __x(r.x) {}                                                             \
    T(float f) : __x(::cuda_cpu::detail::FROM(f)) {}                                             \
    T(double f) : __x(::cuda_cpu::detail::FROM64(f)) {}                                          \
    T(int i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                                     \
    T(unsigned i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                                \
    T(long i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                                    \
    T(unsigned long i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                           \
    T(long long i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                               \
    T(unsigned long long i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                      \
    T(short i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                                   \
    T(unsigned short i) : __x(::cuda_cpu::detail::FROM64((double)i)) {}                          \
    operator float() const { return ::cuda_cpu::detail::TO(__x); }                               \
    operator RAW() const { return RAW{__x}; }                                                    \
    template <class U, class = std::enable_if_t<std::is_arithmetic<U>::value>>                   \
    T& operator=(U v) { return *this = T(v); }                                                   \
    T& operator+=(const T& o) { return *this = float(*this) + float(o); }                        \
    T& operator-=(const T& o) { return *this = float(*this) - float(o); }                        \
    T& operator*=(const T& o) { return *this = float(*this) * float(o); }                        \
    T& operator/=(const T& o) { return *this = float(*this) / float(o); }                        \
  };                                                                                             \
  inline T operator+(const T& a, const T& b) { return T(float(a) + float(b)); }                  \
  inline T operator-(const T& a, const T& b) { return T(float(a) - float(b)); }                  \
  inline T operator*(const T& a, const T& b) { return T(float(a) * float(b)); }                  \
  inline T operator/(const T& a, const T& b) { return T(float(a) / float(b)); }                  \
  inline T operator-(const T& a) { T r = a; r.__x ^= 0x8000u; return r; }                        \
  inline T operator+(const T& a) { return a; }                                                   \
  inline bool operator==(const T& a, const T& b) { return float(a) == float(b); }                \
  inline bool operator!=(const T& a, const T& b) { return float(a) != float(b); }                \
  inline bool operator<(const T& a, const T& b) { return float(a) < float(b); }                  \
  inline bool operator>(const T& a, const T& b) { return float(a) > float(b); }                  \
  inline bool operator<=(const T& a, const T& b) { return float(a) <= float(b); }                \
  inline bool operator>=(const T& a, const T& b) { return float(a) >= float(b); }
CC_16BIT_TYPE(__half, __half_raw, f16_to_f32, f32_to_f16, f64_to_f16)
CC_16BIT_TYPE(__nv_bfloat16, __nv_bfloat16_raw, bf16_to_f32, f32_to_bf16, f64_to_bf16)
#undef CC_16BIT_TYPE
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

// Operations shared by both 16-bit types (H: the scalar type, H2: its pair type).
#define CC_16BIT_OPS(H, H2, NAN_BITS, INF_BITS)                                                          \
  inline H __hadd(H a, H b) { return a + b; }                                                           \
  inline H __hsub(H a, H b) { return a - b; }                                                           \
  inline H __hmul(H a, H b) { return a * b; }                                                           \
  inline H __hdiv(H a, H b) { return a / b; }                                                           \
  inline H __hneg(H a) { return -a; }                                                                   \
  inline H __habs(H a) { a.__x &= 0x7fffu; return a; }                                                 \
  inline H __hfma(H a, H b, H c) { return H(::cuda_cpu::detail::fma_odd(float(a), float(b), float(c))); } \
  inline bool __hisnan(H a) { return (a.__x & 0x7fffu) > INF_BITS; }                                   \
  inline int __hisinf(H a) { return (a.__x & 0x7fffu) == INF_BITS ? ((a.__x & 0x8000u) ? -1 : 1) : 0; } \
  inline H __hmax(H a, H b) {                                                                           \
    if (__hisnan(a) && __hisnan(b)) return H(::cuda_cpu::detail::raw_of<H>::type{NAN_BITS});            \
    return __hisnan(a) ? b : __hisnan(b) ? a : (float(a) >= float(b) ? a : b);                          \
  }                                                                                                     \
  inline H __hmin(H a, H b) {                                                                           \
    if (__hisnan(a) && __hisnan(b)) return H(::cuda_cpu::detail::raw_of<H>::type{NAN_BITS});            \
    return __hisnan(a) ? b : __hisnan(b) ? a : (float(a) <= float(b) ? a : b);                          \
  }                                                                                                     \
  inline bool __heq(H a, H b) { return float(a) == float(b); }                                          \
  inline bool __hne(H a, H b) { return float(a) != float(b); }                                          \
  inline bool __hlt(H a, H b) { return float(a) < float(b); }                                           \
  inline bool __hle(H a, H b) { return float(a) <= float(b); }                                          \
  inline bool __hgt(H a, H b) { return float(a) > float(b); }                                           \
  inline bool __hge(H a, H b) { return float(a) >= float(b); }                                          \
  inline H2 __hadd2(H2 a, H2 b) { return H2{a.x + b.x, a.y + b.y}; }                                    \
  inline H2 __hsub2(H2 a, H2 b) { return H2{a.x - b.x, a.y - b.y}; }                                    \
  inline H2 __hmul2(H2 a, H2 b) { return H2{a.x * b.x, a.y * b.y}; }                                    \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }      \
  inline H2 __hneg2(H2 a) { return H2{-a.x, -a.y}; }
namespace cuda_cpu {
namespace detail {
template <class H> struct raw_of;
template <> struct raw_of<__half> { using type = __half_raw; };
template <> struct raw_of<__nv_bfloat16> { using type = __nv_bfloat16_raw; };
}  // namespace detail
}  // namespace cuda_cpu
CC_16BIT_OPS(__half, __half2, 0x7fffu, 0x7c00u)
CC_16BIT_OPS(__nv_bfloat16, __nv_bfloat162, 0x7fffu, 0x7f80u)
#undef CC_16BIT_OPS

inline float __half2float(__half h) { return ::cuda_cpu::detail::f16_to_f32(h.__x); }
inline __half __float2half(float f) { return __half_raw{::cuda_cpu::detail::f32_to_f16(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{::cuda_cpu::detail::f32_to_f16(f)}; }
inline __half __double2half(double d) { return __half_raw{::cuda_cpu::detail::f64_to_f16(d)}; }
inline __half __int2half_rn(int i) { return __half(i); }
inline int __half2int_rn(__half h) { return (int)nearbyintf(__half2float(h)); }
inline int __half2int_rz(__half h) { return (int)__half2float(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short u) { return __half_raw{(unsigned short)u}; }
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline float __bfloat162float(__nv_bfloat16 b) { return ::cuda_cpu::detail::bf16_to_f32(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16_raw{::cuda_cpu::detail::f32_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16_raw{::cuda_cpu::detail::f64_to_bf16(d)}; }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat16 __short_as_bfloat16(short u) { return __nv_bfloat16_raw{(unsigned short)u}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// 16-bit atomics (sm_70+ for __half, sm_80+ for __nv_bfloat16)
inline __half atomicAdd(__half* a, __half v) {
  return ::cuda_cpu::detail::atomic_rmw<__half, unsigned short>(a, [v](__half o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return ::cuda_cpu::detail::atomic_rmw<__nv_bfloat16, unsigned short>(a, [v](__nv_bfloat16 o) { return o + v; });
}
inline __half2 atomicAdd(__half2* a, __half2 v) {
  return ::cuda_cpu::detail::atomic_rmw<__half2, unsigned>(a, [v](__half2 o) { return __hadd2(o, v); });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) {
  return ::cuda_cpu::detail::atomic_rmw<__nv_bfloat162, unsigned>(a, [v](__nv_bfloat162 o) { return __hadd2(o, v); });
}

// ---------------------------------------------------------------- launcher
namespace cuda_cpu {
struct LaunchDesc {
  void (*invoke)(void* closure);  // runs the kernel body for the current emulated thread
  void* closure;
  dim3 grid, block;
  size_t dyn_smem;
  const char* name;
  int cooperative;                // cudaLaunchCooperativeKernel: all blocks co-resident, grid.sync() allowed
  int has_seed;                   // schedule seed for this launch only (else the module's configured seed)
  unsigned long long seed;
};
int run_launch(const LaunchDesc& d);  // 0 ok; otherwise see cuda_cpu_last_error()

namespace detail {
// Arguments arrive as untyped, possibly under-aligned buffers (ctypes); copy them into aligned storage.
template <class T> T load_arg(const void* p) {
  static_assert(std::is_trivially_copyable<T>::value, "kernel parameters must be trivially copyable");
  alignas(T) unsigned char buf[sizeof(T)];
  std::memcpy(buf, p, sizeof(T));
  return *reinterpret_cast<T*>(buf);
}
template <class... P, size_t... I>
int launch_unpack(void (*k)(P...), dim3 g, dim3 b, size_t smem, void** args, const char* name,
                  const long long* opts, std::index_sequence<I...>) {
  using Tup = std::tuple<std::decay_t<P>...>;
  Tup tup{load_arg<std::decay_t<P>>(args[I])...};  // one copy of the arguments per launch ...
  struct Closure { void (*k)(P...); Tup* t; } cl{k, &tup};
  LaunchDesc d{[](void* c) {
                 auto* cl = static_cast<Closure*>(c);
                 std::apply(cl->k, *cl->t);  // ... and by-value copies per emulated thread
               },
               &cl, g, b, smem, name, opts ? (int)opts[2] : 0, opts ? (int)opts[0] : 0,
               opts ? (unsigned long long)opts[1] : 0ull};
  return run_launch(d);
}

// Parameter type codes for the Python side: f32 f64 f16 bf16 b8 i8..i64 u8..u64, vectors as "<elem>x<n>"
// (float4 -> f32x4), pointers as "p:<pointee>" (p:void for void*), other structs as "s<bytes>".
template <class T> struct vec_code { static constexpr const char* elem = nullptr; static constexpr int n = 0; };
#define CC_VEC_CODE(T, E, N) \
  template <> struct vec_code<T> { static constexpr const char* elem = E; static constexpr int n = N; };
#define CC_VEC_CODES(P, E) \
  CC_VEC_CODE(P##1, E, 1) CC_VEC_CODE(P##2, E, 2) CC_VEC_CODE(P##3, E, 3) CC_VEC_CODE(P##4, E, 4)
CC_VEC_CODES(char, "i8") CC_VEC_CODES(uchar, "u8") CC_VEC_CODES(short, "i16") CC_VEC_CODES(ushort, "u16")
CC_VEC_CODES(int, "i32") CC_VEC_CODES(float, "f32") CC_VEC_CODES(longlong, "i64") CC_VEC_CODES(ulonglong, "u64")
CC_VEC_CODES(double, "f64")
CC_VEC_CODE(uint1, "u32", 1) CC_VEC_CODE(uint2, "u32", 2) CC_VEC_CODE(uint3, "u32", 3) CC_VEC_CODE(uint4, "u32", 4)
CC_VEC_CODE(__half2, "f16", 2) CC_VEC_CODE(__nv_bfloat162, "bf16", 2)
#undef CC_VEC_CODES
#undef CC_VEC_CODE
template <class T> std::string type_code_base() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, void>) return "void";
  else if constexpr (std::is_same_v<U, bool>) return "b8";
  else if constexpr (std::is_same_v<U, float>) return "f32";
  else if constexpr (std::is_same_v<U, double>) return "f64";
  else if constexpr (std::is_same_v<U, __half>) return "f16";
  else if constexpr (std::is_same_v<U, __nv_bfloat16>) return "bf16";
  else if constexpr (vec_code<U>::n > 0) return std::string(vec_code<U>::elem) + "x" + std::to_string(vec_code<U>::n);
  else if constexpr (std::is_pointer_v<U>) return "p";
  else if constexpr (std::is_integral_v<U> || std::is_enum_v<U>)
    return std::string(std::is_signed_v<U> ? "i" : "u") + std::to_string(8 * sizeof(U));
  else return "s" + std::to_string(sizeof(U));  // struct passed by value: raw bytes
}
template <class T> std::string type_code() {
  if constexpr (std::is_pointer_v<T>) return "p:" + type_code_base<std::remove_pointer_t<T>>();
  else return type_code_base<T>();
}
}  // namespace detail

// launch(kernel, grid, block, dynamic_smem_bytes, args, name, opts): args[i] points at the i-th argument value;
// opts (may be null) = {has_seed, seed, cooperative}.
template <class... P>
int launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, void** args, const char* name = "kernel",
           const long long* opts = nullptr) {
  return detail::launch_unpack(k, grid, block, smem, args, name, opts, std::index_sequence_for<P...>{});
}
// Comma-separated type codes of the kernel's parameters, e.g. "p:f32,i32,f32".
template <class... P>
const char* signature(void (*)(P...)) {
  static const std::string s = [] {
    std::string r;
    ((r += detail::type_code<std::decay_t<P>>() + ","), ...);
    if (!r.empty()) r.pop_back();
    return r;
  }();
  return s.c_str();
}
}  // namespace cuda_cpu

// One ctypes-callable entry per kernel (template instantiation):
//   int SYM(const unsigned grid[3], const unsigned block[3], unsigned long long smem, void** args,
//           const long long opts[3])
//   const char* SYM__sig(void)
#define CUDA_CPU_EXPORT(SYM, ...)                                                                      \
  extern "C" __attribute__((visibility("default"))) int SYM(const unsigned* g, const unsigned* b,      \
                                                            unsigned long long smem, void** args,      \
                                                            const long long* opts) {                   \
    return ::cuda_cpu::launch(&__VA_ARGS__, dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]),           \
                              (size_t)smem, args, #__VA_ARGS__, opts);                                 \
  }                                                                                                    \
  extern "C" __attribute__((visibility("default"))) const char* SYM##__sig() {                         \
    return ::cuda_cpu::signature(&__VA_ARGS__);                                                        \
  }

#endif  // CUDA_CPU_H
