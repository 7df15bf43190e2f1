// permutohedral on the CPU. Per image, the lattice is built once (positions, barycentric weights, a hash table
// of the vertices with compact indices, the blur neighbours of every vertex) and reused for all K channels;
// then at::parallel_for (OpenMP) runs over (image, channel): splat, d+1 blur passes, slice. Math: permutohedral.h.
// dense_crf_fwd has its own fused, channel-contiguous mean-field loop (see "Mean-field dense CRF" below). The hash
// table is filled in point order (a vertex of the previous point is matched without probing) and probed in
// batches with prefetches, so that the cache misses of a batch overlap. The embedding and the dense CRF's loops
// (permutohedral_cpu_loops.h) are compiled for AVX-512, AVX2 + FMA and the baseline (isa_each.h); each op call
// runs the copy of cpu::isa_level().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../permutohedral_host.h"
#include "isa.h"

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
  std::vector<int32_t> nbr;    // (d+1, M, 2): blur neighbours per direction (M: not in the lattice, the zero row)
};

// Open addressing with linear probing; a slot packs (the low 32 hash bits, index) in 8 bytes, so that a probe
// reads one cache line, most mismatches skip the key compare and growing needs no key. Indices are given in
// insertion order. Callers hash first (hash()), prefetch() a batch of slots, then find(): the lookups of a batch
// then overlap their cache misses.
class HashTable {
 public:
  HashTable(int d, int64_t expected) : d_(d) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * expected)) cap <<= 1;
    resize(cap);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }
  uint32_t hash(const int* key) const { return static_cast<uint32_t>(perm::hash_key(key, d_)); }
  void prefetch(uint32_t hv) const { __builtin_prefetch(slots_.data() + (hv & (cap_ - 1))); }
  // Index of `key` (hash hv), inserted if new (insert) or -1 if absent (!insert). Not thread-safe when inserting.
  int32_t find(const int* key, uint32_t hv, bool insert) {
    uint64_t h = hv & (cap_ - 1);
    while (true) {
      const Slot e = slots_[h];
      if (e.idx < 0) {
        if (!insert) return -1;
        const int32_t n = static_cast<int32_t>(keys_.size() / d_);
        slots_[h] = Slot{hv, n};
        keys_.insert(keys_.end(), key, key + d_);
        if (static_cast<uint64_t>(n + 1) * 2 > cap_) grow();
        return n;
      }
      if (e.tag == hv && perm::same_key(keys_.data() + static_cast<int64_t>(e.idx) * d_, key, d_)) return e.idx;
      h = (h + 1) & (cap_ - 1);
    }
  }
  int32_t find(const int* key, bool insert) { return find(key, hash(key), insert); }
  int64_t size() const { return static_cast<int64_t>(keys_.size() / d_); }
  const int* key(int64_t m) const { return keys_.data() + m * d_; }

 private:
  struct Slot {
    uint32_t tag;
    int32_t idx;
  };
  void resize(uint64_t cap) {
    cap_ = cap;
    slots_.assign(cap, Slot{0, -1});
  }
  void grow() {
    const std::vector<Slot> old = std::move(slots_);
    resize(cap_ * 2);
    for (const Slot& e : old) {
      if (e.idx < 0) continue;
      uint64_t h = e.tag & (cap_ - 1);
      while (slots_[h].idx >= 0) h = (h + 1) & (cap_ - 1);
      slots_[h] = e;
    }
  }
  int d_;
  uint64_t cap_ = 0;
  std::vector<Slot> slots_;
  std::vector<int> keys_;
};

constexpr int kBatch = 16;               // points / vertices whose hash probes are issued together
constexpr int64_t kEmbedBlock = 8192;    // points embedded (keys kept) at a time by build_lattice

// What the per-level loops (permutohedral_cpu_loops.h) share with the dense CRF below.
constexpr int kCrfMaxKP = 32;  // widest compile-time channel row; wider rows (K > 32) use a runtime width

