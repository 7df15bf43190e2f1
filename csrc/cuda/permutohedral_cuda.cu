// permutohedral on CUDA, with no host synchronisation: every buffer is allocated at a bound known on the host.
//  1. embed:  one thread per point: the d+1 simplex vertices (keys) and barycentric weights (permutohedral.h);
//             each (point, vertex) pair p = i*(d+1) + r writes its key, then inserts p into an open-addressing
//             hash table (capacity a power of two >= 2 N (d+1)) with atomicCAS. The first pair that claims a key
//             "owns" it: the lattice vertex is named by its owner's pair index, in [0, N (d+1)), so the vertex
//             arrays are N (d+1) long and no vertex count is read back.
//  2. nbrs:   one thread per owner: the 2 (d+1) blur neighbours (lookups only).
//  3. splat:  one thread per (image, channel, point), atomicAdd into the vertex values (zeroed).
//  4. blur:   one thread per (image, channel, owner) per direction, ping-pong buffers.
//  5. slice:  one thread per (image, channel, point) + the finishing (self term, normalisation).
// The normalisation (K 1) is the same pipeline on a channel of ones.
// Memory: the lattice itself (keys, table, vertex ids, weights, neighbours) is O(B N (d+1)) ints; the vertex
// values (two ping-pong buffers of N (d+1) per (image, channel) pair) would be O(B K N (d+1)), 1 GB each at B=2,
// K=81, 512x512, d=5. Steps 3-5 therefore run over chunks of (image, channel) pairs, so that each value buffer
// holds at most TSCD_PERM_MAX_CHUNK_VALUES elements (128 MiB in float32) whatever B and K (one pair per chunk when a single
// pair is larger). Sizing them by the real vertex count instead would need that count on the host: a sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../permutohedral_host.h"
#include "common.cuh"

namespace tscd {
namespace {

using perm::kMaxDim;

struct Scales {
  double s[kMaxDim];
};

template <typename scalar_t>
__global__ void permutohedral_embed_kernel(const scalar_t* __restrict__ feat, int d, int64_t N, Scales sc,
                                           int* __restrict__ keys, int* __restrict__ table, int64_t cap,
                                           int* __restrict__ vtx, scalar_t* __restrict__ wts, int64_t B) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * N) return;
  const int64_t b = idx / N, i = idx % N;
  const int d1 = d + 1;
  const int64_t NP = N * d1;
  scalar_t scale[kMaxDim];
  for (int j = 0; j < d; ++j) scale[j] = static_cast<scalar_t>(sc.s[j]);
  int key[(kMaxDim + 1) * kMaxDim];
  scalar_t bary[kMaxDim + 1];
  perm::embed_point<scalar_t, scalar_t>(feat + b * d * N + i, N, d, scale, key, bary);
  int* kb = keys + b * NP * d;
  for (int r = 0; r <= d; ++r) {
    for (int k = 0; k < d; ++k) kb[(i * d1 + r) * d + k] = key[r * d + k];
    wts[b * NP + i * d1 + r] = bary[r];
  }
  __threadfence();  // our keys are visible before any other thread can find them through the table
  int* tb = table + b * cap;
  for (int r = 0; r <= d; ++r) {
    const int p = static_cast<int>(i * d1 + r);
    const int* kr = key + r * d;
    uint64_t h = perm::hash_key(kr, d) & (cap - 1);
    while (true) {
      const int old = atomicCAS(tb + h, -1, p);
      if (old == -1) {
        vtx[b * NP + p] = p;
        break;
      }
      // Acquire: the owner wrote its keys, then fenced, then claimed the slot. Our CAS read its claim; this fence
      // orders the key reads after it (fence-fence synchronisation), and the volatile reads bypass the
      // non-coherent L1, so we see the owner's keys, not stale or uninitialised memory.
      __threadfence();
      const volatile int* ko = kb + (int64_t)old * d;
      bool same = true;
      for (int k = 0; k < d; ++k) same = same && (ko[k] == kr[k]);
      if (same) {
        vtx[b * NP + p] = old;
        break;
      }
      h = (h + 1) & (cap - 1);
    }
  }
}

__device__ inline int lookup(const int* key, int d, const int* tb, int64_t cap, const int* kb) {
  uint64_t h = perm::hash_key(key, d) & (cap - 1);
  while (true) {
    const int e = tb[h];
    if (e < 0) return -1;
    if (perm::same_key(kb + (int64_t)e * d, key, d)) return e;
    h = (h + 1) & (cap - 1);
  }
}

