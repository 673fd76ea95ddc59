// Shim for the emulator build: everything lives in cuda_cpu.h (force-included anyway), so that kernel files can
// #include <cuda_runtime_api.h> unconditionally; NVRTC sees the real header.
#pragma once
#include "../cuda_cpu.h"