// What the fused point pass needs of one kernel's lattice.
template <typename T>
struct CrfKernel {
  const int32_t* vtx;
  const T* w;
  const T* V;    // the blurred lattice values
  const T* nrm;  // n_k per point
  T inv_gain, weight;
  int d1;
};

// The logit of a padding channel (K <= c < S): its softmax weight underflows to 0.
template <typename T>
constexpr T kPadLogit = T(-1e30);

#define TSCD_ISA_LOOPS "permutohedral_cpu_loops.h"
#include "isa_each.h"

// The lattice of one image's points, with the embedding loop of Isa.
template <typename Isa, typename scalar_t>
void build_lattice(const scalar_t* feat, int d, int64_t N, Lattice<scalar_t>& L) {
  const int d1 = d + 1;
  L.d = d;
  L.N = N;
  L.vtx.resize(N * d1);
  L.w.resize(N * d1);
  scalar_t scale[kMaxDim];
  for (int j = 0; j < d; ++j) scale[j] = static_cast<scalar_t>(perm::feature_scale(j, d));
  // In blocks of kEmbedBlock points: the keys and weights of the block's points (in parallel when the caller is
  // not already in a parallel region; the keys of one block only, which stay in cache), then their insertion in
  // point order (the vertex numbering). Neighbouring points mostly share their simplex's vertices: a vertex of the
  // previous point is matched by key compare alone, without a hash probe (not across a block boundary).
  const int64_t block = std::min<int64_t>(N, kEmbedBlock);
  std::unique_ptr<int[]> keys(new int[block * d1 * d]);  // every entry is written before it is read
  HashTable table(d, N / 4);
  int prev[kMaxDim + 1];
  uint32_t prev_hv[kMaxDim + 1];
  uint32_t hv[kBatch * (kMaxDim + 1)];
  for (int64_t b0 = 0; b0 < N; b0 += block) {
    const int64_t b1 = std::min<int64_t>(N, b0 + block);
    at::parallel_for(b0, b1, 2048, [&](int64_t i0, int64_t i1) {
      Isa::template embed_points<scalar_t>(feat, N, d, scale, keys.get(), L.w.data(), i0, i1, b0);
    });
    for (int64_t i0 = b0; i0 < b1; i0 += kBatch) {
      const int64_t i1 = std::min<int64_t>(b1, i0 + kBatch);
      for (int64_t p = i0 * d1; p < i1 * d1; ++p) {
        hv[p - i0 * d1] = table.hash(keys.get() + (p - b0 * d1) * d);
        table.prefetch(hv[p - i0 * d1]);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int* ki = keys.get() + (i - b0) * d1 * d;
        for (int r = 0; r < d1; ++r) {
          const int* key = ki + r * d;
          const uint32_t h = hv[(i - i0) * d1 + r];
          int32_t e = -1;
          if (i > b0) {  // the hashes first: a full key compare only where they agree
            const int* kp = ki - d1 * d;
            for (int q = 0; q < d1 && e < 0; ++q) {
              if (prev_hv[q] == h && perm::same_key(kp + q * d, key, d)) e = prev[q];
            }
          }
          L.vtx[i * d1 + r] = e >= 0 ? e : table.find(key, h, true);
        }
        for (int r = 0; r < d1; ++r) {
          prev[r] = L.vtx[i * d1 + r];
          prev_hv[r] = hv[(i - i0) * d1 + r];
        }
      }
    }
  }
  const int64_t M = L.M = table.size();
  L.nbr.resize(M * d1 * 2);
  // Only the + neighbours are looked up: n = m + u_j  <=>  m = n - u_j, so the - neighbour of n is m (the map is
  // one-to-one, so no two threads write one entry); the rest have no - neighbour (the zero row M).
  std::fill(L.nbr.begin(), L.nbr.end(), static_cast<int32_t>(M));
  at::parallel_for(0, M, 4096, [&](int64_t m0, int64_t m1) {
    int nk[kBatch * (kMaxDim + 1)][kMaxDim];
    uint32_t nh[kBatch * (kMaxDim + 1)];
    for (int64_t mb = m0; mb < m1; mb += kBatch) {
      const int64_t me = std::min<int64_t>(m1, mb + kBatch);
      int q = 0;
      for (int64_t m = mb; m < me; ++m) {
        for (int j = 0; j <= d; ++j, ++q) {
          perm::neighbour_key(table.key(m), d, j, 1, nk[q]);
          nh[q] = table.hash(nk[q]);
          table.prefetch(nh[q]);
        }
      }
      q = 0;
      for (int64_t m = mb; m < me; ++m) {
        for (int j = 0; j <= d; ++j, ++q) {
          const int32_t e = table.find(nk[q], nh[q], false);
          if (e < 0) continue;
          L.nbr[(j * M + m) * 2] = e;
          L.nbr[(j * M + e) * 2 + 1] = static_cast<int32_t>(m);
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
      const int32_t* nb = nbr + (j * M + m) * 2;
      const scalar_t* a = src + static_cast<int64_t>(nb[0]) * C;
      const scalar_t* b = src + static_cast<int64_t>(nb[1]) * C;
      const scalar_t* x = src + m * C;
      scalar_t* y = dst + m * C;
      for (int c = 0; c < C; ++c) y[c] = perm::blur_value(x[c], a[c], b[c]);
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
template <typename Isa, typename scalar_t>
void build_all(const scalar_t* feat, int d, int64_t B, int64_t N, std::vector<Lattice<scalar_t>>& lattices,
               std::vector<scalar_t>& den, bool normalize, bool include_self) {
  const scalar_t inv_gain = static_cast<scalar_t>(1.0 / perm::lattice_gain(d));
  lattices.resize(B);
  den.assign(normalize ? B * N : 0, scalar_t(0));
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> buf0, buf1, ones;
    for (int64_t b = b0; b < b1; ++b) {
      build_lattice<Isa, scalar_t>(feat + b * d * N, d, N, lattices[b]);
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
    with_isa([&](auto isa) {
      build_all<decltype(isa), scalar_t>(features.data_ptr<scalar_t>(), d, B, N, lattices, den, normalize,
                                         include_self);
    });
    apply_all<scalar_t>(lattices, den, values.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, K, N, normalize,
                        include_self, transpose);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Mean-field dense CRF (docs/method.md 6). Per image, each kernel's lattice is built once. The iterations keep
// every buffer point- or vertex-major with the channels contiguous (row stride S: K padded to a multiple of 8), so
// that each step on a point / vertex is a SIMD loop over channels:
//   splat (scatter in point order; threads split the vertices, each range summing its points in point order),
//   d+1 blur passes (threads split the vertices), and one fused pass over the points (threads split the points):
//   slice every kernel's lattice, add the messages to -U, softmax into Q.
// The arithmetic per value is that of mean_field (permutohedral_host.h) with the filter above.

constexpr int64_t kTile = 64;  // points per block of the (K, N) <-> (N, S) transposes

// f(ib, ie) over the points [0, N) in blocks of kTile (in parallel): the (K, N) <-> (N, S) transposes, so that
// each (K, N) row and each (N, S) block is read and written in whole cache lines.
template <typename F>
void for_point_tiles(int64_t N, F&& f) {
  at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t ib = i0; ib < i1; ib += kTile) f(ib, std::min<int64_t>(i1, ib + kTile));
  });
}

// Calls f(std::integral_constant<int, W>()) for a channel width w: 1 or a multiple of 4 up to 32; 0 otherwise
// (the runtime-width instantiation).
template <typename F>
void with_width(int64_t w, F&& f) {
  switch (w) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    case 12: f(std::integral_constant<int, 12>()); break;
    case 16: f(std::integral_constant<int, 16>()); break;
    case 20: f(std::integral_constant<int, 20>()); break;
    case 24: f(std::integral_constant<int, 24>()); break;
    case 28: f(std::integral_constant<int, 28>()); break;
    case 32: f(std::integral_constant<int, 32>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}
// The vertex ranges of a multi-threaded pass, one per thread: [m[t], m[t+1]), and the points that touch each,
// [lo[t], hi[t]) (vertices are numbered in point order, so a range is touched by a band of points).
struct CrfSplit {
  std::vector<int64_t> m, lo, hi;
};

template <typename T>
CrfSplit crf_split(const Lattice<T>& L, int64_t parts) {
  const int d1 = L.d + 1;
  CrfSplit sp;
  for (int64_t t = 0; t <= parts; ++t) sp.m.push_back(L.M * t / parts);
  sp.m.back() = L.M + 1;  // the last range holds the zero row
  if (parts == 1) {
    sp.lo = {0};
    sp.hi = {L.N};
    return sp;
  }
  sp.lo.assign(parts, L.N);
  sp.hi.assign(parts, 0);
  for (int64_t i = 0; i < L.N; ++i) {
    int64_t mn = L.M, mx = 0;
    for (int r = 0; r < d1; ++r) {
      mn = std::min<int64_t>(mn, L.vtx[i * d1 + r]);
      mx = std::max<int64_t>(mx, L.vtx[i * d1 + r]);
    }
    for (int64_t t = 0; t < parts; ++t) {
      if (mx >= sp.m[t] && mn < sp.m[t + 1]) {
        sp.lo[t] = std::min(sp.lo[t], i);
        sp.hi[t] = i + 1;
      }
    }
  }
  return sp;
}

// Every kernel's splat (into x[k]) and d+1 blur passes (x[k] <-> y[k]) of the S channels of q (times its nrm);
// returns each kernel's result buffer (x[k] if d+1 is even, else y[k]). The threads
// split each lattice's vertices (CrfSplit), for the splat and for each blur pass, so that no two threads write one
// cache line; the result is bit-identical whatever the number of threads. Isa: the loops' instruction set.
template <typename Isa, typename T>
std::vector<const T*> crf_lattice_pass(const std::vector<Lattice<T>>& lat, const std::vector<CrfSplit>& split,
                                       const T* q, const std::vector<const T*>& nrm, int64_t S,
                                       const std::vector<T*>& x, const std::vector<T*>& y) {
  const int64_t nk = static_cast<int64_t>(lat.size());
  std::vector<const T*> out(nk);
  with_width(S <= kCrfMaxKP ? S : 0, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    for (int64_t k = 0; k < nk; ++k) {
      const Lattice<T>& L = lat[k];
      const CrfSplit& sp = split[k];
      const int64_t parts = static_cast<int64_t>(sp.lo.size());
      at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          Isa::template crf_splat<T, KP>(L.vtx.data(), L.w.data(), L.d + 1, q, nrm[k], S, S, x[k], sp.m[t], sp.m[t + 1],
                           sp.lo[t], sp.hi[t]);
        }
      });
      T* a = x[k];
      T* b = y[k];
      for (int j = 0; j <= L.d; ++j) {
        at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            Isa::template crf_blur<T, KP>(a, b, L.nbr.data() + j * L.M * 2, S, S, sp.m[t], std::min(sp.m[t + 1], L.M));
          }
        });
        std::fill(b + L.M * S, b + L.M * S + S, T(0));  // the zero row
        std::swap(a, b);
      }
      out[k] = a;
    }
  });
  return out;
}

