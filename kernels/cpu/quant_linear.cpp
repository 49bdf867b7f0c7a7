// Weight-only quantised linear layers (int4 in groups of 32 along K, or int8 per output channel)
// whose per-row arithmetic does not depend on how many rows share the call.
//
// Why: torch's int4pack kernel is fast for a few rows but 2-3x slower than oneDNN for a prefill
// chunk, and the two round differently, so a serving path that switches kernels by row count gives
// a row a result that depends on the batch and on how its prompt was chunked (docs/cpu.md,
// "Batch invariance"). Here every output is computed by one fixed sequence of operations, whatever
// the number of rows and however they are tiled or threaded, so a row's result is bit for bit the
// same alone, in a batch or in a prefill chunk.
//
// The arithmetic, per output column and row: for each group of K (32 values for int4, all of K for
// int8), acc = a chain of AVX-512 BF16 dot products (vdpbf16ps, in k order from zero) of the row's
// bf16 x with the group's integer weights (q - 8 for int4, q for int8: exact in bf16), then
// y = fma(acc, scale, y) and, for int4, y = fma(zero, sum of the group's x, y); y is rounded to bf16
// once. That is x . ((q - 8) * scale + zero) without ever rounding a weight, and it needs no
// floating-point dequantisation per weight: int4 nibbles become bf16 through a 16-entry table.
//
// On a CPU with AVX2 and FMA but no AVX-512 BF16 (many AMD and client Intel hosts) the same packed
// weights run a second implementation, chosen when the library is compiled for the host: acc is a
// chain of float32 FMAs in k order from zero of the row's x (bf16 widened: exact) with the group's
// integer weights (exact in float32), then the same scale and zero steps and one rounding to bf16
// (round to nearest even, as vcvtneps2bf16). Its sums round differently from vdpbf16ps, so the two
// hosts' outputs differ in the last bits, but on each host a row's result is one fixed sequence of
// operations: the same alone, batched or chunked.
//
// Packed layout (kernels/cpu/quant_linear.py packs it once at start-up), per block of 16 output
// columns and per pair of k (2p, 2p + 1), so that lane L of a zmm holds column L's pair, the
// operand vdpbf16ps wants: int4: byte L = q[2p, L] | q[2p + 1, L] << 4 (16 bytes); int8: 16 lanes
// "lo" then 16 "hi" bytes, lane 2i + e of lo (hi) holding column i (8 + i) at k = 2p + e, which one
// vcvtne2ps2bf16 turns into column pairs. Scales (and int4 zeros): bf16 [blocks, groups, 16].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

constexpr int64_t kBlock = 16;       // output columns per block (one zmm of float32)
constexpr int64_t kGroup = 32;       // int4 group size along K
constexpr int64_t kRowChunk = 128;   // rows per task: their activations stay in L2 across blocks

bool quant_linear_available() {
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
inline __m512 bf16x16(const uint16_t* p) {       // 16 bf16 -> float32: the bits shifted up by 16
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// bf16 of -8..7 in words 0..15: the int4 nibble -> (q - 8) table of vpermw.
inline __m512i nibble_table() {
  alignas(64) uint16_t table[32] = {};
  for (int q = 0; q < 16; ++q) table[q] = static_cast<uint16_t>(std::bit_cast<uint32_t>(float(q - 8)) >> 16);
  return _mm512_load_si512(table);
}

// One column block's packed weights: the integer bf16 pairs of k pair p, its groups' scales (zeros).
template <int Bits>
struct Block {
  const uint8_t* packed;
  const uint16_t* scales;
  const uint16_t* zeros;
  __m512i table;

  __m512bh pair(int64_t p) const {
    if constexpr (Bits == 4) {
      // dword L = byte L -> words (low nibble, high nibble) -> their bf16 (q - 8)
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + p * 16)));
      const __m512i nibbles = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), _mm512_set1_epi32(0x000F000F),
                                                        0xA8);      // (v | v << 12) & 0x000F000F
      return reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(nibbles, table));
    } else {
      const __m128i* bytes = reinterpret_cast<const __m128i*>(packed + p * 32);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1)));
      return _mm512_cvtne2ps_pbh(hi, lo);
    }
  }
};

template <int Bits>
int64_t group_pairs(int64_t pairs) { return Bits == 4 ? kGroup / 2 : pairs; }

