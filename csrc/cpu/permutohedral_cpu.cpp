// permutohedral on the CPU. Per image, the lattice is built once (positions, barycentric weights, a hash table
// of the vertices with compact indices, the blur neighbours of every vertex) and reused for all K channels;
// then at::parallel_for (OpenMP) runs over (image, channel): splat, d+1 blur passes, slice. Math: permutohedral.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../permutohedral_host.h"

namespace tscd {
namespace {

using perm::kMaxDim;

template <typename scalar_t>
struct Lattice {
  int d = 0;
  int64_t N = 0;
  int64_t M = 0;               // number of lattice vertices
  std::vector<int32_t> vtx;    // (N, d+1): vertex index of each point's simplex vertex
  std::vector<scalar_t> w;     // (N, d+1): its barycentric weight
  std::vector<int32_t> nbr;    // (M, d+1, 2): blur neighbours (-1: not in the lattice)
};

class HashTable {
 public:
  HashTable(int d, int64_t capacity_hint) : d_(d) {
    cap_ = 1;
    while (cap_ < static_cast<uint64_t>(2 * capacity_hint)) cap_ <<= 1;
    slots_.assign(cap_, -1);
    keys_.reserve(static_cast<size_t>(capacity_hint) * d / 2 + d);
  }
  // Index of `key`, inserted if new (insert) or -1 if absent (!insert).
  int32_t find(const int* key, bool insert) {
    uint64_t h = perm::hash_key(key, d_) & (cap_ - 1);
    while (true) {
      const int32_t e = slots_[h];
      if (e < 0) {
        if (!insert) return -1;
        const int32_t idx = static_cast<int32_t>(keys_.size() / d_);
        slots_[h] = idx;
        keys_.insert(keys_.end(), key, key + d_);
        return idx;
      }
      if (perm::same_key(keys_.data() + static_cast<int64_t>(e) * d_, key, d_)) return e;
      h = (h + 1) & (cap_ - 1);
    }
  }
  int64_t size() const { return static_cast<int64_t>(keys_.size() / d_); }
  const int* key(int64_t m) const { return keys_.data() + m * d_; }

 private:
  int d_;
  uint64_t cap_;
  std::vector<int32_t> slots_;
  std::vector<int> keys_;
};

template <typename scalar_t>
void build_lattice(const scalar_t* feat, int d, int64_t N, Lattice<scalar_t>& L) {
  const int d1 = d + 1;
  L.d = d;
  L.N = N;
  L.vtx.resize(N * d1);
  L.w.resize(N * d1);
  scalar_t scale[kMaxDim];
  for (int j = 0; j < d; ++j) scale[j] = static_cast<scalar_t>(perm::feature_scale(j, d));
  HashTable table(d, N * d1);
  int key[(kMaxDim + 1) * kMaxDim];
  scalar_t bary[kMaxDim + 1];
  for (int64_t i = 0; i < N; ++i) {
    perm::embed_point<scalar_t, scalar_t>(feat + i, N, d, scale, key, bary);
    for (int r = 0; r <= d; ++r) {
      L.vtx[i * d1 + r] = table.find(key + r * d, true);
      L.w[i * d1 + r] = bary[r];
    }
  }
  L.M = table.size();
  L.nbr.resize(L.M * d1 * 2);
  int nk[kMaxDim];
  for (int64_t m = 0; m < L.M; ++m) {
    for (int j = 0; j <= d; ++j) {
      perm::neighbour_key(table.key(m), d, j, 1, nk);
      L.nbr[(m * d1 + j) * 2] = table.find(nk, false);
      perm::neighbour_key(table.key(m), d, j, -1, nk);
      L.nbr[(m * d1 + j) * 2 + 1] = table.find(nk, false);
    }
  }
}

// lat[i] = (slice o blur o splat)(v)[i] / c_d; the transpose runs the blur directions in reverse order.
template <typename scalar_t>
void filter_channel(const Lattice<scalar_t>& L, const scalar_t* v, scalar_t* lat, std::vector<scalar_t>& buf0,
                    std::vector<scalar_t>& buf1, bool transpose, scalar_t inv_gain) {
  const int d = L.d, d1 = d + 1;
  const int64_t N = L.N, M = L.M;
  buf0.assign(M, scalar_t(0));
  buf1.resize(M);
  const int32_t* vtx = L.vtx.data();
  const scalar_t* w = L.w.data();
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t vi = v[i];
    for (int r = 0; r < d1; ++r) buf0[vtx[i * d1 + r]] += w[i * d1 + r] * vi;
  }
  scalar_t* src = buf0.data();
  scalar_t* dst = buf1.data();
  const int32_t* nbr = L.nbr.data();
  for (int s = 0; s <= d; ++s) {
    const int j = transpose ? d - s : s;
    for (int64_t m = 0; m < M; ++m) {
      const int32_t* nb = nbr + (m * d1 + j) * 2;
      dst[m] = perm::blur_at(src, m, nb[0], nb[1]);
    }
    std::swap(src, dst);
  }
  for (int64_t i = 0; i < N; ++i) {
    scalar_t acc = 0;
    for (int r = 0; r < d1; ++r) acc += w[i * d1 + r] * src[vtx[i * d1 + r]];
    lat[i] = acc * inv_gain;
  }
}

// Forward (transpose = false): out = finish(lattice(values)). Backward (transpose = true): the gradient of
// the forward w.r.t. values, given grad_out in `values`.
at::Tensor permutohedral_cpu(const char* op, const at::Tensor& values, const at::Tensor& features, bool normalize,
                             bool include_self, bool transpose) {
  TSCD_CHECK_CPU("permutohedral_filter", values);
  const int d = perm::check_inputs(op, values, features);
  const int64_t B = values.size(0), K = values.size(1), N = values.size(2);
  at::Tensor out = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "permutohedral_cpu", [&] {
    const scalar_t inv_gain = static_cast<scalar_t>(1.0 / perm::lattice_gain(d));
    const scalar_t* feat = features.data_ptr<scalar_t>();
    const scalar_t* val = values.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<Lattice<scalar_t>> lattices(B);
    std::vector<scalar_t> den(normalize ? B * N : 0);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> buf0, buf1, ones;
      for (int64_t b = b0; b < b1; ++b) {
        build_lattice<scalar_t>(feat + b * d * N, d, N, lattices[b]);
        if (normalize) {  // den = K 1 (minus the self term when it is excluded), forward order
          ones.assign(N, scalar_t(1));
          scalar_t* db = den.data() + b * N;
          filter_channel<scalar_t>(lattices[b], ones.data(), db, buf0, buf1, false, inv_gain);
          if (!include_self) {
            for (int64_t i = 0; i < N; ++i) db[i] -= scalar_t(1);
          }
        }
      }
    });
    at::parallel_for(0, B * K, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> buf0, buf1, tmp(N);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / K;
        const scalar_t* v = val + t * N;
        scalar_t* ot = o + t * N;
        const scalar_t* db = normalize ? den.data() + b * N : nullptr;
        if (!transpose) {
          filter_channel<scalar_t>(lattices[b], v, ot, buf0, buf1, false, inv_gain);
          for (int64_t i = 0; i < N; ++i) {
            ot[i] = perm::finish<scalar_t>(ot[i], v[i], normalize ? db[i] : scalar_t(1), normalize, include_self);
          }
        } else {
          // out = (L v - s v) / den  =>  dv = L^T (g / den) - s g / den
          for (int64_t i = 0; i < N; ++i) {
            tmp[i] = normalize ? (db[i] > scalar_t(perm::kNormEps) ? v[i] / db[i] : scalar_t(0)) : v[i];
          }
          filter_channel<scalar_t>(lattices[b], tmp.data(), ot, buf0, buf1, true, inv_gain);
          if (!include_self) {
            for (int64_t i = 0; i < N; ++i) ot[i] -= tmp[i];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor permutohedral_fwd_cpu(const at::Tensor& values, const at::Tensor& features, bool normalize,
                                 bool include_self) {
  return permutohedral_cpu("permutohedral_filter", values, features, normalize, include_self, false);
}

at::Tensor permutohedral_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& features, bool normalize,
                                 bool include_self) {
  return permutohedral_cpu("permutohedral_filter (backward)", grad_out, features, normalize, include_self, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CPU, m) {
  m.impl("permutohedral_fwd", &permutohedral_fwd_cpu);
  m.impl("permutohedral_bwd", &permutohedral_bwd_cpu);
}

}  // namespace tscd
