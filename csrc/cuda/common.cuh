// Helpers for the CUDA kernels. Only c10/cuda headers: the machine's toolkit may lack cuBLAS/cuSPARSE headers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace tscd {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>((n + threads - 1) / threads);
}

}  // namespace cuda
}  // namespace tscd
