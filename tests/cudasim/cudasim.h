// cudasim: a CUDA runtime stand-in for host compilers, so that the CUDA sources of csrc/cuda/ execute on the CPU
// in the test suite (tests/cudasim/README.md). Force-included (g++ -include) into every translation unit that
// tests/cudasim/rewrite.py made from a .cu file; the rewriter turns what a host compiler cannot parse (launches,
// `extern __shared__`, the CUDA registration block, the CUDA device checks) into calls of this header.
//
// What it models: the language keywords, dim3 / threadIdx / blockIdx / blockDim / gridDim, __syncthreads() as a
// real barrier (each block's threads run as cooperative fibers), atomics and fences on real atomics, shared
// memory (sized exactly, refilled with NaN at every block start), the launch limits of the GPU, the error path
// that C10_CUDA_KERNEL_LAUNCH_CHECK reads, and a few attribute/device queries. What it cannot model: nvcc's code
// generation, FMA contraction, the GPU's memory model and warp-level behaviour, and speed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// __restrict__ is a GCC keyword already; __shared__ is rewritten (a leftover one does not compile, on purpose).

// ------------------------------------------------------------------------------------------------ types
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

namespace cudasim {

// The GPU it stands in for: an H100 (sm_90). The opt-in shared-memory limit can be changed from the tests
// (tscd_cudasim::set_shared_memory_optin) to act as another GPU.
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockDimXY = 1024;
constexpr unsigned int kMaxBlockDimZ = 64;
constexpr unsigned int kMaxGridDimX = 2147483647u;
constexpr unsigned int kMaxGridDimYZ = 65535;
constexpr size_t kDefaultSharedMemory = 48 * 1024;

// ------------------------------------------------------------------------------------------------ runtime API
// (tests/cudasim/runtime.cpp)

// The GPU thread running now (valid inside a kernel only). By value: the copy is made by the (uninstrumented)
// runtime, so ThreadSanitizer sees no access of the scheduler's bookkeeping from the kernel.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// __syncthreads() at `file`:`line`: suspends the calling GPU thread until every thread of its block waits at a
// barrier. Threads that wait at different barriers, or exit while others wait, are reported as divergence.
void syncthreads(const char* file, int line);
void threadfence();

// The block's dynamic shared memory (sized exactly as launched, filled with NaN at the block's start).
void* dynamic_shared_memory();
// Static shared memory `key` (one per declaration) of `bytes`, allocated at the block's first use, NaN-filled.
void* static_shared_memory(const char* key, size_t bytes, size_t align);

template <typename T>
inline T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

template <typename T>
inline T& static_shared(const char* key) {
  return *static_cast<T*>(static_shared_memory(key, sizeof(T), alignof(T)));
}

// One launch: checks the configuration against the GPU's limits (a bad one sets the last error and runs
// nothing), then runs every block, each block's threads as fibers, calling `body(ctx)` per thread.
using ThreadBody = void (*)(const void* ctx);
void run_launch(const char* name, const char* site, const void* func, dim3 grid, dim3 block, size_t smem,
                cudaStream_t stream, ThreadBody body, const void* ctx);

// cudaFuncSetAttribute(func, attr, value) for any kernel (function pointer).
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value);

// The detail of the last error of this host thread (what was wrong, which kernel, block and thread); cleared
// with the error by cudaGetLastError.
const char* error_detail();

// A named integer a build may read instead of a compile-time constant (e.g. -DTSCD_PERM_MAX_CHUNK_VALUES=
// ::cudasim::knob("perm_max_chunk_values", int64_t(1) << 25)); set from the tests with tscd_cudasim::set_knob.
int64_t knob(const char* name, int64_t default_value);

