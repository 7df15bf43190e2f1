// cudasim's own test kernels (tests/cudasim/test_runtime.py): plain CUDA, rewritten and run like csrc/cuda/*.cu, to
// show that the stand-in enforces what it promises (launch geometry and limits, barriers and divergence, shared
// memory poisoning and opt-in, atomics vs plain updates under ThreadSanitizer, the watchdog). Never built by nvcc.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace tscd {
namespace {

// ------------------------------------------------------------------------------------------------ geometry
// One row per thread at its global linear index: threadIdx, blockIdx, threads per block, blocks, and the order
// in which the threads ran (an atomic counter).
__global__ void geometry_kernel(int64_t* out, int* counter) {
  const int64_t tpb = (int64_t)blockDim.x * blockDim.y * blockDim.z;
  const int64_t block = blockIdx.x + (int64_t)gridDim.x * (blockIdx.y + (int64_t)gridDim.y * blockIdx.z);
  const int64_t t = threadIdx.x + (int64_t)blockDim.x * (threadIdx.y + (int64_t)blockDim.y * threadIdx.z);
  int64_t* row = out + (block * tpb + t) * 9;
  row[0] = threadIdx.x;
  row[1] = threadIdx.y;
  row[2] = threadIdx.z;
  row[3] = blockIdx.x;
  row[4] = blockIdx.y;
  row[5] = blockIdx.z;
  row[6] = tpb;
  row[7] = (int64_t)gridDim.x * gridDim.y * gridDim.z;
  row[8] = atomicAdd(counter, 1);
}

at::Tensor selftest_geometry(at::IntArrayRef grid, at::IntArrayRef block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "selftest_geometry: grid and block are 3 ints");
  const dim3 g((unsigned)grid[0], (unsigned)grid[1], (unsigned)grid[2]);
  const dim3 b((unsigned)block[0], (unsigned)block[1], (unsigned)block[2]);
  const int64_t n = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  at::Tensor out = at::full({n, 9}, -1, at::kLong);
  at::Tensor counter = at::zeros({1}, at::kInt);
  geometry_kernel<<<g, b, 0, c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int64_t>(), counter.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------------ barriers
// Each block sums its blockDim.x values of x through shared memory (a tree reduction) into out[blockIdx.x].
// mode 0: correct; 1: the barrier between the stores and the reduction is missing; 2: a barrier inside a
// branch that only half the threads take; 3: half the threads return before a barrier; 4: the reduction reads a
// shared element that no thread wrote.
__global__ void block_sum_kernel(const float* x, float* out, int64_t n, int mode) {
  extern __shared__ float part[];
  __shared__ float total;
  const int tid = threadIdx.x;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + tid;
  part[tid] = i < n ? x[i] : 0.f;
  if (tid == 0) total = 0.f;
  if (mode == 3 && tid % 2 == 1) return;
  if (mode == 2) {
    if (tid < (int)blockDim.x / 2) __syncthreads();
  } else if (mode != 1) {
    __syncthreads();
  }
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) part[tid] += part[tid + s + (mode == 4 && s == 1 ? (int)blockDim.x - 1 : 0)];
    __syncthreads();
  }
  if (tid == 0) {
    total = part[0];
    out[blockIdx.x] = total;
  }
}

