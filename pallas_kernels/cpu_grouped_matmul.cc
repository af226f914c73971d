// Grouped matmul for the CPU backend, an XLA FFI custom call: rows sorted by expert times their expert's
// matrix, read in place from the stacked [L, E, ...] weights (XLA:CPU copies every dynamically sliced matrix
// before a dot, which costs more than the dot at decode sizes). Dense f32/bf16 weights [L, E, K, N] (also
// [L, K, N] and [K, N]: one expert; bf16 is widened in registers), or INT4 in the planar layout of
// pallas_kernels/int4_layout.py (packed u8 [L, E, K/2, N], bf16 scales [L, E, K/32, N]).
// Experts (or, when there are few, their columns; for one row of a narrow matrix, its K rows, the partial sums added)
// are split among XLA's intra-op threads (a decode-sized call under 256 KiB of weights runs on the calling thread:
// waking another costs more). With AVX2 + FMA and no AVX-512 (AMD Zen 2-3, most laptops), up to 8 rows stream the
// weights once (one row, or whole rows of a matrix up to 512 columns: 4 blocks of K read side by side, sums in L1; else
// 8 K rows at a time, sums in registers); more rows widen each 128-row tile to f32 once, in 8-column panels, and sum 6
// rows x 16 columns in registers from it. INT4 rounds x to int8 per 32 values of K (llama.cpp's Q8_0) and sums nibble x
// int8 products in integers, one float multiply-add per group: with AVX-512 VNNI by vpdpbusd (1-2 rows stream the
// weights, 4 packed rows transposed in registers; from 3 rows each span's transposed nibbles are kept in L1 for all
// rows), with AVX2 by vpmaddubsw
// into 16-bit lanes (up to 12 rows stream the weights in order, in passes of up to 4 rows, 4 packed rows side by side,
// bytes of adjacent rows interleaved, sums in L1; more rows transpose each tile once and sum 6 rows x 16 columns from
// L1). Without AVX2 (and AVX-512 dense) each streams its matrix rows once per 4 rows of x, accumulating 4 rows x 512
// columns in L1 (with AVX-512: once per 8 rows in registers for bf16 and for 1 or 5+ rows of f32). From 12 rows, each
// 128 x 512 tile of the matrix is read once for all rows (with AVX-512, bf16, and f32 from 32 rows: the tile copied
// into 32-column panels a weight row at a time, 8 rows x 32 columns of f32 sums in registers per panel, bf16 widened
// there); INT4 nibbles are widened to float there.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define K2JAX_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define K2JAX_AVX512 1
#if defined(__AVX512VNNI__)
#define K2JAX_INT4_DOT 1
#endif
#endif

// K2JAX_MATMUL_PART: 1 builds the dense handler, 2 the INT4 ones, 0 (default) both; cpu_build compiles the file
// once per part, in parallel (each part instantiates only its own templates).
#ifndef K2JAX_MATMUL_PART
#define K2JAX_MATMUL_PART 0
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using k2jax_cpu::bf16_to_f32;
using k2jax_cpu::parallel_units;

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kChunk = 512;  // columns per accumulator chunk: 4 rows x 512 floats stay in L1
constexpr int64_t kStride = kChunk + 24;  // accumulator row stride, off 4 KiB multiples (store-to-load aliasing)
// Columns per streamed chunk: R x chunk sums stay in L1; one row takes longer runs of each weight row (4,096
// columns: 1.15-1.5x the rate of 512 on one Zen 3 core, the hardware prefetcher's streams run longer).
constexpr int64_t stream_chunk(int64_t rows) { return rows == 1 ? 4096 : kChunk; }
constexpr int kPass = 8;         // K rows of the weights per accumulation pass
constexpr int kMaxRows = 4;      // rows of x per pass over the weights
constexpr int kGroup = 32;       // INT4 scale group along K
// A stacked INT4 projection over this many bytes is fetched past the caches (prefetchnta): it cannot stay in a
// last-level cache between steps (16-32 MiB per core complex on current x86 parts), and streaming it through them
// evicts what can. Below it (the bundled model's 0.9 MB), fetching into them keeps it there: nta read 1.3x slower.
constexpr int64_t kCachedStackBytes = 32 << 20;
constexpr int64_t kTileK = 128;  // K rows of a widened weight tile: 128 x 512 floats (256 KiB) stay in L2
constexpr int64_t kTiledRows = 3 * kMaxRows;  // from this many rows, weight tiles are widened once for all rows

// One expert's dense matrix [K, N] in f32 or bf16, its rows read in place (bf16 widened in registers while
// streaming, or a row chunk at a time into a buffer for the tiled path).
template <typename T>
struct Dense {
  using Row = T;
  const T* w;
  int64_t k, n;
  static constexpr int kRowsPerStep = 1;
  int64_t steps() const { return k; }
  int64_t bytes() const { return k * n * static_cast<int64_t>(sizeof(T)); }
  int64_t k_of(int64_t step, int) const { return step; }
  int64_t k_unit() const { return 8; }
  Dense rows_of_k(int64_t k0, int64_t k1) const { return {w + k0 * n, k1 - k0, n}; }
  const T* row(int64_t step, int, int64_t c0, int64_t, float*) const { return w + step * n + c0; }
  const float* widened(int64_t step, int, int64_t c0, int64_t width, float* buf) const {
    const T* src = w + step * n + c0;
    if constexpr (std::is_same_v<T, float>) return src;
    for (int64_t c = 0; c < width; ++c) buf[c] = bf16_to_f32(src[c]);
    return buf;
  }
};

// One expert's INT4 matrix in planar blocks of p rows: byte row h holds k_lo = (h / (p/2)) * p + h % (p/2) in its
// low nibble and k_lo + p/2 in its high nibble, offset-binary (q = nibble - 8), times bf16 scale[k / 32, n].
struct Int4 {
  using Row = float;
  const uint8_t* packed;
  const uint16_t* scale;
  int64_t k, n, p;
  bool past_caches;  // prefetch past the caches: the stack cannot stay in them between steps
  static constexpr int kRowsPerStep = 2;
  int64_t steps() const { return k / 2; }
  int64_t bytes() const { return k * n / 2 + (k / kGroup) * n * 2; }
  int64_t k_of(int64_t h, int s) const { return (h / (p / 2)) * p + h % (p / 2) + s * (p / 2); }
  int64_t k_unit() const { return p; }  // K rows [k0, k1) must be whole planar blocks
  // Packed rows whose nibbles each lie in one scale group (per half).
  int64_t group_span() const { return std::min<int64_t>(kGroup, p / 2); }
  Int4 rows_of_k(int64_t k0, int64_t k1) const {
    return {packed + k0 / 2 * n, scale + k0 / kGroup * n, k1 - k0, n, p, past_caches};
  }
  const float* row(int64_t h, int s, int64_t c0, int64_t width, float* buf) const {
    const uint8_t* src = packed + h * n + c0;
    const uint16_t* sc = scale + (k_of(h, s) / kGroup) * n + c0;
    int shift = 4 * s;
    for (int64_t c = 0; c < width; ++c) buf[c] = static_cast<float>(((src[c] >> shift) & 15) - 8) * bf16_to_f32(sc[c]);
    return buf;
  }
  const float* widened(int64_t h, int s, int64_t c0, int64_t width, float* buf) const {
    return row(h, s, c0, width, buf);
  }
};

// A weight element as f32.
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// acc[r][0:width] += sum over the rows w_rows[j] of x[r, k_j] * w_rows[j][0:width], for R rows of x.
template <int R, int J, typename T>
inline void accumulate(const T* const* w_rows, const float* const* x_rows, const int64_t* ks, int64_t width,
                       float (*acc)[kStride]) {
  float xk[R][J];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) xk[r][j] = x_rows[r][ks[j]];
  }
  for (int64_t c = 0; c < width; ++c) {
    float wc[J];
    for (int j = 0; j < J; ++j) wc[j] = to_f32(w_rows[j][c]);
    for (int r = 0; r < R; ++r) {
      float sum = acc[r][c];
      for (int j = 0; j < J; ++j) sum += xk[r][j] * wc[j];
      acc[r][c] = sum;
    }
  }
}

