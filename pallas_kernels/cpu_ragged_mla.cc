// Ragged paged absorbed MLA attention for the CPU backend, an XLA FFI custom call with the contract of
// ragged_mla_reference (pallas_kernels/ragged_mla.py): row b's local page m holds positions
// (page_first + m * page_stride) * N + [0, N); query t of row b at position q_start[b] + t sees keys at positions
// <= its own and < kv_len[b]. Each work unit (a row, a block of its queries, a block of heads) walks only the pages
// its queries can see, reading them in place from the pool [L, P, N, C] (f32, or bf16 widened one key block at
// a time), with an online softmax in float32. Keys of a block have consecutive positions, so a query's mask is a
// prefix of the block. Units are split among XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using k2jax_cpu::bf16_to_f32;
using k2jax_cpu::parallel_units;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // for unaligned loads and stores
constexpr int64_t kKeys = 32;    // keys per block: 32 x 640 floats (80 KiB) stay in L2 for every head group
constexpr int64_t kRows = 64;    // query rows (tokens x heads) per work unit when heads are few
constexpr int kGroup = 4;        // heads per register block (one key load feeds kGroup FMAs)
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Problem {
  const float* q;        // [B, T, H, C]
  const void* kv;        // layer `layer` of the pool: [P, N, C]
  bool bf16;
  const int32_t *table, *kv_len, *q_start;  // [B, M], [B], [B]
  int64_t b, t, h, c, r, n, m, p, first, stride;
  float scale;
  float *o, *lse;        // [B, T, H, R], [B, T, H]
};

// The key block's rows as float32: in place for an f32 pool, widened into buf for bf16.
const float* key_rows(const Problem& pr, int64_t page, int64_t j0, int64_t keys, float* buf) {
  int64_t offset = (page * pr.n + j0) * pr.c;
  if (!pr.bf16) return static_cast<const float*>(pr.kv) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(pr.kv) + offset;
  for (int64_t i = 0; i < keys * pr.c; ++i) buf[i] = bf16_to_f32(src[i]);
  return buf;
}

// s[g][j] = scale * q_g . k_j for G query rows and the first `keys` rows k_j of the block (C lanes each).
template <int G>
void scores(const float* const* q, const float* k, int64_t keys, int64_t c, float scale, float (*s)[kKeys]) {
  for (int64_t j = 0; j < keys; ++j, k += c) {
    v8 acc[G] = {};
    int64_t i = 0;
    for (; i + 8 <= c; i += 8) {
      v8 kk = *reinterpret_cast<const v8u*>(k + i);
      for (int g = 0; g < G; ++g) acc[g] += *reinterpret_cast<const v8u*>(q[g] + i) * kk;
    }
    for (int g = 0; g < G; ++g) {
      float sum = 0;
      for (int l = 0; l < 8; ++l) sum += acc[g][l];
      for (int64_t x = i; x < c; ++x) sum += q[g][x] * k[x];
      s[g][j] = sum * scale;
    }
  }
}

// acc_g[0:R] = alpha_g * acc_g[0:R] + sum_j p[g][j] * k_j[0:R]: the accumulators stay in registers over the keys.
template <int G>
void accumulate(float* const* acc, const float* alpha, const float (*p)[kKeys], const float* k, int64_t keys,
                int64_t c, int64_t r) {
  int64_t i = 0;
  for (; i + 8 <= r; i += 8) {
    v8 a[G];
    for (int g = 0; g < G; ++g) a[g] = *reinterpret_cast<const v8u*>(acc[g] + i) * alpha[g];
    for (int64_t j = 0; j < keys; ++j) {
      v8 kk = *reinterpret_cast<const v8u*>(k + j * c + i);
      for (int g = 0; g < G; ++g) a[g] += p[g][j] * kk;
    }
    for (int g = 0; g < G; ++g) *reinterpret_cast<v8u*>(acc[g] + i) = a[g];
  }
  for (; i < r; ++i) {
    for (int g = 0; g < G; ++g) {
      float a = acc[g][i] * alpha[g];
      for (int64_t j = 0; j < keys; ++j) a += p[g][j] * k[j * c + i];
      acc[g][i] = a;
    }
  }
}

