// Fused CPU kernels for the decode step: the small ops between the matmuls, done in one pass each.
//
// On a 2-core CPU a decode step of the default model spends as much time in ~25 small torch ops per
// layer (norms, rotary, KV writes, K/V gathers, SDPA's set-up, SiLU) as in its matmuls: each op
// costs a dispatch, an allocation and, for the larger ones, an OpenMP region (docs/cpu.md). These
// kernels replace them with five ops per layer that read their inputs once, in float32 registers
// (plus the page scoring of sparse decode):
//
//   rms_norm            y = w * norm(x)                           (RMSNorm, as the HF reference rounds)
//   add_rms_norm        x += d; y = w * norm(x)                   (residual add fused with the next norm)
//   rotary_store        rotate q and k of a fused qkv row in place, write k and v into their KV slots
//   paged_decode_attention  one query per sequence over its pages, read straight from the cache
//   paged_prefill_attention the tokens of prefill chunks, each row exactly as a decode computes it
//   silu_mul            y = silu(gate) * up                        (SwiGLU's activation)
//   quest_page_scores   sparse decode: each page's Quest bound per KV head (kernels/reference.py)
//
// Semantics are those of the torch code in backends/cuda/model.py and kernels/reference.py; the
// tests compare each op against them. Arithmetic is float32; results are rounded to the tensor's
// dtype once, where the torch path rounds after every op (so they are at least as accurate).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// exp(x) for float32 lanes, written so that gcc vectorises the loops that call it (no floor,
// fmin or fmax, which gcc 12 leaves scalar): x = n ln2 + r with n rounded to nearest by adding and
// subtracting 1.5 * 2^23, exp(r) by a degree-6 polynomial (Cephes' coefficients, relative error
// ~2e-7), 2^n from the float's exponent bits. Inputs are clamped to [-87, 88]: exp(-87) ~ 1.6e-38
// stands for 0 (the callers only pass softmax logits minus their max, or -x of a sigmoid).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// Storage types: float, or uint16_t holding bfloat16 bits. The kernels read bf16 as raw 16-bit
// integers (c10::BFloat16 is a struct, and loops over structs do not vectorise).
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

template <typename S>
inline S from_f(float v);
template <>
inline float from_f<float>(float v) { return v; }
template <>
inline uint16_t from_f<uint16_t>(float v) {   // round to nearest even, NaN stays a (quiet) NaN
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// Calls f(S{}) with S the storage type of `dtype` (float32 or bfloat16).
template <typename F>
void dispatch(at::ScalarType dtype, const char* op, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(uint16_t{});
  } else {
    TORCH_CHECK(false, op, ": float32 and bfloat16 only, got ", dtype);
  }
}

template <typename S>
inline S* ptr(const Tensor& t) { return static_cast<S*>(t.data_ptr()); }

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be [rows, features], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows");
}

// ---- RMSNorm ------------------------------------------------------------------------------------

// One row: y = w * round(x * rsqrt(mean(x^2) + eps)), rounded to T: the HF reference's order
// (normalise in float32, round to the activation dtype, multiply by the weight, round again).
template <typename T>
inline void norm_row(const T* x, const T* w, T* y, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(x[i]);
    sum += v * v;
  }
  const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(to_f(x[i]) * rstd)));
  }
}

// x += d, rounded to T as torch's in-place add rounds.
template <typename T>
inline void add_row(T* x, const T* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = from_f<T>(to_f(x[i]) + to_f(d[i]));
}

// Rows (or tokens) per parallel task in the row-wise ops: a row of a few hundred features is ~1 us
// of work, so small batches stay on the calling thread instead of waking the pool.
constexpr int64_t kRowGrain = 16;

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be [features] matching x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  Tensor y = at::empty({rows, n}, x.options());
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = ptr<scalar_t>(x);
    const scalar_t* wp = ptr<scalar_t>(weight);
    scalar_t* yp = ptr<scalar_t>(y);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) norm_row(xp + r * stride, wp, yp + r * n, n, float(eps));
    });
  });
  return y;
}