// y[0:R, c0:c0+width] = x[0:R, :] @ W[:, c0:c0+width]: the weight rows stream once, kPass K rows per pass.
template <int R, typename W>
void block(const W& w, const float* x, int64_t c0, int64_t width, float* y) {
  alignas(32) float acc[R][kStride];
  alignas(32) static thread_local float buf[kPass][kChunk];
  for (int r = 0; r < R; ++r) std::memset(acc[r], 0, sizeof(float) * width);
  const float* x_rows[R];
  for (int r = 0; r < R; ++r) x_rows[r] = x + r * w.k;
  constexpr int kSteps = kPass / W::kRowsPerStep;
  int64_t step = 0;
  for (; step + kSteps <= w.steps(); step += kSteps) {
    const typename W::Row* rows[kPass];
    int64_t ks[kPass];
    for (int i = 0; i < kSteps; ++i) {
      for (int s = 0; s < W::kRowsPerStep; ++s) {
        int j = i * W::kRowsPerStep + s;
        rows[j] = w.row(step + i, s, c0, width, buf[j]);
        ks[j] = w.k_of(step + i, s);
      }
    }
    accumulate<R, kPass>(rows, x_rows, ks, width, acc);
  }
  for (; step < w.steps(); ++step) {
    for (int s = 0; s < W::kRowsPerStep; ++s) {
      const typename W::Row* rows[1] = {w.row(step, s, c0, width, buf[0])};
      int64_t ks[1] = {w.k_of(step, s)};
      accumulate<R, 1>(rows, x_rows, ks, width, acc);
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * w.n + c0, acc[r], sizeof(float) * width);
}

// y[0:R, c0:c0+width] (+)= x[0:R, :] @ one tile's n_rows weight rows (row j at K index ks[j]), accumulators in L1.
template <int R>
void tile_block(const float* const* rows, const int64_t* ks, int64_t n_rows, const float* x, int64_t k, int64_t n,
                int64_t c0, int64_t width, bool add, float* y) {
  alignas(32) float acc[R][kStride];
  const float* x_rows[R];
  for (int r = 0; r < R; ++r) {
    x_rows[r] = x + r * k;
    if (add) {
      std::memcpy(acc[r], y + r * n + c0, sizeof(float) * width);
    } else {
      std::memset(acc[r], 0, sizeof(float) * width);
    }
  }
  int64_t j = 0;
  for (; j + kPass <= n_rows; j += kPass) accumulate<R, kPass>(rows + j, x_rows, ks + j, width, acc);
  for (; j < n_rows; ++j) accumulate<R, 1>(rows + j, x_rows, ks + j, width, acc);
  for (int r = 0; r < R; ++r) std::memcpy(y + r * n + c0, acc[r], sizeof(float) * width);
}

// Many rows: each tile of kTileK weight rows (one column chunk) is widened to f32 once (f32 rows are read in
// place) and kept in L2 while every block of rows accumulates it, instead of each block streaming all of K.
template <typename W>
void group_columns_tiled(const W& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  alignas(32) static thread_local float tile[kTileK][kChunk];
  constexpr int64_t kTileSteps = kTileK / W::kRowsPerStep;
  for (int64_t c = c0; c < c1; c += kChunk) {
    int64_t width = std::min(kChunk, c1 - c);
    for (int64_t step0 = 0; step0 < w.steps(); step0 += kTileSteps) {
      const float* tile_rows[kTileK];
      int64_t ks[kTileK];
      int64_t n_rows = 0;
      for (int64_t step = step0; step < std::min(step0 + kTileSteps, w.steps()); ++step) {
        for (int s = 0; s < W::kRowsPerStep; ++s, ++n_rows) {
          tile_rows[n_rows] = w.widened(step, s, c, width, tile[n_rows]);
          ks[n_rows] = w.k_of(step, s);
        }
      }
      bool add = step0 > 0;
      int64_t r = 0;
      for (; r + kMaxRows <= rows; r += kMaxRows) {
        tile_block<kMaxRows>(tile_rows, ks, n_rows, x + r * w.k, w.k, w.n, c, width, add, y + r * w.n);
      }
      for (; r < rows; ++r) tile_block<1>(tile_rows, ks, n_rows, x + r * w.k, w.k, w.n, c, width, add, y + r * w.n);
    }
  }
}

#ifdef K2JAX_AVX512
// K rows per block visit, whose next span is prefetched: 8 for up to 4 rows (fewer streams at once; one row
// of bf16 read 12 -> 16 GB/s on one Zen 4 core), 16 for more (their FMAs hide the latency; 8 was no faster).
constexpr int64_t dense_span_rows(int rows) { return rows <= 4 ? 8 : 16; }
constexpr int kDenseMaxRows = 8;    // rows per pass over the weights

// 32 columns of a weight row as two f32 vectors (columns outside `width` read as 0): f32 in order; bf16 widened
// in registers as its even columns, then its odd ones (unpermuted by store_row). kFull (width >= 32) loads without
// a mask: on Zen 5 masked loads, every lane on, left the stream prefetcher idle (a scratch loop over one f32 row
// read 43 GB/s on two cores masked, 65 unmasked, both without software prefetch).
template <bool kFull>
inline void load32(const float* p, int64_t width, __m512* out) {
  for (int v = 0; v < 2; ++v) {
    out[v] = kFull ? _mm512_loadu_ps(p + 16 * v)
                   : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::clamp<int64_t>(width - 16 * v, 0, 16)) - 1), p + 16 * v);
  }
}
template <bool kFull>
inline void load32(const uint16_t* p, int64_t width, __m512* out) {
  __m512i h = kFull ? _mm512_loadu_si512(p)
                    : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << std::clamp<int64_t>(width, 0, 32)) - 1), p);
  out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  out[1] = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// y[0:width] = a row's sums in load32's order per 32 columns.
template <typename T>
inline void store_row(const float* acc, int64_t width, float* y) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(y, acc, sizeof(float) * width);
  } else {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t c = 0; c < width; c += 32) {
      __m512 even = _mm512_load_ps(acc + c), odd = _mm512_load_ps(acc + c + 16);
      for (int h = 0; h < 2; ++h) {
        int64_t left = std::clamp<int64_t>(width - c - 16 * h, 0, 16);
        __m512 v = _mm512_permutex2var_ps(even, h ? hi : lo, odd);
        _mm512_mask_storeu_ps(y + c + 16 * h, static_cast<__mmask16>((1u << left) - 1), v);
      }
    }
  }
}

// acc[0:R, c0:c0+16V] (row stride `stride`) += x[0:R, k0:k0+len] @ W[k0:k0+len, c0:c0+16V], in registers
// (kFull: width is 16V).
template <int R, int V, bool kFull, typename T>
inline void dense_span(const Dense<T>& w, const float* x, int64_t k0, int64_t len, int64_t c0, int64_t width,
                       float* acc, int64_t stride) {
  __m512 a[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) a[r][v] = _mm512_load_ps(acc + r * stride + 16 * v);
  }
  // The next span is prefetched: into L1 for more rows (into L2 they read 10-40% slower), into L2 for one bf16 row
  // (one Zen 4 core: 14-16 -> 17-21 GB/s), not at all for one f32 row, which the hardware streams faster alone
  // (two Zen 5 cores, one f32 row of 1024 x 4096 stacks: 56 -> 65 GB/s, 37 -> 50 in a slow hour).
  constexpr bool kPrefetch = R > 1 || !std::is_same_v<T, float>;
  constexpr auto kHint = R == 1 ? _MM_HINT_T1 : _MM_HINT_T0;
  const T* src = w.w + k0 * w.n + c0;
  for (int64_t kk = 0; kk < len; ++kk, src += w.n) {
    for (size_t b = 0; kPrefetch && b < 16 * V * sizeof(T); b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(src + dense_span_rows(R) * w.n) + b, kHint);
    }
    __m512 wv[V];
    for (int v = 0; v < V; v += 2) load32<kFull>(src + 16 * v, width - 16 * v, wv + v);
    for (int r = 0; r < R; ++r) {
      __m512 xb = _mm512_set1_ps(x[r * w.k + k0 + kk]);
      for (int v = 0; v < V; ++v) a[r][v] = _mm512_fmadd_ps(wv[v], xb, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) _mm512_store_ps(acc + r * stride + 16 * v, a[r][v]);
  }
}

// y[0:R, c0:c1] = x[0:R] @ W[:, c0:c1] in one pass over the weights: per chunk of columns, each span of K rows
// is read across the chunk before the next (contiguous runs of memory), the chunk's R x stream_chunk(R) sums in L1.
// A block reads 512 bytes of each weight row for one or two rows of x, for one bf16 row too (two Zen 5 cores read
// 256 bytes ~10% slower); more rows take fewer columns: at most 16 accumulators. Columns short of a block go 32 at a
// time, so a narrow matrix multiplies no zeros.
template <int R, typename T>
void dense_rows(const Dense<T>& w, const float* x, float* y, int64_t c0, int64_t c1) {
  constexpr int V = R == 1 && sizeof(T) == 2 ? 16 : R <= 2 ? 8 : R <= 4 ? 4 : 2;  // vectors per row of a block
  constexpr int64_t kCols = 16 * V;
  constexpr int64_t kWidth = stream_chunk(R), kSpan = dense_span_rows(R);
  alignas(64) float acc[R][kWidth];
  for (int64_t c = c0; c < c1; c += kWidth) {
    int64_t width = std::min(kWidth, c1 - c);
    std::memset(acc, 0, sizeof(acc));
    for (int64_t k0 = 0; k0 < w.k; k0 += kSpan) {
      int64_t len = std::min(kSpan, w.k - k0), b = 0;
      for (; b + kCols <= width; b += kCols) dense_span<R, V, true>(w, x, k0, len, c + b, kCols, &acc[0][b], kWidth);
      for (; b + 32 <= width; b += 32) dense_span<R, 2, true>(w, x, k0, len, c + b, 32, &acc[0][b], kWidth);
      if (b < width) dense_span<R, 2, false>(w, x, k0, len, c + b, width - b, &acc[0][b], kWidth);
    }
    for (int r = 0; r < R; ++r) store_row<T>(acc[r], width, y + r * w.n + c);
  }
}

// The first min(rows, 8) rows in one pass (dense_rows), for bf16 always and for f32 one row or from 5 rows (2-4
// f32 rows streamed in place by block<R> read as fast or faster; one row reads 1.1-1.6x faster here, on Zen 4);
// returns how many it took.
template <typename T>
int64_t dense_rows_in_registers(const Dense<T>& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  if (std::is_same_v<T, float> && rows > 1 && rows <= kMaxRows) return 0;
  switch (std::min<int64_t>(rows, kDenseMaxRows)) {
    case 8: dense_rows<8>(w, x, y, c0, c1); return 8;
    case 7: dense_rows<7>(w, x, y, c0, c1); return 7;
    case 6: dense_rows<6>(w, x, y, c0, c1); return 6;
    case 5: dense_rows<5>(w, x, y, c0, c1); return 5;
    case 4: dense_rows<4>(w, x, y, c0, c1); return 4;
    case 3: dense_rows<3>(w, x, y, c0, c1); return 3;
    case 2: dense_rows<2>(w, x, y, c0, c1); return 2;
    default: dense_rows<1>(w, x, y, c0, c1); return 1;
  }
}

constexpr int kPanelRows = 8;        // rows of x per panel pass: 8 x 2 vectors of sums in registers
constexpr int64_t kPanelCols = 32;   // columns of a packed panel: two f32 vectors

// Word order of a packed bf16 panel row: word 2i is column i and word 2i+1 column 16 + i, so that one 64-byte
// load widens to columns 0-15 (each word shifted up) and 16-31 (each high word masked) in order.
struct PanelOrder {
  alignas(64) int16_t idx[32] = {};
  constexpr PanelOrder() {
    for (int i = 0; i < 16; ++i) idx[2 * i] = static_cast<int16_t>(i), idx[2 * i + 1] = static_cast<int16_t>(16 + i);
  }
};
constexpr PanelOrder kPanelOrder;

// dst[0:32] = src[0:32] in a packed panel's order, zero from column `left` on. A whole row loads without a mask:
// the hardware's stream prefetcher on Zen 5 does not follow masked loads.
inline void pack32(const float* src, int64_t left, float* dst) {
  for (int v = 0; v < 2; ++v) {
    __mmask16 m = static_cast<__mmask16>((1u << std::clamp<int64_t>(left - 16 * v, 0, 16)) - 1);
    __m512 w = left >= kPanelCols ? _mm512_loadu_ps(src + 16 * v) : _mm512_maskz_loadu_ps(m, src + 16 * v);
    _mm512_store_ps(dst + 16 * v, w);
  }
}
inline void pack32(const uint16_t* src, int64_t left, uint16_t* dst) {
  __mmask32 m = static_cast<__mmask32>((uint64_t{1} << std::clamp<int64_t>(left, 0, 32)) - 1);
  __m512i h = left >= kPanelCols ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi16(m, src);
  _mm512_store_si512(dst, _mm512_permutexvar_epi16(_mm512_load_si512(kPanelOrder.idx), h));
}