// Online-softmax update of G query rows (running max m, sum l, accumulators acc) with `keys` visible keys.
template <int G>
void update(const float* const* q, float* const* acc, float* m, float* l, const float* k, int64_t keys,
            const Problem& pr) {
  float s[G][kKeys], alpha[G];
  scores<G>(q, k, keys, pr.c, pr.scale, s);
  for (int g = 0; g < G; ++g) {
    float mx = m[g];
    for (int64_t j = 0; j < keys; ++j) mx = std::max(mx, s[g][j]);
    alpha[g] = std::exp(m[g] - mx);  // m = -inf before the first key: 0
    float sum = 0;
    for (int64_t j = 0; j < keys; ++j) sum += (s[g][j] = std::exp(s[g][j] - mx));
    l[g] = alpha[g] * l[g] + sum;
    m[g] = mx;
  }
  accumulate<G>(acc, alpha, s, k, keys, pr.c, pr.r);
}

// The heads [h0, h1) of one token in register blocks of up to kGroup; row x0 is head h0's in the unit's state.
void update_heads(const Problem& pr, int64_t b, int64_t t, int64_t h0, int64_t h1, int64_t x0, float* acc, float* m,
                  float* l, const float* k, int64_t keys) {
  for (int64_t h = h0; h < h1; h += kGroup) {
    int g_count = static_cast<int>(std::min<int64_t>(kGroup, h1 - h));
    const float* q[kGroup];
    float* a[kGroup];
    for (int g = 0; g < g_count; ++g) {
      q[g] = pr.q + ((b * pr.t + t) * pr.h + h + g) * pr.c;
      a[g] = acc + (x0 + h - h0 + g) * pr.r;
    }
    int64_t x = x0 + h - h0;
    switch (g_count) {
      case 4: update<4>(q, a, m + x, l + x, k, keys, pr); break;
      case 3: update<3>(q, a, m + x, l + x, k, keys, pr); break;
      case 2: update<2>(q, a, m + x, l + x, k, keys, pr); break;
      default: update<1>(q, a, m + x, l + x, k, keys, pr); break;
    }
  }
}

