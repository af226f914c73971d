// Ragged paged absorbed MLA attention for the CPU backend, an XLA FFI custom call with the contract of
// ragged_mla_reference (pallas_kernels/ragged_mla.py): row b's local page m holds positions (page_first + m *
// page_stride) * N + [0, N); query t of row b at position q_start[b] + t sees keys at positions <= its own and <
// kv_len[b]; a query at or past kv_len[b] (a chunk's padding) sees none and is skipped. Lanes from `width` on (the
// pool's zero padding to 128-lane rows) are never read: scores sum the first `width` lanes only. Each work unit (a row,
// a block of its queries, a block of heads) walks only the pages its queries can see, reading them in place from the
// pool [L, P, N, C] (f32, or bf16 widened one key block at a time), with an online softmax in float32. Keys of a block
// have consecutive positions, so a query's mask is a prefix of the block. Scores are dot products for units of up to 4
// query rows (decode; summed across lanes 8 keys at a time) and a small matmul over the transposed key block for more;
// p @ kv keeps 4 rows x 2 vectors in registers (vectors of 16 lanes with AVX-512, else 8). The next page of a row is
// prefetched while one is read. Units are split among XLA's intra-op threads.

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
typedef int32_t v8i __attribute__((vector_size(32)));
// The vectors of the loops that multiply several query rows (scores over the transposed block, p @ kv): 16 lanes
// with AVX-512 (1.7x the attention of a prompt chunk over 8 lanes on Zen 5), else 8. The dot products of up to 4
// rows and the softmax stay 8 lanes wide.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vw __attribute__((vector_size(4 * kLanes)));
typedef float vwu __attribute__((vector_size(4 * kLanes), aligned(4)));
constexpr int64_t kKeys = 32;    // keys per block (lanes of the scores): 32 x 640 floats (80 KiB) stay in L2
constexpr int64_t kRows = 128;   // query rows (tokens x heads) per work unit (5-9% faster than 64 on Zen 5: fewer
                                 // key blocks transposed and re-read per query row)
constexpr int kGroup = 4;        // query rows per register block of p @ kv (one key load feeds kGroup FMAs)
static_assert(kKeys % (2 * kLanes) == 0, "scores() reads a block's keys 2 vectors at a time");
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr v8i kLane = {0, 1, 2, 3, 4, 5, 6, 7};