// One packed panel row (32 columns) as two f32 vectors in column order.
inline void panel_row(const float* p, __m512 (&w)[2]) { w[0] = _mm512_load_ps(p), w[1] = _mm512_load_ps(p + 16); }
inline void panel_row(const uint16_t* p, __m512 (&w)[2]) {
  __m512i h = _mm512_load_si512(p);
  w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  w[1] = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// y[0:R, 0:width] (row stride n; += when add) = x[0:R, 0:depth] (row stride k) @ one panel [depth, 32], the R x 32
// sums in registers over the whole depth (the classic GEMM micro-kernel: broadcast x[r, kk], FMA the panel row).
template <int R, typename T>
inline void panel_rows(const T* panel, int64_t depth, const float* x, int64_t k, int64_t width, bool add, float* y,
                       int64_t n) {
  __mmask16 m[2];
  for (int v = 0; v < 2; ++v) m[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(width - 16 * v, 0, 16)) - 1);
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 2; ++v) a[r][v] = add ? _mm512_maskz_loadu_ps(m[v], y + r * n + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < depth; ++kk, panel += kPanelCols) {
    __m512 wv[2];
    panel_row(panel, wv);
    for (int r = 0; r < R; ++r) {
      __m512 xb = _mm512_set1_ps(x[r * k + kk]);
      for (int v = 0; v < 2; ++v) a[r][v] = _mm512_fmadd_ps(wv[v], xb, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 2; ++v) _mm512_mask_storeu_ps(y + r * n + 16 * v, m[v], a[r][v]);
  }
}

// panel_rows over all rows, kPanelRows at a time and then the rest.
template <typename T>
void panel_all_rows(const T* panel, int64_t depth, const float* x, int64_t k, int64_t rows, int64_t width, bool add,
                    float* y, int64_t n) {
  int64_t r = 0;
  for (; r + kPanelRows <= rows; r += kPanelRows) {
    panel_rows<kPanelRows>(panel, depth, x + r * k, k, width, add, y + r * n, n);
  }
  x += r * k, y += r * n;
  switch (rows - r) {
    case 7: panel_rows<7>(panel, depth, x, k, width, add, y, n); break;
    case 6: panel_rows<6>(panel, depth, x, k, width, add, y, n); break;
    case 5: panel_rows<5>(panel, depth, x, k, width, add, y, n); break;
    case 4: panel_rows<4>(panel, depth, x, k, width, add, y, n); break;
    case 3: panel_rows<3>(panel, depth, x, k, width, add, y, n); break;
    case 2: panel_rows<2>(panel, depth, x, k, width, add, y, n); break;
    case 1: panel_rows<1>(panel, depth, x, k, width, add, y, n); break;
    default: break;
  }
}

