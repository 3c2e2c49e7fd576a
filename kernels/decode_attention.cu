// Decode attention: few query tokens per sequence, each over its own prefix of the slotted KV
// cache, split along the keys when there are too few (token, KV head) pairs to fill the GPU
// (flash-decoding). Same semantics as attention_forward in kernels/attention.cu (the CPU
// reference is src/backend/cpu/attention.rs), plus the log-sum-exp of each row.
//
// decode_attention: grid (m tokens, n_kv_heads, splits), DECODE_THREADS threads. A block takes
// one token, one KV head and every query head of its group (group <= DECODE_MAX_GROUP), so each
// K/V row is read from memory once for the whole group, and the keys split * split_keys ..
// (split + 1) * split_keys of the token's 0..=position. Keys are staged DECODE_KEYS at a time
// in shared memory with cp.async in two stages (the copy of the next step overlaps this one's
// math); per step:
//   1. scores [group, DECODE_KEYS]: one fp32 dot product per thread and (head, key) pair;
//   2. online softmax per head (a warp per head): running max and sum, correction factor;
//   3. values: a thread owns 8 consecutive output dims of one head (x128 reads of V rows) and
//      accumulates p * V over the step's keys.
// With one split the block writes out (bf16) and lse; with several it writes its unnormalised
// output and (max, sum) in fp32 to scratch, and decode_attention_combine merges the splits.
// Requires head_dim % 8 == 0, head_dim <= DECODE_MAX_HEAD_DIM, 16-byte aligned cache rows
// (the launcher, src/cuda/ops/decode_attention.rs, checks; other cases use attention.cu).
// Head dims 64 and 128 (groups up to 16) take decode_attention_mma_d{D} instead, the same
// computation on tensor cores (at the end of this file).

#include "common.cuh"
#include "mma.cuh"

#include <math.h>

#define DECODE_THREADS 128
#define DECODE_KEYS 64
#define DECODE_MAX_GROUP 8
#define DECODE_MAX_HEAD_DIM 256
// (head, 8-dim chunk) items per block at most, over the threads: the items one thread owns
#define DECODE_ITEMS ((DECODE_MAX_GROUP * DECODE_MAX_HEAD_DIM / 8 + DECODE_THREADS - 1) / DECODE_THREADS)