// MR rows x NB column blocks: the arithmetic of the header, group by group. weights(b, p) gives
// block b's pair p, read from a dequantised panel or dequantised on the spot (the same values).
// xsum: the rows' per-group sums of x (int4), row r's at xsum[r * groups + g].
template <int Bits, int MR, int NB, typename Weights>
void tile(const uint16_t* x, int64_t x_stride, const float* xsum, int64_t groups, const Block<Bits>* blocks,
          Weights weights, int64_t pairs, uint16_t* y, int64_t y_stride) {
  __m512 out[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) out[r][b] = _mm512_setzero_ps();
  const int64_t per_group = group_pairs<Bits>(pairs);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t p = g * per_group; p < (g + 1) * per_group; ++p) {
      __m512bh w[NB];
      for (int b = 0; b < NB; ++b) w[b] = weights(b, p);
      for (int r = 0; r < MR; ++r) {
        int32_t x_pair;
        __builtin_memcpy(&x_pair, x + r * x_stride + 2 * p, sizeof(x_pair));
        const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x_pair));
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w[b], xb);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 scale = bf16x16(blocks[b].scales + g * kBlock);
      for (int r = 0; r < MR; ++r) out[r][b] = _mm512_fmadd_ps(acc[r][b], scale, out[r][b]);
      if constexpr (Bits == 4) {
        const __m512 zero = bf16x16(blocks[b].zeros + g * kBlock);
        for (int r = 0; r < MR; ++r)
          out[r][b] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[r * groups + g]), out[r][b]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + b * kBlock),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(out[r][b])));
}

constexpr int kTileRows = 4;        // rows per tile: 2 x 4 x 2 accumulators + weights in 32 zmm
constexpr int64_t kDirectRows = 4;  // up to this many rows, weights are dequantised in the loop

// `count` rows of one task (1 or 2 column blocks), tile by tile.
template <int Bits, int NB, typename Weights>
void task_rows(const uint16_t* x, int64_t x_stride, const float* xsum, int64_t groups, int64_t count,
               const Block<Bits>* blocks, Weights weights, int64_t pairs, uint16_t* y, int64_t y_stride) {
  int64_t r = 0;
  for (; r + kTileRows <= count; r += kTileRows)
    tile<Bits, kTileRows, NB>(x + r * x_stride, x_stride, xsum + r * groups, groups, blocks, weights, pairs,
                             y + r * y_stride, y_stride);
  const uint16_t* xr = x + r * x_stride;
  const float* sr = xsum + r * groups;
  uint16_t* yr = y + r * y_stride;
  switch (count - r) {
    case 3: tile<Bits, 3, NB>(xr, x_stride, sr, groups, blocks, weights, pairs, yr, y_stride); break;
    case 2: tile<Bits, 2, NB>(xr, x_stride, sr, groups, blocks, weights, pairs, yr, y_stride); break;
    case 1: tile<Bits, 1, NB>(xr, x_stride, sr, groups, blocks, weights, pairs, yr, y_stride); break;
    default: break;
  }
}

template <int Bits, int NB>
void run_task(const uint16_t* x, int64_t x_stride, const float* xsum, int64_t groups, int64_t count,
              const Block<Bits>* blocks, int64_t pairs, __m512i* panel, uint16_t* y, int64_t y_stride) {
  if (count <= kDirectRows) {       // decode: each weight pair is used by these few rows only
    auto direct = [blocks](int b, int64_t p) { return blocks[b].pair(p); };
    task_rows<Bits, NB>(x, x_stride, xsum, groups, count, blocks, direct, pairs, y, y_stride);
    return;
  }
  for (int64_t p = 0; p < pairs; ++p)
    for (int b = 0; b < NB; ++b) panel[p * NB + b] = reinterpret_cast<__m512i>(blocks[b].pair(p));
  auto from_panel = [panel](int b, int64_t p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * NB + b));
  };
  task_rows<Bits, NB>(x, x_stride, xsum, groups, count, blocks, from_panel, pairs, y, y_stride);
}
#endif

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
// ---- AVX2 + FMA: 16 output columns as two ymm of float32, one k at a time ----

inline __m256 bf16x8(const uint16_t* p) {       // 8 bf16 -> float32: the bits shifted up by 16
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// float32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN), 8 lanes as int32
inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan));
}

inline void store_bf16x16(uint16_t* y, __m256 lo, __m256 hi) {
  // packus interleaves 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> reorder the quadwords
  const __m256i packed = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm256_permute4x64_epi64(packed, 0xD8));
}