at::Tensor selftest_block_sum(const at::Tensor& x, int64_t threads, int64_t mode) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "selftest_block_sum: x (n,) float");
  const int64_t n = x.numel(), blocks = (n + threads - 1) / threads;
  at::Tensor out = at::empty({blocks}, x.options());
  const size_t smem = sizeof(float) * (size_t)(threads + (mode == 4 ? threads : 0));
  block_sum_kernel<<<(unsigned)blocks, (unsigned)threads, smem>>>(x.data_ptr<float>(), out.data_ptr<float>(), n,
                                                                   (int)mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// A tile loop: every round, the block stores a tile of x in shared memory and each thread reads its neighbour's
// element. Two barriers per round; `barrier` false drops the one between the stores and the loads (the loop's
// other barrier remains, so a later round's stores still follow the earlier round's loads of the fast threads).
__global__ void tile_loop_kernel(const float* x, float* out, int rounds, bool barrier) {
  extern __shared__ float tile[];
  const int tid = threadIdx.x, n = blockDim.x;
  float acc = 0.f;
  for (int r = 0; r < rounds; ++r) {
    __syncthreads();
    tile[tid] = x[(int64_t)r * n + tid];
    if (barrier) __syncthreads();
    acc += tile[(tid + 1) % n];
  }
  out[tid] = acc;
}

at::Tensor selftest_tile_loop(const at::Tensor& x, int64_t threads, int64_t rounds, bool barrier) {
  TORCH_CHECK(x.numel() == threads * rounds && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "selftest_tile_loop: x (rounds * threads,) float");
  at::Tensor out = at::empty({threads}, x.options());
  tile_loop_kernel<<<1, (unsigned)threads, sizeof(float) * (size_t)threads>>>(x.data_ptr<float>(),
                                                                            out.data_ptr<float>(), (int)rounds, barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------------ atomics
// n threads add 1 to out[0]: with atomicAdd, or with a plain read-modify-write (a data race on a GPU).
template <typename scalar_t>
__global__ void add_kernel(scalar_t* out, int64_t n, bool atomic) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (atomic) {
    atomicAdd(out, scalar_t(1));
  } else {
    out[0] += scalar_t(1);
  }
}

at::Tensor selftest_add(const at::Tensor& out, int64_t n, bool atomic) {
  TORCH_CHECK(out.numel() >= 1 && out.is_contiguous(), "selftest_add: out must hold one element");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "selftest_add", [&] {
    add_kernel<scalar_t><<<(unsigned)((n + 127) / 128), 128>>>(out.data_ptr<scalar_t>(), n, atomic);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ shared memory
// One block of 32 threads with `bytes` of dynamic shared memory; each thread writes its index and reads its
// neighbour's after a barrier (out[t] = (t + 1) % 32). optin > 0 raises the kernel's limit to `optin` bytes first.
__global__ void smem_kernel(int* out) {
  extern __shared__ int words[];
  const int t = threadIdx.x;
  words[t] = t;
  __syncthreads();
  out[t] = words[(t + 1) % 32];
}

at::Tensor selftest_smem(int64_t bytes, int64_t optin) {
  if (optin > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)optin));
  }
  at::Tensor out = at::full({32}, -1, at::kInt);
  smem_kernel<<<1, 32, (size_t)bytes>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Reads `count` floats of dynamic shared memory that no thread wrote (the stand-in poisons it with NaN).
__global__ void smem_poison_kernel(float* out, int count) {
  extern __shared__ float never_written[];
  if (threadIdx.x == 0) {
    for (int i = 0; i < count; ++i) out[i] = never_written[i];
  }
}

at::Tensor selftest_smem_poison(int64_t count) {
  at::Tensor out = at::zeros({count}, at::kFloat);
  smem_poison_kernel<<<2, 8, sizeof(float) * (size_t)count>>>(out.data_ptr<float>(), (int)count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------------ watchdog
// Thread 0 of block 0 waits for a flag that nobody sets.
__global__ void hang_kernel(const int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const volatile int* f = flag;
    while (*f == 0) {
    }
  }
}

void selftest_hang() {
  at::Tensor flag = at::zeros({1}, at::kInt);
  hang_kernel<<<2, 4>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Thread 1 of block 1 writes through a null pointer: the stand-in names the kernel, block and thread, then the
// process ends as a GPU context would.
__global__ void fault_kernel(int* out) {
  int* p = (blockIdx.x == 1 && threadIdx.x == 1) ? nullptr : out;
  *(volatile int*)p = 1;
}

void selftest_fault() {
  at::Tensor out = at::zeros({1}, at::kInt);
  fault_kernel<<<2, 4>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CUDA, m) {
  m.impl("selftest_geometry", &selftest_geometry);
  m.impl("selftest_block_sum", &selftest_block_sum);
  m.impl("selftest_tile_loop", &selftest_tile_loop);
  m.impl("selftest_add", &selftest_add);
  m.impl("selftest_smem", &selftest_smem);
  m.impl("selftest_smem_poison", &selftest_smem_poison);
  m.impl("selftest_hang", &selftest_hang);
  m.impl("selftest_fault", &selftest_fault);
}

}  // namespace tscd