// Prefetches part `i` of `parts` of tile rows [k0, k0 + depth) x columns [c0, c0 + width) of W into L2.
template <typename T>
void prefetch_tile(const Dense<T>& w, int64_t k0, int64_t depth, int64_t c0, int64_t width, int64_t i, int64_t parts) {
  for (int64_t kk = depth * i / parts; kk < depth * (i + 1) / parts; ++kk) {
    const char* row = reinterpret_cast<const char*>(w.w + (k0 + kk) * w.n + c0);
    for (int64_t b = 0; b < width * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
  }
}

// Rows from which dense_tiled pays: bf16 from kTiledRows; f32, whose panels cost a copy that tiles read in place
// do not, from 32 (measured: 0.7x at 12 rows, even at 32, faster from 64).
template <typename T>
constexpr int64_t kPanelMinRows = std::is_same_v<T, float> ? 32 : kTiledRows;

// This thread's packed tile: kChunk / kPanelCols panels of kTileK rows x kPanelCols columns (a function, not
// inlined: one thread-local lookup per call).
template <typename T>
__attribute__((noinline)) T* panel_tile() {
  alignas(64) static thread_local T tile[kChunk / kPanelCols * kTileK * kPanelCols];
  return tile;
}

// Many rows, dense: each kTileK x kChunk tile of the weights is copied (bf16 stays bf16) into 32-column panels, a
// weight row at a time (one run of memory, which the stream prefetcher follows; a panel at a time read 128 rows of
// one line each), and every row multiplies each panel from there, sums in registers; y holds the sums between tiles
// along K. The next tile is prefetched into L2 a slice per panel.
template <typename T>
void dense_tiled(const Dense<T>& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  T* tile = panel_tile<T>();
  for (int64_t c = c0; c < c1; c += kChunk) {
    int64_t width = std::min(kChunk, c1 - c);
    for (int64_t k0 = 0; k0 < w.k; k0 += kTileK) {
      int64_t depth = std::min(kTileK, w.k - k0);
      bool last_k = k0 + kTileK >= w.k;
      int64_t next_c = last_k ? c + kChunk : c, next_k0 = last_k ? 0 : k0 + kTileK;
      int64_t next_depth = next_c < c1 ? std::min(kTileK, w.k - next_k0) : 0;
      int64_t next_width = std::min(kChunk, c1 - next_c), n_panels = (width + kPanelCols - 1) / kPanelCols;
      for (int64_t kk = 0; kk < depth; ++kk) {
        const T* src = w.w + (k0 + kk) * w.n + c;
        for (int64_t b = 0; b < width; b += kPanelCols) {
          pack32(src + b, std::min(kPanelCols, width - b), tile + b * kTileK + kk * kPanelCols);
        }
      }
      for (int64_t b = 0; b < width; b += kPanelCols) {
        prefetch_tile(w, next_k0, next_depth, next_c, next_width, b / kPanelCols, n_panels);
        panel_all_rows(tile + b * kTileK, depth, x + k0, w.k, rows, std::min(kPanelCols, width - b), k0 > 0, y + c + b,
                       w.n);
      }
    }
  }
}
#endif

#ifdef K2JAX_AVX2
// AVX2 + FMA (no AVX-512), dense: 8 columns per vector. Up to kStreamRows rows stream the weights once: one row,
// and rows of a matrix read whole (at most kChunk columns), 4 blocks of K side by side; others a span of K rows at a
// time. More rows widen each tile of the weights to f32 once, panel by panel, and sum 6 rows at a time from it.
constexpr int64_t kSpan2 = 8;         // dense K rows per register pass of span_rows (more, or software prefetch,
                                      // read slower on Zen 3)
constexpr int kStreamRows = 8;        // dense: from more rows, the tiled path
constexpr int64_t kPanelTileK = 128;  // K rows of a widened tile: kPanelTileK x kChunk floats (256 KiB) in L2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

template <typename T>
inline void prefetch_row(const T* p, int64_t cols) {
  for (int64_t b = 0; b < cols * static_cast<int64_t>(sizeof(T)); b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
  }
}

// xt[j * R + r] = x[r, k0 + j] for j < len: the x values a span broadcasts, one line apart at
// most (x's rows lie K floats apart, often a multiple of 4 KiB: the same L1 set).
template <int R>
inline void gather_x(const float* x, int64_t k, int64_t k0, int64_t len, float* xt) {
  for (int64_t j = 0; j < len; ++j) {
    for (int r = 0; r < R; ++r) xt[j * R + r] = x[r * k + k0 + j];
  }
}

// xb[(j * R + r) * 8 + 0..7] = x[r, k0 + j] for j < len: every x value a span multiplies, as a vector that the
// multiply-adds read from L1 (8 rows: 1.2x the rate of broadcasting each from xt as it is needed).
template <int R>
inline void broadcast_x(const float* x, int64_t k, int64_t k0, int64_t len, float* xb) {
  for (int64_t j = 0; j < len; ++j) {
    for (int r = 0; r < R; ++r) _mm256_store_ps(xb + (j * R + r) * 8, _mm256_set1_ps(x[r * k + k0 + j]));
  }
}

// acc[0:R, 0:8V] (row stride kStride) += x[0:R, k0:k0+len] @ W[k0:k0+len, c:c+8V], x broadcast in xb.
template <int R, int V, typename T>
inline void dense_panel(const Dense<T>& w, const float* xb, int64_t k0, int64_t len, int64_t c, float* acc) {
  __m256 a[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) a[r][v] = _mm256_load_ps(acc + r * kStride + 8 * v);
  }
  const T* src = w.w + k0 * w.n + c;
  for (int64_t i = 0; i < len; ++i, src += w.n) {
    for (int v = 0; v < V; ++v) {
      __m256 wv = load8(src + 8 * v);
      for (int r = 0; r < R; ++r) a[r][v] = _mm256_fmadd_ps(_mm256_load_ps(xb + (i * R + r) * 8), wv, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) _mm256_store_ps(acc + r * kStride + 8 * v, a[r][v]);
  }
}

// Vectors per panel for R (2-8) rows in span_rows: R x V sums, R broadcasts and the weights in 16 registers.
template <int R>
constexpr int stream_vectors() { return R == 2 ? 4 : R <= 4 ? 2 : 1; }

// y[0:R, c0:c0+width] = x[0:R] @ W[:, c0:c0+width] (width a multiple of 8, at most stream_chunk(R)): each span of
// kSpan2 adjacent K rows is read across the chunk before the next. For 2-8 rows of a matrix wider than one chunk,
// or of a share of its columns, this reads faster than stream_rows' blocks on Zen 2 (bf16 1024 x 1024, 2 rows: 18
// against 13 GB/s; the small config's native batch-8 step), whole rows of narrower ones slower (bf16 1024 x 512: 11-14
// against 23-26 GB/s; f32: 21 against 34).
template <int R, typename T>
void span_rows(const Dense<T>& w, const float* x, float* y, int64_t c0, int64_t width) {
  constexpr int V = stream_vectors<R>();
  alignas(32) float acc[R][stream_chunk(R) + 24];
  for (int r = 0; r < R; ++r) std::memset(acc[r], 0, sizeof(float) * width);
  alignas(32) float xb[kSpan2 * R * 8];
  for (int64_t s0 = 0; s0 < w.k; s0 += kSpan2) {
    int64_t len = std::min(kSpan2, w.k - s0), c = 0;
    broadcast_x<R>(x, w.k, s0, len, xb);
    for (; c + 8 * V <= width; c += 8 * V) dense_panel<R, V>(w, xb, s0, len, c0 + c, &acc[0][c]);
    for (; c < width; c += 8) dense_panel<R, 1>(w, xb, s0, len, c0 + c, &acc[0][c]);
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * w.n + c0, acc[r], sizeof(float) * width);
}

// K blocks that rows of x read side by side: each a long run of memory, kBlocks2 multiply-adds per row per sum
// loaded and stored. Blocks whose rows lie a multiple of 4 KiB apart share L1 sets: 8 read slower than 4 on Zen 2.
constexpr int kBlocks2 = 4;

// y[0:R, c0:c0+width] = x[0:R] @ W[:, c0:c0+width] (width a multiple of 8, at most stream_chunk(R)): K is cut into
// kBlocks2 blocks whose rows are read side by side, so that each block is one sequential run of memory; the R x
// width sums stay in L1, 16 columns per pass with the blocks' weights in registers. span_rows' spans of adjacent K
// rows start a short run per row and span instead. Two Zen 2 cores, each streaming whole 1024 x 512 matrices (an
// expert's gate) in a scratch harness, spans -> blocks: f32 1 row 24 -> 29-31 GB/s, 2 rows 19-21 -> 34-40; bf16 1
// row 10-15 -> 26-30 (benchmarks/RESULTS.md).
template <int R, typename T>
void stream_rows(const Dense<T>& w, const float* x, float* y, int64_t c0, int64_t width) {
  alignas(32) float acc[R][stream_chunk(R) + 24];
  for (int r = 0; r < R; ++r) std::memset(acc[r], 0, sizeof(float) * width);
  // An odd count of rows per block puts alternate blocks half a 4 KiB page apart when rows take 2 KiB.
  const int64_t per = std::max<int64_t>(w.k / kBlocks2 - (w.k / kBlocks2 % 2 == 0), 0);
  for (int64_t j = 0; j < per; ++j) {
    __m256 xb[kBlocks2][R];  // x broadcast: in registers for one row, else read from L1 by the multiply-adds
    const T* src[kBlocks2];
    for (int b = 0; b < kBlocks2; ++b) {
      for (int r = 0; r < R; ++r) xb[b][r] = _mm256_set1_ps(x[r * w.k + b * per + j]);
      src[b] = w.w + (b * per + j) * w.n + c0;
    }
    int64_t c = 0;
    for (; c + 16 <= width; c += 16) {  // 16 columns: the blocks' 8 weight vectors in registers for every row
      __m256 wv[kBlocks2][2];
      for (int b = 0; b < kBlocks2; ++b) wv[b][0] = load8(src[b] + c), wv[b][1] = load8(src[b] + c + 8);
      for (int r = 0; r < R; ++r) {
        __m256 a0 = _mm256_load_ps(acc[r] + c), a1 = _mm256_load_ps(acc[r] + c + 8);
        for (int b = 0; b < kBlocks2; ++b) {
          a0 = _mm256_fmadd_ps(xb[b][r], wv[b][0], a0);
          a1 = _mm256_fmadd_ps(xb[b][r], wv[b][1], a1);
        }
        _mm256_store_ps(acc[r] + c, a0), _mm256_store_ps(acc[r] + c + 8, a1);
      }
    }
    if (c < width) {
      for (int r = 0; r < R; ++r) {
        __m256 a = _mm256_load_ps(acc[r] + c);
        for (int b = 0; b < kBlocks2; ++b) a = _mm256_fmadd_ps(xb[b][r], load8(src[b] + c), a);
        _mm256_store_ps(acc[r] + c, a);
      }
    }
  }
  for (int64_t k = kBlocks2 * per; k < w.k; ++k) {  // K rows past the blocks
    const T* src = w.w + k * w.n + c0;
    for (int r = 0; r < R; ++r) {
      const __m256 xk = _mm256_set1_ps(x[r * w.k + k]);
      for (int64_t c = 0; c < width; c += 8) {
        _mm256_store_ps(acc[r] + c, _mm256_fmadd_ps(xk, load8(src + c), _mm256_load_ps(acc[r] + c)));
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * w.n + c0, acc[r], sizeof(float) * width);
}

// Floats from one panel of a widened tile to the next: 8 per K row, plus a line so that the panels' rows do not all
// fall in one L1 set.
inline int64_t panel_stride(int64_t rows) { return 8 * rows + 16; }

// Weight rows [step0, step0 + steps) at columns c0..c0+width (a multiple of 8) as f32 in panel order:
// tile[p * panel_stride + 8 j + 0..7] holds columns c0 + 8p.. of K row step0 + j.
// The next tile's rows are prefetched meanwhile (short runs of columns at a stride defeat the hardware's).
template <typename T>
void widen_tile(const Dense<T>& w, int64_t step0, int64_t steps, int64_t c0, int64_t width, float* tile) {
  for (int64_t j = 0; j < steps; ++j) {
    const T* src = w.w + (step0 + j) * w.n + c0;
    prefetch_row(src + steps * w.n, width);
    for (int64_t c = 0; c < width; c += 8) _mm256_store_ps(tile + c / 8 * panel_stride(steps) + 8 * j, load8(src + c));
  }
}
// y[0:R, c:c+8V] (+)= x[0:R] @ V adjacent widened panels of n_rows K rows, x gathered in xt.
template <int R, int V>
inline void tile_panel(const float* panel, int64_t stride, const float* xt, int64_t n_rows, int64_t n, bool add,
                       float* y) {
  __m256 a[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) a[r][v] = add ? _mm256_loadu_ps(y + r * n + 8 * v) : _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < n_rows; ++j) {
    __m256 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm256_load_ps(panel + v * stride + 8 * j);
    for (int r = 0; r < R; ++r) {
      __m256 xb = _mm256_broadcast_ss(xt + j * R + r);
      for (int v = 0; v < V; ++v) a[r][v] = _mm256_fmadd_ps(xb, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + r * n + 8 * v, a[r][v]);
  }
}

// y[0:R, c0:c0+width] (+)= x[0:R] @ the widened tile: 16 columns at a time (R x 2 sums in registers), then 8.
template <int R>
void tile_rows(const float* tile, int64_t k0, int64_t n_rows, const float* x, int64_t k, int64_t n,
               int64_t c0, int64_t width, bool add, float* y) {
  alignas(32) float xt[kPanelTileK * R];
  gather_x<R>(x, k, k0, n_rows, xt);
  const int64_t stride = panel_stride(n_rows);
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) tile_panel<R, 2>(tile + c / 8 * stride, stride, xt, n_rows, n, add, y + c0 + c);
  if (c < width) tile_panel<R, 1>(tile + c / 8 * stride, stride, xt, n_rows, n, add, y + c0 + c);
}

// fn(std::integral_constant<int, rows>{}) for 1 <= rows <= kMax: a runtime row count to a template one.
template <int kMax, typename F>
inline void with_rows(int64_t rows, F fn) {
  if constexpr (kMax > 0) {
    if (rows == kMax) return fn(std::integral_constant<int, kMax>{});
    with_rows<kMax - 1>(rows, fn);
  }
}

// This thread's widened tile (a function, not inlined: one thread-local lookup per call).
__attribute__((noinline)) float* tile_buffer() {
  alignas(32) static thread_local float tile[kChunk / 8 * (8 * kPanelTileK + 16)];
  return tile;
}

// Many rows: each tile of kPanelTileK K rows x kChunk columns is widened once and kept in L2 while every
// block of 6 rows sums it, 16 columns at a time in registers.
template <typename T>
void tiled_rows(const Dense<T>& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  float* tile = tile_buffer();
  for (int64_t c = c0; c < c1; c += kChunk) {
    int64_t width = std::min(kChunk, c1 - c);
    for (int64_t step0 = 0; step0 < w.k; step0 += kPanelTileK) {
      int64_t n_rows = std::min(kPanelTileK, w.k - step0);
      widen_tile(w, step0, n_rows, c, width, tile);
      bool add = step0 > 0;
      for (int64_t r = 0; r < rows; r += 6) {
        with_rows<6>(std::min<int64_t>(6, rows - r), [&](auto R) {
          tile_rows<decltype(R)::value>(tile, step0, n_rows, x + r * w.k, w.k, w.n, c, width, add, y + r * w.n);
        });
      }
    }
  }
}

// All rows times columns [c0, c1) (a multiple of 8 wide): few rows stream the weights, many take the tiled path.
template <typename T>
void group_columns_avx2(const Dense<T>& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  if (rows > kStreamRows) return tiled_rows(w, x, rows, y, c0, c1);
  for (int64_t c = c0, chunk = stream_chunk(rows); c < c1; c += chunk) {
    int64_t width = std::min(chunk, c1 - c);
    with_rows<kStreamRows>(rows, [&](auto R) {
      constexpr int kRows = decltype(R)::value;
      if constexpr (kRows == 1) stream_rows<1>(w, x, y, c, width);
      else if (width == w.n) stream_rows<kRows>(w, x, y, c, width);
      else span_rows<kRows>(w, x, y, c, width);
    });
  }
}
#endif

// All rows of one expert group times its matrix, for columns [c0, c1).
template <typename W>
void group_columns(const W& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
#ifdef K2JAX_AVX512
  if constexpr (W::kRowsPerStep == 1) {  // dense
    if (rows >= kPanelMinRows<typename W::Row>) return dense_tiled(w, x, rows, y, c0, c1);
    while (int64_t done = rows > 0 && rows < kTiledRows ? dense_rows_in_registers(w, x, rows, y, c0, c1) : 0) {
      x += done * w.k, y += done * w.n, rows -= done;
    }
  }
#elif defined(K2JAX_AVX2)
  if constexpr (W::kRowsPerStep == 1) {  // dense; the last columns short of a vector below
    int64_t c8 = c0 + (c1 - c0) / 8 * 8;
    group_columns_avx2(w, x, rows, y, c0, c8);
    if ((c0 = c8) == c1) return;
  }
#endif
  if (rows >= kTiledRows) return group_columns_tiled(w, x, rows, y, c0, c1);
  for (int64_t c = c0; c < c1; c += kChunk) {
    int64_t width = std::min(kChunk, c1 - c);
    int64_t r = 0;
    for (; r + kMaxRows <= rows; r += kMaxRows) block<kMaxRows>(w, x + r * w.k, c, width, y + r * w.n);
    switch (rows - r) {
      case 3: block<3>(w, x + r * w.k, c, width, y + r * w.n); break;
      case 2: block<2>(w, x + r * w.k, c, width, y + r * w.n); break;
      case 1: block<1>(w, x + r * w.k, c, width, y + r * w.n); break;
      default: break;
    }
  }
}


#ifdef K2JAX_INT4_DOT
constexpr int64_t kDotCols = 64;       // columns per INT4 dot block: one 64-byte load per packed row
constexpr int64_t kDotTiledRows = 3;   // from this many rows, nibbles are split once for all rows (dot_tiled)
constexpr int64_t kDotTiledCols = 256;  // columns per split span: 16 KiB of nibbles in L1
constexpr int64_t kDotRowBlock = 128;   // rows whose sums (128 KiB) stay in L2 over all spans
constexpr int64_t kCorrK = 16;         // K values per offset correction (the smallest planar half-block)

// Rows of x quantized to int8 per 32-wide K group, as llama.cpp's Q8_0: q = round(x / d), d = max|x| / 127
// (NaN kept, so it reaches the output); corr[r, k / 16] = -8 * 16 * sum of those 16 q (undoes q = nibble - 8
// for the high nibbles, which the dot reads 16 times too large, and /16 for the low nibbles).
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> corr;
  int64_t k;
  QuantRows(const float* x, int64_t rows, int64_t k) : q(rows * k), d(rows * k / kGroup), corr(rows * k / kCorrK), k(k) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t g = 0; g < rows * k / kGroup; ++g) {
      const float* xg = x + g * kGroup;
      __m512 a = _mm512_andnot_ps(sign, _mm512_loadu_ps(xg)), b = _mm512_andnot_ps(sign, _mm512_loadu_ps(xg + 16));
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
      if (_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)) amax = std::numeric_limits<float>::quiet_NaN();
      d[g] = amax / 127;
      __m512 inv = _mm512_set1_ps(amax > 0 ? 127 / amax : 0.0f);
      for (int half = 0; half < 2; ++half) {
        __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + 16 * half), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&q[g * kGroup + 16 * half]), _mm512_cvtsepi32_epi8(qi));
        corr[2 * g + half] = -8 * 16 * _mm512_reduce_add_epi32(qi);
      }
    }
  }
  int32_t corr_of(int64_t r, int64_t k0, int64_t len) const {
    int32_t c = 0;
    for (int64_t i = 0; i < len / kCorrK; ++i) c += corr[(r * k + k0) / kCorrK + i];
    return c;
  }
};