// kernel<<<grid, block, smem, stream>>>(args...), as the rewriter writes it. The arguments are converted to the
// kernel's parameter types once, at the launch (CUDA copies them to the device then), and every GPU thread calls
// the kernel with that copy.
template <typename... P, typename... A>
inline void launch(const char* name, const char* site, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cudasim: a kernel launch must pass one argument per parameter");
  using Params = std::tuple<std::decay_t<P>...>;
  struct Ctx {
    void (*kernel)(P...);
    Params params;
  };
  const Ctx ctx{kernel, Params(static_cast<std::decay_t<P>>(std::forward<A>(args))...)};
  const ThreadBody body = [](const void* c) {
    const Ctx& k = *static_cast<const Ctx*>(c);
    std::apply(k.kernel, k.params);
  };
  run_launch(name, site, reinterpret_cast<const void*>(kernel), grid, block, smem, stream, body, &ctx);
}

}  // namespace cudasim

#define threadIdx (::cudasim::thread_idx())
#define blockIdx (::cudasim::block_idx())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())
#define warpSize 32

#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
#define __threadfence() ::cudasim::threadfence()
#define __threadfence_block() ::cudasim::threadfence()

// ------------------------------------------------------------------------------------------------ runtime calls
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*func)(P...), cudaFuncAttribute attr, int value) {
  return ::cudasim::set_func_attribute(reinterpret_cast<const void*>(func), attr, value);
}

// ------------------------------------------------------------------------------------------------ atomics
// Real atomics (relaxed, as CUDA's atomicAdd/atomicCAS): under ThreadSanitizer they are atomic accesses, so two
// threads updating one address through them do not race, while a plain `+=` does.
namespace cudasim {
template <typename T, typename Bits>
inline T atomic_add_float(T* addr, T value) {
  static_assert(sizeof(T) == sizeof(Bits), "cudasim: atomic width");
  Bits* bits = reinterpret_cast<Bits*>(addr);
  Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  while (true) {
    T cur;
    std::memcpy(&cur, &old, sizeof(T));
    const T next = cur + value;
    Bits want;
    std::memcpy(&want, &next, sizeof(T));
    if (__atomic_compare_exchange_n(bits, &old, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return cur;
  }
}
}  // namespace cudasim

inline float atomicAdd(float* addr, float value) { return ::cudasim::atomic_add_float<float, uint32_t>(addr, value); }
inline double atomicAdd(double* addr, double value) {
  return ::cudasim::atomic_add_float<double, uint64_t>(addr, value);
}
inline int atomicAdd(int* addr, int value) { return __atomic_fetch_add(addr, value, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* addr, unsigned int value) {
  return __atomic_fetch_add(addr, value, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* addr, unsigned long long value) {
  return __atomic_fetch_add(addr, value, __ATOMIC_RELAXED);
}
inline int atomicCAS(int* addr, int compare, int value) {
  __atomic_compare_exchange_n(addr, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline unsigned int atomicCAS(unsigned int* addr, unsigned int compare, unsigned int value) {
  __atomic_compare_exchange_n(addr, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline unsigned long long atomicCAS(unsigned long long* addr, unsigned long long compare, unsigned long long value) {
  __atomic_compare_exchange_n(addr, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline int atomicExch(int* addr, int value) { return __atomic_exchange_n(addr, value, __ATOMIC_RELAXED); }
inline int atomicMax(int* addr, int value) {
  int old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(addr, &old, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMin(int* addr, int value) {
  int old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (old > value && !__atomic_compare_exchange_n(addr, &old, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------------------------------------ min / max
// The overloads CUDA's headers declare for host and device code (crt/math_functions.hpp), not templates, so that
// they coexist with std::min/std::max exactly as under nvcc.
#define CUDASIM_MINMAX(T)                              \
  inline T min(T a, T b) { return a < b ? a : b; }     \
  inline T max(T a, T b) { return a > b ? a : b; }
CUDASIM_MINMAX(int)
CUDASIM_MINMAX(unsigned int)
CUDASIM_MINMAX(long)
CUDASIM_MINMAX(unsigned long)
CUDASIM_MINMAX(long long)
CUDASIM_MINMAX(unsigned long long)
CUDASIM_MINMAX(float)
CUDASIM_MINMAX(double)
#undef CUDASIM_MINMAX