Tensor add_rms_norm(const Tensor& x, const Tensor& delta, const Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.is_contiguous(), "x (the residual stream, updated in place) must be contiguous");
  TORCH_CHECK(delta.sizes() == x.sizes(), "delta must have x's shape");
  TORCH_CHECK(delta.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "x, delta and weight must share a dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be [features] matching x");
  const int64_t rows = x.size(0), n = x.size(1), dstride = delta.stride(0);
  Tensor y = at::empty({rows, n}, x.options());
  dispatch(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = ptr<scalar_t>(x);
    const scalar_t* dp = ptr<scalar_t>(delta);
    const scalar_t* wp = ptr<scalar_t>(weight);
    scalar_t* yp = ptr<scalar_t>(y);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(xp + r * n, dp + r * dstride, n);
        norm_row(xp + r * n, wp, yp + r * n, n, float(eps));
      }
    });
  });
  return y;
}

// ---- rotary + KV write --------------------------------------------------------------------------

// One head in place: [lo, hi] -> [lo cos + hi sin_signed, hi cos + lo sin_signed] (halves of d).
template <typename T>
inline void rotate_head(T* x, const T* c, const T* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float lo = to_f(x[i]), hi = to_f(x[i + half]);
    x[i] = from_f<T>(lo * to_f(c[i]) + hi * to_f(s[i]));
    x[i + half] = from_f<T>(hi * to_f(c[i + half]) + lo * to_f(s[i + half]));
  }
}

// qkv: [T, (H + 2 KV) d], rows [q heads | k heads | v heads]. Each q and k head is rotated in place
// with the half-swap convention: out = x * cos + swap_halves(x) * sin_signed, where the tables
// hold cos and [-sin, sin] per position (model.py's _grow_rotary). Then k and v rows go to their
// slots in k_cache, v_cache: [slots, KV, d].
void rotary_store(const Tensor& qkv, const Tensor& positions, const Tensor& cos, const Tensor& sin_signed,
                  int64_t q_heads, int64_t kv_heads, const Tensor& k_cache, const Tensor& v_cache,
                  const Tensor& slots) {
  check_rows(qkv, "qkv");
  const int64_t tokens = qkv.size(0), d = cos.size(1);
  TORCH_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * d, "qkv width does not match the heads");
  TORCH_CHECK(d % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.sizes() == sin_signed.sizes(),
              "cos and sin tables must be contiguous [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.numel() == tokens && slots.numel() == tokens &&
                  positions.is_contiguous() && slots.is_contiguous(),
              "positions and slots must be contiguous int64 [T]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  k_cache.size(1) == kv_heads && k_cache.size(2) == d && v_cache.sizes() == k_cache.sizes(),
              "caches must be contiguous [slots, kv_heads, head_dim]");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dtype && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "qkv, rotary tables and caches must share a dtype");
  const int64_t num_slots = k_cache.size(0), table_len = cos.size(0), stride = qkv.stride(0);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {      // checked up front: a bad index must not write anywhere
    TORCH_CHECK(pos[t] >= 0 && pos[t] < table_len, "position ", pos[t], " outside the rotary table");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache");
  }
  const int64_t half = d / 2, rotated = q_heads + kv_heads, kv_row = kv_heads * d;
  dispatch(dtype, "rotary_store", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = ptr<scalar_t>(qkv);
    const scalar_t* cp = ptr<scalar_t>(cos);
    const scalar_t* sp = ptr<scalar_t>(sin_signed);
    scalar_t* kc = ptr<scalar_t>(k_cache);
    scalar_t* vc = ptr<scalar_t>(v_cache);
    at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* row = base + t * stride;
        const scalar_t* c = cp + pos[t] * d;
        const scalar_t* s = sp + pos[t] * d;
        for (int64_t h = 0; h < rotated; ++h) rotate_head(row + h * d, c, s, half);
        std::memcpy(kc + slot[t] * kv_row, row + q_heads * d, kv_row * sizeof(scalar_t));
        std::memcpy(vc + slot[t] * kv_row, row + rotated * d, kv_row * sizeof(scalar_t));
      }
    });
  });
}

