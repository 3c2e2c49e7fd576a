// Fused causal grouped-query attention for prefill and training (FlashAttention-2 style), forward
// and backward, over the slotted KV cache. The CPU reference is src/backend/cpu/attention.rs
// (attention_forward, attention_backward); the semantics are those of kernels/attention.cu.
//
//     token m (slot s, position p), query head h, KV head kvh = h / (n_heads / n_kv_heads):
//     S_j = scale * q[m, h] . K[s, j, kvh]   for j = 0..=p          (scale = 1/sqrt(D))
//     out[m, h] = sum_j P_j V[s, j, kvh],   P = softmax(S),   lse[m, h] = log sum_j exp(S_j)
//
// Work is cut into query tiles: up to FLASH_ROWS tokens (2 * FLASH_ROWS for the wide forward) of
// one slot at consecutive positions and consecutive batch rows (a prefill chunk), built on the
// host (src/cuda/attention_plan.rs) as uint4 (first token, count, slot, first position); the
// forward and dq kernels take them last to first, so the tiles with the most keys start first. The keys a tile sees are 0 .. first position
// + count of its slot. No score matrix is ever stored: scores live in registers, a tile at a time.
//
// Every product is a tensor-core m16n8k16 (kernels/mma.cuh) with fragments loaded by ldmatrix:
// bf16 operands, fp32 accumulation; probabilities and dS are rounded to bf16 only as operands of
// the next product, the softmax statistics stay fp32. Key tiles are copied into shared memory
// with cp.async in two stages, so the copy of the next tile overlaps the math on this one.
// Head dims 32, 64 and 128 are instantiated (others use attention.cu).
//
// Kernels (launchers in src/cuda/ops/flash_attention.rs):
//   flash_attention_forward_d{D}     grid (query tiles, n_heads), 4 warps; warp w owns query
//                                    rows 16w..16w+16 of the tile; keys in steps of FWD_KEYS
//                                    staged in shared memory; online softmax in exp2 units.
//   flash_attention_forward_wide_d{D} the same over tiles of 128 rows, 32 per warp (two m16
//                                    slabs sharing each K/V fragment); for d = 128 the query
//                                    tile waits in shared memory and keys come 32 per step.
//   flash_attention_backward_dot     dsum[m, h] = dout[m, h] . out[m, h] (FlashAttention's D).
//   flash_attention_backward_dq_d{D} grid (query tiles, n_heads): recomputes P from lse, then
//                                    dS = P * (dO V^T - dsum) and dq = scale * dS K (overwritten).
//   flash_attention_backward_dkdv_d{D} grid (key tiles, n_kv_heads): KV_KEYS keys of one slot,
//                                    over every query tile of that slot and every query head of
//                                    the group: dV += P^T dO, dK += scale * dS^T Q, added to the
//                                    bf16 gradient caches. Each key row has one owner: no atomics,
//                                    and the result does not depend on scheduling.
//   flash_attention_backward_fused_d{D} the dk/dv kernel that also computes dq (5 products instead
//                                    of the dq and dk/dv kernels' 7): dS goes through shared
//                                    memory, dq = scale * dS K is summed in f32 over the key tiles
//                                    in key order (see below), then converted to bf16. 1-D grid.
//   flash_attention_backward_fused_wide_d{D} the same with 8 warps over key tiles of 2 * KV_KEYS:
//                                    each query tile copied and each dq row added to half as often
//                                    (FlashAttention-2's 128-key blocks); one block per SM, so the
//                                    next query tile is copied during the math on this one.

#include "common.cuh"
#include "mma.cuh"

#include <math.h>

#define FLASH_THREADS 128  // 4 warps (src/cuda/ops/flash_attention.rs)
#define FLASH_ROWS 64      // query rows per tile, 16 per warp (src/cuda/attention_plan.rs)
#define FWD_KEYS 64        // keys per step of the forward
#define DQ_KEYS 32         // keys per step of the dq kernel (fewer: it holds two score tiles)
#define KV_KEYS 64         // keys per block of the dk/dv kernel, 16 per warp (the wide fused
                           // backward: 2 * KV_KEYS, 8 warps)
#define KV_QUERIES 16      // queries per inner step of the dk/dv kernel
#define DS_STRIDE (FLASH_ROWS + TILE_PAD)  // bf16 per row of the fused kernel's dS^T tile
#define MAX_TURN_SPINS (1 << 22)  // polls of a dq turn before the fused kernel gives up (trap):
                                  // seconds, where a real wait is a few query tiles' work

static_assert(FLASH_ROWS == 16 * (FLASH_THREADS / WARP_SIZE), "one 16-row slab per warp");
static_assert(KV_KEYS == 16 * (FLASH_THREADS / WARP_SIZE), "one 16-key slab per warp");
static_assert(KV_QUERIES == 16, "one k-step of the dk/dv products, two score tiles");

// A query tile: batch rows first_token .. first_token + count, positions first_pos .. + count.
struct QueryTile {
    int first_token, count, slot, first_pos;
};

__device__ __forceinline__ QueryTile read_tile(const uint4* tiles, int i) {
    const uint4 v = tiles[i];
    return QueryTile{(int)v.x, (int)v.y, (int)v.z, (int)v.w};
}

// ----------------------------------------------------------------------------
// forward

