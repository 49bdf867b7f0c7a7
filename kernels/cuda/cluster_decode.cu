// One-launch centroid sparse decode for few rows, on Hopper thread-block clusters.
//
// At batch 1 the Triton chain (score, select inside the attention, merge) is a chain of launches and
// dependent memory trips, not of bytes (docs/sparse.md). Here one cluster of CL blocks serves one
// (sequence, KV head) row and the stages meet at the cluster's hardware barrier, sharing what they
// computed through each other's shared memory (distributed shared memory) instead of global memory:
//
//   0. every block loads the row's q and page table into its shared memory;
//   A. block r scores its slice of the row's groups from their centroids (centroid_scores.py's rule:
//      L_h(n) / scale), and the slice's log-sum-exp per q head;                     -- cluster barrier
//   B. every block reads all the row's bounds from its own memory, takes each q head's log-softmax,
//      the max over the GQA group and forces sink and recent groups; then block r ranks its own
//      slice's groups against the whole row (ties to the lower index, selection.keep_top_k's order)
//      and sends each kept group of rank c to block c / (budget / CL), which attends it;  -- barrier
//   C. block r attends to its budget / CL kept groups' keys (K/V by cp.async in one trip), its
//      partial (max, sum) and unnormalised output pushed to the blocks that merge them;  -- barrier
//   D. block r merges one slice of the outputs from its own memory.
//
// kernels/centroid_reference.centroid_select_pages is the rule; kernels/cuda/cluster_decode.py
// launches it and says where it is used.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace cg = cooperative_groups;

constexpr int NT = 256;            // threads a block
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

// All fields 8 bytes wide, mirrored by a ctypes.Structure in cluster_decode.py.
struct Params {
  int64_t q, k, v, cents, stats, table, lens, out;  // device pointers
  int64_t s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_cp, s_ch, s_sp, s_sh, s_tb, s_ob, s_oh;  // elements
  int64_t width, page_size, group_pages, budget, sink, recent, chunk;  // budget, sink, recent in groups
  int64_t stop;    // unused (kept for the ctypes mirror)
  int64_t stamps;  // timing only: non-zero, int64 [blocks, 16] of clock64() at each stage's end (thread 0)
  double scale;
};

// Offsets (bytes) of one block's shared memory; the host sizes the launch with the same function.
// The *_all arrays and `assign` are filled by every block of the cluster (pushed through distributed
// shared memory before a cluster barrier), so that after it each block reads only its own memory.
struct Layout {
  int qraw, q, qsq, lse, part_all, pt, bound, bound_all, keys, assign, p, pb, red, ml_all, acc_in, big, total;
};

__host__ __device__ inline int round16(int x) { return (x + 15) & ~15; }
// a group's centroids in shared memory: rows padded by 16 bytes (conflict-free fragment loads), then stats
template <int D, int C>
__host__ __device__ constexpr int group_smem_bytes() { return C * (D + 16) + C * 8; }

template <int D, int GROUP, int C, int CL, typename T>
__host__ __device__ inline Layout make_layout(int width, int group_pages, int budget, int span, int chunk) {
  constexpr int HP = GROUP <= 4 ? 4 : 8;  // a group's bounds, padded to whole float4s
  const int max_groups = width / group_pages;
  const int slice = (max_groups + CL - 1) / CL;
  const int tokens = budget * span / CL;  // a block's share of the kept keys
  Layout L;
  int at = 0;
  L.qraw = at;     at += round16(GROUP * D * (int)sizeof(T));
  L.q = at;        at += round16(GROUP * (D + 4) * 4);
  L.qsq = at;      at += round16(GROUP * 4);
  L.lse = at;      at += round16(GROUP * 4);
  L.part_all = at; at += round16(CL * HP * 2 * 4);
  L.pt = at;       at += round16(width * 4);
  L.bound = at;    at += round16(slice * HP * 4);
  L.bound_all = at; at += round16(max_groups * HP * 4);
  L.keys = at;     at += round16(max_groups * 4);
  L.assign = at;   at += round16(budget * 4);
  L.p = at;        at += round16(GROUP * tokens * 4);
  L.pb = at;       at += round16(GROUP * (tokens + 8) * (int)sizeof(T));
  L.red = at;      at += round16((NT / 32) * GROUP * 4);
  L.ml_all = at;   at += round16(CL * HP * 2 * 4);
  L.acc_in = at;   at += round16(CL * (GROUP * D / CL) * 4);
  L.big = at;
  const int cents_bytes = chunk * group_smem_bytes<D, C>();
  const int kv_bytes = 2 * tokens * (D + 8) * (int)sizeof(T);
  at += cents_bytes > kv_bytes ? cents_bytes : kv_bytes;
  L.total = at;
  return L;
}

