// Grouped matmul for the CPU backend, an XLA FFI custom call: rows sorted by expert times their expert's
// matrix, read in place from the stacked [L, E, ...] weights (XLA:CPU copies every dynamically sliced matrix
// before a dot, which costs more than the dot at decode sizes). Dense f32/bf16 weights [L, E, K, N] (also
// [L, K, N] and [K, N]: one expert; bf16 is widened a row chunk at a time inside the loop), or INT4
// in the planar layout of pallas_kernels/int4_layout.py (packed u8 [L, E, K/2, N], bf16 scales [L, E, K/32, N]).
// Experts (or, when there are few, their columns) are split among XLA's intra-op threads; each streams its
// matrix rows once per 4 rows of x, accumulating 4 rows x 512 columns in L1.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using k2jax_cpu::bf16_to_f32;
using k2jax_cpu::parallel_units;

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kChunk = 512;  // columns per accumulator chunk: 4 rows x 512 floats stay in L1
constexpr int64_t kStride = kChunk + 24;  // accumulator row stride, off 4 KiB multiples (store-to-load aliasing)
constexpr int kPass = 8;         // K rows of the weights per accumulation pass
constexpr int kMaxRows = 4;      // rows of x per pass over the weights
constexpr int kGroup = 32;       // INT4 scale group along K
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
  int64_t k_of(int64_t step, int) const { return step; }
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
  static constexpr int kRowsPerStep = 2;
  int64_t steps() const { return k / 2; }
  int64_t k_of(int64_t h, int s) const { return (h / (p / 2)) * p + h % (p / 2) + s * (p / 2); }
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

// All rows of one expert group times its matrix, for columns [c0, c1).
template <typename W>
void group_columns(const W& w, const float* x, int64_t rows, float* y, int64_t c0, int64_t c1) {
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

// The shared driver: every non-empty group times its matrix, split over groups (many) or columns (few);
// rows past the groups are zero.
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
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  if (static_cast<int64_t>(active.size()) >= 2 * threads) {  // whole experts per thread: contiguous reads
    parallel_units(pool, active.size(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run(i, 0, n);
    });
  } else {  // few experts: split their columns, in units of one vector
    parallel_units(pool, (n + 7) / 8, [&](int64_t u0, int64_t u1) {
      for (size_t i = 0; i < active.size(); ++i) run(i, u0 * 8, std::min(n, u1 * 8));
    });
  }
  return ffi::Error::Success();
}

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
  return grouped(pool, x, layer, sizes, dims[0], n, [&](int64_t i) {
    return Int4{pbase + i * (k / 2) * n, sbase + i * (k / kGroup) * n, k, n, planar};
  }, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxGroupedMatmulDense, DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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