__global__ void permutohedral_neighbours_kernel(int d, int64_t NP, const int* __restrict__ keys,
                                                const int* __restrict__ table, int64_t cap,
                                                const int* __restrict__ vtx, int* __restrict__ nbr, int64_t B) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * NP) return;
  const int64_t b = idx / NP, p = idx % NP;
  if (vtx[idx] != p) return;  // not an owner: not a vertex
  const int* kb = keys + b * NP * d;
  const int* tb = table + b * cap;
  int nk[kMaxDim];
  for (int j = 0; j <= d; ++j) {
    perm::neighbour_key(kb + p * d, d, j, 1, nk);
    nbr[(idx * (d + 1) + j) * 2] = lookup(nk, d, tb, cap, kb);
    perm::neighbour_key(kb + p * d, d, j, -1, nk);
    nbr[(idx * (d + 1) + j) * 2 + 1] = lookup(nk, d, tb, cap, kb);
  }
}

// grid.x over points, grid.y over (image, channel). den: normalise (may be null); pre: divide the input by den
// (the backward's g / den) instead of the output.
// Steps 3-5 see one chunk of (image, channel) pairs: pair bk = bk0 + blockIdx.y; the value buffers `lat`, `src`,
// `dst` hold the chunk only (row blockIdx.y), the other arrays are indexed by the global pair.
template <typename scalar_t>
__global__ void permutohedral_splat_kernel(const scalar_t* __restrict__ val, const scalar_t* __restrict__ den,
                                           bool pre, const int* __restrict__ vtx, const scalar_t* __restrict__ wts,
                                           scalar_t* __restrict__ lat, int d, int64_t N, int64_t K, int64_t bk0) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t bk = bk0 + blockIdx.y, b = bk / K;
  const int d1 = d + 1;
  const int64_t NP = N * d1;
  scalar_t v = val[bk * N + i];
  if (pre && den != nullptr) v = perm::normalise<scalar_t>(v, den[b * N + i]);
  for (int r = 0; r < d1; ++r) {
    const int64_t p = b * NP + i * d1 + r;
    atomicAdd(lat + (int64_t)blockIdx.y * NP + vtx[p], wts[p] * v);
  }
}

template <typename scalar_t>
__global__ void permutohedral_blur_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                          const int* __restrict__ vtx, const int* __restrict__ nbr, int d, int j,
                                          int64_t NP, int64_t K, int64_t bk0) {
  const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= NP) return;
  const int64_t row = blockIdx.y, b = (bk0 + row) / K;
  if (vtx[b * NP + p] != p) return;
  const int* nb = nbr + ((b * NP + p) * (d + 1) + j) * 2;
  dst[row * NP + p] = perm::blur_at(src + row * NP, p, (int64_t)nb[0], (int64_t)nb[1]);
}

template <typename scalar_t>
__global__ void permutohedral_slice_kernel(const scalar_t* __restrict__ lat, const scalar_t* __restrict__ val,
                                           const scalar_t* __restrict__ den, bool transpose,
                                           const int* __restrict__ vtx, const scalar_t* __restrict__ wts,
                                           scalar_t* __restrict__ out, int d, int64_t N, int64_t K,
                                           scalar_t inv_gain, bool normalize, bool include_self, int64_t bk0) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t bk = bk0 + blockIdx.y, b = bk / K;
  const int d1 = d + 1;
  const int64_t NP = N * d1;
  scalar_t acc = 0;
  for (int r = 0; r < d1; ++r) {
    const int64_t p = b * NP + i * d1 + r;
    acc += wts[p] * lat[(int64_t)blockIdx.y * NP + vtx[p]];
  }
  acc *= inv_gain;
  if (val == nullptr) {  // the normalisation pass: den = K 1 (- 1 without the self term)
    out[bk * N + i] = include_self ? acc : acc - scalar_t(1);
    return;
  }
  scalar_t v = val[bk * N + i];
  if (!transpose) {
    out[bk * N + i] = perm::finish<scalar_t>(acc, v, normalize ? den[b * N + i] : scalar_t(1), normalize,
                                             include_self);
  } else {
    if (normalize) v = perm::normalise<scalar_t>(v, den[b * N + i]);
    out[bk * N + i] = include_self ? acc : acc - v;
  }
}