// One unit: tokens [t0, t1) x heads [h0, h1) of row b over the pages they can see. Returns false (writing
// nothing) when a page id it would read is outside the pool.
bool attend_unit(const Problem& pr, int64_t b, int64_t t0, int64_t t1, int64_t h0, int64_t h1) {
  int64_t nh = h1 - h0, rows = (t1 - t0) * nh;
  thread_local std::vector<float> state, buf;
  state.assign(rows * (pr.r + 2), 0.f);
  float *acc = state.data(), *m = acc + rows * pr.r, *l = m + rows;
  std::fill(m, m + rows, -kInf);
  if (pr.bf16) buf.resize(kKeys * pr.c);
  int64_t kv_len = pr.kv_len[b], q_start = pr.q_start[b];
  int64_t hi = std::min(kv_len, q_start + t1);  // no query of the unit sees a position >= hi
  for (int64_t page_m = 0; page_m < pr.m; ++page_m) {
    int64_t page_pos = (pr.first + page_m * pr.stride) * pr.n;
    if (page_pos >= hi) break;
    int64_t page = pr.table[b * pr.m + page_m];
    if (page < 0 || page >= pr.p) return false;
    for (int64_t j0 = 0; j0 < pr.n && page_pos + j0 < hi; j0 += kKeys) {
      int64_t pos0 = page_pos + j0, keys = std::min({kKeys, pr.n - j0, hi - pos0});
      const float* k = key_rows(pr, page, j0, keys, buf.data());
      for (int64_t t = t0; t < t1; ++t) {
        int64_t visible = std::min(std::min(kv_len, q_start + t + 1) - pos0, keys);
        if (visible > 0) update_heads(pr, b, t, h0, h1, (t - t0) * nh, acc, m, l, k, visible);
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t h = h0; h < h1; ++h) {
      int64_t x = (t - t0) * nh + h - h0, out = (b * pr.t + t) * pr.h + h;
      float* o = pr.o + out * pr.r;
      if (l[x] > 0) {
        float inv = 1.f / l[x];
        for (int64_t i = 0; i < pr.r; ++i) o[i] = acc[x * pr.r + i] * inv;
        pr.lse[out] = m[x] + std::log(l[x]);
      } else {
        std::memset(o, 0, sizeof(float) * pr.r);
        pr.lse[out] = -kInf;
      }
    }
  }
  return true;
}

ffi::Error RaggedMlaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> table,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> q_start, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> page_first, float sm_scale, int64_t page_stride,
                         ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = kv.dimensions(), td = table.dimensions(), od = o->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || od.size() != 4 || kd[3] != qd[3] || td[0] != qd[0] ||
      kv_len.dimensions().size() != 1 || kv_len.dimensions()[0] != qd[0] || q_start.dimensions().size() != 1 ||
      q_start.dimensions()[0] != qd[0] || od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[2] || od[3] >= qd[3]) {
    return ffi::Error::InvalidArgument(
        "ragged MLA expects q [B, T, H, C], kv [L, P, N, C], table [B, M], kv_len [B], q_start [B], o [B, T, H, R<C]");
  }
  if (kv.element_type() != ffi::F32 && kv.element_type() != ffi::BF16) {
    return ffi::Error::InvalidArgument("the page pool must be float32 or bfloat16");
  }
  if (page_stride < 1) return ffi::Error::InvalidArgument("page_stride must be >= 1");
  int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("layer index out of range");
  bool bf16 = kv.element_type() == ffi::BF16;
  int64_t layer_elems = kd[1] * kd[2] * kd[3];
  const void* kv_layer = bf16 ? static_cast<const void*>(reinterpret_cast<const uint16_t*>(kv.untyped_data()) +
                                                         l * layer_elems)
                              : static_cast<const void*>(kv.typed_data<float>() + l * layer_elems);
  Problem pr{q.typed_data(), kv_layer, bf16, table.typed_data(), kv_len.typed_data(), q_start.typed_data(),
             qd[0], qd[1], qd[2], qd[3], od[3], kd[2], td[1], kd[1], page_first.typed_data()[0], page_stride,
             sm_scale, o->typed_data(), lse->typed_data()};
  // Units: (row, token block, head block); tokens are blocked to about kRows query rows, and heads are split only
  // when there are too few units with keys to keep every thread busy.
  int64_t tokens = std::clamp<int64_t>(kRows / pr.h, 1, std::max<int64_t>(pr.t, 1));
  int64_t token_blocks = (pr.t + tokens - 1) / tokens, threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t busy = 0;
  for (int64_t b = 0; b < pr.b; ++b) busy += pr.kv_len[b] > 0;
  int64_t head_blocks = 1;
  if (busy * token_blocks < 2 * threads) {
    head_blocks = std::min((pr.h + kGroup - 1) / kGroup,
                           (2 * threads + busy * token_blocks - 1) / std::max<int64_t>(busy * token_blocks, 1));
  }
  int64_t heads = std::min(pr.h, ((pr.h + head_blocks - 1) / head_blocks + kGroup - 1) / kGroup * kGroup);
  head_blocks = (pr.h + heads - 1) / heads;
  std::atomic<int64_t> bad_row{-1};
  parallel_units(pool, pr.b * token_blocks * head_blocks, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t b = u / (token_blocks * head_blocks), tb = u / head_blocks % token_blocks, hb = u % head_blocks;
      if (!attend_unit(pr, b, tb * tokens, std::min(pr.t, (tb + 1) * tokens), hb * heads,
                       std::min(pr.h, (hb + 1) * heads))) {
        bad_row.store(b);
      }
    }
  });
  if (bad_row.load() >= 0) {
    return ffi::Error::InvalidArgument("page table row " + std::to_string(bad_row.load()) +
                                       " holds a page id outside the pool [0, " + std::to_string(pr.p) +
                                       ") for a position it attends to");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxRaggedMla, RaggedMlaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("page_stride")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