static_assert(DECODE_MAX_GROUP <= DECODE_THREADS / WARP_SIZE * 2, "a warp handles at most two heads");

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
decode_attention(__nv_bfloat16* out, float* lse, float* partial_out, float* partial_stats,
                 const __nv_bfloat16* q, const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,
                 const uint32_t* slots, const uint32_t* positions, int m, int capacity, int n_heads,
                 int n_kv_heads, int head_dim, int split_keys, float scale) {
    // dynamic shared memory: q_s [group, head_dim] f32 | scores [group, DECODE_KEYS] f32 |
    // two stages of K, V [DECODE_KEYS, head_dim + TILE_PAD] bf16
    // (its own name: one shared with the template kernel's below draws nvcc's warning #1556)
    DYNAMIC_SHARED(unsigned char, fp32_smem);
    __shared__ float max_s[DECODE_MAX_GROUP], sum_s[DECODE_MAX_GROUP], corr_s[DECODE_MAX_GROUP];

    const int token = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int group = n_heads / n_kv_heads;
    const int stride = head_dim + TILE_PAD;
    float* q_s = reinterpret_cast<float*>(fp32_smem);
    float* score_s = q_s + group * head_dim;
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(score_s + group * DECODE_KEYS);
    const int tile = DECODE_KEYS * stride;  // elements of one K or V stage

    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const int len = (int)positions[token] + 1;
    const int begin = split * split_keys;
    const int end = min(len, begin + split_keys);
    const int h0 = kvh * group;  // first query head of the group
    const int vecs = head_dim / 8;
    const int items = group * vecs;

    const size_t row = (size_t)token * n_heads + h0;  // (token, h0) in [m, n_heads] order
    if (begin >= end) {  // an empty split (a short sequence in a batch with long ones)
        for (int i = tid; i < group * 2; i += DECODE_THREADS) {
            partial_stats[((size_t)split * m * n_heads + row) * 2 + i] = i % 2 == 0 ? -INFINITY : 0.0f;
        }
        for (int i = tid; i < group * head_dim; i += DECODE_THREADS) {
            partial_out[((size_t)split * m * n_heads + row) * head_dim + i] = 0.0f;
        }
        return;
    }

    for (int i = tid; i < group * head_dim; i += DECODE_THREADS) {
        q_s[i] = bf16_to_f32(q[(size_t)token * q_dim + h0 * head_dim + i]);
    }
    if (tid < group) {
        max_s[tid] = -INFINITY;
        sum_s[tid] = 0.0f;
    }
    float acc[DECODE_ITEMS][8];
    for (int k = 0; k < DECODE_ITEMS; k++) {
        for (int e = 0; e < 8; e++) { acc[k][e] = 0.0f; }
    }

    const size_t slot_base = (size_t)slots[token] * capacity * kv_dim + (size_t)kvh * head_dim;
    const int steps = ceil_div(end - begin, DECODE_KEYS);
    auto prefetch = [&](int step) {  // the keys of `step` into stage step % 2
        const int j0 = begin + step * DECODE_KEYS, n = min(DECODE_KEYS, end - j0);
        __nv_bfloat16* k_dst = kv_s + (step % 2) * 2 * tile;
        for (int i = tid; i < n * vecs; i += DECODE_THREADS) {
            const int r = i / vecs, c = (i % vecs) * 8;
            const size_t at = slot_base + (size_t)(j0 + r) * kv_dim + c;
            copy_async16(k_dst + r * stride + c, cache_k + at, true);
            copy_async16(k_dst + tile + r * stride + c, cache_v + at, true);
        }
        copy_async_commit();
    };
    prefetch(0);
    for (int step = 0; step < steps; step++) {
        const int n = min(DECODE_KEYS, end - (begin + step * DECODE_KEYS));
        // then this step's keys (and q_s, max_s, sum_s) are visible to every thread
        pipeline_advance(step, steps, prefetch);
        const __nv_bfloat16* k_s = kv_s + (step % 2) * 2 * tile;
        const __nv_bfloat16* v_s = k_s + tile;

        // 1. scores
        for (int i = tid; i < group * DECODE_KEYS; i += DECODE_THREADS) {
            const int hh = i / DECODE_KEYS, j = i % DECODE_KEYS;
            float s = -INFINITY;
            if (j < n) {
                const float* qh = q_s + hh * head_dim;
                const __nv_bfloat16* kr = k_s + j * stride;
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d += 8) {
                    const x128 kv = *reinterpret_cast<const x128*>(kr + d);
                    for (int e = 0; e < 8; e++) { dot += qh[d + e] * bf16_to_f32(kv[e]); }
                }
                s = dot * scale;
            }
            score_s[i] = s;
        }
        __syncthreads();

        // 2. online softmax, a warp per head; the step has at least one key, so the max is finite
        for (int hh = warp; hh < group; hh += DECODE_THREADS / WARP_SIZE) {
            float* sc = score_s + hh * DECODE_KEYS;
            const float a = sc[lane], b = sc[lane + WARP_SIZE];
            const float mx = fmaxf(max_s[hh], warp_reduce_max(fmaxf(a, b)));
            const float pa = expf(a - mx), pb = expf(b - mx);
            sc[lane] = pa;
            sc[lane + WARP_SIZE] = pb;
            const float sum = warp_reduce_sum(pa + pb);
            if (lane == 0) {
                const float correction = expf(max_s[hh] - mx);  // 0 on the first step
                corr_s[hh] = correction;
                sum_s[hh] = sum_s[hh] * correction + sum;
                max_s[hh] = mx;
            }
        }
        __syncthreads();

        // 3. values
        for (int k = 0; k < DECODE_ITEMS; k++) {
            const int item = tid + k * DECODE_THREADS;
            if (item >= items) { break; }
            const int hh = item / vecs, d0 = (item % vecs) * 8;
            const float correction = corr_s[hh];
            for (int e = 0; e < 8; e++) { acc[k][e] *= correction; }
            const float* p = score_s + hh * DECODE_KEYS;
            for (int j = 0; j < n; j++) {
                const x128 v = *reinterpret_cast<const x128*>(v_s + j * stride + d0);
                const float pj = p[j];
                for (int e = 0; e < 8; e++) { acc[k][e] += pj * bf16_to_f32(v[e]); }
            }
        }
        __syncthreads();  // done with this stage and score_s before they are refilled
    }

    for (int k = 0; k < DECODE_ITEMS; k++) {
        const int item = tid + k * DECODE_THREADS;
        if (item >= items) { break; }
        const int hh = item / vecs, d0 = (item % vecs) * 8;
        if (splits == 1) {
            const float inv = 1.0f / sum_s[hh];
            x128 o;
            for (int e = 0; e < 8; e++) { o[e] = f32_to_bf16(acc[k][e] * inv); }
            store128(out + (row + hh) * head_dim + d0, o);
        } else {
            float* dst = partial_out + ((size_t)split * m * n_heads + row + hh) * head_dim + d0;
            for (int e = 0; e < 8; e++) { dst[e] = acc[k][e]; }
        }
    }
    if (tid < group) {
        if (splits == 1) {
            if (lse != nullptr) { lse[row + tid] = max_s[tid] + logf(sum_s[tid]); }
        } else {
            float* st = partial_stats + ((size_t)split * m * n_heads + row + tid) * 2;
            st[0] = max_s[tid];
            st[1] = sum_s[tid];
        }
    }
}