// The forward takes SLABS slabs of 16 query rows per warp: FLASH_ROWS rows per block with one,
// 2 * FLASH_ROWS in the wide variant, where every K and V fragment loaded from shared memory
// feeds two m16 products (FlashAttention-2's 128-row blocks).

// Whether the query fragments stay in registers for the whole key loop ([16 * SLABS, D] bf16:
// D / 4 * SLABS registers); the wide d = 128 variant reads them from a shared tile instead, to
// leave room for its 2 x [16, 128] output accumulators.
template <int D, int SLABS>
__host__ __device__ constexpr bool forward_q_in_registers() {
    return SLABS * D <= 128;
}

// Keys per step of the forward: FWD_KEYS, or half that where two [16, 128] output accumulators
// per warp leave no registers for a [16, 64] score tile per slab.
template <int D, int SLABS>
__host__ __device__ constexpr int forward_keys() {
    return SLABS * D > 128 ? FWD_KEYS / 2 : FWD_KEYS;
}

template <int D, int SLABS>
__device__ __forceinline__ void flash_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q,
                                              const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,
                                              const uint4* tiles, int capacity, int n_heads,
                                              int n_kv_heads, float scale) {
    constexpr int KEYS = forward_keys<D, SLABS>();
    constexpr int S = D + TILE_PAD;
    constexpr int TILE = KEYS * S;
    constexpr int ROWS = FLASH_ROWS * SLABS;
    constexpr bool Q_IN_REGISTERS = forward_q_in_registers<D, SLABS>();
    DYNAMIC_SHARED(unsigned char, smem);
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem);  // [2 stages][K, V][KEYS][S]
    __nv_bfloat16* q_s = kv_s + 4 * TILE;  // [ROWS][S], when !Q_IN_REGISTERS

    // The heaviest tiles (latest positions: most keys) start first, so the grid ends on light ones.
    const QueryTile tile = read_tile(tiles, gridDim.x - 1 - blockIdx.x);
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int q_dim = n_heads * D, kv_dim = n_kv_heads * D;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * 16 * SLABS;  // the warp owns rows warp_row0 .. + 16 * SLABS
    // a warp whose rows are all padding only helps with the copies
    const bool warp_live = warp_row0 < tile.count;
    // positions of the warp's first and last real row
    const int warp_first_pos = tile.first_pos + warp_row0;
    const int warp_last_pos = tile.first_pos + min(warp_row0 + 16 * SLABS, tile.count) - 1;
    const float scale_log2 = scale * LOG2E;  // the softmax in log2 units: exp2 is one instruction
    const __nv_bfloat16* q_tile = q + (size_t)tile.first_token * q_dim + h * D;

    uint32_t q_frag[Q_IN_REGISTERS ? SLABS : 1][Q_IN_REGISTERS ? D / 16 : 1][4];  // [16, D] per slab
    if constexpr (Q_IN_REGISTERS) {
#pragma unroll
        for (int i = 0; i < SLABS; i++) {
            load_rows_as_a<D>(q_frag[i], q_tile, q_dim, warp_row0 + 16 * i, tile.count, g, t);
        }
    } else {
        load_tile_async<D, ROWS, FLASH_THREADS>(q_s, q_tile, q_dim, tile.count);  // lands with step 0's keys
    }

    float o[SLABS][D / 8][4];  // [16, D] output accumulator per slab
    float row_max[SLABS][2], row_sum[SLABS][2];  // per slab, this thread's rows g and g + 8
