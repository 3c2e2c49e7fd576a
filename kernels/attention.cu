// Causal grouped-query attention over a slotted KV cache (the CPU reference is
// src/backend/cpu/attention.rs: attention_forward).
//
//     token m (slot s = slots[m], position p = positions[m]), query head h, KV head g = h / group:
//     score_j = scale * q[m, h] . K[s, j, g]        for j = 0..=p      (scale = 1/sqrt(head_dim))
//     out[m, h] = sum_j softmax(score)_j * V[s, j, g]
//     lse[m, h] = log sum_j exp(score_j)               (only when lse is not null)
//
// Layout: q, out: (m, n_heads * head_dim) bf16; cache_k, cache_v: (slots, capacity,
// n_kv_heads * head_dim) bf16 (one layer); slots, positions: (m) u32, validated by the host.
// A prefill (a ragged batch: the tokens of several sequences concatenated, each with its own slot
// and position, the cache already holding their keys/values) and a decode step (one token per
// sequence) are the same computation.
//
// This is the simple, general version: any head_dim up to 256 and any GQA group. The fused
// kernels (flash_attention.cu for prefill, decode_attention.cu for decode) take the shapes they
// support; src/cuda/backend.rs chooses. Memory is
// O(1) per block, never O(p): the keys are visited in chunks of ATTN_THREADS with an online
// softmax (running max, accumulator rescaled whenever the max grows).
//
// Parallelisation: one thread block of ATTN_THREADS threads per (token, query head):
// grid = (m, n_heads, 1). Per chunk of ATTN_THREADS keys:
//   1. scores: thread t computes the whole fp32 dot product for key chunk_start + t
//      (q is staged in shared memory as fp32; K rows are read with 16-byte loads when possible).
//   2. block max -> new running max; thread t keeps its own running sum of exp(score - max)
//      (rescaled together with everything else, reduced over the block only once at the end),
//      and puts its probability in shared memory.
//   3. values: the threads split into `groups` groups of `span` threads; thread (g, d) owns a few
//      output dims and accumulates them over the keys g, g + groups, ... of the chunk. When the
//      V rows are 16-byte aligned (head_dim % 8 == 0) a thread owns 8 consecutive dims and reads
//      them with one 16-byte load (span = head_dim / 8); otherwise it owns dims d and d + span
//      (span = head_dim rounded up to a power of two, at most ATTN_THREADS). Either way the
//      reads of a V row are coalesced.
// At the end the group accumulators are summed through shared memory and divided by the sum.
// Shared memory (all static): q (256 floats) + probabilities (ATTN_THREADS floats) + the group
// partial sums (at most 8 * ATTN_THREADS floats) + reduction scratch: about 5.8 KB.

#include "common.cuh"

#include <math.h>

#define ATTN_THREADS 128       // threads per block = keys per chunk (src/cuda/ops/attention.rs)
#define ATTN_MAX_HEAD_DIM 256  // q staging size; the launcher rejects larger head_dim
#define ATTN_VEC 8             // bf16 per 16-byte load = dims per thread on the vector path

static_assert(ATTN_THREADS % WARP_SIZE == 0, "block reductions need whole warps");
static_assert(ATTN_MAX_HEAD_DIM <= 2 * ATTN_THREADS, "the scalar path owns at most 2 dims per thread");
static_assert(ATTN_VEC == x128::size, "one x128 per thread on the vector path");

// q . k for one key row of head_dim bf16 values; q_s is fp32 in shared memory (every thread
// reads the same address at the same time: a broadcast, no bank conflicts).
__device__ __forceinline__ float attn_dot(const float* q_s, const __nv_bfloat16* k_row,
                                          int head_dim, bool vectorised) {
    float acc = 0.0f;
    if (vectorised) {
        for (int d = 0; d < head_dim; d += x128::size) {
            const x128 kv = load128(k_row + d);
            for (int e = 0; e < x128::size; e++) { acc += q_s[d + e] * bf16_to_f32(kv[e]); }
        }
    } else {
        for (int d = 0; d < head_dim; d++) { acc += q_s[d] * bf16_to_f32(k_row[d]); }
    }
    return acc;
}