// ---- decode attention over pages ----------------------------------------------------------------

constexpr int64_t kKeysPerSplit = 256;   // keys per task: long contexts split, then merge (flash-decoding)
constexpr int64_t kSerialWork = 1 << 16; // below this many key elements per step, no thread pool

// Element offset of each key's row (position begin + t) in a [slots, KV, d] cache, page by page
// (no division per key).
inline void key_offsets(const int64_t* table, int64_t page_size, int64_t kv_heads, int64_t d, int64_t h,
                        int64_t begin, int64_t end, int64_t* offset) {
  for (int64_t pos = begin; pos < end;) {
    const int64_t page = pos / page_size, first = pos % page_size;
    const int64_t run = std::min(page_size - first, end - pos);
    const int64_t base = ((table[page] * page_size + first) * kv_heads + h) * d;
    for (int64_t j = 0; j < run; ++j) offset[pos - begin + j] = base + j * kv_heads * d;
    pos += run;
  }
}

// scores[g][t] -> exp(scores - max) in place; m[g] = max, l[g] = sum of the exps.
inline void softmax_rows(float* scores, int64_t group, int64_t keys, float* m, float* l) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * keys;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < keys; ++t) mx = sg[t] > mx ? sg[t] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < keys; ++t) {
      sg[t] = exp_approx(sg[t] - mx);
      sum += sg[t];
    }
    m[g] = mx;
    l[g] = sum;
  }
}