// Word indices for permuted_scales: f32 lane j of output i takes bf16 column 16 (j / 4) + 4 i + j % 4.
struct ScaleOrder {
  alignas(64) int16_t idx[4][32] = {};
  constexpr ScaleOrder() {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 16; ++j) idx[i][2 * j + 1] = static_cast<int16_t>(16 * (j / 4) + 4 * i + j % 4);
    }
  }
};
constexpr ScaleOrder kScaleOrder;

// Bf16 scales of columns c0 + {0..3, 16..19, 32..35, 48..51} + 4 * i (the order of dot_block's sums) as f32.
inline void permuted_scales(const uint16_t* s, __mmask64 cols, __m512 (&out)[4]) {
  __m512i a = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(cols), s);
  __m512i b = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(cols >> 32), s + 32);
  for (int i = 0; i < 4; ++i) {
    __m512i idx = _mm512_load_si512(kScaleOrder.idx[i]);
    out[i] = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi16(0xAAAAAAAA, a, idx, b));
  }
}

// The first `left` of a block's 64 columns (all from 64 on).
inline __mmask64 first_cols(int64_t left) { return left >= kDotCols ? ~__mmask64{0} : (__mmask64{1} << left) - 1; }

// Low nibbles (as is) and high nibbles (masked in place, so 16 times too large) of 4 packed rows at src (row
// stride n) x 64 columns, transposed in registers so that every 32-bit lane holds 4 K values of one column: lane L
// of vector i holds columns 16 L + 4 i + (0..3).
inline void split_nibbles(const uint8_t* src, int64_t n, __mmask64 cols, __m512i (&lo)[4], __m512i (&hi)[4]) {
  const __m512i lo_mask = _mm512_set1_epi8(0x0F), hi_mask = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512i b0 = _mm512_maskz_loadu_epi8(cols, src), b1 = _mm512_maskz_loadu_epi8(cols, src + n);
  __m512i b2 = _mm512_maskz_loadu_epi8(cols, src + 2 * n), b3 = _mm512_maskz_loadu_epi8(cols, src + 3 * n);
  __m512i p01 = _mm512_unpacklo_epi8(b0, b1), q01 = _mm512_unpackhi_epi8(b0, b1);
  __m512i p23 = _mm512_unpacklo_epi8(b2, b3), q23 = _mm512_unpackhi_epi8(b2, b3);
  __m512i t[4] = {_mm512_unpacklo_epi16(p01, p23), _mm512_unpackhi_epi16(p01, p23),
                  _mm512_unpacklo_epi16(q01, q23), _mm512_unpackhi_epi16(q01, q23)};
  for (int i = 0; i < 4; ++i) lo[i] = _mm512_and_si512(t[i], lo_mask), hi[i] = _mm512_and_si512(t[i], hi_mask);
}

// Block [c0, c0 + 64) of acc[0:R] += the int8 x rows r0.. times packed rows [h0, h0 + span), whose nibbles
// nibbles.multiply takes 4 packed rows at a time (split as split_nibbles splits them): low and high nibbles multiply
// x's int8 with VNNI, and the integer sums become float once, times scale * d. Lane L of acc block i holds columns
// 16 L + 4 i + (0..3). The span is a template argument so that the loop unrolls whole and the sums stay in registers.
template <int R, int64_t span, typename Nibbles>
inline void dot_span_of(const Int4& w, const QuantRows& xq, int64_t r0, int64_t h0, int64_t c0, __mmask64 cols,
                        float* acc, int64_t acc_stride, Nibbles nibbles) {
  const int64_t k_lo = w.k_of(h0, 0), k_hi = w.k_of(h0, 1);
  __m512i lo[R][4], hi[R][4];
  const int8_t* q_lo[R];
  const int8_t* q_hi[R];
  for (int r = 0; r < R; ++r) {
    __m512i c_lo = _mm512_set1_epi32(xq.corr_of(r0 + r, k_lo, span) / 16);
    __m512i c_hi = _mm512_set1_epi32(xq.corr_of(r0 + r, k_hi, span));
    for (int i = 0; i < 4; ++i) lo[r][i] = c_lo, hi[r][i] = c_hi;
    q_lo[r] = xq.q.data() + (r0 + r) * w.k + k_lo;
    q_hi[r] = xq.q.data() + (r0 + r) * w.k + k_hi;
  }
  for (int64_t h = 0; h < span; h += 4) {
    __m512i x_lo[R], x_hi[R];
    for (int r = 0; r < R; ++r) {
      int32_t a, b;
      std::memcpy(&a, q_lo[r] + h, 4);
      std::memcpy(&b, q_hi[r] + h, 4);
      x_lo[r] = _mm512_set1_epi32(a), x_hi[r] = _mm512_set1_epi32(b);
    }
    nibbles.template multiply<R>(h, x_lo, x_hi, lo, hi);
  }
  for (int64_t k : {k_lo, k_hi}) {
    for (int j = 0; j < 2; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w.scale + ((k + span) / kGroup) * w.n + c0 + 32 * j), _MM_HINT_T1);
    }
  }
  __m512 s_lo[4], s_hi[4];
  permuted_scales(w.scale + (k_lo / kGroup) * w.n + c0, cols, s_lo);
  permuted_scales(w.scale + (k_hi / kGroup) * w.n + c0, cols, s_hi);
  for (int r = 0; r < R; ++r) {
    __m512 d_lo = _mm512_set1_ps(xq.d[((r0 + r) * w.k + k_lo) / kGroup]);
    __m512 d_hi = _mm512_set1_ps(xq.d[((r0 + r) * w.k + k_hi) / kGroup] / 16);
    for (int i = 0; i < 4; ++i) {
      float* a = acc + r * acc_stride + 16 * i;
      __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[r][i]), _mm512_mul_ps(s_lo[i], d_lo), _mm512_load_ps(a));
      _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r][i]), _mm512_mul_ps(s_hi[i], d_hi), sum));
    }
  }
}

// dot_span_of for a span of 32 or 16 packed rows (Int4::group_span: half of a planar block of 32+ rows, at most
// one scale group).
template <int R, typename Nibbles>
inline void dot_span(const Int4& w, const QuantRows& xq, int64_t r0, int64_t h0, int64_t span, int64_t c0,
                     __mmask64 cols, float* acc, int64_t acc_stride, Nibbles nibbles) {
  if (span == kGroup) return dot_span_of<R, kGroup>(w, xq, r0, h0, c0, cols, acc, acc_stride, nibbles);
  dot_span_of<R, kGroup / 2>(w, xq, r0, h0, c0, cols, acc, acc_stride, nibbles);
}

// Nibbles for dot_span straight from the packed rows at src (row stride n), the next span prefetched into L2 as
// they go (on one Zen 4 core 1.2-1.6x the rate of prefetching into L1 for 1-8 rows).
struct StreamedNibbles {
  const uint8_t* src;
  int64_t n, span;
  __mmask64 cols;
  void split(int64_t h, __m512i (&lo)[4], __m512i (&hi)[4]) const {
    const uint8_t* p = src + h * n;
    for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(p + (span + j) * n), _MM_HINT_T1);
    split_nibbles(p, n, cols, lo, hi);
  }
  // sums_lo[r][i] += packed rows [h, h + 4)'s low nibbles (vector i) times x_lo[r]; the high ones likewise.
  template <int R>
  void multiply(int64_t h, const __m512i (&x_lo)[R], const __m512i (&x_hi)[R], __m512i (&sums_lo)[R][4],
                __m512i (&sums_hi)[R][4]) const {
    __m512i lo[4], hi[4];
    split(h, lo, hi);
    for (int i = 0; i < 4; ++i) {
      for (int r = 0; r < R; ++r) {
        sums_lo[r][i] = _mm512_dpbusd_epi32(sums_lo[r][i], lo[i], x_lo[r]);
        sums_hi[r][i] = _mm512_dpbusd_epi32(sums_hi[r][i], hi[i], x_hi[r]);
      }
    }
  }
  // Every 4 packed rows' nibbles in buf: 8 vectors each, the low nibbles' first (BufferedNibbles reads them).
  void store(__m512i* buf) const {
    for (int64_t h = 0; h < span; h += 4) {
      __m512i lo[4], hi[4];
      split(h, lo, hi);
      for (int i = 0; i < 4; ++i) _mm512_store_si512(buf + 2 * h + i, lo[i]);
      for (int i = 0; i < 4; ++i) _mm512_store_si512(buf + 2 * h + 4 + i, hi[i]);
    }
  }
};