// ----------------------------------------------------------------------------
// entry point (launched from src/cuda/ops/attention.rs: grid = (m, n_heads, 1),
// block = (ATTN_THREADS, 1, 1), no dynamic shared memory)

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* cache_k,
                  const __nv_bfloat16* cache_v, const uint32_t* slots, const uint32_t* positions,
                  int m, int capacity, int n_heads, int n_kv_heads, int head_dim, float scale) {
    __align__(16) __shared__ float q_s[ATTN_MAX_HEAD_DIM];
    __shared__ float probs_s[ATTN_THREADS];               // this chunk's exp(score - max)
    __shared__ float partial_s[ATTN_VEC * ATTN_THREADS];  // [groups, head_dim] output partials

    const int token = blockIdx.x;
    const int h = blockIdx.y;
    if (token >= m || h >= n_heads) { return; }  // uniform over the block
    const int tid = threadIdx.x;

    const int q_dim = n_heads * head_dim;
    const int kv_dim = n_kv_heads * head_dim;
    const int kv_head = h / (n_heads / n_kv_heads);
    const int pos = (int)positions[token];  // attends to keys 0..=pos
    const size_t q_off = (size_t)token * q_dim + (size_t)h * head_dim;
    // the first key of this (slot, KV head); key j is at kv_base + j * kv_dim
    const size_t kv_base = (size_t)slots[token] * capacity * kv_dim + (size_t)kv_head * head_dim;
    const __nv_bfloat16* k_head = cache_k + kv_base;
    const __nv_bfloat16* v_head = cache_v + kv_base;

    // Every K (V) row start is 16-byte aligned when head_dim is a multiple of 8 (so are kv_dim
    // and the head offset) and the cache is. Uniform over the grid.
    const bool vec_k = (head_dim % ATTN_VEC == 0) && is_aligned16(cache_k);
    const bool vec_v = (head_dim % ATTN_VEC == 0) && is_aligned16(cache_v);

    for (int d = tid; d < head_dim; d += ATTN_THREADS) { q_s[d] = bf16_to_f32(q[q_off + d]); }
    __syncthreads();

    // value-phase role of this thread (see the header comment): dims dim0 + i * dim_stride
    int span, dims, dim_stride;
    if (vec_v) {
        span = head_dim / ATTN_VEC;  // 1..32
        dims = ATTN_VEC;
        dim_stride = 1;
    } else {
        span = 1;
        while (span < head_dim && span < ATTN_THREADS) { span *= 2; }
        dims = 2;
        dim_stride = span;
    }
    const int groups = ATTN_THREADS / span;  // on the vector path the last few threads may idle
    const int group = tid / span;
    const int dim0 = vec_v ? (tid % span) * ATTN_VEC : tid % span;
    const bool active = group < groups;

    float acc[ATTN_VEC];
    for (int i = 0; i < ATTN_VEC; i++) { acc[i] = 0.0f; }
    float run_max = -INFINITY;  // block-uniform
    float run_sum = 0.0f;       // this thread's share of sum_j exp(score_j - run_max)

    for (int chunk = 0; chunk <= pos; chunk += ATTN_THREADS) {
        const int chunk_len = min(ATTN_THREADS, pos + 1 - chunk);  // >= 1

        // 1. scores
        float score = -INFINITY;
        if (tid < chunk_len) {
            score = scale * attn_dot(q_s, k_head + (size_t)(chunk + tid) * kv_dim, head_dim, vec_k);
        }

        // 2. online softmax: the chunk has at least one key, so new_max is finite and the first
        //    correction exp(-inf - new_max) is 0
        const float new_max = fmaxf(run_max, block_reduce_max(score));
        const float correction = expf(run_max - new_max);
        const float p = (tid < chunk_len) ? expf(score - new_max) : 0.0f;
        run_sum = run_sum * correction + p;
        run_max = new_max;
        probs_s[tid] = p;
        __syncthreads();

        // 3. values
        for (int i = 0; i < ATTN_VEC; i++) { acc[i] *= correction; }
        if (vec_v) {
            if (active) {
                for (int j = group; j < chunk_len; j += groups) {
                    const float pj = probs_s[j];
                    const x128 v = load128(v_head + (size_t)(chunk + j) * kv_dim + dim0);
                    for (int i = 0; i < ATTN_VEC; i++) { acc[i] += pj * bf16_to_f32(v[i]); }
                }
            }
        } else {
            for (int i = 0; i < 2; i++) {
                const int d = dim0 + i * span;
                if (d < head_dim) {
                    float a = acc[i];
                    for (int j = group; j < chunk_len; j += groups) {
                        a += probs_s[j] * bf16_to_f32(v_head[(size_t)(chunk + j) * kv_dim + d]);
                    }
                    acc[i] = a;
                }
            }
        }
        __syncthreads();  // probs_s is rewritten by the next chunk
    }

    // sum the groups' partial outputs: groups * head_dim <= ATTN_VEC * ATTN_THREADS
    if (active) {
        for (int i = 0; i < dims; i++) {
            const int d = dim0 + i * dim_stride;
            if (d < head_dim) { partial_s[group * head_dim + d] = acc[i]; }
        }
    }
    const float sum = block_reduce_sum(run_sum);  // its barrier also orders partial_s
    const float inv_sum = 1.0f / sum;
    if (lse != nullptr && tid == 0) { lse[(size_t)token * n_heads + h] = run_max + logf(sum); }
    __nv_bfloat16* out_head = out + q_off;
    for (int d = tid; d < head_dim; d += ATTN_THREADS) {
        float o = 0.0f;
        for (int g = 0; g < groups; g++) { o += partial_s[g * head_dim + d]; }
        out_head[d] = f32_to_bf16(o * inv_sum);
    }
}