// One task, plain loops (any head_dim, any group): the `group` query heads q (already scaled,
// float32 [group, d]) sharing one kv head, over the keys at `offset`. Writes the split's
// unnormalised output acc [group, d]; scores [group, keys] is scratch.
template <typename T>
void attend_generic(const float* qf, const T* kc, const T* vc, const int64_t* offset, int64_t keys,
                    int64_t d, int64_t group, float* scores, float* m, float* l, float* acc) {
  std::vector<float> row(d);
  float* r = row.data();
  for (int64_t t = 0; t < keys; ++t) {
    const T* k = kc + offset[t];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) r[i] = to_f(k[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < d; ++i) sum += qg[i] * r[i];
      scores[g * keys + t] = sum;
    }
  }
  softmax_rows(scores, group, keys, m, l);
  std::fill(acc, acc + group * d, 0.0f);
  for (int64_t t = 0; t < keys; ++t) {
    const T* v = vc + offset[t];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) r[i] = to_f(v[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * keys + t];
      float* a = acc + g * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += p * r[i];
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {       // 16 bf16 -> float32: the bits shifted up by 16
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// attend_generic with head_dim D and group G fixed at compile time, on AVX-512: the G queries
// and, in the second pass, the G output rows live in registers, and every key or value row is
// loaded once for all G heads. gcc leaves the plain loops' reductions as 16 in-order scalar
// adds and keeps the accumulators in memory; this is ~4x faster at long contexts.
template <typename T, int64_t D, int64_t G>
void attend_avx512(const float* qf, const T* kc, const T* vc, const int64_t* offset, int64_t keys,
                   int64_t, int64_t, float* scores, float* m, float* l, float* acc) {
  constexpr int64_t C = D / 16;
  __m512 qv[G][C];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(qf + g * D + 16 * c);
  for (int64_t t = 0; t < keys; ++t) {
    const T* k = kc + offset[t];
    __m512 kv[C];
    for (int64_t c = 0; c < C; ++c) kv[c] = load16(k + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      __m512 sum = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int64_t c = 1; c < C; ++c) sum = _mm512_fmadd_ps(qv[g][c], kv[c], sum);
      scores[g * keys + t] = _mm512_reduce_add_ps(sum);
    }
  }
  softmax_rows(scores, G, keys, m, l);
  __m512 out[G][C];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) out[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < keys; ++t) {
    const T* v = vc + offset[t];
    __m512 vv[C];
    for (int64_t c = 0; c < C; ++c) vv[c] = load16(v + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * keys + t]);
      for (int64_t c = 0; c < C; ++c) out[g][c] = _mm512_fmadd_ps(p, vv[c], out[g][c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, out[g][c]);
}
#endif

template <typename T>
using AttendFn = void (*)(const float*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,
                          float*, float*, float*, float*);

#if defined(__AVX512F__)
// attend_avx512<T, D, G> for the G in Gs equal to `group`, else nullptr.
template <typename T, int64_t D, int64_t... Gs>
AttendFn<T> avx512_for_group(int64_t group, std::integer_sequence<int64_t, Gs...>) {
  AttendFn<T> picked = nullptr;
  ((group == Gs + 1 ? (picked = attend_avx512<T, D, Gs + 1>, 0) : 0), ...);
  return picked;
}
#endif

// The specialised kernel for (head_dim, group) where one exists on this CPU (head_dim 64 with
// groups up to 8, 128 with groups up to 4: the registers they need), else the plain one.
template <typename T>
AttendFn<T> pick_attend(int64_t d, int64_t group) {
  AttendFn<T> picked = nullptr;
#if defined(__AVX512F__)
  if (d == 64) picked = avx512_for_group<T, 64>(group, std::make_integer_sequence<int64_t, 8>{});
  if (d == 128) picked = avx512_for_group<T, 128>(group, std::make_integer_sequence<int64_t, 4>{});
#endif
  return picked ? picked : attend_generic<T>;
}

// One query head's output from its splits' (max, sum, unnormalised output): rescaled to the common
// max and summed in split order; empty splits (l = 0) add nothing. Split s's values sit at m[s *
// stride], l[s * stride], acc[s * stride * d]. Both attention ops call this one function, so a row
// gets the same bits from paged_decode_attention and paged_prefill_attention (docs/cpu.md).
template <typename T>
__attribute__((noinline)) void merge_splits(const float* m, const float* l, const float* acc, int64_t splits,
                                            int64_t stride, int64_t d, float* o, T* dst) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, m[s * stride]);
  std::fill(o, o + d, 0.0f);
  float total = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    if (l[s * stride] == 0.0f) continue;
    const float w = std::exp(m[s * stride] - mx);
    total += l[s * stride] * w;
    const float* a = acc + s * stride * d;
    for (int64_t i = 0; i < d; ++i) o[i] += a[i] * w;
  }
  for (int64_t i = 0; i < d; ++i) dst[i] = from_f<T>(o[i] / total);
}