__device__ inline void cp_async16(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
__device__ inline void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ inline unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// D += A B on the tensor cores, m16n8k16, fp32 accumulators (A row-major 16x16, B 16x8 by columns)
__device__ inline void mma16816(float* c, const uint32_t* a, const uint32_t* b, const __nv_bfloat16*) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ inline void mma16816(float* c, const uint32_t* a, const uint32_t* b, const __half*) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ inline uint32_t pack2(float x, float y, const __nv_bfloat16*) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ inline uint32_t pack2(float x, float y, const __half*) {
  const __half2 v = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ inline uint32_t pack_halves(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }
// two e4m3 values (a 16-bit word, lower column first) as an fp16 pair (exact)
__device__ inline uint32_t fp8x2_to_half2(uint16_t pair) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline void from_float(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ inline void from_float(__half* p, float x) { *p = __float2half(x); }

// 8 16-bit values of a 16-byte word as floats
__device__ inline void unpack8(uint4 u, const __nv_bfloat16*, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
__device__ inline void unpack8(uint4 u, const __half*, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
    f[2 * j] = x.x;
    f[2 * j + 1] = x.y;
  }
}

// float order as unsigned order (-0.0 ties with +0.0, as selection.keep_top_k)
__device__ inline uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ inline float warp_max(float x) {
#pragma unroll
  for (int o = 16; o; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

__device__ inline void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ inline void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
__device__ inline void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"); }

template <int D, int GROUP, int C, int CL, typename T>
__global__ void __launch_bounds__(NT, 1) cluster_decode(const Params p) {
  static_assert(C == 8 && GROUP <= 8, "a tensor-core tile is two groups' 8 centroids by up to 8 q heads");
  static_assert(D % 16 == 0 && (GROUP * D) % (2 * CL) == 0, "shapes");
  constexpr int HP = GROUP <= 4 ? 4 : 8;
  constexpr int NW = NT / 32;
  constexpr int GB = group_smem_bytes<D, C>();
  constexpr int CROW = D + 16;  // a centroid row in shared memory (bytes)
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int kvh = blockIdx.x / CL, b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int fg = lane >> 2, ft = lane & 3;  // a tensor-core fragment's row group and column pair
  const int width = static_cast<int>(p.width), gp = static_cast<int>(p.group_pages);
  const int ps = static_cast<int>(p.page_size), span = ps * gp;
  const int budget = static_cast<int>(p.budget), chunk = static_cast<int>(p.chunk);
  const int per_block = budget / CL;       // kept groups a block attends
  const int tokens = per_block * span;     // their keys
  const Layout L = make_layout<D, GROUP, C, CL, T>(width, gp, budget, span, chunk);
  extern __shared__ __align__(16) unsigned char smem[];
  T* qraw = reinterpret_cast<T*>(smem + L.qraw);
  float* q_s = reinterpret_cast<float*>(smem + L.q);
  float* qsq_s = reinterpret_cast<float*>(smem + L.qsq);
  float* lse_s = reinterpret_cast<float*>(smem + L.lse);
  float* part_all = reinterpret_cast<float*>(smem + L.part_all);
  int* pt_s = reinterpret_cast<int*>(smem + L.pt);
  float* bound_s = reinterpret_cast<float*>(smem + L.bound);
  float* bound_all = reinterpret_cast<float*>(smem + L.bound_all);
  uint32_t* keys_s = reinterpret_cast<uint32_t*>(smem + L.keys);
  int* assign_s = reinterpret_cast<int*>(smem + L.assign);
  float* p_s = reinterpret_cast<float*>(smem + L.p);
  T* pb = reinterpret_cast<T*>(smem + L.pb);
  float* red_s = reinterpret_cast<float*>(smem + L.red);
  float* ml_all = reinterpret_cast<float*>(smem + L.ml_all);
  float* acc_in = reinterpret_cast<float*>(smem + L.acc_in);
  unsigned char* big = smem + L.big;
  const float scale = static_cast<float>(p.scale);
  long long* stamps = p.stamps ? reinterpret_cast<long long*>(p.stamps) + (blockIdx.y * gridDim.x + blockIdx.x) * 16
                               : nullptr;
#define RG_STAMP(i) \
  if (stamps && tid == 0) stamps[i] = clock64();
  RG_STAMP(0)
  // every block of the cluster must have started before another writes into its shared memory:
  // arrive now, wait just before the first push (by then the wait is free)
  cluster_arrive_relaxed();

  // ---- 0. q and the page table (within its width: no wait on the length), one trip ----
  const int seq_len = reinterpret_cast<const int*>(p.lens)[b];
  {
    const T* Q = reinterpret_cast<const T*>(p.q) + b * p.s_qb + static_cast<int64_t>(kvh) * GROUP * p.s_qh;
    constexpr int QP = D * sizeof(T) / 16;
    for (int i = tid; i < GROUP * QP; i += NT)
      cp_async16(qraw + (i / QP) * D + (i % QP) * (16 / sizeof(T)), Q + (i / QP) * p.s_qh + (i % QP) * (16 / sizeof(T)));
    const int* table = reinterpret_cast<const int*>(p.table) + b * p.s_tb;
    for (int i = tid; i < width / 4; i += NT) cp_async16(pt_s + 4 * i, table + 4 * i);
  }
  cp_async_wait_all();
  __syncthreads();
  for (int i = tid; i < GROUP * D; i += NT) q_s[(i / D) * (D + 4) + i % D] = to_float(qraw[i]);
  __syncthreads();
  if (warp < GROUP) {
    float s = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float x = q_s[warp * (D + 4) + d] * scale;
      s = fmaf(x, x, s);
    }
    s = warp_sum(s);
    if (lane == 0) qsq_s[warp] = s;
  }
  RG_STAMP(1)
  const int n = seq_len > 0 ? (seq_len + span - 1) / span : 0;  // groups; the last holds the new token
  const int full = seq_len > 0 ? (seq_len - 1) / span : 0;     // groups with a summary
  const int slice = (n + CL - 1) / CL;
  const int g0 = min(n, rank * slice), g1 = min(n, g0 + slice);

  // ---- A. this block's slice of group bounds, in chunks of the centroid buffer ----
  // q as the tensor cores' B operand, fp16 (as centroid_scores.py meets fp8 centroids). The k
  // order within a 16-dim step is permuted so that a lane reads its 4 centroid bytes as one word:
  // fragment k 2t, 2t+1, 2t+8, 2t+9 are dims 4t .. 4t+3 of the step (the dot is the same sum).
  uint32_t qf[D / 16][2];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* qh = q_s + fg * (D + 4) + 16 * ks + 4 * ft + 2 * r;
      qf[ks][r] = fg < GROUP ? pack2(qh[0], qh[1], static_cast<const __half*>(nullptr)) : 0u;
    }
  const unsigned char* cents = reinterpret_cast<const unsigned char*>(p.cents) + kvh * p.s_ch;
  const unsigned char* stats =
      reinterpret_cast<const unsigned char*>(reinterpret_cast<const float*>(p.stats) + kvh * p.s_sh);
  constexpr int RPIECES = D / 16, PIECES = C * RPIECES + C / 2;  // 16-byte copies: a centroid row, a group
  for (int c0 = g0; c0 < g1; c0 += chunk) {
    const int cn = min(chunk, g1 - c0);
    const int loaded = max(0, min(cn, full - c0));  // groups of the chunk with a summary
    for (int i = tid; i < loaded * PIECES; i += NT) {
      const int gi = i / PIECES, piece = i - gi * PIECES;
      const int64_t page = pt_s[(c0 + gi) * gp + gp - 1];  // a group's summary sits at its last page
      if (piece < C * RPIECES) {
        const int row = piece / RPIECES, col = piece - row * RPIECES;
        cp_async16(big + gi * GB + row * CROW + 16 * col, cents + page * p.s_cp + row * D + 16 * col);
      } else {
        const int sp = piece - C * RPIECES;
        cp_async16(big + gi * GB + C * CROW + 16 * sp, stats + page * p.s_sp * 4 + 16 * sp);
      }
    }
    cp_async_wait_all();
    __syncthreads();
    RG_STAMP(2)
    // a warp four groups at a time: two tiles of two groups' 16 centroid rows times the q heads
    for (int ga = 4 * warp; ga < cn; ga += 4 * NW) {
      int gx[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) gx[u] = min(ga + u, cn - 1);
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
          const uint32_t wa = *reinterpret_cast<const uint32_t*>(big + gx[2 * tile] * GB + fg * CROW + 16 * ks + 4 * ft);
          const uint32_t wb =
              *reinterpret_cast<const uint32_t*>(big + gx[2 * tile + 1] * GB + fg * CROW + 16 * ks + 4 * ft);
          const uint32_t af[4] = {fp8x2_to_half2(static_cast<uint16_t>(wa)), fp8x2_to_half2(static_cast<uint16_t>(wb)),
                                  fp8x2_to_half2(static_cast<uint16_t>(wa >> 16)),
                                  fp8x2_to_half2(static_cast<uint16_t>(wb >> 16))};
          mma16816(acc[tile], af, qf[ks], static_cast<const __half*>(nullptr));
        }
      }
      // acc[tile]: centroid fg of group gx[2 tile] (0, 1) and gx[2 tile + 1] (2, 3), heads 2 ft, 2 ft + 1
#pragma unroll
      for (int tile = 0; tile < 2; ++tile) {
        float logit[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int gi = gx[2 * tile + (r >> 1)], h = 2 * ft + (r & 1);
          const float2 st = reinterpret_cast<const float2*>(big + gi * GB + C * CROW)[fg];
          logit[r] = acc[tile][r] * scale + st.x + 0.5f * st.y * qsq_s[h < GROUP ? h : 0];
        }
        float m[4], e[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) m[r] = logit[r];
#pragma unroll
        for (int o = 4; o < 32; o <<= 1)
#pragma unroll
          for (int r = 0; r < 4; ++r) m[r] = fmaxf(m[r], __shfl_xor_sync(FULL, m[r], o));
#pragma unroll
        for (int r = 0; r < 4; ++r) e[r] = __expf(logit[r] - m[r]);
#pragma unroll
        for (int o = 4; o < 32; o <<= 1)
#pragma unroll
          for (int r = 0; r < 4; ++r) e[r] += __shfl_xor_sync(FULL, e[r], o);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int u = 2 * tile + (r >> 1), h = 2 * ft + (r & 1);
          const int g = c0 + ga + u;
          if (fg == 0 && h < GROUP && ga + u < cn)
            bound_s[(g - g0) * HP + h] = g < full ? (m[r] + __logf(e[r])) / scale : -CUDART_INF_F;
        }
      }
    }
    __syncthreads();  // the buffer is refilled by the next chunk
  }
  RG_STAMP(3)
  if (warp < GROUP) {  // the slice's max and sum of exp per q head, in the attention's units
    float m = -CUDART_INF_F;
    for (int i = lane; i < g1 - g0; i += 32) m = fmaxf(m, bound_s[i * HP + warp] * scale);
    m = warp_max(m);
    float s = 0.f;
    for (int i = lane; i < g1 - g0; i += 32) {
      const float x = bound_s[i * HP + warp] * scale;
      s += x == -CUDART_INF_F ? 0.f : __expf(x - m);
    }
    s = warp_sum(s);
    if (lane == 0) {
      red_s[2 * warp] = m;
      red_s[2 * warp + 1] = s;
    }
  }
  __syncthreads();
  cluster_wait();  // every block has started: push this slice's bounds and partials to all of them
  RG_STAMP(4)
  for (int i = tid; i < (g1 - g0) * (HP / 4) * CL; i += NT) {
    const int r = i % CL, v = i / CL;  // destination block, float4 of the slice
    const float4 x = reinterpret_cast<const float4*>(bound_s)[v];
    reinterpret_cast<float4*>(cluster.map_shared_rank(bound_all, r) + g0 * HP)[v] = x;
  }
  if (tid < CL) {
    float* dst = cluster.map_shared_rank(part_all, tid) + rank * HP * 2;
    for (int h = 0; h < GROUP; ++h) {
      dst[2 * h] = red_s[2 * h];
      dst[2 * h + 1] = red_s[2 * h + 1];
    }
  }
  cluster_arrive();
  cluster_wait();
  RG_STAMP(5)

  // ---- B. the row's scores (own memory only); each block ranks its own slice's groups ----
  if (tid < GROUP) {
    float m = -CUDART_INF_F;
#pragma unroll
    for (int r = 0; r < CL; ++r) m = fmaxf(m, part_all[r * HP * 2 + 2 * tid]);
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < CL; ++r) {
      const float mr = part_all[r * HP * 2 + 2 * tid];
      s += mr == -CUDART_INF_F ? 0.f : part_all[r * HP * 2 + 2 * tid + 1] * __expf(mr - m);
    }
    lse_s[tid] = m == -CUDART_INF_F ? 0.f : m + __logf(s);
  }
  __syncthreads();
  const int sink = static_cast<int>(p.sink), recent = static_cast<int>(p.recent);
  for (int i = tid; i < n; i += NT) {
    float score = -CUDART_INF_F;
#pragma unroll
    for (int h = 0; h < GROUP; ++h) score = fmaxf(score, bound_all[i * HP + h] * scale - lse_s[h]);
    if (i < sink || i >= n - recent || n <= budget) score = CUDART_INF_F;
    keys_s[i] = order_key(score);
  }
  __syncthreads();
  RG_STAMP(6)
  // A group's rank: the keys above it plus the equal keys of lower index (ties to the lower index,
  // selection.keep_top_k's order), so the ranks are 0 .. n-1 and exactly the k of rank < k are kept.
  // The kept group of rank c goes to block c / per_block, which attends it: no compaction, no pass
  // over the whole row in one block (the attention's sum does not depend on the keys' order beyond
  // rounding).
  const int k = min(n, budget);
  for (int e = g0 + warp; e < g1; e += NW) {
    const uint32_t ke = keys_s[e];
    int c = 0;
    for (int j = lane; j < n; j += 32) {
      const uint32_t kj = keys_s[j];
      c += (kj > ke) | ((kj == ke) & (j < e));
    }
    c = __reduce_add_sync(FULL, c);
    if (lane == 0 && c < k) cluster.map_shared_rank(assign_s, c / per_block)[c % per_block] = e;
  }
  cluster_arrive();
  cluster_wait();
  RG_STAMP(7)

  // ---- C. this block's kept groups ----
  const int mine = max(0, min(per_block, k - rank * per_block));
  // keys of slot s (a kept group) at offset off are real when off < that group's length (the last is partial)
  auto real = [&](int j) {
    const int s = j / span, off = j - s * span;
    return s < mine && off < seq_len - assign_s[s] * span;
  };
  constexpr int KROW = D + 8;  // a key row in shared memory (elements): no bank conflicts
  T* ks = reinterpret_cast<T*>(big);
  T* vs = ks + tokens * KROW;
  const T* K = reinterpret_cast<const T*>(p.k) + kvh * p.s_kh;
  const T* V = reinterpret_cast<const T*>(p.v) + kvh * p.s_vh;
  {
    constexpr int KP = D * sizeof(T) / 16, EP = 16 / sizeof(T);  // 16-byte pieces a row, elements a piece
    for (int i = tid; i < tokens * KP; i += NT) {
      const int j = i / KP, pc = i - j * KP;
      if (real(j)) {
        const int s = j / span, off = j - s * span;
        const int64_t page = pt_s[assign_s[s] * gp + off / ps];
        const int row = off % ps;
        cp_async16(ks + j * KROW + pc * EP, K + page * p.s_kp + row * p.s_ks + pc * EP);
        cp_async16(vs + j * KROW + pc * EP, V + page * p.s_vp + row * p.s_vs + pc * EP);
      } else {  // not a key: zero values (a zero weight times stale bits could be NaN)
        *reinterpret_cast<uint4*>(vs + j * KROW + pc * EP) = make_uint4(0, 0, 0, 0);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();
  RG_STAMP(8)
  // q K^T on the tensor cores: a warp 16-token tiles (rows) times the q heads (columns)
  const T* tag = nullptr;
  uint32_t qk[D / 16][2];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* qh = q_s + fg * (D + 4) + 16 * kk + 2 * ft + 8 * r;
      qk[kk][r] = fg < GROUP ? pack2(qh[0], qh[1], tag) : 0u;
    }
  const int used = mine * span;  // slots' keys (the last slot's tail masked by real())
  float mloc[2] = {-CUDART_INF_F, -CUDART_INF_F};  // heads 2 ft, 2 ft + 1
  for (int m0 = 16 * warp; m0 < used; m0 += 16 * NW) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const T* ka = ks + (m0 + fg) * KROW + 2 * ft;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t af[4] = {*reinterpret_cast<const uint32_t*>(ka + 16 * kk),
                              *reinterpret_cast<const uint32_t*>(ka + 8 * KROW + 16 * kk),
                              *reinterpret_cast<const uint32_t*>(ka + 16 * kk + 8),
                              *reinterpret_cast<const uint32_t*>(ka + 8 * KROW + 16 * kk + 8)};
      mma16816(acc, af, qk[kk], tag);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // token m0 + fg (+8 for r >= 2), head 2 ft + (r & 1)
      const int j = m0 + fg + 8 * (r >> 1), h = 2 * ft + (r & 1);
      const float x = real(j) ? acc[r] * scale * LOG2E : -CUDART_INF_F;
      if (h < GROUP) p_s[h * tokens + j] = x;
      mloc[r & 1] = fmaxf(mloc[r & 1], x);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mloc[r] = fmaxf(mloc[r], __shfl_xor_sync(FULL, mloc[r], o));
    if (fg == 0 && 2 * ft + r < GROUP) red_s[warp * GROUP + 2 * ft + r] = mloc[r];
  }
  __syncthreads();
  RG_STAMP(9)
  float mh[GROUP], lsum[GROUP];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    mh[h] = -CUDART_INF_F;
    for (int w = 0; w < NW; ++w) mh[h] = fmaxf(mh[h], red_s[w * GROUP + h]);
    lsum[h] = 0.f;
  }
  __syncthreads();  // red_s is reused below
  // the weights: fp32 for the sums, in K/V's dtype for the tensor cores (as decode.py rounds them)
  constexpr int PROW = 8;  // padding of a head's row of weights (elements)
  for (int i = tid; i < GROUP * tokens; i += NT) {
    const int h = i / tokens, j = i - h * tokens;
    float m = -CUDART_INF_F;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) m = g == h ? mh[g] : m;
    const float w = j < used && real(j) && m != -CUDART_INF_F ? exp2f(p_s[i] - m) : 0.f;
    from_float(pb + h * (tokens + PROW) + j, w);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) lsum[g] += g == h ? w : 0.f;
  }
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    const float l = warp_sum(lsum[h]);
    if (lane == 0) red_s[warp * GROUP + h] = l;
  }
  __syncthreads();
  if (tid < CL) {  // this block's (max, sum) per head, to every block
    float* dst = cluster.map_shared_rank(ml_all, tid) + rank * HP * 2;
    for (int h = 0; h < GROUP; ++h) {
      float l = 0.f;
      for (int w = 0; w < NW; ++w) l += red_s[w * GROUP + h];
      dst[2 * h] = mh[h];
      dst[2 * h + 1] = l;
    }
  }
  RG_STAMP(10)
  // weights times values on the tensor cores: heads (rows, GROUP of 16 used) by 8 dims a tile;
  // each tile's outputs go straight to the block that merges them
  constexpr int NTILES = D / 8, OUTS = GROUP * D / CL;
  const uint16_t* vh = reinterpret_cast<const uint16_t*>(vs);
  const int ksteps = (used + 15) / 16;
  for (int nt = warp; nt < NTILES; nt += NW) {
    const int n0 = 8 * nt;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int kt = 0; kt < ksteps; ++kt) {
      const int k0 = 16 * kt;
      const T* prow = pb + fg * (tokens + PROW) + k0 + 2 * ft;
      const uint32_t af[4] = {fg < GROUP ? *reinterpret_cast<const uint32_t*>(prow) : 0u, 0u,
                              fg < GROUP ? *reinterpret_cast<const uint32_t*>(prow + 8) : 0u, 0u};
      const int vr = (k0 + 2 * ft) * KROW + n0 + fg;
      const uint32_t bf[2] = {pack_halves(vh[vr], vh[vr + KROW]), pack_halves(vh[vr + 8 * KROW], vh[vr + 9 * KROW])};
      mma16816(acc, af, bf, tag);
    }
    if (fg < GROUP) {  // row fg: head fg; columns n0 + 2 ft, + 1
      const int o = fg * D + n0 + 2 * ft, owner = o / OUTS;
      *reinterpret_cast<float2*>(cluster.map_shared_rank(acc_in, owner) + rank * OUTS + (o - owner * OUTS)) =
          make_float2(acc[0], acc[1]);
    }
  }
  RG_STAMP(11)
  cluster_arrive();
  cluster_wait();  // every partial has arrived; nothing is read from another block after this
  RG_STAMP(12)

  // ---- D. the merge of this block's slice of the outputs, from its own memory ----
  if (tid < OUTS) {
    const int o = rank * OUTS + tid, h = o / D, d = o % D;
    float m = -CUDART_INF_F;
#pragma unroll
    for (int r = 0; r < CL; ++r)
      if (ml_all[r * HP * 2 + 2 * h + 1] > 0.f) m = fmaxf(m, ml_all[r * HP * 2 + 2 * h]);
    float l = 0.f, a = 0.f;
#pragma unroll
    for (int r = 0; r < CL; ++r) {
      const float lr = ml_all[r * HP * 2 + 2 * h + 1];
      if (lr > 0.f) {
        const float w = exp2f(ml_all[r * HP * 2 + 2 * h] - m);
        l = fmaf(w, lr, l);
        a = fmaf(w, acc_in[r * OUTS + tid], a);
      }
    }
    T* out = reinterpret_cast<T*>(p.out) + b * p.s_ob + static_cast<int64_t>(kvh * GROUP + h) * p.s_oh + d;
    from_float(out, l > 0.f ? a / l : 0.f);
  }
  RG_STAMP(13)