#pragma unroll
    for (int i = 0; i < SLABS; i++) {
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) { o[i][dn][0] = o[i][dn][1] = o[i][dn][2] = o[i][dn][3] = 0.0f; }
        row_max[i][0] = row_max[i][1] = -INFINITY;  // running max of the scores (log2 units)
        row_sum[i][0] = row_sum[i][1] = 0.0f;       // this thread's share of sum exp2(score - max)
    }

    const size_t slot_base = (size_t)tile.slot * capacity * kv_dim + (size_t)kvh * D;
    const int key_end = tile.first_pos + tile.count;  // keys 0..key_end
    const int steps = ceil_div(key_end, KEYS);
    // K and V of step i into stage i % 2: the copy of step i + 1 runs during the math of step i
    auto prefetch = [&](int step) {
        const int j0 = step * KEYS, valid = min(KEYS, key_end - j0);
        __nv_bfloat16* k_dst = kv_s + (step % 2) * 2 * TILE;
        const size_t at = slot_base + (size_t)j0 * kv_dim;
        load_tile_async<D, KEYS, FLASH_THREADS>(k_dst, cache_k + at, kv_dim, valid);
        load_tile_async<D, KEYS, FLASH_THREADS>(k_dst + TILE, cache_v + at, kv_dim, valid);
        copy_async_commit();
    };
    prefetch(0);
    for (int step = 0; step < steps; step++) {
        const int j0 = step * KEYS;
        // then this step's tiles are in shared memory for every thread
        pipeline_advance(step, steps, prefetch);
        const __nv_bfloat16* k_s = kv_s + (step % 2) * 2 * TILE;
        const __nv_bfloat16* v_s = k_s + TILE;

        // keys all beyond the warp's rows (the diagonal's far side) change nothing: skip them
        if (warp_live && j0 <= warp_last_pos) {
            // s = Q K^T: [16, KEYS] per slab as KEYS / 8 accumulator tiles
            float s[SLABS][KEYS / 8][4];
#pragma unroll
            for (int i = 0; i < SLABS; i++) {
#pragma unroll
                for (int nt = 0; nt < KEYS / 8; nt++) { s[i][nt][0] = s[i][nt][1] = s[i][nt][2] = s[i][nt][3] = 0.0f; }
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[SLABS][4];
#pragma unroll
                for (int i = 0; i < SLABS; i++) {
                    if constexpr (Q_IN_REGISTERS) {
#pragma unroll
                        for (int e = 0; e < 4; e++) { a[i][e] = q_frag[i][kk][e]; }
                    } else {
                        load_a(a[i], q_s, S, warp_row0 + 16 * i, kk * 16, lane);
                    }
                }
#pragma unroll
                for (int nt = 0; nt < KEYS / 8; nt += 2) {
                    uint32_t b[2][2];
                    load_b_transposed_x2(b, k_s, S, nt * 8, kk * 16, lane);
#pragma unroll
                    for (int i = 0; i < SLABS; i++) {
                        mma_m16n8k16(s[i][nt], a[i], b[0]);
                        mma_m16n8k16(s[i][nt + 1], a[i], b[1]);
                    }
                }
            }
            // the causal mask, only where the step reaches past the warp's first row (a padding
            // key, j >= key_end, is beyond every real row's position): a branch the whole warp
            // takes or skips, so the steps below the diagonal run no compare per score
            if (j0 + KEYS - 1 > warp_first_pos) {
#pragma unroll
                for (int i = 0; i < SLABS; i++) {
                    const int pos0 = warp_first_pos + 16 * i + g;  // rows g and g + 8 of slab i
#pragma unroll
                    for (int nt = 0; nt < KEYS / 8; nt++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int j = j0 + nt * 8 + 2 * t + (e & 1);
                            if (j > pos0 + 8 * (e / 2)) { s[i][nt][e] = -INFINITY; }
                        }
                    }
                }
            }
            // online softmax per row (key 0 is visible to every row: the max is finite from the
            // first step on; padding rows see real keys too)
#pragma unroll
            for (int i = 0; i < SLABS; i++) {
                online_softmax_step(s[i], o[i], row_max[i], row_sum[i], scale_log2);
            }
            // o += P V, P straight from the score registers
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; kk++) {
                uint32_t a[SLABS][4];
#pragma unroll
                for (int i = 0; i < SLABS; i++) { accumulators_to_a(a[i], s[i][2 * kk], s[i][2 * kk + 1]); }
                mma_accumulate_rows<D, SLABS>(o, a, v_s, S, kk * 16, lane);
            }
        }
        __syncthreads();  // every warp is done with this stage before step + 2 refills it
    }

#pragma unroll
    for (int i = 0; i < SLABS; i++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float sum = row_sum[i][half];
            sum += __shfl_xor_sync(FULL_MASK, sum, 1);
            sum += __shfl_xor_sync(FULL_MASK, sum, 2);
            const int row = warp_row0 + 16 * i + 8 * half + g;
            if (row >= tile.count) { continue; }
            const size_t token = (size_t)tile.first_token + row;
            const float inv = 1.0f / sum;
            __nv_bfloat16* out_row = out + token * q_dim + h * D;
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                *reinterpret_cast<uint32_t*>(out_row + dn * 8 + 2 * t) =
                    pack_bf16(o[i][dn][2 * half] * inv, o[i][dn][2 * half + 1] * inv);
            }
            if (lse != nullptr && t == 0) { lse[token * n_heads + h] = (row_max[i][half] + log2f(sum)) * LN2; }
        }
    }
}

// ----------------------------------------------------------------------------
// backward: dsum = rowsum(dout * out), one warp per (token, head) row of D values

extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
flash_attention_backward_dot(float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                             int rows, int head_dim) {
    const int r = blockIdx.x * (FLASH_THREADS / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (r >= rows) { return; }  // uniform over the warp
    const int lane = threadIdx.x % WARP_SIZE;
    const __nv_bfloat16* a = dout + (size_t)r * head_dim;
    const __nv_bfloat16* b = out + (size_t)r * head_dim;
    float acc = 0.0f;
    for (int d = lane; d < head_dim; d += WARP_SIZE) { acc += bf16_to_f32(a[d]) * bf16_to_f32(b[d]); }
    acc = warp_reduce_sum(acc);
    if (lane == 0) { dsum[r] = acc; }
}

// ----------------------------------------------------------------------------
// backward: dq

template <int D>
__device__ __forceinline__ void flash_backward_dq(__nv_bfloat16* dq, const __nv_bfloat16* dout,
                                                  const float* lse, const float* dsum, const __nv_bfloat16* q,
                                                  const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,
                                                  const uint4* tiles, int capacity, int n_heads,
                                                  int n_kv_heads, float scale) {
    constexpr int S = D + TILE_PAD;
    constexpr int TILE = DQ_KEYS * S;
    DYNAMIC_SHARED(unsigned char, smem);
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem);  // [2 stages][K, V][DQ_KEYS][S]

    const QueryTile tile = read_tile(tiles, gridDim.x - 1 - blockIdx.x);  // heaviest first, as the forward
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int q_dim = n_heads * D, kv_dim = n_kv_heads * D;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int row[2] = {warp * 16 + g, warp * 16 + g + 8};
    const int pos[2] = {tile.first_pos + row[0], tile.first_pos + row[1]};
    const float scale_log2 = scale * LOG2E;

    const size_t first = (size_t)tile.first_token * q_dim + h * D;
    uint32_t q_frag[D / 16][4], do_frag[D / 16][4];
    load_rows_as_a<D>(q_frag, q + first, q_dim, warp * 16, tile.count, g, t);
    load_rows_as_a<D>(do_frag, dout + first, q_dim, warp * 16, tile.count, g, t);
    // per row: lse in log2 units (+inf for padding rows: their P is 0) and dsum
    float row_lse[2], row_dsum[2];
    for (int i = 0; i < 2; i++) {
        const size_t r = ((size_t)tile.first_token + row[i]) * n_heads + h;
        row_lse[i] = row[i] < tile.count ? lse[r] * LOG2E : INFINITY;
        row_dsum[i] = row[i] < tile.count ? dsum[r] : 0.0f;
    }

    float acc[D / 8][4];  // dq [16, D]
    for (int dn = 0; dn < D / 8; dn++) { acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f; }

    const size_t slot_base = (size_t)tile.slot * capacity * kv_dim + (size_t)kvh * D;
    const int key_end = tile.first_pos + tile.count;
    const int steps = ceil_div(key_end, DQ_KEYS);
    auto prefetch = [&](int step) {  // as in the forward
        const int j0 = step * DQ_KEYS, valid = min(DQ_KEYS, key_end - j0);
        __nv_bfloat16* k_dst = kv_s + (step % 2) * 2 * TILE;
        const size_t at = slot_base + (size_t)j0 * kv_dim;
        load_tile_async<D, DQ_KEYS, FLASH_THREADS>(k_dst, cache_k + at, kv_dim, valid);
        load_tile_async<D, DQ_KEYS, FLASH_THREADS>(k_dst + TILE, cache_v + at, kv_dim, valid);
        copy_async_commit();
    };
    prefetch(0);
    for (int step = 0; step < steps; step++) {
        const int j0 = step * DQ_KEYS;
        pipeline_advance(step, steps, prefetch);
        const __nv_bfloat16* k_s = kv_s + (step % 2) * 2 * TILE;
        const __nv_bfloat16* v_s = k_s + TILE;

        float p[DQ_KEYS / 8][4], dp[DQ_KEYS / 8][4];  // [16, DQ_KEYS] each
        for (int nt = 0; nt < DQ_KEYS / 8; nt++) {
            for (int e = 0; e < 4; e++) { p[nt][e] = dp[nt][e] = 0.0f; }
        }
        for (int nt = 0; nt < DQ_KEYS / 8; nt += 2) {
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t b[2][2];
                load_b_transposed_x2(b, k_s, S, nt * 8, kk * 16, lane);
                mma_m16n8k16(p[nt], q_frag[kk], b[0]);
                mma_m16n8k16(p[nt + 1], q_frag[kk], b[1]);
                load_b_transposed_x2(b, v_s, S, nt * 8, kk * 16, lane);
                mma_m16n8k16(dp[nt], do_frag[kk], b[0]);
                mma_m16n8k16(dp[nt + 1], do_frag[kk], b[1]);
            }
        }
        // the causal mask (S = -inf), only where the step reaches past the warp's first row
        if (j0 + DQ_KEYS - 1 > pos[0] - g) {
            for (int nt = 0; nt < DQ_KEYS / 8; nt++) {
                for (int e = 0; e < 4; e++) {
                    if (j0 + nt * 8 + 2 * t + (e & 1) > pos[e / 2]) { p[nt][e] = -INFINITY; }
                }
            }
        }
        // P = exp(S - lse); dS = P * (dP - dsum), kept in p
        for (int nt = 0; nt < DQ_KEYS / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                const int i = e / 2;
                const float pj = exp2_approx(fmaf(p[nt][e], scale_log2, -row_lse[i]));
                p[nt][e] = pj * (dp[nt][e] - row_dsum[i]);
            }
        }
        // dq += dS K
        for (int kk = 0; kk < DQ_KEYS / 16; kk++) {
            uint32_t a[4];
            accumulators_to_a(a, p[2 * kk], p[2 * kk + 1]);
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t b[2][2];
                load_b_x2(b, k_s, S, kk * 16, dn * 8, lane);
                mma_m16n8k16(acc[dn], a, b[0]);
                mma_m16n8k16(acc[dn + 1], a, b[1]);
            }
        }
        __syncthreads();  // every warp is done with this stage before step + 2 refills it
    }

    for (int i = 0; i < 2; i++) {
        if (row[i] >= tile.count) { continue; }
        __nv_bfloat16* dq_row = dq + ((size_t)tile.first_token + row[i]) * q_dim + h * D;
        for (int dn = 0; dn < D / 8; dn++) {
            *reinterpret_cast<uint32_t*>(dq_row + dn * 8 + 2 * t) =
                pack_bf16(acc[dn][2 * i] * scale, acc[dn][2 * i + 1] * scale);
        }
    }
}