// Nibbles for dot_span that StreamedNibbles::store kept in buf.
struct BufferedNibbles {
  const __m512i* buf;
  // As StreamedNibbles::multiply, each nibble vector loaded where it is used (few registers live).
  template <int R>
  void multiply(int64_t h, const __m512i (&x_lo)[R], const __m512i (&x_hi)[R], __m512i (&sums_lo)[R][4],
                __m512i (&sums_hi)[R][4]) const {
    const __m512i* v = buf + h * 2;
    for (int i = 0; i < 4; ++i) {
      __m512i lo = _mm512_load_si512(v + i);
      for (int r = 0; r < R; ++r) sums_lo[r][i] = _mm512_dpbusd_epi32(sums_lo[r][i], lo, x_lo[r]);
      __m512i hi = _mm512_load_si512(v + 4 + i);
      for (int r = 0; r < R; ++r) sums_hi[r][i] = _mm512_dpbusd_epi32(sums_hi[r][i], hi, x_hi[r]);
    }
  }
};

// Columns [c0, c0 + width) of block at 64 columns, lanes in dot_span's order, stored in column order.
inline void store_permuted(const float* acc, float* y, int64_t width) {
  for (int64_t c = 0; c < width; c += kDotCols) {
    const float* v = acc + c;
    __m512 a0 = _mm512_load_ps(v), a1 = _mm512_load_ps(v + 16), a2 = _mm512_load_ps(v + 32), a3 = _mm512_load_ps(v + 48);
    __m512 a = _mm512_shuffle_f32x4(a0, a1, 0x44), b = _mm512_shuffle_f32x4(a0, a1, 0xEE);
    __m512 p = _mm512_shuffle_f32x4(a2, a3, 0x44), q = _mm512_shuffle_f32x4(a2, a3, 0xEE);
    __m512 out[4] = {_mm512_shuffle_f32x4(a, p, 0x88), _mm512_shuffle_f32x4(a, p, 0xDD),
                     _mm512_shuffle_f32x4(b, q, 0x88), _mm512_shuffle_f32x4(b, q, 0xDD)};
    for (int i = 0; i < 4; ++i) {
      int64_t left = std::clamp<int64_t>(width - c - 16 * i, 0, 16);
      _mm512_mask_storeu_ps(y + c + 16 * i, static_cast<__mmask16>((1u << left) - 1), out[i]);
    }
  }
}

// y[0:R, c0:c0+width] = x[0:R] @ W[:, c0:c0+width] (width <= stream_chunk(R)) from int8 x. Each span of packed rows is
// read across the whole chunk before the next (contiguous runs of memory), accumulating R x width floats in L1.
template <int R>
void dot_chunk(const Int4& w, const QuantRows& xq, int64_t r0, int64_t c0, int64_t width, float* y) {
  constexpr int64_t kWidth = stream_chunk(R);
  alignas(64) float acc[R][kWidth];
  std::memset(acc, 0, sizeof(acc));
  const int64_t span = w.group_span();
  for (int64_t h0 = 0; h0 < w.k / 2; h0 += span) {
    for (int64_t c = 0; c < width; c += kDotCols) {
      __mmask64 cols = first_cols(width - c);
      StreamedNibbles nibbles{w.packed + h0 * w.n + c0 + c, w.n, span, cols};
      dot_span<R>(w, xq, r0, h0, span, c0 + c, cols, &acc[0][c], kWidth, nibbles);
    }
  }
  for (int r = 0; r < R; ++r) store_permuted(acc[r], y + (r0 + r) * w.n + c0, width);
}

// Scratch of dot_tiled (a function, not inlined: one thread-local lookup per call): each span's split nibbles
// for kDotTiledCols columns, and a block of rows' sums in dot_span's lane order.
struct DotTiles {
  alignas(64) __m512i nibbles[kDotTiledCols / kDotCols * kGroup / 4 * 8];
  alignas(64) float acc[kDotRowBlock][kDotTiledCols];
};
__attribute__((noinline)) DotTiles& dot_tiles() {
  static thread_local DotTiles tiles;
  return tiles;
}

// Many rows: each span of packed rows is split (split_nibbles) once per kDotTiledCols columns into an L1 buffer
// that every pair of a block of kDotRowBlock rows multiplies; the block's sums stay in L2 until the last span.
void dot_tiled(const Int4& w, const QuantRows& xq, int64_t rows, int64_t c0, int64_t c1, float* y) {
  DotTiles& tiles = dot_tiles();
  const int64_t span = w.group_span();
  for (int64_t c = c0; c < c1; c += kDotTiledCols) {
    const int64_t width = std::min(kDotTiledCols, c1 - c), blocks = (width + kDotCols - 1) / kDotCols;
    const int64_t block_vectors = span / 4 * 8;
    for (int64_t r0 = 0; r0 < rows; r0 += kDotRowBlock) {
      const int64_t block_rows = std::min(kDotRowBlock, rows - r0);
      for (int64_t r = 0; r < block_rows; ++r) std::memset(tiles.acc[r], 0, sizeof(float) * blocks * kDotCols);
      for (int64_t h0 = 0; h0 < w.k / 2; h0 += span) {
        for (int64_t b = 0; b < blocks; ++b) {
          StreamedNibbles from{w.packed + h0 * w.n + c + b * kDotCols, w.n, span, first_cols(width - b * kDotCols)};
          from.store(tiles.nibbles + b * block_vectors);
        }
        for (int64_t b = 0; b < blocks; ++b) {
          __mmask64 cols = first_cols(width - b * kDotCols);
          BufferedNibbles nibbles{tiles.nibbles + b * block_vectors};
          int64_t r = 0;
          for (; r + 2 <= block_rows; r += 2) {
            dot_span<2>(w, xq, r0 + r, h0, span, c + b * kDotCols, cols, &tiles.acc[r][b * kDotCols], kDotTiledCols,
                        nibbles);
          }
          if (r < block_rows) {
            dot_span<1>(w, xq, r0 + r, h0, span, c + b * kDotCols, cols, &tiles.acc[r][b * kDotCols], kDotTiledCols,
                        nibbles);
          }
        }
      }
      for (int64_t r = 0; r < block_rows; ++r) store_permuted(tiles.acc[r], y + (r0 + r) * w.n + c, width);
    }
  }
}

// INT4 groups: x quantized once; fewer than kDotTiledRows rows stream the weights 2 rows at a time, a chunk of
// stream_chunk(rows) columns at a time; more take dot_tiled.
void group_columns(const Int4& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  QuantRows xq(x, rows, w.k);
  if (rows >= kDotTiledRows) return dot_tiled(w, xq, rows, c0, c1, y);
  for (int64_t c = c0, chunk = stream_chunk(rows); c < c1; c += chunk) {
    int64_t width = std::min(chunk, c1 - c);
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) dot_chunk<2>(w, xq, r, c, width, y);
    if (r < rows) dot_chunk<1>(w, xq, r, c, width, y);
  }
}
#elif defined(K2JAX_AVX2)
// INT4 without VNNI: x rounded to int8 per 32 values of K as on the VNNI path, nibble x int8 products summed in
// 16-bit lanes by vpmaddubsw (two products per lane), which AVX2 runs at several times the rate of float FMAs.
constexpr int64_t kQuadCols = 32;     // columns per packed byte vector
constexpr int kInt4StreamRows = 4;    // rows of x per pass of int4_stream over the weights (more spill registers)
constexpr int kInt4StreamPasses = 3;  // passes up to which rows stream (1.1-1.5x the tiled path's rate at 5-12
                                      // rows); more rows take the tiled path (as fast at 16, faster from 24)
constexpr int kInt4TileRows = 6;      // rows per tile micro-kernel: 6 x 2 vectors of sums in registers
constexpr int64_t kInt4TileSteps = 128;  // packed rows per tile: 2 x 64 KiB of nibbles at 512 columns, in L2

// Rows of x as int8 per 32 values of K (llama.cpp's Q8_0): q = round(x / d), d = max|x| / 127; a group holding
// NaN or inf gets d = NaN (its row's outputs are NaN; its q are 0, or -128 where x was not finite).
// lanes[r, k / 16] holds, for that block of 16 q, -8 times the sum of the q at K offsets 0-1 mod 4 (low 16 bits)
// and 2-3 mod 4 (high 16 bits): the starting value of the two 16-bit sums per column that vpmaddubsw fills from
// 4 packed rows, which read nibbles as q + 8.
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> lanes;
  int64_t k;
  QuantX(const float* x, int64_t rows, int64_t k) : q(rows * k), d(rows * k / kGroup), lanes(rows * k / 16), k(k) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < rows * k / kGroup; ++g) {
      const float* xg = x + g * kGroup;
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 v[4], m = _mm256_setzero_ps();
      int nan = 0;
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xg + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
      }
      m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
      m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
      float amax = _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1))));
      bool finite = !nan && amax <= std::numeric_limits<float>::max();
      d[g] = finite ? amax / 127 : std::numeric_limits<float>::quiet_NaN();
      __m256 inv = _mm256_set1_ps(finite && amax > 0 ? 127 / amax : 0.0f);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      __m256i qv = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + g * kGroup), qv);
      // per 16 q: sums at offsets 0-1 and 2-3 mod 4 as the two 16-bit halves of every 32-bit lane, times -8
      __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), qv);
      pairs = _mm256_add_epi16(pairs, _mm256_shuffle_epi32(pairs, 0x4E));
      pairs = _mm256_add_epi16(pairs, _mm256_shuffle_epi32(pairs, 0xB1));
      pairs = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(pairs, 3));
      lanes[2 * g] = _mm256_extract_epi32(pairs, 0), lanes[2 * g + 1] = _mm256_extract_epi32(pairs, 4);
    }
  }
  // The starting lanes for K values [k0, k0 + len) of row r (len 16 or 32, k0 a multiple of 16), as the two 16-bit
  // halves of one 32-bit lane: at most 8 * 128 * 16 in each half, as is every partial sum after (|nibble - 8| <= 8),
  // within int16.
  int32_t start_halves(int64_t r, int64_t k0, int64_t len) const {
    int32_t a = lanes[(r * k + k0) / 16];
    if (len > 16) {
      int32_t b = lanes[(r * k + k0) / 16 + 1];
      a = static_cast<int32_t>((static_cast<uint32_t>((a >> 16) + (b >> 16)) << 16) |
                               ((static_cast<int16_t>(a) + static_cast<int16_t>(b)) & 0xFFFF));
    }
    return a;
  }
  __m256i start(int64_t r, int64_t k0, int64_t len) const { return _mm256_set1_epi32(start_halves(r, k0, len)); }
  // One 16-bit sum per column (int4_stream): the two halves added, -8 times the sum of the q, at most 8 * 127 * 32.
  __m256i start16(int64_t r, int64_t k0, int64_t len) const {
    int32_t a = start_halves(r, k0, len);
    return _mm256_set1_epi16(static_cast<int16_t>(static_cast<int16_t>(a) + (a >> 16)));
  }
  __m256i pair(int64_t r, int64_t k0) const {  // q[r, k0:k0+2] in every 16-bit lane
    int16_t v;
    std::memcpy(&v, q.data() + r * k + k0, 2);
    return _mm256_set1_epi16(v);
  }
  __m256i quad(int64_t r, int64_t k0) const {  // q[r, k0:k0+4] in every 32-bit lane
    int32_t v;
    std::memcpy(&v, q.data() + r * k + k0, 4);
    return _mm256_set1_epi32(v);
  }
  float scale(int64_t r, int64_t k0) const { return d[(r * k + k0) / kGroup]; }
};

