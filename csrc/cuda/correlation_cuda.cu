// correlation (SCD loss) on CUDA: one kernel for the forward and both backward passes (see csrc/correlation.h).
// A block owns kOuter outer points of one image (one thread each) and streams the inner points in tiles of
// kTile through shared memory; each thread recomputes its kTile pairs (G and F dot products from shared memory)
// and never stores a tile. Forward: per-block partial sums of P(G) (F + c) (summed on the host side in double).
// Backward: each thread owns its outer point's gradient row, so no atomics are needed.
// Shared memory: (kOuter + kTile) * (Cs + Ct) floats (about 26 KB for VOC's 21 + 20 channels); above 48 KB the
// kernel opts in to the device's larger limit. Correctness first: plain FMA, no tensor cores (the Triton
// backend is the tl.dot path).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../correlation_host.h"
#include "common.cuh"

namespace tscd {
namespace {

using correlation::Sizes;
constexpr int kOuter = 64;  // outer points (threads) per block
constexpr int kTile = 32;   // inner points per shared-memory tile

struct PassArgs {
  int64_t n_out, n_in;
  int Cs, Ct;
  bool clamp, with_t, with_c;
};

inline int row_stride(int C) { return C | 1; }  // odd stride: threads reading their own rows avoid bank conflicts

template <typename scalar_t, bool kOffsetInner, bool kBackward>
__global__ void correlation_pass_kernel(const scalar_t* __restrict__ out_s, const scalar_t* __restrict__ out_t,
                                        const scalar_t* __restrict__ in_s, const scalar_t* __restrict__ in_t,
                                        const scalar_t* __restrict__ offset, const scalar_t* __restrict__ grad,
                                        PassArgs a, scalar_t* __restrict__ partial, scalar_t* __restrict__ ds,
                                        scalar_t* __restrict__ dt, scalar_t* __restrict__ dc) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);
  const int C = a.Cs + a.Ct, ld = C | 1;
  scalar_t* rows = sm;                   // (kOuter, ld): [student | teacher] features of the outer points
  scalar_t* tile = rows + kOuter * ld;   // (kTile, C): the same for a tile of inner points
  scalar_t* tile_off = tile + kTile * C; // (kTile,): offsets of the inner points (column pass)
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x;
  const int64_t o0 = (int64_t)blockIdx.x * kOuter, o = o0 + tid;
  const bool active = o < a.n_out;
  for (int idx = tid; idx < kOuter * C; idx += blockDim.x) {
    const int r = idx / C, c = idx % C;
    const int64_t oo = o0 + r;
    scalar_t v = 0;
    if (oo < a.n_out) v = c < a.Cs ? out_s[(b * a.n_out + oo) * a.Cs + c] : out_t[(b * a.n_out + oo) * a.Ct + c - a.Cs];
    rows[r * ld + c] = v;
  }
  const scalar_t off_o = (!kOffsetInner && active) ? offset[b * a.n_out + o] : scalar_t(0);
  const scalar_t g_b = kBackward ? grad[b] : scalar_t(1);
  const scalar_t* my = rows + tid * ld;
  scalar_t loss = 0, dcs = 0;
  for (int64_t j0 = 0; j0 < a.n_in; j0 += kTile) {
    const int nj = (int)min((int64_t)kTile, a.n_in - j0);
    __syncthreads();
    for (int idx = tid; idx < kTile * C; idx += blockDim.x) {
      const int j = idx / C, c = idx % C;
      const int64_t jj = j0 + j;
      scalar_t v = 0;
      if (j < nj) v = c < a.Cs ? in_s[(b * a.n_in + jj) * a.Cs + c] : in_t[(b * a.n_in + jj) * a.Ct + c - a.Cs];
      tile[j * C + c] = v;
    }
    if (kOffsetInner && tid < kTile) tile_off[tid] = tid < nj ? offset[b * a.n_in + j0 + tid] : scalar_t(0);
    __syncthreads();
    if (!active) continue;
    scalar_t dv[kTile], ev[kTile];
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      dv[j] = 0;
      ev[j] = 0;
      if (j < nj) {
        const scalar_t* tj = tile + j * C;
        scalar_t g = 0, f = 0;
        for (int c = 0; c < a.Cs; ++c) g += my[c] * tj[c];
        for (int c = a.Cs; c < C; ++c) f += my[c] * tj[c];
        const scalar_t fc = f + (kOffsetInner ? tile_off[j] : off_o);
        if (kBackward) {
          correlation::pair_grads<scalar_t>(g, fc, a.clamp, g_b, &dv[j], &ev[j]);
          dcs += ev[j];
        } else {
          loss += correlation::pair_value<scalar_t>(g, fc, a.clamp);
        }
      }
    }
    if (kBackward) {
      for (int c = 0; c < a.Cs; ++c) {
        scalar_t s = 0;
#pragma unroll
        for (int j = 0; j < kTile; ++j) s += dv[j] * tile[j * C + c];
        ds[(b * a.n_out + o) * a.Cs + c] += s;
      }
      if (a.with_t) {
        for (int c = 0; c < a.Ct; ++c) {
          scalar_t s = 0;
#pragma unroll
          for (int j = 0; j < kTile; ++j) s += ev[j] * tile[j * C + a.Cs + c];
          dt[(b * a.n_out + o) * a.Ct + c] += s;
        }
      }
    }
  }
  if (kBackward) {
    if (a.with_c && active) dc[b * a.n_out + o] = dcs;
    return;
  }
  // block reduction of the forward partial sums (reusing the row buffer)
  __syncthreads();
  rows[tid] = loss;
  __syncthreads();
  for (int s = kOuter / 2; s > 0; s >>= 1) {
    if (tid < s) rows[tid] += rows[tid + s];
    __syncthreads();
  }
  if (tid == 0) partial[b * gridDim.x + blockIdx.x] = rows[0];
}