template <typename Isa, typename T>
void dense_crf_image(const T* unary, const std::vector<const T*>& feats, const std::vector<int>& dims,
                     at::ArrayRef<double> weights, int64_t num_iter, int K, int64_t N, T* out) {
  const int nk = static_cast<int>(feats.size());
  const int64_t S = (K + 7) / 8 * 8;
  std::vector<Lattice<T>> lat(nk);
  for (int k = 0; k < nk; ++k) build_lattice<Isa, T>(feats[k], dims[k], N, lat[k]);
  std::vector<std::vector<T>> va(nk), vb(nk);
  std::vector<CrfKernel<T>> ks(nk);
  std::vector<std::vector<T>> norms(nk);
  std::vector<const T*> ones(nk), nrm(nk);
  const std::vector<T> one(N, T(1));
  // the threads split each lattice's vertices in the lattice passes (CrfSplit)
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  std::vector<CrfSplit> split(nk);
  at::parallel_for(0, nk, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) split[k] = crf_split(lat[k], threads);
  });
  // each kernel's two value buffers: the splat goes to x[k], the blur passes alternate between them
  std::vector<T*> x(nk), y(nk);
  for (int k = 0; k < nk; ++k) {
    va[k].resize((lat[k].M + 1) * S);
    vb[k].resize((lat[k].M + 1) * S);
    x[k] = va[k].data();
    y[k] = vb[k].data();
    ones[k] = one.data();
  }
  // n_k = (K_k 1)^-1/2: the lattice applied to ones (one channel, row stride 1)
  const std::vector<const T*> v1 = crf_lattice_pass<Isa, T>(lat, split, one.data(), ones, 1, x, y);
  for (int k = 0; k < nk; ++k) {
    const Lattice<T>& L = lat[k];
    const T inv_gain = static_cast<T>(1.0 / perm::lattice_gain(L.d));
    norms[k].resize(N);
    at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T acc = 0;
        for (int r = 0; r <= L.d; ++r) acc += L.w[i * (L.d + 1) + r] * v1[k][L.vtx[i * (L.d + 1) + r]];
        norms[k][i] = perm::crf_norm(acc * inv_gain);
      }
    });
    nrm[k] = norms[k].data();
    ks[k] = CrfKernel<T>{L.vtx.data(), L.w.data(), nullptr, norms[k].data(), inv_gain,
                         static_cast<T>(weights[k]), L.d + 1};
  }
  std::vector<T> negu(N * S), q(N * S, T(0));
  for_point_tiles(N, [&](int64_t ib, int64_t ie) {  // -U, point-major
    for (int64_t c = 0; c < S; ++c) {
      for (int64_t i = ib; i < ie; ++i) negu[i * S + c] = c < K ? -unary[c * N + i] : kPadLogit<T>;
    }
  });
  auto update = [&](int nkern) {  // Q = softmax(-U + the messages of the first nkern kernels)
    with_width(S <= kCrfMaxKP ? S : 0, [&](auto kp) {
      constexpr int KP = decltype(kp)::value;
      at::parallel_for(0, N, 2048, [&](int64_t i0, int64_t i1) {
        std::vector<T> scratch(KP > 0 ? 0 : S);
        Isa::template crf_update<T, KP>(ks.data(), nkern, negu.data(), q.data(), S, scratch.data(), i0, i1);
      });
    });
  };
  update(0);
  for (int64_t it = 0; it < num_iter; ++it) {
    const std::vector<const T*> v = crf_lattice_pass<Isa, T>(lat, split, q.data(), nrm, S, x, y);
    for (int k = 0; k < nk; ++k) ks[k].V = v[k];
    update(nk);
  }
  for_point_tiles(N, [&](int64_t ib, int64_t ie) {  // Q, class-major
    for (int64_t c = 0; c < K; ++c) {
      for (int64_t i = ib; i < ie; ++i) out[c * N + i] = q[i * S + c];
    }
  });
}

at::Tensor dense_crf_cpu(const at::Tensor& unary, at::TensorList features, at::ArrayRef<double> weights,
                         int64_t num_iter) {
  const char* op = "dense_crf";
  TSCD_CHECK_CPU(op, unary);
  perm::check_crf_inputs(op, unary, features, weights, num_iter);
  const int64_t B = unary.size(0), K = unary.size(1), N = unary.size(2);
  at::Tensor q = at::empty_like(unary);
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dense_crf_cpu", [&] {
    std::vector<int> dims;
    for (const at::Tensor& f : features) dims.push_back(static_cast<int>(f.size(1)));
    with_isa([&](auto isa) {
      for (int64_t b = 0; b < B; ++b) {
        std::vector<const scalar_t*> feats;
        for (const at::Tensor& f : features) feats.push_back(f.data_ptr<scalar_t>() + b * f.size(1) * N);
        dense_crf_image<decltype(isa), scalar_t>(unary.data_ptr<scalar_t>() + b * K * N, feats, dims, weights,
                                                 num_iter, static_cast<int>(K), N, q.data_ptr<scalar_t>() + b * K * N);
      }
    });
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