// 4 packed rows at src (row stride n) x 32 columns, transposed: every 32-bit lane holds the 4 rows' bytes of one
// column, lane L of t[i] column 8i + L, in order.
inline void transpose_quad(const uint8_t* src, int64_t n, __m256i (&t)[4]) {
  auto row = [&](int j) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * n)); };
  __m256i b0 = row(0), b1 = row(1), b2 = row(2), b3 = row(3);
  __m256i p01 = _mm256_unpacklo_epi8(b0, b1), q01 = _mm256_unpackhi_epi8(b0, b1);
  __m256i p23 = _mm256_unpacklo_epi8(b2, b3), q23 = _mm256_unpackhi_epi8(b2, b3);
  // per 128-bit half: columns 0-3 | 4-7 | 8-11 | 12-15 (of that half's 16)
  __m256i a = _mm256_unpacklo_epi16(p01, p23), b = _mm256_unpackhi_epi16(p01, p23);
  __m256i c = _mm256_unpacklo_epi16(q01, q23), e = _mm256_unpackhi_epi16(q01, q23);
  t[0] = _mm256_permute2x128_si256(a, b, 0x20), t[1] = _mm256_permute2x128_si256(c, e, 0x20);
  t[2] = _mm256_permute2x128_si256(a, b, 0x31), t[3] = _mm256_permute2x128_si256(c, e, 0x31);
}

// y[0:8] += the 16-bit pair sums of 8 columns (per 32-bit lane) times d times their scales.
inline void add_scaled(__m256i sums, __m256 scale, float d, float* y) {
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sums, _mm256_set1_epi16(1))), _mm256_set1_ps(d));
  _mm256_storeu_ps(y, _mm256_fmadd_ps(v, scale, _mm256_loadu_ps(y)));
}

// y[0:8] and y[16:24] += 16 columns' 16-bit sums (columns 0-7 and 16-23 of 32, as vpunpck*bw orders them) times d
// times their scales.
inline void add_scaled16(__m256i sums, const uint16_t* scale, float d, float* y) {
  const __m256 dv = _mm256_set1_ps(d);
  __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sums)));
  __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sums, 1)));
  _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_mul_ps(a, dv), load8(scale), _mm256_loadu_ps(y)));
  _mm256_storeu_ps(y + 16, _mm256_fmadd_ps(_mm256_mul_ps(b, dv), load8(scale + 16), _mm256_loadu_ps(y + 16)));
}

constexpr int64_t kInt4StreamCols = 2048;  // columns per chunk of int4_stream: R x 2 x 4 KiB of sums

// sums[r][s][0:width] += packed rows [0, 4) at src, their low (s = 0) and high (s = 1) nibbles times x's pairs of K
// values xp[r][s] (for rows 0-1 and 2-3). Bytes of 2 adjacent rows are interleaved, so every 16-bit lane holds 2 K
// values of one column for vpmaddubsw: a third of the shuffles of a 4-row transpose. Each step fetches 2 cache lines
// of rows [8, 12) ahead with kHint, in address order when the chunk holds whole rows (the 4 rows are one run of
// memory: 1.2-1.3x the rate of fetching row by row from DRAM), else rows 8-9 and 10-11 of 64 columns on alternate
// steps. Unconditional: GCC 12.2 emitted none of them while they sat under a branch in this loop.
template <int R, _mm_hint kHint>
inline void int4_quad_rows(const Int4& w, const uint8_t* src, int64_t width, const __m256i (&xp)[R][2][2],
                           int16_t (&sums)[R][2][kInt4StreamCols]) {
  const __m256i mask = _mm256_set1_epi8(15);
  const bool whole = width == w.n;
  const int64_t next = whole ? 64 : w.n;
  for (int64_t v = 0; v < width; v += 32) {
    const char* ahead = reinterpret_cast<const char*>(whole ? src + 8 * w.n + 4 * v
                                                            : src + (8 + (v & 32) / 16) * w.n + (v & ~63));
    _mm_prefetch(ahead, kHint), _mm_prefetch(ahead + next, kHint);
    auto row = [&](int j) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j * w.n + v)); };
    const __m256i b0 = row(0), b1 = row(1), b2 = row(2), b3 = row(3);
    // pairs[i]: columns 0-7 and 16-23 (i even) or 8-15 and 24-31 (i odd) of rows 0, 1 (i < 2) or 2, 3
    const __m256i pairs[4] = {_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1),
                              _mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3)};
    __m256i nib[2][4];
    for (int i = 0; i < 4; ++i) {
      nib[0][i] = _mm256_and_si256(pairs[i], mask);
      nib[1][i] = _mm256_and_si256(_mm256_srli_epi16(pairs[i], 4), mask);
    }
    for (int r = 0; r < R; ++r) {
      for (int s = 0; s < 2; ++s) {
        for (int i = 0; i < 2; ++i) {
          __m256i* acc = reinterpret_cast<__m256i*>(sums[r][s] + v + 16 * i);
          __m256i add = _mm256_add_epi16(_mm256_maddubs_epi16(nib[s][i], xp[r][s][0]),
                                         _mm256_maddubs_epi16(nib[s][i + 2], xp[r][s][1]));
          _mm256_store_si256(acc, _mm256_add_epi16(_mm256_load_si256(acc), add));
        }
      }
    }
  }
}

// Few rows: y[r0:r0+R, c0:c1] = x[r0:r0+R] @ W[:, c0:c1] (c1 - c0 a multiple of 32), the packed rows read in
// order, 4 side by side across a chunk of columns (each a sequential run, which the hardware prefetcher follows);
// one 16-bit sum per column and scale group stays in L1 (at most 32 * 8 * 127 in magnitude, as is every partial sum:
// it starts at -8 times the group's sum of q, and each product adds nibble x q).
template <int R>
void int4_stream(const Int4& w, const QuantX& xq, int64_t r0, float* y, int64_t c0, int64_t c1) {
  alignas(32) int16_t sums[R][2][kInt4StreamCols];  // per row of x: the low and high nibbles' scale groups
  const int64_t span = w.group_span();
  for (int64_t c = c0; c < c1; c += kInt4StreamCols) {
    const int64_t width = std::min(kInt4StreamCols, c1 - c);
    for (int64_t h0 = 0; h0 < w.k / 2; h0 += span) {
      const int64_t k[2] = {w.k_of(h0, 0), w.k_of(h0, 1)};
      for (int r = 0; r < R; ++r) {
        for (int s = 0; s < 2; ++s) {
          const __m256i start = xq.start16(r0 + r, k[s], span);
          for (int64_t v = 0; v < width; v += 16) _mm256_store_si256(reinterpret_cast<__m256i*>(sums[r][s] + v), start);
        }
      }
      for (int64_t h = 0; h < span; h += 4) {
        __m256i xp[R][2][2];
        for (int r = 0; r < R; ++r) {
          for (int s = 0; s < 2; ++s) {
            xp[r][s][0] = xq.pair(r0 + r, k[s] + h), xp[r][s][1] = xq.pair(r0 + r, k[s] + h + 2);
          }
        }
        const uint8_t* src = w.packed + (h0 + h) * w.n + c;
        if (w.past_caches) {
          int4_quad_rows<R, _MM_HINT_NTA>(w, src, width, xp, sums);
        } else {
          int4_quad_rows<R, _MM_HINT_T0>(w, src, width, xp, sums);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int s = 0; s < 2; ++s) {
          const uint16_t* scale = w.scale + (k[s] / kGroup) * w.n + c;
          const float d = xq.scale(r0 + r, k[s]);
          for (int64_t v = 0; v < width; v += 16) {
            const int64_t col = v / 32 * 32 + (v / 16 % 2) * 8;  // where this vector's first column lies
            add_scaled16(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r][s] + v)), scale + col, d,
                         y + (r0 + r) * w.n + c + col);
          }
        }
      }
    }
  }
}

// A tile of packed rows [h0, h0 + steps) x columns [c0, c0 + width) as nibbles 0-15, one byte each: segment 2j
// holds span j's low nibbles, 2j + 1 its high ones; in a segment, quad s (packed rows 4s..4s+3) and vector v
// (columns 8v..8v+7) are at ((segment * quads + s) * vectors + v) * 32, one column per 32-bit lane.
void fill_int4_tile(const Int4& w, int64_t h0, int64_t steps, int64_t span, int64_t c0, int64_t width,
                    uint8_t* tile) {
  const __m256i mask = _mm256_set1_epi8(15);
  const int64_t quads = span / 4, vectors = width / 8;
  for (int64_t h = 0; h < steps; h += 4) {
    int64_t j = h / span, s = h % span / 4;
    const uint8_t* src = w.packed + (h0 + h) * w.n + c0;
    prefetch_row(src + steps * w.n, width);
    uint8_t* lo = tile + ((2 * j * quads + s) * vectors) * 32;
    uint8_t* hi = lo + quads * vectors * 32;
    for (int64_t c = 0; c < width; c += kQuadCols, lo += 128, hi += 128) {
      __m256i t[4];
      transpose_quad(src + c, w.n, t);
      for (int i = 0; i < 4; ++i) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lo + 32 * i), _mm256_and_si256(t[i], mask));
        _mm256_store_si256(reinterpret_cast<__m256i*>(hi + 32 * i), _mm256_and_si256(_mm256_srli_epi16(t[i], 4), mask));
      }
    }
  }
}

// y[0:R, c:c+16] += x[r0:r0+R, k0:k0+4*quads] @ one tile segment's 2 vectors (seg: quad stride `stride` bytes), R x 2
// sums in registers, then times the segment's scales (group k0 / 32).
template <int R>
inline void int4_tile_panel(const uint8_t* seg, int64_t stride, int64_t quads, const QuantX& xq, int64_t r0,
                            int64_t k0, const uint16_t* scale, float* y, int64_t n) {
  __m256i a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = xq.start(r0 + r, k0, 4 * quads);
  for (int64_t s = 0; s < quads; ++s, seg += stride) {
    __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(seg));
    __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(seg + 32));
    for (int r = 0; r < R; ++r) {
      __m256i xb = xq.quad(r0 + r, k0 + 4 * s);
      a[r][0] = _mm256_add_epi16(a[r][0], _mm256_maddubs_epi16(w0, xb));
      a[r][1] = _mm256_add_epi16(a[r][1], _mm256_maddubs_epi16(w1, xb));
    }
  }
  __m256 s0 = load8(scale), s1 = load8(scale + 8);
  for (int r = 0; r < R; ++r) {
    float d = xq.scale(r0 + r, k0);
    add_scaled(a[r][0], s0, d, y + r * n);
    add_scaled(a[r][1], s1, d, y + r * n + 8);
  }
}