// A column block's integer weights at k pair p as float32: w[0], w[1] columns 0-7 at k = 2p, 2p + 1;
// w[2], w[3] columns 8-15.
template <int Bits>
inline void pair_weights(const uint8_t* packed, int64_t p, __m256* w) {
  if constexpr (Bits == 4) {
    const uint8_t* bytes = packed + p * 16;       // byte L: column L's (k0 | k1 << 4)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * h)));
      const __m256i eight = _mm256_set1_epi32(8);
      w[2 * h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0xF)), eight));
      w[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
    }
  } else {
    const uint8_t* bytes = packed + p * 32;       // lo then hi: lane 2i + e holds column i (8 + i) at k 2p + e
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * h)));
      w[2 * h] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16));   // the even words: k0
      w[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 16));                       // the odd: k1
    }
  }
}

// MR rows of NB column blocks, group by group (the header's arithmetic): a column's group sum is one
// FMA chain in k order from zero, then the scale and zero steps. weights(b, p, e, w) gives block b's
// two weight vectors (columns 0-7, 8-15) at k = 2p + e, from a dequantised panel or on the spot.
// Every accumulator lane sees the same operations in the same order whatever MR and NB are, so a
// row's result does not depend on the tile it falls in. The per-group totals live in memory (one
// update a group), so the 16 ymm registers hold the 2 MR NB accumulators, the weights and a
// broadcast.
template <int Bits, int MR, int NB, typename Weights>
void tile_avx2(const float* x, int64_t x_stride, const float* xsum, int64_t groups, const uint16_t* const* scales,
               const uint16_t* const* zeros, Weights weights, int64_t pairs, uint16_t* y, int64_t y_stride) {
  alignas(32) float out[MR][NB * kBlock] = {};
  const int64_t per_group = Bits == 4 ? kGroup / 2 : pairs;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MR][2 * NB];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 2 * NB; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t p = g * per_group; p < (g + 1) * per_group; ++p) {
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {      // k = 2p, then 2p + 1
        __m256 w[2 * NB];
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) weights(b, p, e, w + 2 * b);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m256 xb = _mm256_broadcast_ss(x + r * x_stride + 2 * p + e);
#pragma GCC unroll 4
          for (int v = 0; v < 2 * NB; ++v) acc[r][v] = _mm256_fmadd_ps(xb, w[v], acc[r][v]);
        }
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < 2 * NB; ++v) {
      const int b = v / 2, h = v % 2;
      const __m256 scale = bf16x8(scales[b] + g * kBlock + 8 * h);
      const __m256 zero = Bits == 4 ? bf16x8(zeros[b] + g * kBlock + 8 * h) : _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        __m256 o = _mm256_fmadd_ps(acc[r][v], scale, _mm256_load_ps(out[r] + 8 * v));
        if constexpr (Bits == 4) o = _mm256_fmadd_ps(zero, _mm256_set1_ps(xsum[r * groups + g]), o);
        _mm256_store_ps(out[r] + 8 * v, o);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b)
      store_bf16x16(y + r * y_stride + b * kBlock, _mm256_load_ps(out[r] + 16 * b), _mm256_load_ps(out[r] + 16 * b + 8));
}

constexpr int kTileRowsAvx2 = 6;        // a panel tile: 6 rows x 2 accumulators + 2 weights + a broadcast
constexpr int64_t kDirectRowsAvx2 = 4;  // up to this many rows, weights are dequantised in the loop

// `count` rows of NB column blocks (a task), tile by tile: MR rows a tile, the rest one smaller tile.
template <int Bits, int NB, int MR, typename Weights>
void task_rows_avx2(const float* x, int64_t x_stride, const float* xsum, int64_t groups, int64_t count,
                    const uint16_t* const* scales, const uint16_t* const* zeros, Weights weights, int64_t pairs,
                    uint16_t* y, int64_t y_stride) {
  int64_t r = 0;
  for (; r + MR <= count; r += MR)
    tile_avx2<Bits, MR, NB>(x + r * x_stride, x_stride, xsum + r * groups, groups, scales, zeros, weights, pairs,
                            y + r * y_stride, y_stride);
  const float* xr = x + r * x_stride;
  const float* sr = xsum + r * groups;
  uint16_t* yr = y + r * y_stride;
  switch (count - r) {
#define RG_REST(R) \
  case R: if constexpr (R < MR) tile_avx2<Bits, R, NB>(xr, x_stride, sr, groups, scales, zeros, weights, pairs, yr, y_stride); break;
    RG_REST(5) RG_REST(4) RG_REST(3) RG_REST(2) RG_REST(1)
#undef RG_REST
    default: break;
  }
}