// q: [B, H, d] (any row stride, contiguous heads); caches: [slots, KV, d].
// page_tables: [B, W] int64 page ids shared by the kv heads, or [B, KV, W] one table per kv head
// (sparse decode: each head's chosen pages); padding past a length is never read.
// lengths: [B] (or [B, KV] with per-head tables) keys read through the table, the last page
// possibly partial. Keys are attended in table order; positions play no part (rotary is already
// in the cache). Returns [B, H, d] in q's dtype.
Tensor paged_decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& page_tables, const Tensor& lengths, int64_t page_size,
                              double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [B, H, d] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == q.size(2),
              "caches must be contiguous [slots, kv_heads, head_dim] matching q");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  const bool per_head = page_tables.dim() == 3;
  TORCH_CHECK(page_tables.scalar_type() == at::kLong && page_tables.is_contiguous() &&
                  page_tables.size(0) == batch && (!per_head || page_tables.size(1) == kv_heads) &&
                  (per_head || page_tables.dim() == 2),
              "page_tables must be contiguous int64 [B, pages] or [B, kv_heads, pages]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() &&
                  lengths.numel() == batch * (per_head ? kv_heads : 1),
              "lengths must be contiguous int64 [B] ([B, kv_heads] with per-head tables)");
  TORCH_CHECK(page_size > 0 && k_cache.size(0) % page_size == 0, "cache slots must be whole pages");
  const int64_t group = heads / kv_heads, width = page_tables.size(-1);
  const int64_t num_pages = k_cache.size(0) / page_size, tables_count = lengths.numel();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t* tables = page_tables.const_data_ptr<int64_t>();
  int64_t splits = 1, total_keys = 0;
  for (int64_t i = 0; i < tables_count; ++i) {      // validated before any read
    TORCH_CHECK(len[i] >= 1 && len[i] <= width * page_size, "length ", len[i], " does not fit its page table");
    for (int64_t p = 0; p < (len[i] + page_size - 1) / page_size; ++p) {
      const int64_t page = tables[i * width + p];
      TORCH_CHECK(page >= 0 && page < num_pages, "page ", page, " outside the cache");
    }
    splits = std::max(splits, (len[i] + kKeysPerSplit - 1) / kKeysPerSplit);
    total_keys += len[i];
  }
  Tensor out = at::empty({batch, heads, d}, q.options());
  const int64_t tasks = batch * kv_heads * splits;
  std::vector<float> m(tasks * group), l(tasks * group), acc(tasks * group * d);
  const int64_t grain = total_keys * (per_head ? 1 : kv_heads) * d < kSerialWork ? tasks : 1;
  dispatch(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = ptr<scalar_t>(q);
    const scalar_t* kc = ptr<scalar_t>(k_cache);
    const scalar_t* vc = ptr<scalar_t>(v_cache);
    scalar_t* op = ptr<scalar_t>(out);
    const AttendFn<scalar_t> attend = pick_attend<scalar_t>(d, group);
    at::parallel_for(0, tasks, grain, [&](int64_t first, int64_t last) {
      std::vector<float> qf(group * d), scores(group * kKeysPerSplit);
      std::vector<int64_t> offset(kKeysPerSplit);
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / (kv_heads * splits), h = (task / splits) % kv_heads, s = task % splits;
        const int64_t which = per_head ? b * kv_heads + h : b;
        const int64_t begin = s * kKeysPerSplit, end = std::min(len[which], begin + kKeysPerSplit);
        float* tm = m.data() + task * group;
        float* tl = l.data() + task * group;
        if (begin >= end) {                   // this sequence is shorter than the longest one
          std::fill(tm, tm + group, -std::numeric_limits<float>::infinity());
          std::fill(tl, tl + group, 0.0f);
          continue;
        }
        key_offsets(tables + which * width, page_size, kv_heads, d, h, begin, end, offset.data());
        const scalar_t* qh = qp + b * q.stride(0) + h * group * d;
        for (int64_t i = 0; i < group * d; ++i) qf[i] = to_f(qh[i]) * float(scale);
        attend(qf.data(), kc, vc, offset.data(), end - begin, d, group, scores.data(), tm, tl,
               acc.data() + task * group * d);
      }
    });
    // Merge the splits of each (sequence, kv head, query head): rescale to the common max.
    std::vector<float> o(d);
    for (int64_t bh = 0; bh < batch * kv_heads; ++bh) {
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t first = bh * splits * group + g;
        merge_splits(m.data() + first, l.data() + first, acc.data() + first * d, splits, group, d, o.data(),
                     op + (b * heads + h * group + g) * d);
      }
    }
  });
  return out;
}

