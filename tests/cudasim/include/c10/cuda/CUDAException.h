// cudasim stand-in for c10/cuda/CUDAException.h: the error checks of the launchers, on cudasim's error path.
// A failed launch or kernel raises the same kind of error as on a GPU ("CUDA error: <what>"), followed by
// cudasim's detail (which kernel, block and thread, and what was wrong).
#pragma once

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(EXPR)                                                                              \
  do {                                                                                                    \
    const cudaError_t cudasim_err_ = (EXPR);                                                              \
    if (cudasim_err_ != cudaSuccess) {                                                                    \
      (void)cudaGetLastError(); /* cleared, as c10's check does */                                        \
      const char* cudasim_detail_ = ::cudasim::error_detail();                                            \
      TORCH_CHECK(false, "CUDA error: ", cudaGetErrorString(cudasim_err_), " (cudasim: ", cudasim_detail_, \
                  ")");                                                                                   \
    }                                                                                                     \
  } while (0)

#define C10_CUDA_CHECK_WARN(EXPR) (void)(EXPR)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