struct Problem {
  const float* q;        // [B, T, H, C]
  const void* kv;        // layer `layer` of the pool: [P, N, C]
  bool bf16;
  const int32_t *table, *kv_len, *q_start;  // [B, M], [B], [B]
  int64_t b, t, h, c, w, r, n, m, p, first, stride;  // w: lanes holding data (r <= w <= c)
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

// e^x in float32 for the lanes' x <= 0 (finite or not; lanes past a row's keys hold anything and are discarded):
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-7 expf polynomial (about 1 ulp). x below
// -87 gives e^-87 (1.6e-38) instead of less, nothing beside the row maximum's e^0 = 1 in the softmax sum.
inline v8 exp_nonpositive(v8 x) {
  x = x > -87.f ? x : v8{} - 87.f;  // also maps NaN to -87
  v8 n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23 shifts the fraction out
  v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
          1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Pins a loaded vector in a register. Without it GCC folds the load into every FMA that uses it, and the repeated
// loads, not the FMAs, bound the inner loops (a key vector feeds one FMA per query row).
template <typename V>
inline void in_register(V& v) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#endif
}

// kt[i * kKeys + j] = k_j[i] for the block's keys (rows of c lanes, the first w read), zeros past `keys`: scores
// become a small matmul with lanes over keys (no horizontal sums), the block transposed once for all the unit's rows.
void transpose_keys(const float* k, int64_t keys, int64_t c, int64_t w, float* kt) {
  for (int64_t i = 0; i < w; ++i) {
    float* col = kt + i * kKeys;
    for (int64_t j = 0; j < keys; ++j) col[j] = k[j * c + i];
    std::fill(col + keys, col + kKeys, 0.f);
  }
}

// s_x[0:keys rounded up to 2 kLanes] = scale * q_x . k_j over the first w lanes for X <= kGroup query rows against
// the transposed key block, 2 kLanes keys at a time: each step loads 2 key vectors and X query lanes for 2X FMAs.
template <int X>
void scores(const float* const* q, const float* kt, int64_t keys, int64_t w, float scale, float* const* s) {
  for (int64_t j0 = 0; j0 < keys; j0 += 2 * kLanes) {
    vw acc[X][2] = {};
    const float* col = kt + j0;
    for (int64_t i = 0; i < w; ++i, col += kKeys) {
      vw k0 = *reinterpret_cast<const vwu*>(col), k1 = *reinterpret_cast<const vwu*>(col + kLanes);
      in_register(k0);
      in_register(k1);
      for (int x = 0; x < X; ++x) {
        float qi = q[x][i];
        acc[x][0] += qi * k0;
        acc[x][1] += qi * k1;
      }
    }
    for (int x = 0; x < X; ++x) {
      *reinterpret_cast<vwu*>(s[x] + j0) = acc[x][0] * scale;
      *reinterpret_cast<vwu*>(s[x] + j0 + kLanes) = acc[x][1] * scale;
    }
  }
}

// [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]: AVX's hadd.
inline v8 pair_sums(v8 x, v8 y) {
  return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Lane l: the sum of v[l]'s 8 lanes; 8 horizontal sums in 9 vector adds instead of 56 scalar ones.
inline v8 lane_sums(const v8* v) {
  v8 lo = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));  // v0..v3's half sums: low half, high half
  v8 hi = pair_sums(pair_sums(v[4], v[5]), pair_sums(v[6], v[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// The same scores from the row-major block (rows of c lanes), for G <= kGroup rows: one key load feeds G dot
// products; each key's G partial-sum vectors are summed across lanes 8 keys at a time. Cheaper than transposing the
// block for few query rows (decode). Scores past `keys` (up to a multiple of 8) are 0.
template <int G>
void scores_direct(const float* const* q, const float* k, int64_t keys, int64_t c, int64_t w, float scale,
                   float* const* s) {
  for (int64_t j0 = 0; j0 < keys; j0 += 8) {
    v8 part[G][8];
    for (int64_t jj = 0; jj < 8; ++jj) {
      v8 acc[G] = {};
      if (j0 + jj < keys) {
        const float* kj = k + (j0 + jj) * c;
        int64_t i = 0;
        for (; i + 8 <= w; i += 8) {
          v8 kk = *reinterpret_cast<const v8u*>(kj + i);
          in_register(kk);
          for (int g = 0; g < G; ++g) acc[g] += *reinterpret_cast<const v8u*>(q[g] + i) * kk;
        }
        for (; i < w; ++i) {
          for (int g = 0; g < G; ++g) acc[g][0] += q[g][i] * kj[i];
        }
      }
      for (int g = 0; g < G; ++g) part[g][jj] = acc[g];
    }
    for (int g = 0; g < G; ++g) *reinterpret_cast<v8u*>(s[g] + j0) = lane_sums(part[g]) * scale;
  }
}

// acc_g[0:R] = alpha_g * acc_g[0:R] + sum over j < keys of p_g[j] * k_j[0:R] for G rows; the accumulators stay in
// registers over the keys, 2 kLanes lanes at a time.
template <int G>
void accumulate(float* const* acc, const float* alpha, const float* const* p, const float* k, int64_t keys,
                int64_t c, int64_t r) {
  int64_t i = 0;
  for (; i + 2 * kLanes <= r; i += 2 * kLanes) {
    vw a[G][2];
    for (int g = 0; g < G; ++g) {
      a[g][0] = *reinterpret_cast<const vwu*>(acc[g] + i) * alpha[g];
      a[g][1] = *reinterpret_cast<const vwu*>(acc[g] + i + kLanes) * alpha[g];
    }
    for (int64_t j = 0; j < keys; ++j) {
      vw k0 = *reinterpret_cast<const vwu*>(k + j * c + i), k1 = *reinterpret_cast<const vwu*>(k + j * c + i + kLanes);
      in_register(k0);
      in_register(k1);
      for (int g = 0; g < G; ++g) {
        a[g][0] += p[g][j] * k0;
        a[g][1] += p[g][j] * k1;
      }
    }
    for (int g = 0; g < G; ++g) {
      *reinterpret_cast<vwu*>(acc[g] + i) = a[g][0];
      *reinterpret_cast<vwu*>(acc[g] + i + kLanes) = a[g][1];
    }
  }
  for (; i < r; ++i) {
    for (int g = 0; g < G; ++g) {
      float a = acc[g][i] * alpha[g];
      for (int64_t j = 0; j < keys; ++j) a += p[g][j] * k[j * c + i];
      acc[g][i] = a;
    }
  }
}

// Per-unit scratch, grown once per thread: accumulators [rows, R], running max and sum, the block's rescale
// factors, probabilities [rows, kKeys], visible key counts, the transposed key block and a widened bf16 block.
struct Scratch {
  std::vector<float> acc, m, l, alpha, s, kt, buf;
  std::vector<int64_t> visible;
  std::vector<const float*> q;
  std::vector<float*> acc_rows, s_rows;
};

// The online-softmax update of the unit's rows [x0, rows) with one key block k (rows before x0 see none of it; the
// visible counts do not decrease with the row, which goes token-major).
void update_rows(const Problem& pr, Scratch& w, int64_t x0, int64_t rows, const float* k, int64_t keys) {
  int64_t x = x0;
  const float* const* q = &w.q[x0];
  float* const* s_rows = &w.s_rows[x0];
  switch (rows - x0) {
    case 1: scores_direct<1>(q, k, keys, pr.c, pr.w, pr.scale, s_rows); break;
    case 2: scores_direct<2>(q, k, keys, pr.c, pr.w, pr.scale, s_rows); break;
    case 3: scores_direct<3>(q, k, keys, pr.c, pr.w, pr.scale, s_rows); break;
    case 4: scores_direct<4>(q, k, keys, pr.c, pr.w, pr.scale, s_rows); break;
    default:
      transpose_keys(k, keys, pr.c, pr.w, w.kt.data());
      for (; x + kGroup <= rows; x += kGroup) scores<kGroup>(&w.q[x], w.kt.data(), keys, pr.w, pr.scale, &w.s_rows[x]);
      switch (rows - x) {
        case 3: scores<3>(&w.q[x], w.kt.data(), keys, pr.w, pr.scale, &w.s_rows[x]); break;
        case 2: scores<2>(&w.q[x], w.kt.data(), keys, pr.w, pr.scale, &w.s_rows[x]); break;
        case 1: scores<1>(&w.q[x], w.kt.data(), keys, pr.w, pr.scale, &w.s_rows[x]); break;
        default: break;
      }
  }
  for (x = x0; x < rows; ++x) {
    float* s = w.s_rows[x];
    int64_t visible = w.visible[x];
    v8 top = v8{} - kInf;
    for (int v = 0; v < kKeys / 8; ++v) {  // the running max over the visible keys, 8 lanes at a time
      v8 sv = *reinterpret_cast<const v8u*>(s + 8 * v);
      top = ((kLane + 8 * v < static_cast<int32_t>(visible)) & (sv > top)) ? sv : top;
    }
    float mx = w.m[x];
    for (int l = 0; l < 8; ++l) mx = std::max(mx, top[l]);
    w.alpha[x] = std::exp(w.m[x] - mx);  // m = -inf before the first key: 0
    v8 sum = {};
    for (int v = 0; v < kKeys / 8; ++v) {  // keys this row does not see weigh nothing in its register block
      v8 e = exp_nonpositive(*reinterpret_cast<const v8u*>(s + 8 * v) - mx);
      e = kLane + 8 * v < static_cast<int32_t>(visible) ? e : v8{};
      *reinterpret_cast<v8u*>(s + 8 * v) = e;
      sum += e;
    }
    w.l[x] = w.alpha[x] * w.l[x] + (sum[0] + sum[1] + sum[2] + sum[3] + sum[4] + sum[5] + sum[6] + sum[7]);
    w.m[x] = mx;
  }
  for (x = x0; x < rows; x += kGroup) {
    int g_count = static_cast<int>(std::min<int64_t>(kGroup, rows - x));
    int64_t used = w.visible[x + g_count - 1];
    const float* const* p = &w.s_rows[x];
    switch (g_count) {
      case 4: accumulate<4>(&w.acc_rows[x], &w.alpha[x], p, k, used, pr.c, pr.r); break;
      case 3: accumulate<3>(&w.acc_rows[x], &w.alpha[x], p, k, used, pr.c, pr.r); break;
      case 2: accumulate<2>(&w.acc_rows[x], &w.alpha[x], p, k, used, pr.c, pr.r); break;
      default: accumulate<1>(&w.acc_rows[x], &w.alpha[x], p, k, used, pr.c, pr.r); break;
    }
  }
}

// Asks for the lanes scores read (the first w of c) of a page's first `keys` keys ahead of use: a row's pages lie
// anywhere in the pool, where the hardware prefetcher cannot follow.
void prefetch_page(const Problem& pr, int64_t page, int64_t keys) {
  int64_t size = pr.bf16 ? 2 : 4;
  const char* first = static_cast<const char*>(pr.kv) + page * pr.n * pr.c * size;
  for (int64_t j = 0; j < keys; ++j) {
    for (int64_t b = 0; b < pr.w * size; b += 64) __builtin_prefetch(first + j * pr.c * size + b);
  }
}

// One unit: tokens [t0, t1) x heads [h0, h1) of row b over the pages they can see (its padding tokens, at or past
// kv_len, see none). Returns false (writing nothing) when a page id it would read is outside the pool.
bool attend_unit(const Problem& pr, int64_t b, int64_t t0, int64_t t1, int64_t h0, int64_t h1) {
  int64_t kv_len = pr.kv_len[b], q_start = pr.q_start[b];
  int64_t real_t1 = std::clamp(kv_len - q_start, t0, t1);  // tokens from real_t1 on are padding
  int64_t nh = h1 - h0, rows = (real_t1 - t0) * nh, all_rows = (t1 - t0) * nh;
  thread_local Scratch w;
  w.acc.assign(rows * pr.r, 0.f);
  w.m.assign(rows, -kInf);
  w.l.assign(rows, 0.f);
  w.alpha.resize(rows);
  w.s.resize(rows * kKeys);
  w.kt.resize(pr.c * kKeys);
  w.visible.resize(rows);
  w.q.resize(rows);
  w.acc_rows.resize(rows);
  w.s_rows.resize(rows);
  if (pr.bf16) w.buf.resize(kKeys * pr.c);
  for (int64_t x = 0; x < rows; ++x) {
    w.q[x] = pr.q + ((b * pr.t + t0 + x / nh) * pr.h + h0 + x % nh) * pr.c;
    w.acc_rows[x] = w.acc.data() + x * pr.r;
    w.s_rows[x] = w.s.data() + x * kKeys;
  }
  int64_t hi = rows > 0 ? std::min(kv_len, q_start + real_t1) : 0;  // no query of the unit sees a position >= hi
  for (int64_t page_m = 0; page_m < pr.m; ++page_m) {
    int64_t page_pos = (pr.first + page_m * pr.stride) * pr.n;
    if (page_pos >= hi) break;
    int64_t page = pr.table[b * pr.m + page_m];
    if (page < 0 || page >= pr.p) return false;
    int64_t next_pos = page_pos + pr.stride * pr.n;
    if (page_m + 1 < pr.m && next_pos < hi) {
      int64_t next = pr.table[b * pr.m + page_m + 1];
      if (next >= 0 && next < pr.p) prefetch_page(pr, next, std::min(pr.n, hi - next_pos));
    }
    for (int64_t j0 = 0; j0 < pr.n && page_pos + j0 < hi; j0 += kKeys) {
      int64_t pos0 = page_pos + j0, keys = std::min({kKeys, pr.n - j0, hi - pos0});
      int64_t x0 = rows;
      for (int64_t x = rows - 1; x >= 0; --x) {
        w.visible[x] = std::clamp<int64_t>(std::min(kv_len, q_start + t0 + x / nh + 1) - pos0, 0, keys);
        if (w.visible[x] > 0) x0 = x;
      }
      if (x0 < rows) update_rows(pr, w, x0, rows, key_rows(pr, page, j0, keys, w.buf.data()), keys);
    }
  }
  for (int64_t x = 0; x < all_rows; ++x) {
    int64_t out = (b * pr.t + t0 + x / nh) * pr.h + h0 + x % nh;
    float* o = pr.o + out * pr.r;
    if (x < rows && w.l[x] > 0) {
      float inv = 1.f / w.l[x];
      for (int64_t i = 0; i < pr.r; ++i) o[i] = w.acc[x * pr.r + i] * inv;
      pr.lse[out] = w.m[x] + std::log(w.l[x]);
    } else {
      std::memset(o, 0, sizeof(float) * pr.r);
      pr.lse[out] = -kInf;
    }
  }
  return true;
}

ffi::Error RaggedMlaImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> table,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> q_start, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> page_first, float sm_scale, int64_t page_stride, int64_t width,
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
  if (width < od[3] || width > qd[3]) {
    return ffi::Error::InvalidArgument("width " + std::to_string(width) + " must be in [R, C] = [" +
                                       std::to_string(od[3]) + ", " + std::to_string(qd[3]) + "]");
  }
  int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("layer index out of range");
  bool bf16 = kv.element_type() == ffi::BF16;
  int64_t layer_elems = kd[1] * kd[2] * kd[3];
  const void* kv_layer = bf16 ? static_cast<const void*>(reinterpret_cast<const uint16_t*>(kv.untyped_data()) +
                                                         l * layer_elems)
                              : static_cast<const void*>(kv.typed_data<float>() + l * layer_elems);
  Problem pr{q.typed_data(), kv_layer, bf16, table.typed_data(), kv_len.typed_data(), q_start.typed_data(),
             qd[0], qd[1], qd[2], qd[3], width, od[3], kd[2], td[1], kd[1], page_first.typed_data()[0], page_stride,
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
                                  .Attr<int64_t>("width")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