// Causal attention of the new tokens of prefill chunks (and decodes) over the cache, their own
// K/V already written: row t is query q[t] over the first key_counts[t] keys of the page table
// page_tables[token_seq[t]]. Every row is computed exactly as paged_decode_attention computes a
// decode of the same length (same 256-key splits, same kernels, same merge), so a token's output,
// and the K/V that later layers write from it, do not depend on how its prompt was chunked or
// whether it ran as a decode. q: [T, H, d] (any row stride, contiguous heads); page_tables: int64
// [B, W]; token_seq, key_counts: int64 [T]. Returns [T, H, d] in q's dtype.
Tensor paged_prefill_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& page_tables, const Tensor& token_seq, const Tensor& key_counts,
                               int64_t page_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, H, d] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == q.size(2),
              "caches must be contiguous [slots, kv_heads, head_dim] matching q");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype");
  const int64_t tokens = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(page_tables.scalar_type() == at::kLong && page_tables.is_contiguous() && page_tables.dim() == 2,
              "page_tables must be contiguous int64 [B, pages]");
  TORCH_CHECK(token_seq.scalar_type() == at::kLong && token_seq.is_contiguous() && token_seq.numel() == tokens &&
                  key_counts.scalar_type() == at::kLong && key_counts.is_contiguous() && key_counts.numel() == tokens,
              "token_seq and key_counts must be contiguous int64 [T]");
  TORCH_CHECK(page_size > 0 && k_cache.size(0) % page_size == 0, "cache slots must be whole pages");
  const int64_t group = heads / kv_heads, width = page_tables.size(1), seqs = page_tables.size(0);
  const int64_t num_pages = k_cache.size(0) / page_size;
  const int64_t* seq_of = token_seq.const_data_ptr<int64_t>();
  const int64_t* count = key_counts.const_data_ptr<int64_t>();
  const int64_t* tables = page_tables.const_data_ptr<int64_t>();
  std::vector<int64_t> longest(seqs, 0);
  for (int64_t t = 0; t < tokens; ++t) {      // validated before any read
    TORCH_CHECK(seq_of[t] >= 0 && seq_of[t] < seqs, "token ", t, " names sequence ", seq_of[t], " of ", seqs);
    TORCH_CHECK(count[t] >= 1 && count[t] <= width * page_size, "key count ", count[t], " does not fit its page table");
    longest[seq_of[t]] = std::max(longest[seq_of[t]], count[t]);
  }
  for (int64_t b = 0; b < seqs; ++b)
    for (int64_t p = 0; p < (longest[b] + page_size - 1) / page_size; ++p) {
      const int64_t page = tables[b * width + p];
      TORCH_CHECK(page >= 0 && page < num_pages, "page ", page, " outside the cache");
    }
  Tensor out = at::empty({tokens, heads, d}, q.options());
  const int64_t tasks = tokens * kv_heads;
  // Causal rows grow in cost with their position: each thread takes every threads-th task, not a
  // contiguous range (which would give the last thread the longest rows).
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  dispatch(q.scalar_type(), "paged_prefill_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = ptr<scalar_t>(q);
    const scalar_t* kc = ptr<scalar_t>(k_cache);
    const scalar_t* vc = ptr<scalar_t>(v_cache);
    scalar_t* op = ptr<scalar_t>(out);
    const AttendFn<scalar_t> attend = pick_attend<scalar_t>(d, group);
    at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t last_thread) {
      std::vector<float> qf(group * d), scores(group * kKeysPerSplit), o(d), m, l, acc;
      std::vector<int64_t> offset(kKeysPerSplit);
      for (int64_t lane = first_thread; lane < last_thread; ++lane) {
        for (int64_t task = lane; task < tasks; task += threads) {
          const int64_t t = task / kv_heads, h = task % kv_heads, keys = count[t];
          const int64_t splits = (keys + kKeysPerSplit - 1) / kKeysPerSplit;
          m.resize(splits * group);
          l.resize(splits * group);
          acc.resize(splits * group * d);
          const scalar_t* qh = qp + t * q.stride(0) + h * group * d;
          for (int64_t i = 0; i < group * d; ++i) qf[i] = to_f(qh[i]) * float(scale);
          for (int64_t s = 0; s < splits; ++s) {
            const int64_t begin = s * kKeysPerSplit, end = std::min(keys, begin + kKeysPerSplit);
            key_offsets(tables + seq_of[t] * width, page_size, kv_heads, d, h, begin, end, offset.data());
            attend(qf.data(), kc, vc, offset.data(), end - begin, d, group, scores.data(), m.data() + s * group,
                   l.data() + s * group, acc.data() + s * group * d);
          }
          for (int64_t g = 0; g < group; ++g)
            merge_splits(m.data() + g, l.data() + g, acc.data() + g * d, splits, group, d, o.data(),
                         op + (t * heads + h * group + g) * d);
        }
      }
    });
  });
  return out;
}