// Hash-table slots per (point, vertex) pair, at least (a power of two of at least this many): 2, so the table is at
// most half full. A build may set it (-DTSCD_PERM_TABLE_FACTOR=1: a fuller table, longer probe runs, e.g. to test
// the probe's wrap-around at the table's end).
#ifndef TSCD_PERM_TABLE_FACTOR
#define TSCD_PERM_TABLE_FACTOR 2
#endif

struct GpuLattice {
  at::Tensor keys, table, vtx, wts, nbr;
  int64_t cap;
};

GpuLattice build(const at::Tensor& features, int d, cudaStream_t stream) {
  const int64_t B = features.size(0), N = features.size(2), NP = N * (d + 1);
  GpuLattice L;
  const int64_t min_cap = std::max<int64_t>(TSCD_PERM_TABLE_FACTOR * NP, NP + 1);  // an empty slot ends a probe
  L.cap = 1;
  while (L.cap < min_cap) L.cap <<= 1;
  const auto iopt = features.options().dtype(at::kInt);
  L.keys = at::empty({B, NP, d}, iopt);
  L.table = at::full({B, L.cap}, -1, iopt);
  L.vtx = at::empty({B, NP}, iopt);
  L.wts = at::empty({B, NP}, features.options());
  L.nbr = at::empty({B, NP, d + 1, 2}, iopt);
  Scales sc;
  for (int j = 0; j < kMaxDim; ++j) sc.s[j] = j < d ? perm::feature_scale(j, d) : 0.0;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "permutohedral_embed_cuda", [&] {
    permutohedral_embed_kernel<scalar_t><<<cuda::blocks_for(B * N), cuda::kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), d, N, sc, L.keys.data_ptr<int>(), L.table.data_ptr<int>(), L.cap,
        L.vtx.data_ptr<int>(), L.wts.data_ptr<scalar_t>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  permutohedral_neighbours_kernel<<<cuda::blocks_for(B * NP), cuda::kThreads, 0, stream>>>(
      d, NP, L.keys.data_ptr<int>(), L.table.data_ptr<int>(), L.cap, L.vtx.data_ptr<int>(), L.nbr.data_ptr<int>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return L;
}

// Upper bound on the elements of one vertex-value buffer (two are live): 2^25, 128 MiB in float32. A build may set
// it (-DTSCD_PERM_MAX_CHUNK_VALUES=...): the CUDA-on-CPU tests make small inputs span several chunks with it.
#ifndef TSCD_PERM_MAX_CHUNK_VALUES
#define TSCD_PERM_MAX_CHUNK_VALUES (int64_t(1) << 25)
#endif

// (image, channel) pairs per chunk of steps 3-5: as many as fit TSCD_PERM_MAX_CHUNK_VALUES, at least 1, at most the
// grid's y limit.
inline int64_t pairs_per_chunk(int64_t pairs, int64_t NP) {
  const int64_t max_values = TSCD_PERM_MAX_CHUNK_VALUES;
  int64_t chunk = std::max<int64_t>(1, max_values / std::max<int64_t>(1, NP));
  return std::min<int64_t>({chunk, pairs, 65535});
}

// out (B, K, N): val null -> the normalisation pass on ones (K = 1).
template <typename scalar_t>
void run_pipeline(const GpuLattice& L, const at::Tensor& val, const at::Tensor& den, at::Tensor& out, int d,
                  int64_t B, int64_t K, int64_t N, bool transpose, bool normalize, bool include_self,
                  cudaStream_t stream) {
  const int64_t NP = N * (d + 1);
  const int64_t pairs = B * K;
  const int64_t chunk = pairs_per_chunk(pairs, NP);
  at::Tensor a = at::empty({chunk, NP}, out.options());
  at::Tensor c = at::empty({chunk, NP}, out.options());
  const scalar_t* den_p = den.defined() ? den.data_ptr<scalar_t>() : nullptr;
  at::Tensor ones;
  const scalar_t* val_p;
  if (val.defined()) {
    val_p = val.data_ptr<scalar_t>();
  } else {
    ones = at::ones({B, K, N}, out.options());
    val_p = ones.data_ptr<scalar_t>();
  }
  const scalar_t inv_gain = static_cast<scalar_t>(1.0 / perm::lattice_gain(d));
  for (int64_t bk0 = 0; bk0 < pairs; bk0 += chunk) {
    const int64_t rows = std::min(chunk, pairs - bk0);
    a.zero_();  // stream-ordered: the previous chunk's kernels are done with it
    const dim3 grid_pts(cuda::blocks_for(N), static_cast<unsigned int>(rows));
    const dim3 grid_vtx(cuda::blocks_for(NP), static_cast<unsigned int>(rows));
    permutohedral_splat_kernel<scalar_t><<<grid_pts, cuda::kThreads, 0, stream>>>(
        val_p, den_p, transpose && normalize, L.vtx.data_ptr<int>(), L.wts.data_ptr<scalar_t>(),
        a.data_ptr<scalar_t>(), d, N, K, bk0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* src = a.data_ptr<scalar_t>();
    scalar_t* dst = c.data_ptr<scalar_t>();
    for (int s = 0; s <= d; ++s) {
      const int j = transpose ? d - s : s;
      permutohedral_blur_kernel<scalar_t><<<grid_vtx, cuda::kThreads, 0, stream>>>(
          src, dst, L.vtx.data_ptr<int>(), L.nbr.data_ptr<int>(), d, j, NP, K, bk0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(src, dst);
    }
    permutohedral_slice_kernel<scalar_t><<<grid_pts, cuda::kThreads, 0, stream>>>(
        src, val.defined() ? val_p : nullptr, den_p, transpose, L.vtx.data_ptr<int>(), L.wts.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), d, N, K, inv_gain, normalize, include_self, bk0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor permutohedral_cuda(const char* op, const at::Tensor& values, const at::Tensor& features, bool normalize,
                              bool include_self, bool transpose) {
  TSCD_CHECK_CUDA("permutohedral_filter", values);
  const c10::cuda::CUDAGuard guard(values.device());
  const int d = perm::check_inputs(op, values, features);
  const int64_t B = values.size(0), K = values.size(1), N = values.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const GpuLattice L = build(features, d, stream);
  at::Tensor out = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "permutohedral_cuda", [&] {
    at::Tensor den;
    if (normalize) {
      den = at::empty({B, 1, N}, values.options());
      run_pipeline<scalar_t>(L, at::Tensor(), at::Tensor(), den, d, B, 1, N, false, false, include_self, stream);
    }
    run_pipeline<scalar_t>(L, values, den, out, d, B, K, N, transpose, normalize, include_self, stream);
  });
  return out;
}

// Mean-field dense CRF (docs/method.md 6): the lattice of each kernel is built once for all iterations.
at::Tensor dense_crf_cuda(const at::Tensor& unary, at::TensorList features, at::ArrayRef<double> weights,
                          int64_t num_iter) {
  const char* op = "dense_crf";
  TSCD_CHECK_CUDA(op, unary);
  const c10::cuda::CUDAGuard guard(unary.device());
  perm::check_crf_inputs(op, unary, features, weights, num_iter);
  const int64_t B = unary.size(0), N = unary.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<GpuLattice> lattices;
  std::vector<int> dims;
  for (const at::Tensor& f : features) {
    dims.push_back(static_cast<int>(f.size(1)));
    lattices.push_back(build(f, dims.back(), stream));
  }
  at::Tensor q;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dense_crf_cuda", [&] {
    auto filter = [&](size_t k, const at::Tensor& v) {
      at::Tensor o = at::empty_like(v);
      run_pipeline<scalar_t>(lattices[k], v, at::Tensor(), o, dims[k], B, v.size(1), N, false, false, true, stream);
      return o;
    };
    q = perm::mean_field(unary, weights, num_iter, filter);
  });
  return q;
}

at::Tensor permutohedral_fwd_cuda(const at::Tensor& values, const at::Tensor& features, bool normalize,
                                  bool include_self) {
  return permutohedral_cuda("permutohedral_filter", values, features, normalize, include_self, false);
}

at::Tensor permutohedral_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& features, bool normalize,
                                  bool include_self) {
  return permutohedral_cuda("permutohedral_filter (backward)", grad_out, features, normalize, include_self, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CUDA, m) {
  m.impl("permutohedral_fwd", &permutohedral_fwd_cuda);
  m.impl("permutohedral_bwd", &permutohedral_bwd_cuda);
  m.impl("dense_crf_fwd", &dense_crf_cuda);
}

}  // namespace tscd