// One task: `count` rows (a row chunk) of the column blocks at packed[0..NB). Decode rows (few)
// dequantise each weight pair where it is used, one row two blocks at a time (four FMA chains, so
// the row does not wait on one chain's latency); more rows first dequantise the task's block into a
// panel of float32 that every tile of the chunk reads.
template <int Bits, int NB>
void run_task_avx2(const float* x, int64_t x_stride, const float* xsum, int64_t groups, int64_t count,
                   const uint8_t* const* packed, const uint16_t* const* scales, const uint16_t* const* zeros,
                   int64_t pairs, float* panel, uint16_t* y, int64_t y_stride) {
  if (count <= kDirectRowsAvx2) {
    // tiles index `blocks` from their own first block: column block b of this task is blocks[b]
    auto direct = [](const uint8_t* const* blocks) {
      return [blocks](int b, int64_t p, int e, __m256* w) {
        __m256 four[4];
        pair_weights<Bits>(blocks[b], p, four);
        w[0] = four[e];
        w[1] = four[2 + e];
      };
    };
    if constexpr (NB == 2) {
      if (count == 1) {
        tile_avx2<Bits, 1, 2>(x, x_stride, xsum, groups, scales, zeros, direct(packed), pairs, y, y_stride);
        return;
      }
    }
    for (int b = 0; b < NB; ++b)      // 2-4 rows: enough chains in one block
      task_rows_avx2<Bits, 1, 4>(x, x_stride, xsum, groups, count, scales + b, zeros + b, direct(packed + b), pairs,
                                 y + b * kBlock, y_stride);
    return;
  }
  for (int b = 0; b < NB; ++b) {
    for (int64_t p = 0; p < pairs; ++p) {   // pair p: [columns 0-7 k0, k1, columns 8-15 k0, k1] x 8 floats
      __m256 four[4];
      pair_weights<Bits>(packed[b], p, four);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(panel + 32 * p + 8 * i, four[i]);
    }
    auto from_panel = [panel](int, int64_t p, int e, __m256* w) {
      w[0] = _mm256_loadu_ps(panel + 32 * p + 8 * e);
      w[1] = _mm256_loadu_ps(panel + 32 * p + 8 * (2 + e));
      // kept in registers: folded into the FMAs as memory operands, each would load once per row
      asm("" : "+x"(w[0]), "+x"(w[1]));
    };
    task_rows_avx2<Bits, 1, kTileRowsAvx2>(x, x_stride, xsum, groups, count, scales + b, zeros + b, from_panel,
                                           pairs, y + b * kBlock, y_stride);
  }
}
#endif

inline float bf16_value(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

// x: bf16 [M, K] (contiguous features, any row stride); packed: uint8 [N / 16, K / 2, 16 or 32];
// scales (and zeros for int4): bf16 [N / 16, groups, 16]. Returns bf16 [M, N].
Tensor quant_linear(const Tensor& x, const Tensor& packed, const Tensor& scales, const Tensor& zeros, int64_t bits) {
  TORCH_CHECK(quant_linear_available(), "quant_linear needs AVX-512 BF16 or AVX2 + FMA (this build has neither)");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "x must be bf16 [rows, features] with contiguous features");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.size(2) == 16 * bits / 4,
              "packed must be contiguous uint8 [blocks, K / 2, ", 16 * bits / 4, "]");
  const int64_t rows_total = x.size(0), k = x.size(1), blocks = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(pairs * 2 == k, "x has ", k, " features, the weight ", pairs * 2);
  const int64_t groups = bits == 4 ? k / kGroup : 1;
  TORCH_CHECK(bits == 8 || k % kGroup == 0, "int4 needs K to be a multiple of ", kGroup);
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  scales.sizes() == at::IntArrayRef({blocks, groups, kBlock}),
              "scales must be contiguous bf16 [blocks, groups, 16]");
  TORCH_CHECK(bits == 8 || (zeros.sizes() == scales.sizes() && zeros.is_contiguous() &&
                            zeros.scalar_type() == at::kBFloat16),
              "zeros must match scales");
  const int64_t n = blocks * kBlock;
  Tensor y = at::empty({rows_total, n}, x.options());
  if (rows_total == 0) return y;
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
  const uint16_t* xp = static_cast<const uint16_t*>(x.data_ptr());
  uint16_t* yp = static_cast<uint16_t*>(y.data_ptr());
  const uint8_t* wp = packed.const_data_ptr<uint8_t>();
  const uint16_t* sp = static_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* zp = bits == 4 ? static_cast<const uint16_t*>(zeros.data_ptr()) : nullptr;
  const int64_t x_stride = x.stride(0), block_bytes = pairs * packed.size(2), block_scales = groups * kBlock;
  // int4: each row's per-group sums of x (for the zeros), in k order, one row at a time
  std::vector<float> xsum(bits == 4 ? rows_total * groups : 0);
  if (bits == 4) {
    at::parallel_for(0, rows_total, 64, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          float sum = 0.0f;
          for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) sum += bf16_value(xp[r * x_stride + i]);
          xsum[r * groups + g] = sum;
        }
    });
  }