// ---- Quest page scores (sparse decode's page selection) ------------------------------------------

// For each of the `group` q heads (float32 [group, d]): bound[g] = max(bound[g], sum over d of
// max(q * lo, q * hi)), the largest q.k any key within the block's [lo, hi] can reach.
template <typename T>
inline void quest_bounds(const float* q, const T* lo, const T* hi, int64_t d, int64_t group, float scale,
                         float* bound, int64_t bound_stride) {
#if defined(__AVX512F__)
  if (d % 16 == 0 && d <= 128) {
    __m512 l[8], h[8];
    const int64_t chunks = d / 16;
    for (int64_t c = 0; c < chunks; ++c) {
      l[c] = load16(lo + 16 * c);
      h[c] = load16(hi + 16 * c);
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 qv = _mm512_loadu_ps(q + g * d + 16 * c);
        acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_mul_ps(qv, l[c]), _mm512_mul_ps(qv, h[c])));
      }
      const float value = _mm512_reduce_add_ps(acc) * scale;
      bound[g * bound_stride] = std::max(bound[g * bound_stride], value);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float sum = 0.0f;
    for (int64_t i = 0; i < d; ++i) sum += std::max(q[g * d + i] * to_f(lo[i]), q[g * d + i] * to_f(hi[i]));
    bound[g * bound_stride] = std::max(bound[g * bound_stride], sum * scale);
  }
}