// ----------------------------------------------------------------------------
// backward: dk, dv (and dq, fused)
//
// A key tile is uint4 (first key, key count, first query tile, end query tile): keys first key ..
// + key count of the slot whose query tiles are tiles[first .. end) (the host sorts the tiles by
// slot). Warp w owns keys 16w..16w+16 of the block and computes the transposed products, keys as
// rows: S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q.
//
// FUSED: dq of a query tile is also the sum over key tiles of scale * dS K. The block (WARPS warps,
// KEYS = 16 * WARPS keys) puts its dS^T [KEYS keys, FLASH_ROWS queries] in shared memory, then
// the warps compute scale * dS K [FLASH_ROWS, D] and add it to the tile's rows of `dq_acc` (f32
// [m, q_dim]; the host converts it to bf16 dq after the kernel). The key tiles of a slot take
// turns per (query tile, head) in key order, counted in `turns`: key tile r (keys
// KEYS * r .. + KEYS) waits until turns[] == r, adds, and passes the turn on. So every dq element
// is the same sum in the same order on every run, key tile 0's part stored (no zeroing of dq_acc),
// the others added (`turns`: [1 + query tiles * n_heads] i32, zero at launch: turns[0] counts the
// tickets, then one turn per (query tile, head)). A block takes its work by ticket (so a lower
// ticket's block has provably started), and tickets go key tile major over the key tiles,
// which the host sorts by r: the block a block waits for is running or done, never waiting on it
// in turn. Each block does its query tiles in the same order, so once a tile's predecessor is
// ahead they proceed in step; when both start together, rank r's first wait lasts until the
// ranks before it reach its first query tile (the pipeline filling), none once they have finished.

// A fragment of the 16x16 block of A = the TRANSPOSE of a row-major tile, at A rows row0 and
// columns col0: A[i][k] = tile[col0 + k][row0 + i]. M0..M3 = a[0..3] are the transposed 8x8
// blocks at tile (rows, cols) (+0, +0), (+0, +8), (+8, +0), (+8, +8).
__device__ __forceinline__ void load_a_transposed(uint32_t a[4], const __nv_bfloat16* tile, int stride,
                                                  int row0, int col0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldmatrix_x4_trans(a, tile + (col0 + (i / 2) * 8 + r) * stride + row0 + (i % 2) * 8);
}

// Waits (thread 0 polling, then the block) until `turn` holds `value`; traps after
// MAX_TURN_SPINS polls, which only key tiles out of key order could cause.
__device__ __forceinline__ void wait_for_turn(const int* turn, int value) {
    if (threadIdx.x == 0) {
        int spins = 0;
        while (*reinterpret_cast<const volatile int*>(turn) != value) {
            if (++spins > MAX_TURN_SPINS) { __trap(); }
            __nanosleep(64);  // fewer polls competing with the other blocks' dq additions
        }
        __threadfence();  // the previous tile's dq_acc writes are visible from here on
    }
    __syncthreads();
}

// Hands the turn to the next key tile once the whole block's writes are visible device-wide
// (the barrier, then one thread's fence: the pattern of cooperative groups' grid sync).
__device__ __forceinline__ void pass_turn(int* turn) {
    // (also what orders every warp's dq additions before the turn passes: not redundant with the
    // barriers that protect shared memory)
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(turn, 1);
    }
}

// scale * dS K over this key tile's KEYS keys into the query tile's rows of dq_acc: stored by the
// first key tile (FIRST), added (fire-and-forget reductions in L2) by the others. Warp w takes
// query rows 16 (w % 4) .. + 16 and, with 8 warps, half of the columns (w / 4).
template <int D, int KEYS, int WARPS, bool FIRST>
__device__ __forceinline__ void dq_of_key_tile(float* dq_acc, const __nv_bfloat16* ds_s,
                                               const __nv_bfloat16* k_s, size_t first, int q_dim,
                                               int count, float scale, int warp, int lane) {
    constexpr int S = D + TILE_PAD;
    constexpr int SLABS = FLASH_ROWS / 16;
    constexpr int COLS = D / (WARPS / SLABS);  // columns per warp
    static_assert(WARPS % SLABS == 0 && COLS % 16 == 0, "whole 16-column steps per warp");
    const int g = lane / 4, t = lane % 4;
    const int row0 = (warp % SLABS) * 16, col0 = (warp / SLABS) * COLS;
    if (row0 >= count) { return; }  // padding rows only
    uint32_t a[KEYS / 16][4];  // dS [16 queries, KEYS keys] from the dS^T tile
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; kk++) { load_a_transposed(a[kk], ds_s, DS_STRIDE, row0, kk * 16, lane); }
    // this thread's elements of rows g and g + 8 start here (null: a padding row), so each one
    // below is a constant offset from them
    float* rows[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = row0 + g + 8 * half;
        rows[half] = row < count ? dq_acc + first + (size_t)row * q_dim + col0 + 2 * t : nullptr;
    }
#pragma unroll
    for (int step = 0; step < COLS / 16; step++) {
        float acc[2][4] = {};  // [16, 16]: columns col0 + 16 * step .. + 16
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++) {
            uint32_t b[2][2];
            load_b_x2(b, k_s, S, kk * 16, col0 + 16 * step, lane);
            mma_m16n8k16(acc[0], a[kk], b[0]);
            mma_m16n8k16(acc[1], a[kk], b[1]);
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                if (rows[half] == nullptr) { continue; }
                float* at = rows[half] + 16 * step + 8 * j;
                const float x = acc[j][2 * half] * scale, y = acc[j][2 * half + 1] * scale;
                if constexpr (FIRST) {
                    __stcg(reinterpret_cast<float2*>(at), make_float2(x, y));
                } else {
                    reduce_add_f32x2(at, x, y);
                }
            }
        }
    }
}