#if defined(__AVX512BF16__)
  const int64_t pair_blocks = (blocks + 1) / 2, chunks = (rows_total + kRowChunk - 1) / kRowChunk;
  // Tasks: (row chunk, pair of column blocks). Which rows share a task changes nothing per row.
  at::parallel_for(0, chunks * pair_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<__m512i> panel(pairs * 2);
    for (int64_t task = first; task < last; ++task) {
      const int64_t chunk = task / pair_blocks, b0 = (task % pair_blocks) * 2;
      const int64_t nb = std::min<int64_t>(2, blocks - b0);
      const int64_t r0 = chunk * kRowChunk, count = std::min(kRowChunk, rows_total - r0);
      const uint16_t* xr = xp + r0 * x_stride;
      const float* sr = bits == 4 ? xsum.data() + r0 * groups : nullptr;
      uint16_t* yr = yp + r0 * n + b0 * kBlock;
      auto run = [&](auto bits_tag) {
        constexpr int Bits = decltype(bits_tag)::value;
        Block<Bits> block[2];
        for (int64_t b = 0; b < nb; ++b)
          block[b] = {wp + (b0 + b) * block_bytes, sp + (b0 + b) * block_scales,
                      zp ? zp + (b0 + b) * block_scales : nullptr, nibble_table()};
        if (nb == 2) run_task<Bits, 2>(xr, x_stride, sr, groups, count, block, pairs, panel.data(), yr, n);
        else run_task<Bits, 1>(xr, x_stride, sr, groups, count, block, pairs, panel.data(), yr, n);
      };
      if (bits == 4) run(std::integral_constant<int, 4>{});
      else run(std::integral_constant<int, 8>{});
    }
  });
#else
  // x widened to float32 once (exact), so the inner loop broadcasts a loaded float per k
  std::vector<float> xf(rows_total * k);
  at::parallel_for(0, rows_total, 64, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
      for (int64_t i = 0; i < k; ++i) xf[r * k + i] = bf16_value(xp[r * x_stride + i]);
  });
  const int64_t pair_blocks = (blocks + 1) / 2, chunks = (rows_total + kRowChunk - 1) / kRowChunk;
  // Tasks: (row chunk, pair of column blocks). Which rows share a task changes nothing per row.
  at::parallel_for(0, chunks * pair_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> panel(pairs * 32);   // a task's column block as float32 weights (row chunks)
    for (int64_t task = first; task < last; ++task) {
      const int64_t chunk = task / pair_blocks, b0 = (task % pair_blocks) * 2;
      const int64_t nb = std::min<int64_t>(2, blocks - b0);
      const int64_t r0 = chunk * kRowChunk, count = std::min(kRowChunk, rows_total - r0);
      const float* xr = xf.data() + r0 * k;
      const float* sr = bits == 4 ? xsum.data() + r0 * groups : nullptr;
      uint16_t* yr = yp + r0 * n + b0 * kBlock;
      const uint8_t* wb[2] = {wp + b0 * block_bytes, wp + (b0 + nb - 1) * block_bytes};
      const uint16_t* sb[2] = {sp + b0 * block_scales, sp + (b0 + nb - 1) * block_scales};
      const uint16_t* zb[2] = {zp ? zp + b0 * block_scales : nullptr, zp ? zp + (b0 + nb - 1) * block_scales : nullptr};
      auto run = [&](auto bits_tag) {
        constexpr int Bits = decltype(bits_tag)::value;
        if (nb == 2) run_task_avx2<Bits, 2>(xr, k, sr, groups, count, wb, sb, zb, pairs, panel.data(), yr, n);
        else run_task_avx2<Bits, 1>(xr, k, sr, groups, count, wb, sb, zb, pairs, panel.data(), yr, n);
      };
      if (bits == 4) run(std::integral_constant<int, 4>{});
      else run(std::integral_constant<int, 8>{});
    }
  });
#endif
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(radixgate_cpu, m) {
  m.def("quant_linear_available() -> bool", &quant_linear_available);
  m.def("quant_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int bits) -> Tensor", &quant_linear);
}