// kernels/reference.quest_page_scores for a batch: q [B, H, d]; kmin, kmax [pages, blocks, KV, d]
// (one layer's block summaries); page_tables [B, P]; lengths [B]. Per row and KV head: each q head's
// bound of every page (the best of its written blocks) at the attention scale, log-softmax over the
// row's pages, max over the GQA group. Returns float32 [B, KV, P], -inf past a row's pages.
Tensor quest_page_scores(const Tensor& q, const Tensor& kmin, const Tensor& kmax, const Tensor& page_tables,
                         const Tensor& lengths, int64_t page_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [B, H, d] with contiguous heads");
  TORCH_CHECK(kmin.dim() == 4 && kmin.is_contiguous() && kmax.is_contiguous() && kmax.sizes() == kmin.sizes() &&
                  kmin.size(3) == q.size(2),
              "kmin, kmax must be contiguous [pages, blocks, kv_heads, head_dim] matching q");
  TORCH_CHECK(kmin.scalar_type() == q.scalar_type() && kmax.scalar_type() == q.scalar_type(),
              "q and summaries must share a dtype");
  TORCH_CHECK(page_tables.scalar_type() == at::kLong && page_tables.dim() == 2 && page_tables.is_contiguous() &&
                  page_tables.size(0) == q.size(0),
              "page_tables must be contiguous int64 [B, pages]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.numel() == q.size(0),
              "lengths must be contiguous int64 [B]");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t num_pages = kmin.size(0), blocks = kmin.size(1), kv_heads = kmin.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(page_size > 0 && page_size % blocks == 0, "blocks must divide the page size");
  const int64_t group = heads / kv_heads, width = page_tables.size(1), sub = page_size / blocks;
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t* tables = page_tables.const_data_ptr<int64_t>();
  int64_t work = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= width * page_size, "length ", len[b], " does not fit its page table");
    for (int64_t p = 0; p < (len[b] + page_size - 1) / page_size; ++p) {
      const int64_t page = tables[b * width + p];
      TORCH_CHECK(page >= 0 && page < num_pages, "page ", page, " outside the summaries");
    }
    work += (len[b] + page_size - 1) / page_size * blocks * heads * d;
  }
  Tensor out = at::full({batch, kv_heads, width}, -std::numeric_limits<float>::infinity(),
                        q.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  dispatch(q.scalar_type(), "quest_page_scores", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = ptr<scalar_t>(q);
    const scalar_t* lo_p = ptr<scalar_t>(kmin);
    const scalar_t* hi_p = ptr<scalar_t>(kmax);
    const int64_t tasks = batch * kv_heads;
    at::parallel_for(0, tasks, work < kSerialWork ? tasks : 1, [&](int64_t first, int64_t last) {
      std::vector<float> qf(group * d), logits;
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        const int64_t pages = (len[b] + page_size - 1) / page_size;
        const scalar_t* qh = qp + b * q.stride(0) + h * group * d;
        for (int64_t i = 0; i < group * d; ++i) qf[i] = to_f(qh[i]);
        logits.assign(group * pages, -std::numeric_limits<float>::infinity());
        for (int64_t p = 0; p < pages; ++p) {
          const int64_t page = tables[b * width + p];
          const int64_t filled = std::min(page_size, len[b] - p * page_size);
          const int64_t written = (filled + sub - 1) / sub;
          for (int64_t j = 0; j < written; ++j) {
            const int64_t base = ((page * blocks + j) * kv_heads + h) * d;
            quest_bounds(qf.data(), lo_p + base, hi_p + base, d, group, float(scale), logits.data() + p, pages);
          }
        }
        float* dst = op + (b * kv_heads + h) * width;
        for (int64_t g = 0; g < group; ++g) {
          const float* lg = logits.data() + g * pages;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t p = 0; p < pages; ++p) mx = std::max(mx, lg[p]);
          float sum = 0.0f;
          for (int64_t p = 0; p < pages; ++p) sum += std::exp(lg[p] - mx);
          const float lse = mx + std::log(sum);
          for (int64_t p = 0; p < pages; ++p) dst[p] = std::max(dst[p], lg[p] - lse);
        }
      }
    });
  });
  return out;
}

// ---- SwiGLU activation --------------------------------------------------------------------------

// out = silu(gate) * up for one row [gate | up] of 2 * inter values.
template <typename T>
inline void silu_mul_row(const T* gate, T* out, int64_t inter) {
  const T* up = gate + inter;
#pragma omp simd
  for (int64_t i = 0; i < inter; ++i) {
    const float g = to_f(gate[i]);
    out[i] = from_f<T>(g / (1.0f + exp_approx(-g)) * to_f(up[i]));
  }
}

Tensor silu_mul(const Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must hold gate and up halves");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2, stride = gate_up.stride(0);
  Tensor y = at::empty({rows, inter}, gate_up.options());
  dispatch(gate_up.scalar_type(), "silu_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* src = ptr<scalar_t>(gate_up);
    scalar_t* dst = ptr<scalar_t>(y);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(src + r * stride, dst + r * inter, inter);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(radixgate_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("rotary_store(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin_signed, int q_heads, "
        "int kv_heads, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots) -> ()", &rotary_store);
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_tables, "
        "Tensor lengths, int page_size, float scale) -> Tensor", &paged_decode_attention);
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_tables, "
        "Tensor token_seq, Tensor key_counts, int page_size, float scale) -> Tensor", &paged_prefill_attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("quest_page_scores(Tensor q, Tensor kmin, Tensor kmax, Tensor page_tables, Tensor lengths, "
        "int page_size, float scale) -> Tensor", &quest_page_scores);
}