// Query tiles are copied in STAGES stages: with 2 the copy of the next (head, query tile) runs
// during the math on this one (the wide fused kernel: one block per SM, nothing else to overlap).
template <int D, bool FUSED, int WARPS, int STAGES>
__device__ __forceinline__ void flash_backward_dkdv(float* dq_acc, int* turns,
                                                    __nv_bfloat16* dcache_k, __nv_bfloat16* dcache_v,
                                                    const __nv_bfloat16* dout, const float* lse,
                                                    const float* dsum, const __nv_bfloat16* q,
                                                    const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,
                                                    const uint4* tiles, const uint4* key_tiles,
                                                    int capacity, int n_heads, int n_kv_heads, float scale) {
    constexpr int S = D + TILE_PAD;
    constexpr int KEYS = 16 * WARPS;  // one 16-key slab per warp
    constexpr int THREADS = WARPS * WARP_SIZE;
    constexpr int QTILE = FLASH_ROWS * S;
    static_assert(STAGES == 1 || STAGES == 2, "one or two stages of query tiles");
    DYNAMIC_SHARED(unsigned char, smem);
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem);  // [KEYS][S]
    __nv_bfloat16* v_s = k_s + KEYS * S;                            // [KEYS][S]
    __nv_bfloat16* q_stages = v_s + KEYS * S;                       // [STAGES][FLASH_ROWS][S]
    __nv_bfloat16* do_stages = q_stages + STAGES * QTILE;           // [STAGES][FLASH_ROWS][S]
    float* lse_stages = reinterpret_cast<float*>(do_stages + STAGES * QTILE);  // [STAGES][FLASH_ROWS], log2 units
    float* dsum_stages = lse_stages + STAGES * FLASH_ROWS;                     // [STAGES][FLASH_ROWS]
    __nv_bfloat16* ds_s = reinterpret_cast<__nv_bfloat16*>(dsum_stages + STAGES * FLASH_ROWS);  // FUSED: [KEYS][DS_STRIDE]

    // the fused kernels' grid is 1-D, and a block's work is its ticket's, key tile major
    int block = blockIdx.x;
    if constexpr (FUSED) {  // the ticket (see above): turns[0] counts them
        __shared__ int ticket;
        if (threadIdx.x == 0) { ticket = atomicAdd(turns, 1); }
        __syncthreads();
        block = ticket;
    }
    const int key_tile = FUSED ? block / n_kv_heads : block;
    const int kvh = FUSED ? block % n_kv_heads : blockIdx.y;
    const uint4 kt = key_tiles[key_tile];
    const int first_key = (int)kt.x, key_count = (int)kt.y;
    const int tiles_begin = (int)kt.z, tiles_end = (int)kt.w;
    const int slot = read_tile(tiles, tiles_begin).slot;
    const int group = n_heads / n_kv_heads;
    const int q_dim = n_heads * D, kv_dim = n_kv_heads * D;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int key[2] = {first_key + warp * 16 + g, first_key + warp * 16 + g + 8};
    const float scale_log2 = scale * LOG2E;

    const size_t slot_base = (size_t)slot * capacity * kv_dim + (size_t)kvh * D;
    const size_t keys_at = slot_base + (size_t)first_key * kv_dim;
    load_tile_async<D, KEYS, THREADS>(k_s, cache_k + keys_at, kv_dim, key_count);
    load_tile_async<D, KEYS, THREADS>(v_s, cache_v + keys_at, kv_dim, key_count);
    copy_async_commit();  // waited for with the first query tile

    float dk[D / 8][4], dv[D / 8][4];  // [16 keys, D] each
    for (int dn = 0; dn < D / 8; dn++) {
        for (int e = 0; e < 4; e++) { dk[dn][e] = dv[dn][e] = 0.0f; }
    }

    // The work items: every query head h of the group times every query tile ti of the slot that
    // sees some of these keys, h major. advance() steps (h, ti) to the next (h == h_end: done).
    const int h_end = (kvh + 1) * group;
    auto sees_none = [&](int i) {
        const QueryTile tile = read_tile(tiles, i);
        return tile.first_pos + tile.count <= first_key;
    };
    auto advance = [&](int& h, int& ti) {
        do {
            if (++ti == tiles_end) {
                ti = tiles_begin;
                h++;
            }
        } while (h < h_end && sees_none(ti));
    };
    // Starts copying item (h, ti)'s Q and dO rows into a stage (one cp.async group) and fills its
    // statistics (visible after the next barrier).
    auto load_item = [&](int stage, int h, int ti) {
        const QueryTile tile = read_tile(tiles, ti);
        const size_t first = (size_t)tile.first_token * q_dim + h * D;
        load_tile_async<D, FLASH_ROWS, THREADS>(q_stages + stage * QTILE, q + first, q_dim, tile.count);
        load_tile_async<D, FLASH_ROWS, THREADS>(do_stages + stage * QTILE, dout + first, q_dim, tile.count);
        copy_async_commit();
        for (int r = threadIdx.x; r < FLASH_ROWS; r += blockDim.x) {
            const size_t at = ((size_t)tile.first_token + r) * n_heads + h;
            lse_stages[stage * FLASH_ROWS + r] = r < tile.count ? lse[at] * LOG2E : INFINITY;  // padding: P = 0
            dsum_stages[stage * FLASH_ROWS + r] = r < tile.count ? dsum[at] : 0.0f;
        }
    };

    int h = kvh * group, ti = tiles_begin - 1;
    advance(h, ti);
    if (STAGES == 2 && h < h_end) { load_item(0, h, ti); }
    for (int stage = 0; h < h_end; stage = (stage + 1) % STAGES) {
        int next_h = h, next_ti = ti;
        advance(next_h, next_ti);
        if (STAGES == 1) {
            load_item(0, h, ti);
            copy_async_wait<0>();
        } else if (next_h < h_end) {
            load_item((stage + 1) % STAGES, next_h, next_ti);  // the stage the last item used
            copy_async_wait<1>();
        } else {
            copy_async_wait<0>();
        }
        __syncthreads();  // this item's tiles and statistics are in shared memory
        const QueryTile tile = read_tile(tiles, ti);
        const size_t first = (size_t)tile.first_token * q_dim + h * D;
        const __nv_bfloat16* q_s = q_stages + stage * QTILE;
        const __nv_bfloat16* do_s = do_stages + stage * QTILE;
        const float* lse_s = lse_stages + stage * FLASH_ROWS;
        const float* dsum_s = dsum_stages + stage * FLASH_ROWS;

        for (int c0 = 0; c0 < tile.count; c0 += KV_QUERIES) {
            // p = S^T, dp = dP^T: [16 keys, KV_QUERIES queries]
            float p[KV_QUERIES / 8][4], dp[KV_QUERIES / 8][4];
            for (int nt = 0; nt < KV_QUERIES / 8; nt++) {
                for (int e = 0; e < 4; e++) { p[nt][e] = dp[nt][e] = 0.0f; }
            }
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t ka[4], va[4], b[2][2];
                load_a(ka, k_s, S, warp * 16, kk * 16, lane);
                load_a(va, v_s, S, warp * 16, kk * 16, lane);
                load_b_transposed_x2(b, q_s, S, c0, kk * 16, lane);
                mma_m16n8k16(p[0], ka, b[0]);
                mma_m16n8k16(p[1], ka, b[1]);
                load_b_transposed_x2(b, do_s, S, c0, kk * 16, lane);
                mma_m16n8k16(dp[0], va, b[0]);
                mma_m16n8k16(dp[1], va, b[1]);
            }
            // the causal mask (S^T = -inf: query c sees key j when j <= its position), only
            // where the warp's last key is past the step's first query
            if (key[0] - g + 15 > tile.first_pos + c0) {
                for (int nt = 0; nt < KV_QUERIES / 8; nt++) {
                    for (int e = 0; e < 4; e++) {
                        if (key[e / 2] > tile.first_pos + c0 + nt * 8 + 2 * t + (e & 1)) {
                            p[nt][e] = -INFINITY;
                        }
                    }
                }
            }
            // P^T and dS^T (in dp)
            for (int nt = 0; nt < KV_QUERIES / 8; nt++) {
                for (int e = 0; e < 4; e++) {
                    const int c = c0 + nt * 8 + 2 * t + (e & 1);
                    const float pj = exp2_approx(fmaf(p[nt][e], scale_log2, -lse_s[c]));
                    p[nt][e] = pj;
                    dp[nt][e] = pj * (dp[nt][e] - dsum_s[c]);
                }
            }
            // dv += P^T dO, dk += dS^T Q (one k-step of KV_QUERIES = 16 queries)
            uint32_t pa[4], dsa[4];
            accumulators_to_a(pa, p[0], p[1]);
            accumulators_to_a(dsa, dp[0], dp[1]);
            if constexpr (FUSED) {
                // dS^T as bf16 (the operand dk uses too): rows g and g + 8 of the warp's keys
                __nv_bfloat16* ds_rows = ds_s + (warp * 16 + g) * DS_STRIDE + c0 + 2 * t;
                *reinterpret_cast<uint32_t*>(ds_rows) = dsa[0];
                *reinterpret_cast<uint32_t*>(ds_rows + 8 * DS_STRIDE) = dsa[1];
                *reinterpret_cast<uint32_t*>(ds_rows + 8) = dsa[2];
                *reinterpret_cast<uint32_t*>(ds_rows + 8 * DS_STRIDE + 8) = dsa[3];
            }
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t b[2][2];
                load_b_x2(b, do_s, S, c0, dn * 8, lane);
                mma_m16n8k16(dv[dn], pa, b[0]);
                mma_m16n8k16(dv[dn + 1], pa, b[1]);
                load_b_x2(b, q_s, S, c0, dn * 8, lane);
                mma_m16n8k16(dk[dn], dsa, b[0]);
                mma_m16n8k16(dk[dn + 1], dsa, b[1]);
            }
        }

        if constexpr (FUSED) {
            // (the dS^T columns of queries past the last 16-query step are not written: the
            // warps whose dq rows they are skip the product)
            const int rank = first_key / KEYS;
            int* turn = turns + 1 + (size_t)ti * n_heads + h;
            wait_for_turn(turn, rank);  // (its barrier: the whole dS^T tile is in shared memory)
            if (rank == 0) {
                dq_of_key_tile<D, KEYS, WARPS, true>(dq_acc, ds_s, k_s, first, q_dim, tile.count,
                                                     scale, warp, lane);
            } else {
                dq_of_key_tile<D, KEYS, WARPS, false>(dq_acc, ds_s, k_s, first, q_dim, tile.count,
                                                      scale, warp, lane);
            }
            pass_turn(turn);  // its barrier also ends every warp's use of this stage and of ds_s
        } else {
            __syncthreads();  // every warp is done with this stage before it is refilled
        }
        h = next_h;
        ti = next_ti;
    }

    // add into the gradient caches (each key row of this KV head belongs to this block only)
    for (int i = 0; i < 2; i++) {
        if (key[i] >= first_key + key_count) { continue; }
        const size_t at = slot_base + (size_t)key[i] * kv_dim;
        for (int dn = 0; dn < D / 8; dn++) {
            const int d = dn * 8 + 2 * t;
            __nv_bfloat162* k2 = reinterpret_cast<__nv_bfloat162*>(dcache_k + at + d);
            __nv_bfloat162* v2 = reinterpret_cast<__nv_bfloat162*>(dcache_v + at + d);
            const float2 kold = __bfloat1622float2(*k2), vold = __bfloat1622float2(*v2);
            *k2 = __floats2bfloat162_rn(kold.x + dk[dn][2 * i] * scale, kold.y + dk[dn][2 * i + 1] * scale);
            *v2 = __floats2bfloat162_rn(vold.x + dv[dn][2 * i], vold.y + dv[dn][2 * i + 1]);
        }
    }
}

