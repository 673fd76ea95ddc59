// Shim for the emulator build: everything lives in cuda_cpu.h (force-included anyway), so that kernel files can
// #include <vector_types.h> unconditionally; NVRTC sees the real header.
#pragma once
#include "../cuda_cpu.h"