// This thread's INT4 tile (a function, not inlined: one thread-local lookup per call).
__attribute__((noinline)) uint8_t* int4_tile_buffer() {
  alignas(32) static thread_local uint8_t tile[2 * kInt4TileSteps * kChunk];
  return tile;
}

// Many rows: y[0:rows, c0:c1] = x @ W[:, c0:c1] (c1 - c0 a multiple of 32); each tile of packed rows is
// transposed and split into nibbles once, then every block of 6 rows sums each segment from L1.
void int4_tiled(const Int4& w, const QuantX& xq, int64_t rows, float* y, int64_t c0, int64_t c1) {
  uint8_t* tile = int4_tile_buffer();
  const int64_t span = w.group_span(), quads = span / 4;
  for (int64_t c = c0; c < c1; c += kChunk) {
    int64_t width = std::min(kChunk, c1 - c), stride = width / 8 * 32;
    for (int64_t h0 = 0; h0 < w.k / 2; h0 += kInt4TileSteps) {
      int64_t steps = std::min(kInt4TileSteps, w.k / 2 - h0);
      fill_int4_tile(w, h0, steps, span, c, width, tile);
      for (int64_t sg = 0; sg < 2 * steps / span; ++sg) {
        int64_t k0 = w.k_of(h0 + sg / 2 * span, sg % 2);
        const uint8_t* seg = tile + sg * quads * stride;
        const uint16_t* scale = w.scale + (k0 / kGroup) * w.n + c;
        for (int64_t r = 0; r < rows; r += kInt4TileRows) {
          with_rows<kInt4TileRows>(std::min<int64_t>(kInt4TileRows, rows - r), [&](auto R) {
            for (int64_t v = 0; v < width / 8; v += 2) {
              int4_tile_panel<decltype(R)::value>(seg + 32 * v, stride, quads, xq, r, k0, scale + 8 * v,
                                                   y + r * w.n + c + 8 * v, w.n);
            }
          });
        }
      }
    }
  }
}

// INT4 groups: x rounded once; up to 12 rows stream the weights, 4 rows per pass, more take the tiled path; the last
// columns short of a vector run the portable loop on x as rounded.
void group_columns(const Int4& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
  QuantX xq(x, rows, w.k);
  int64_t c32 = c0 + (c1 - c0) / kQuadCols * kQuadCols;
  for (int64_t r = 0; r < rows; ++r) std::memset(y + r * w.n + c0, 0, sizeof(float) * (c32 - c0));
  if (rows > kInt4StreamPasses * kInt4StreamRows) {
    int4_tiled(w, xq, rows, y, c0, c32);
  } else {
    for (int64_t r = 0; r < rows; r += kInt4StreamRows) {
      with_rows<kInt4StreamRows>(std::min<int64_t>(kInt4StreamRows, rows - r),
                                 [&](auto R) { int4_stream<decltype(R)::value>(w, xq, r, y, c0, c32); });
    }
  }
  if (c32 < c1) {
    std::vector<float> rounded(rows * w.k);
    for (int64_t i = 0; i < rows * w.k; ++i) rounded[i] = xq.q[i] * xq.d[i / kGroup];
    group_columns<Int4>(w, rounded.data(), rows, y, c32, c1);
  }
}
#endif

// Columns per share when a matrix's columns are split among threads: one vector (the AVX2 INT4 path: 32 columns).
template <typename T>
constexpr int64_t col_unit(const Dense<T>&) { return 8; }
#if defined(K2JAX_AVX2) && !defined(K2JAX_INT4_DOT)
constexpr int64_t col_unit(const Int4&) { return kQuadCols; }
#else
constexpr int64_t col_unit(const Int4&) { return 8; }
#endif

// The shared driver: every non-empty group times its matrix, split over groups (many) or columns (few);
// rows past the groups are zero.
constexpr int64_t kInlineRows = 8;            // decode-sized calls only
constexpr int64_t kInlineBytes = 256 << 10;   // weights below this run on the calling thread (bundled model:
                                              // batch-1 step 1.2 -> 0.7 ms)

template <typename MakeW>
ffi::Error grouped(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                   ffi::Buffer<ffi::S32> sizes, int64_t n_layers, int64_t n, MakeW make_w,
                   ffi::ResultBuffer<ffi::F32> y) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], e = sizes.dimensions()[0];
  int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= n_layers) return ffi::Error::InvalidArgument("layer index out of range");
  const int32_t* size = sizes.typed_data();
  int64_t total = 0;
  for (int64_t g = 0; g < e; ++g) {
    if (size[g] < 0) return ffi::Error::InvalidArgument("negative group size");
    total += size[g];
  }
  if (total > m) return ffi::Error::InvalidArgument("group sizes exceed the rows");
  float* out = y->typed_data();
  std::memset(out + total * n, 0, sizeof(float) * (m - total) * n);
  const float* xs = x.typed_data();
  std::vector<int64_t> active, first_row;  // the groups with rows, and where their rows start
  for (int64_t g = 0, row = 0; g < e; row += size[g], ++g) {
    if (size[g] > 0) active.push_back(g), first_row.push_back(row);
  }
  auto run = [&](int64_t i, int64_t c0, int64_t c1) {
    int64_t g = active[i];
    group_columns(make_w(l * e + g), xs + first_row[i] * k, size[g], out + first_row[i] * n, c0, c1);
  };
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1), bytes = 0;
  for (int64_t g : active) bytes += make_w(l * e + g).bytes();
  if (total <= kInlineRows && bytes < kInlineBytes) {  // less work than waking another thread costs
    for (size_t i = 0; i < active.size(); ++i) run(i, 0, n);
  } else if (total == 1 && threads > 1 && n < 2 * kChunk * threads && k / make_w(l * e + active[0]).k_unit() >= 2) {
    // one row (decode at batch 1) of a narrow matrix: K split among threads, each reading a contiguous block of
    // the weights (a share of its columns would be short runs of every row)
    auto w = make_w(l * e + active[0]);
    int64_t units = k / w.k_unit(), parts = std::min(threads, units);
    std::vector<float> partial(parts * n);
    parallel_units(pool, parts, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        int64_t k0 = units * p / parts * w.k_unit(), k1 = units * (p + 1) / parts * w.k_unit();
        group_columns(w.rows_of_k(k0, k1), xs + first_row[0] * k + k0, 1, partial.data() + p * n, 0, n);
      }
    });
    for (int64_t p = 1; p < parts; ++p) {
      for (int64_t c = 0; c < n; ++c) partial[c] += partial[p * n + c];
    }
    std::memcpy(out + first_row[0] * n, partial.data(), sizeof(float) * n);
  } else if (static_cast<int64_t>(active.size()) >= 2 * threads) {  // whole experts per thread: contiguous reads
    parallel_units(pool, active.size(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run(i, 0, n);
    });
  } else {  // few experts: split their columns, in units of one vector
    const int64_t unit = col_unit(make_w(0));
    parallel_units(pool, (n + unit - 1) / unit, [&](int64_t u0, int64_t u1) {
      for (size_t i = 0; i < active.size(); ++i) run(i, u0 * unit, std::min(n, u1 * unit));
    });
  }
  return ffi::Error::Success();
}

#if K2JAX_MATMUL_PART != 2
ffi::Error DenseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = w.dimensions();  // [L, E, K, N], [L, K, N] or [K, N]
  int64_t rank = dims.size();
  if (rank < 2 || rank > 4) return ffi::Error::InvalidArgument("weights must be [L, E, K, N], [L, K, N] or [K, N]");
  int64_t n_layers = rank >= 3 ? dims[0] : 1, e = rank == 4 ? dims[1] : 1, k = dims[rank - 2], n = dims[rank - 1];
  if (k != x.dimensions()[1] || e != sizes.dimensions()[0]) {
    return ffi::Error::InvalidArgument("weights [.., E, K, N] must match x [M, K] and sizes [E]");
  }
  if (w.element_type() == ffi::F32) {
    const float* base = w.typed_data<float>();
    return grouped(pool, x, layer, sizes, n_layers, n,
                   [&](int64_t i) { return Dense<float>{base + i * k * n, k, n}; }, y);
  }
  if (w.element_type() == ffi::BF16) {
    const uint16_t* base = reinterpret_cast<const uint16_t*>(w.untyped_data());
    return grouped(pool, x, layer, sizes, n_layers, n,
                   [&](int64_t i) { return Dense<uint16_t>{base + i * k * n, k, n}; }, y);
  }
  return ffi::Error::InvalidArgument("dense weights must be float32 or bfloat16");
}

#endif

#if K2JAX_MATMUL_PART != 1
ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                    ffi::Buffer<ffi::BF16> scale, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> sizes,
                    int64_t planar, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = packed.dimensions();  // [L, E, K/2, N]
  int64_t k = x.dimensions()[1];
  if (dims.size() != 4 || 2 * dims[2] != k || dims[1] != sizes.dimensions()[0] || k % planar || planar % kGroup ||
      scale.dimensions()[2] * kGroup != k) {
    return ffi::Error::InvalidArgument("packed must be [L, E, K/2, N], scale [L, E, K/32, N], x [M, K]");
  }
  int64_t n = dims[3];
  const uint8_t* pbase = packed.typed_data();
  const uint16_t* sbase = reinterpret_cast<const uint16_t*>(scale.untyped_data());
  const bool past_caches = static_cast<int64_t>(packed.size_bytes()) > kCachedStackBytes;
  return grouped(pool, x, layer, sizes, dims[0], n, [&](int64_t i) {
    return Int4{pbase + i * (k / 2) * n, sbase + i * (k / kGroup) * n, k, n, planar, past_caches};
  }, y);
}

#endif
}  // namespace

#if K2JAX_MATMUL_PART != 2
XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxGroupedMatmulDense, DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif

#if K2JAX_MATMUL_PART != 1
// Whether the INT4 matmul rounds x to int8 (1; 0: built without that path, float x), for the reference.
extern "C" int64_t K2jaxGroupedMatmulInt4RoundsX() {
#if defined(K2JAX_INT4_DOT) || defined(K2JAX_AVX2)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxGroupedMatmulInt4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("planar")
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif
