// permutohedral on the CPU. Per image, the lattice is built once (positions, barycentric weights, a hash table
// of the vertices with compact indices, the blur neighbours of every vertex) and reused for all K channels;
// then at::parallel_for (OpenMP) runs over (image, channel): splat, d+1 blur passes, slice. Math: permutohedral.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../permutohedral_host.h"

namespace tscd {
namespace {

using perm::kMaxDim;

constexpr int kChunk = 4;  // channels filtered together (vertex-major, so a neighbour index is read once per chunk)

template <typename scalar_t>
struct Lattice {
  int d = 0;
  int64_t N = 0;
  int64_t M = 0;               // number of lattice vertices; row M of the value buffers is a zero row
  std::vector<int32_t> vtx;    // (N, d+1): vertex index of each point's simplex vertex
  std::vector<scalar_t> w;     // (N, d+1): its barycentric weight
  std::vector<int32_t> nbr;    // (M, d+1, 2): blur neighbours (M: not in the lattice, reads the zero row)
};

// Open addressing with linear probing; a slot holds (hash, index) so that most mismatches skip the key compare.
class HashTable {
 public:
  HashTable(int d, int64_t expected) : d_(d) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * expected)) cap <<= 1;
    resize(cap);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }
  // Index of `key`, inserted if new (insert) or -1 if absent (!insert). Not thread-safe when inserting.
  int32_t find(const int* key, bool insert) {
    const uint64_t hv = perm::hash_key(key, d_);
    uint64_t h = hv & (cap_ - 1);
    while (true) {
      const int32_t e = idx_[h];
      if (e < 0) {
        if (!insert) return -1;
        const int32_t n = static_cast<int32_t>(keys_.size() / d_);
        idx_[h] = n;
        hash_[h] = hv;
        keys_.insert(keys_.end(), key, key + d_);
        if (static_cast<uint64_t>(n + 1) * 2 > cap_) grow();
        return n;
      }
      if (hash_[h] == hv && perm::same_key(keys_.data() + static_cast<int64_t>(e) * d_, key, d_)) return e;
      h = (h + 1) & (cap_ - 1);
    }
  }
  int64_t size() const { return static_cast<int64_t>(keys_.size() / d_); }
  const int* key(int64_t m) const { return keys_.data() + m * d_; }

 private:
  void resize(uint64_t cap) {
    cap_ = cap;
    idx_.assign(cap, -1);
    hash_.assign(cap, 0);
  }
  void grow() {
    std::vector<int32_t> old_idx = std::move(idx_);
    std::vector<uint64_t> old_hash = std::move(hash_);
    resize(cap_ * 2);
    for (size_t s = 0; s < old_idx.size(); ++s) {
      if (old_idx[s] < 0) continue;
      uint64_t h = old_hash[s] & (cap_ - 1);
      while (idx_[h] >= 0) h = (h + 1) & (cap_ - 1);
      idx_[h] = old_idx[s];
      hash_[h] = old_hash[s];
    }
  }
  int d_;
  uint64_t cap_ = 0;
  std::vector<int32_t> idx_;
  std::vector<uint64_t> hash_;
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
  // keys and weights of every point (parallel when the caller is not already in a parallel region)
  std::vector<int> keys(N * d1 * d);
  at::parallel_for(0, N, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      perm::embed_point<scalar_t, scalar_t>(feat + i, N, d, scale, keys.data() + i * d1 * d, L.w.data() + i * d1);
    }
  });
  HashTable table(d, N);
  for (int64_t p = 0; p < N * d1; ++p) L.vtx[p] = table.find(keys.data() + p * d, true);
  const int64_t M = L.M = table.size();
  L.nbr.resize(M * d1 * 2);
  at::parallel_for(0, M, 4096, [&](int64_t m0, int64_t m1) {
    int nk[kMaxDim];
    for (int64_t m = m0; m < m1; ++m) {
      for (int j = 0; j <= d; ++j) {
        for (int side = 0; side < 2; ++side) {
          perm::neighbour_key(table.key(m), d, j, side == 0 ? 1 : -1, nk);
          const int32_t e = table.find(nk, false);
          L.nbr[(m * d1 + j) * 2 + side] = e < 0 ? static_cast<int32_t>(M) : e;
        }
      }
    }
  });
}

// lat[c][i] = (slice o blur o splat)(v[c])[i] / c_d for the kc <= kChunk channels v[c] = v + c * N; the transpose
// runs the blur directions in reverse order. buf0, buf1: scratch, (M + 1) x kChunk each.
template <typename scalar_t>
void filter_chunk(const Lattice<scalar_t>& L, const scalar_t* v, scalar_t* lat, int kc, std::vector<scalar_t>& buf0,
                  std::vector<scalar_t>& buf1, bool transpose, scalar_t inv_gain) {
  constexpr int C = kChunk;
  const int d = L.d, d1 = d + 1;
  const int64_t N = L.N, M = L.M;
  buf0.assign((M + 1) * C, scalar_t(0));
  buf1.assign((M + 1) * C, scalar_t(0));
  const int32_t* vtx = L.vtx.data();
  const scalar_t* w = L.w.data();
  for (int64_t i = 0; i < N; ++i) {
    scalar_t vi[C];
    for (int c = 0; c < C; ++c) vi[c] = c < kc ? v[c * N + i] : scalar_t(0);
    for (int r = 0; r < d1; ++r) {
      scalar_t* dst = buf0.data() + static_cast<int64_t>(vtx[i * d1 + r]) * C;
      const scalar_t wr = w[i * d1 + r];
      for (int c = 0; c < C; ++c) dst[c] += wr * vi[c];
    }
  }
  scalar_t* src = buf0.data();
  scalar_t* dst = buf1.data();
  const int32_t* nbr = L.nbr.data();
  for (int s = 0; s <= d; ++s) {
    const int j = transpose ? d - s : s;
    for (int64_t m = 0; m < M; ++m) {
      const int32_t* nb = nbr + (m * d1 + j) * 2;
      const scalar_t* a = src + static_cast<int64_t>(nb[0]) * C;
      const scalar_t* b = src + static_cast<int64_t>(nb[1]) * C;
      const scalar_t* x = src + m * C;
      scalar_t* y = dst + m * C;
      for (int c = 0; c < C; ++c) y[c] = scalar_t(0.5) * x[c] + scalar_t(0.25) * (a[c] + b[c]);
    }
    std::swap(src, dst);  // row M stays 0 in both buffers
  }
  for (int64_t i = 0; i < N; ++i) {
    scalar_t acc[C] = {};
    for (int r = 0; r < d1; ++r) {
      const scalar_t* x = src + static_cast<int64_t>(vtx[i * d1 + r]) * C;
      const scalar_t wr = w[i * d1 + r];
      for (int c = 0; c < C; ++c) acc[c] += wr * x[c];
    }
    for (int c = 0; c < kc; ++c) lat[c * N + i] = acc[c] * inv_gain;
  }
}

// Builds the lattice of every image (in parallel over images); den (normalize): K 1, minus 1 without the self term.
template <typename scalar_t>
void build_all(const scalar_t* feat, int d, int64_t B, int64_t N, std::vector<Lattice<scalar_t>>& lattices,
               std::vector<scalar_t>& den, bool normalize, bool include_self) {
  const scalar_t inv_gain = static_cast<scalar_t>(1.0 / perm::lattice_gain(d));
  lattices.resize(B);
  den.assign(normalize ? B * N : 0, scalar_t(0));
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> buf0, buf1, ones;
    for (int64_t b = b0; b < b1; ++b) {
      build_lattice<scalar_t>(feat + b * d * N, d, N, lattices[b]);
      if (normalize) {  // forward order
        ones.assign(N, scalar_t(1));
        scalar_t* db = den.data() + b * N;
        filter_chunk<scalar_t>(lattices[b], ones.data(), db, 1, buf0, buf1, false, inv_gain);
        if (!include_self) {
          for (int64_t i = 0; i < N; ++i) db[i] -= scalar_t(1);
        }
      }
    }
  });
}

// Forward (transpose = false): o = finish(lattice(val)). Backward (transpose = true): the gradient of the
// forward w.r.t. the values, given grad_out in `val`. Parallel over (image, chunk of kChunk channels).
template <typename scalar_t>
void apply_all(const std::vector<Lattice<scalar_t>>& lattices, const std::vector<scalar_t>& den, const scalar_t* val,
               scalar_t* o, int64_t B, int64_t K, int64_t N, bool normalize, bool include_self, bool transpose) {
  const scalar_t inv_gain = static_cast<scalar_t>(1.0 / perm::lattice_gain(lattices[0].d));
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> buf0, buf1, tmp;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, k0 = (t % chunks) * kChunk;
      const int kc = static_cast<int>(std::min<int64_t>(kChunk, K - k0));
      const scalar_t* v = val + (b * K + k0) * N;
      scalar_t* ot = o + (b * K + k0) * N;
      const scalar_t* db = normalize ? den.data() + b * N : nullptr;
      if (!transpose) {
        filter_chunk<scalar_t>(lattices[b], v, ot, kc, buf0, buf1, false, inv_gain);
        for (int c = 0; c < kc; ++c) {
          for (int64_t i = 0; i < N; ++i) {
            ot[c * N + i] = perm::finish<scalar_t>(ot[c * N + i], v[c * N + i], normalize ? db[i] : scalar_t(1),
                                                   normalize, include_self);
          }
        }
      } else {
        // out = (L v - s v) / den  =>  dv = L^T (g / den) - s g / den
        tmp.resize(kc * N);
        for (int c = 0; c < kc; ++c) {
          for (int64_t i = 0; i < N; ++i) {
            const scalar_t g = v[c * N + i];
            tmp[c * N + i] = normalize ? perm::normalise<scalar_t>(g, db[i]) : g;
          }
        }
        filter_chunk<scalar_t>(lattices[b], tmp.data(), ot, kc, buf0, buf1, true, inv_gain);
        if (!include_self) {
          for (int64_t i = 0; i < kc * N; ++i) ot[i] -= tmp[i];
        }
      }
    }
  });
}

at::Tensor permutohedral_cpu(const char* op, const at::Tensor& values, const at::Tensor& features, bool normalize,
                             bool include_self, bool transpose) {
  TSCD_CHECK_CPU("permutohedral_filter", values);
  const int d = perm::check_inputs(op, values, features);
  const int64_t B = values.size(0), K = values.size(1), N = values.size(2);
  at::Tensor out = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "permutohedral_cpu", [&] {
    std::vector<Lattice<scalar_t>> lattices;
    std::vector<scalar_t> den;
    build_all<scalar_t>(features.data_ptr<scalar_t>(), d, B, N, lattices, den, normalize, include_self);
    apply_all<scalar_t>(lattices, den, values.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, K, N, normalize,
                        include_self, transpose);
  });
  return out;
}

// Mean-field dense CRF (docs/method.md 6): the lattice of each kernel and image is built once for all iterations.
at::Tensor dense_crf_cpu(const at::Tensor& unary, at::TensorList features, at::ArrayRef<double> weights,
                         int64_t num_iter) {
  const char* op = "dense_crf";
  TSCD_CHECK_CPU(op, unary);
  perm::check_crf_inputs(op, unary, features, weights, num_iter);
  const int64_t B = unary.size(0), N = unary.size(2);
  at::Tensor q;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dense_crf_cpu", [&] {
    std::vector<std::vector<Lattice<scalar_t>>> lattices(features.size());
    std::vector<scalar_t> no_den;
    for (size_t k = 0; k < features.size(); ++k) {
      const int d = static_cast<int>(features[k].size(1));
      build_all<scalar_t>(features[k].data_ptr<scalar_t>(), d, B, N, lattices[k], no_den, false, true);
    }
    auto filter = [&](size_t k, const at::Tensor& v) {
      at::Tensor o = at::empty_like(v);
      apply_all<scalar_t>(lattices[k], no_den, v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), B, v.size(1), N,
                          false, true, false);
      return o;
    };
    q = perm::mean_field(unary, weights, num_iter, filter);
  });
  return q;
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
  m.impl("dense_crf_fwd", &dense_crf_cpu);
}

}  // namespace tscd