template <typename scalar_t, bool kOffsetInner, bool kBackward>
void launch(const at::Tensor& out_s, const at::Tensor& out_t, const at::Tensor& in_s, const at::Tensor& in_t,
            const at::Tensor& offset, const at::Tensor& grad, const PassArgs& a, int64_t B, at::Tensor& partial,
            at::Tensor& ds, at::Tensor& dt, at::Tensor& dc) {
  const int C = a.Cs + a.Ct;
  const size_t smem = sizeof(scalar_t) * ((size_t)kOuter * row_stride(C) + (size_t)kTile * C + kTile);
  auto kernel = correlation_pass_kernel<scalar_t, kOffsetInner, kBackward>;
  if (smem > 48 * 1024) {
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem <= (size_t)optin, "correlation: Ct + Cs = ", C, " channels need ", smem,
                " bytes of shared memory per block, more than this GPU's ", optin, "; use backend='triton'");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const int64_t blocks = (a.n_out + kOuter - 1) / kOuter;
  TORCH_CHECK(B < 65536, "correlation: at most 65535 images per call; got ", B);
  const dim3 grid_dim(static_cast<unsigned int>(blocks), static_cast<unsigned int>(B));
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
  kernel<<<grid_dim, kOuter, smem, c10::cuda::getCurrentCUDAStream()>>>(
      out_s.data_ptr<scalar_t>(), out_t.data_ptr<scalar_t>(), in_s.data_ptr<scalar_t>(), in_t.data_ptr<scalar_t>(),
      offset.data_ptr<scalar_t>(), ptr(grad), a, ptr(partial), ptr(ds), ptr(dt), ptr(dc));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor correlation_fwd_cuda(const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1,
                                const at::Tensor& s2, const at::Tensor& offset, bool clamp_student) {
  TSCD_CHECK_CUDA("correlation", t1);
  const c10::cuda::CUDAGuard guard(t1.device());
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, at::Tensor());
  const int64_t blocks = (z.N1 + kOuter - 1) / kOuter;
  at::Tensor partial = at::empty({z.B, blocks}, t1.options());
  at::Tensor none;
  const PassArgs a{z.N1, z.N2, (int)z.Cs, (int)z.Ct, clamp_student, false, false};
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_fwd_cuda", [&] {
    launch<scalar_t, false, false>(s1, t1, s2, t2, offset, none, a, z.B, partial, none, none, none);
  });
  return partial.sum(1, /*keepdim=*/false, at::kDouble).to(t1.scalar_type());
}

std::vector<at::Tensor> correlation_bwd_cuda(const at::Tensor& grad, const at::Tensor& t1, const at::Tensor& t2,
                                             const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& offset,
                                             bool clamp_student, bool teacher_grad) {
  TSCD_CHECK_CUDA("correlation", t1);
  const c10::cuda::CUDAGuard guard(t1.device());
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, grad);
  at::Tensor ds1 = at::zeros_like(s1), ds2 = at::zeros_like(s2);
  at::Tensor dt1 = at::zeros_like(t1), dt2 = at::zeros_like(t2), dc = at::zeros_like(offset);
  at::Tensor none;
  const PassArgs row{z.N1, z.N2, (int)z.Cs, (int)z.Ct, clamp_student, teacher_grad, teacher_grad};
  const PassArgs col{z.N2, z.N1, (int)z.Cs, (int)z.Ct, clamp_student, teacher_grad, false};
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_bwd_cuda", [&] {
    launch<scalar_t, false, true>(s1, t1, s2, t2, offset, grad, row, z.B, none, ds1, dt1, dc);
    launch<scalar_t, true, true>(s2, t2, s1, t1, offset, grad, col, z.B, none, ds2, dt2, none);
  });
  return {ds1, ds2, dt1, dt2, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CUDA, m) {
  m.impl("correlation_fwd", &correlation_fwd_cuda);
  m.impl("correlation_bwd", &correlation_bwd_cuda);
}

}  // namespace tscd