// Merges the splits of decode_attention: grid (m, n_heads), DECODE_THREADS threads.
// out = sum_s w_s o_s / sum_s w_s l_s with w_s = exp(max_s - max over splits); split 0 is never
// empty, so the max is finite and empty splits (max -inf) weigh 0.
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
decode_attention_combine(__nv_bfloat16* out, float* lse, const float* partial_out,
                         const float* partial_stats, int m, int n_heads, int head_dim, int splits) {
    const size_t row = (size_t)blockIdx.x * n_heads + blockIdx.y;
    const size_t split_stride = (size_t)m * n_heads;
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) { mx = fmaxf(mx, partial_stats[(s * split_stride + row) * 2]); }
    float total = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float* st = partial_stats + (s * split_stride + row) * 2;
        total += expf(st[0] - mx) * st[1];
    }
    for (int d = threadIdx.x; d < head_dim; d += DECODE_THREADS) {
        float o = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float w = expf(partial_stats[(s * split_stride + row) * 2] - mx);
            o += w * partial_out[(s * split_stride + row) * head_dim + d];
        }
        out[row * head_dim + d] = f32_to_bf16(o / total);
    }
    if (threadIdx.x == 0 && lse != nullptr) { lse[row] = mx + logf(total); }
}

// ----------------------------------------------------------------------------
// Tensor-core decode: decode_attention_mma_d{D} (D = 64, 128; up to 16 query heads per KV head,
// which the launcher checks: the merge below holds 16 rows per warp).
// The same grid, splits, outputs and scratch as decode_attention (decode_attention_combine merges
// its splits), but the group's query heads are the 16 rows of an m16n8k16 tile (rows >= group are
// zeros), so the scores and the value sums are tensor-core products (kernels/mma.cuh) and the
// block is a stream of K and V. Per step of DECODE_KEYS keys (staged with cp.async in two
// stages), warp w takes keys 16w .. 16w + 16 of the step: S = Q K^T [16, 16], an online softmax
// per row in exp2 units, O_w += P V [16, D]. At the end the 4 warps' (max, sum, O) are merged
// through shared memory (the K/V stages, no longer needed). Scores and statistics fp32; P is
// rounded to bf16 as the operand of P V, as in flash_attention_forward.

#define DECODE_WARPS (DECODE_THREADS / WARP_SIZE)

static_assert(DECODE_KEYS == 16 * DECODE_WARPS, "one 16-key slab per warp and step");