#undef RG_STAMP
}

template <int D, int GROUP, int C, int CL, typename T>
static int launch(const Params* p, int batch, int kv_heads, cudaStream_t stream, int* smem_out) {
  const Layout L = make_layout<D, GROUP, C, CL, T>(static_cast<int>(p->width), static_cast<int>(p->group_pages),
                                                   static_cast<int>(p->budget),
                                                   static_cast<int>(p->page_size * p->group_pages),
                                                   static_cast<int>(p->chunk));
  *smem_out = L.total;
  auto kernel = cluster_decode<D, GROUP, C, CL, T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L.total);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (CL > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kv_heads * CL, batch, 1);
  config.blockDim = dim3(NT, 1, 1);
  config.dynamicSmemBytes = L.total;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CL;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, *p);
  return static_cast<int>(err);
}

// dtype: 0 bf16, 1 fp16. Returns a cudaError_t (0: launched), or -1 for shapes with no instance.
// smem_out: the block's shared memory in bytes (with dry_run, only that: nothing is launched).
extern "C" int rg_cluster_decode(const Params* p, int batch, int kv_heads, int head_dim, int group, int clusters,
                                 int cluster, int dtype, void* stream, int* smem_out, int dry_run) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define RG_CASE(D_, G_, C_, CL_, T_, DT_)                                                    \
  if (head_dim == D_ && group == G_ && clusters == C_ && cluster == CL_ && dtype == DT_) {   \
    if (dry_run) {                                                                           \
      *smem_out = make_layout<D_, G_, C_, CL_, T_>(                                          \
          static_cast<int>(p->width), static_cast<int>(p->group_pages),                      \
          static_cast<int>(p->budget), static_cast<int>(p->page_size * p->group_pages),      \
          static_cast<int>(p->chunk)).total;                                                 \
      return 0;                                                                              \
    }                                                                                        \
    return launch<D_, G_, C_, CL_, T_>(p, batch, kv_heads, s, smem_out);                    \
  }
  RG_CASE(128, 4, 8, 8, __nv_bfloat16, 0)
  RG_CASE(128, 4, 8, 16, __nv_bfloat16, 0)
  RG_CASE(128, 4, 8, 8, __half, 1)
  RG_CASE(128, 4, 8, 16, __half, 1)
  RG_CASE(64, 3, 8, 8, __nv_bfloat16, 0)
  RG_CASE(64, 3, 8, 8, __half, 1)
#undef RG_CASE
  return -1;
}

extern "C" const char* rg_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