// ----------------------------------------------------------------------------
// entry points, one per head dim (dynamic shared memory sizes: src/cuda/ops/flash_attention.rs)

#define FLASH_ENTRY_POINTS(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_attention_forward_d##D(          \
        __nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* cache_k,          \
        const __nv_bfloat16* cache_v, const uint4* tiles, int capacity, int n_heads, int n_kv_heads,   \
        float scale) {                                                                                 \
        flash_forward<D, 1>(out, lse, q, cache_k, cache_v, tiles, capacity, n_heads, n_kv_heads, scale); \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_attention_forward_wide_d##D(     \
        __nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* cache_k,          \
        const __nv_bfloat16* cache_v, const uint4* tiles, int capacity, int n_heads, int n_kv_heads,   \
        float scale) {                                                                                 \
        flash_forward<D, 2>(out, lse, q, cache_k, cache_v, tiles, capacity, n_heads, n_kv_heads, scale); \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_attention_backward_dq_d##D(      \
        __nv_bfloat16* dq, const __nv_bfloat16* dout, const float* lse, const float* dsum,             \
        const __nv_bfloat16* q, const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,            \
        const uint4* tiles, int capacity, int n_heads, int n_kv_heads, float scale) {                  \
        flash_backward_dq<D>(dq, dout, lse, dsum, q, cache_k, cache_v, tiles, capacity, n_heads,       \
                             n_kv_heads, scale);                                                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1) flash_attention_backward_dkdv_d##D( \
        __nv_bfloat16* dcache_k, __nv_bfloat16* dcache_v, const __nv_bfloat16* dout, const float* lse, \
        const float* dsum, const __nv_bfloat16* q, const __nv_bfloat16* cache_k,                       \
        const __nv_bfloat16* cache_v, const uint4* tiles, const uint4* key_tiles, int capacity,        \
        int n_heads, int n_kv_heads, float scale) {                                                    \
        flash_backward_dkdv<D, false, 4, 1>(nullptr, nullptr, dcache_k, dcache_v, dout, lse, dsum, q,    \
                                      cache_k, cache_v, tiles, key_tiles, capacity, n_heads,           \
                                      n_kv_heads, scale);                                              \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1) flash_attention_backward_fused_d##D( \
        float* dq_acc, int* turns, __nv_bfloat16* dcache_k, __nv_bfloat16* dcache_v,                  \
        const __nv_bfloat16* dout, const float* lse, const float* dsum, const __nv_bfloat16* q,        \
        const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v, const uint4* tiles,               \
        const uint4* key_tiles, int capacity, int n_heads, int n_kv_heads, float scale) {              \
        flash_backward_dkdv<D, true, 4, 1>(dq_acc, turns, dcache_k, dcache_v, dout, lse, dsum, q,         \
                                        cache_k, cache_v, tiles, key_tiles, capacity, n_heads,         \
                                        n_kv_heads, scale);                                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(2 * FLASH_THREADS, 1)                                 \
        flash_attention_backward_fused_wide_d##D(                                                      \
            float* dq_acc, int* turns, __nv_bfloat16* dcache_k, __nv_bfloat16* dcache_v,               \
            const __nv_bfloat16* dout, const float* lse, const float* dsum, const __nv_bfloat16* q,    \
            const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v, const uint4* tiles,           \
            const uint4* key_tiles, int capacity, int n_heads, int n_kv_heads, float scale) {          \
        flash_backward_dkdv<D, true, 8, 2>(dq_acc, turns, dcache_k, dcache_v, dout, lse, dsum, q,         \
                                        cache_k, cache_v, tiles, key_tiles, capacity, n_heads,         \
                                        n_kv_heads, scale);                                            \
    }

FLASH_ENTRY_POINTS(32)
FLASH_ENTRY_POINTS(64)
FLASH_ENTRY_POINTS(128)