template <int D>
__device__ __forceinline__ void decode_attention_mma(
    __nv_bfloat16* out, float* lse, float* partial_out, float* partial_stats,
    const __nv_bfloat16* q, const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,
    const uint32_t* slots, const uint32_t* positions, int m, int capacity, int n_heads,
    int n_kv_heads, int split_keys, float scale) {
    constexpr int S = D + TILE_PAD;
    constexpr int TILE = DECODE_KEYS * S;
    // dynamic shared memory: two stages of K, V [DECODE_KEYS, S] bf16; after the keys, the
    // warps' O [DECODE_WARPS, 16, D] f32 and (max, sum) [DECODE_WARPS, 16, 2] f32
    DYNAMIC_SHARED(unsigned char, smem);
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem);

    const int token = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int group = n_heads / n_kv_heads;
    const int q_dim = n_heads * D, kv_dim = n_kv_heads * D;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int len = (int)positions[token] + 1;
    const int begin = split * split_keys;
    const int end = min(len, begin + split_keys);
    const int h0 = kvh * group;  // first query head of the group
    const size_t row = (size_t)token * n_heads + h0;  // (token, h0) in [m, n_heads] order
    const size_t split_row = (size_t)split * m * n_heads + row;

    if (begin >= end) {  // an empty split (a short sequence in a batch with long ones)
        for (int i = threadIdx.x; i < group * 2; i += DECODE_THREADS) {
            partial_stats[split_row * 2 + i] = i % 2 == 0 ? -INFINITY : 0.0f;
        }
        for (int i = threadIdx.x; i < group * D; i += DECODE_THREADS) {
            partial_out[split_row * D + i] = 0.0f;
        }
        return;
    }

    uint32_t q_frag[D / 16][4];  // the group's query heads as the rows of a [16, D] A operand
    load_rows_as_a<D>(q_frag, q + (size_t)token * q_dim + h0 * D, D, 0, group, g, t);
    float o_slab[1][D / 8][4];  // [16, D] output accumulator over this warp's keys
    float (&o)[D / 8][4] = o_slab[0];
    for (int dn = 0; dn < D / 8; dn++) { o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f; }
    float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, log2 units
    float row_sum[2] = {0.0f, 0.0f};            // this thread's share of sum exp2(score - max)
    const float scale_log2 = scale * LOG2E;

    const size_t slot_base = (size_t)slots[token] * capacity * kv_dim + (size_t)kvh * D;
    const int steps = ceil_div(end - begin, DECODE_KEYS);
    auto prefetch = [&](int step) {  // the keys of `step` into stage step % 2, zero-filled past end
        const int j0 = begin + step * DECODE_KEYS, valid = min(DECODE_KEYS, end - j0);
        const size_t at = slot_base + (size_t)j0 * kv_dim;
        __nv_bfloat16* k_dst = kv_s + (step % 2) * 2 * TILE;
        load_tile_async<D, DECODE_KEYS, DECODE_THREADS>(k_dst, cache_k + at, kv_dim, valid);
        load_tile_async<D, DECODE_KEYS, DECODE_THREADS>(k_dst + TILE, cache_v + at, kv_dim, valid);
        copy_async_commit();
    };
    prefetch(0);
    for (int step = 0; step < steps; step++) {
        const int j0 = begin + step * DECODE_KEYS + warp * 16;  // this warp's first key
        // then this step's tiles are in shared memory for every thread
        pipeline_advance(step, steps, prefetch);
        const __nv_bfloat16* k_s = kv_s + (step % 2) * 2 * TILE;
        const __nv_bfloat16* v_s = k_s + TILE;

        // s = Q K^T over the warp's 16 keys: two [16, 8] accumulator tiles
        float s[2][4];
        for (int nt = 0; nt < 2; nt++) { s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f; }
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t b[2][2];
            load_b_transposed_x2(b, k_s, S, warp * 16, kk * 16, lane);
            mma_m16n8k16(s[0], q_frag[kk], b[0]);
            mma_m16n8k16(s[1], q_frag[kk], b[1]);
        }
        if (j0 + 16 > end) {  // keys at or past the end: the last step's warps only, all their lanes
            for (int nt = 0; nt < 2; nt++) {
                for (int e = 0; e < 4; e++) {
                    if (j0 + nt * 8 + 2 * t + (e & 1) >= end) { s[nt][e] = -INFINITY; }
                }
            }
        }
        // online softmax per row over the warp's keys. A warp past the end (the last step's
        // tail) sees only -inf: it rescales by 0 and adds 0, staying empty.
        online_softmax_step(s, o, row_max, row_sum, scale_log2);
        // o += P V over the warp's keys, P straight from the score registers
        uint32_t a[1][4];
        accumulators_to_a(a[0], s[0], s[1]);
        mma_accumulate_rows<D, 1>(o_slab, a, v_s, S, warp * 16, lane);
        __syncthreads();  // every warp is done with this stage before step + 2 refills it
    }

    // the warps' states into shared memory (the stages are free: the loop ended with a barrier)
    float* o_s = reinterpret_cast<float*>(smem);        // [DECODE_WARPS, 16, D]
    float* stat_s = o_s + DECODE_WARPS * 16 * D;        // [DECODE_WARPS, 16, 2]: max, sum
    for (int i = 0; i < 2; i++) {
        float sum = row_sum[i];
        sum += __shfl_xor_sync(FULL_MASK, sum, 1);
        sum += __shfl_xor_sync(FULL_MASK, sum, 2);
        const int r = warp * 16 + g + 8 * i;
        for (int dn = 0; dn < D / 8; dn++) {
            o_s[r * D + dn * 8 + 2 * t] = o[dn][2 * i];
            o_s[r * D + dn * 8 + 2 * t + 1] = o[dn][2 * i + 1];
        }
        if (t == 0) {
            stat_s[r * 2] = row_max[i];
            stat_s[r * 2 + 1] = sum;
        }
    }
    __syncthreads();
    // merge per (head, dim): warp 0 holds the split's first key, so the max is finite and empty
    // warps (max -inf) weigh 0
    for (int i = threadIdx.x; i < group * D; i += DECODE_THREADS) {
        const int r = i / D, d = i % D;
        float mx = -INFINITY;
        for (int w = 0; w < DECODE_WARPS; w++) { mx = fmaxf(mx, stat_s[(w * 16 + r) * 2]); }
        float total = 0.0f, acc = 0.0f;
        for (int w = 0; w < DECODE_WARPS; w++) {
            const float c = exp2f(stat_s[(w * 16 + r) * 2] - mx);
            total += c * stat_s[(w * 16 + r) * 2 + 1];
            acc += c * o_s[(w * 16 + r) * D + d];
        }
        if (splits == 1) {
            out[(row + r) * D + d] = f32_to_bf16(acc / total);
            if (d == 0 && lse != nullptr) { lse[row + r] = (mx + log2f(total)) * LN2; }
        } else {
            partial_out[(split_row + r) * D + d] = acc;  // relative to the max, as decode_attention
            if (d == 0) {
                partial_stats[(split_row + r) * 2] = mx * LN2;  // natural-log units for the combine
                partial_stats[(split_row + r) * 2 + 1] = total;
            }
        }
    }
}

// entry points: grid (m, n_kv_heads, splits), DECODE_THREADS threads, dynamic shared memory
// 2 * 2 * DECODE_KEYS * (D + TILE_PAD) bf16 (src/cuda/ops/decode_attention.rs)
#define DECODE_MMA_ENTRY_POINT(D)                                                                 \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS) decode_attention_mma_d##D(       \
        __nv_bfloat16* out, float* lse, float* partial_out, float* partial_stats,                 \
        const __nv_bfloat16* q, const __nv_bfloat16* cache_k, const __nv_bfloat16* cache_v,       \
        const uint32_t* slots, const uint32_t* positions, int m, int capacity, int n_heads,       \
        int n_kv_heads, int split_keys, float scale) {                                            \
        decode_attention_mma<D>(out, lse, partial_out, partial_stats, q, cache_k, cache_v, slots, \
                                positions, m, capacity, n_heads, n_kv_heads, split_keys, scale);  \
    }

DECODE_MMA_ENTRY_POINT(64)
DECODE_MMA_ENTRY_POINT(128)
