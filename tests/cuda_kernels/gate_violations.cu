// gate_violations.cu -- kernels that must FAIL the NVRTC compile gate (tests/test_cuda_compile_gate.py).
// Never used by cupybn; they show the gate notices local memory, warnings and flush-to-zero math.
#include <cuda_runtime.h>

namespace gate_violations {

// A per-thread array indexed with a run-time value lives in local memory (a stack frame).
__global__ void local_array_kernel(const int* idx, float* out) {
  float scratch[64];
  for (int i = 0; i < 64; ++i) scratch[i] = out[i * blockDim.x + threadIdx.x];
  out[threadIdx.x] = scratch[idx[threadIdx.x] & 63];
}

// With GATE_VIOLATION_WARNING: an unused variable (a warning, an error under -Werror).
__global__ void unused_variable_kernel(float* out) {
#ifdef GATE_VIOLATION_WARNING
  int unused = 3;
#endif
  out[threadIdx.x] = 1.0f;
}

// Plain float arithmetic: under CuPy's -ftz=true it becomes mul.ftz / add.ftz.
__global__ void plain_float_kernel(const float* a, float* out) {
  out[threadIdx.x] = a[threadIdx.x] * a[threadIdx.x + 1] + 1.0f;
}

}  // namespace gate_violations
