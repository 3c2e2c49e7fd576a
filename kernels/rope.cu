// Rotary position embedding (RoPE), Hugging Face `rotate_half` convention, in place, with the
// projections' biases added first in the forward (q, k and v's bias in one launch):
//
//   for each token r, head h and i < half = head_dim / 2, with angle = position[r] * inv_freq[i]:
//     x1 = x[r, h, i], x2 = x[r, h, i + half]
//     x[r, h, i]        = x1 * cos(angle) - x2 * sin(angle)
//     x[r, h, i + half] = x2 * cos(angle) + x1 * sin(angle)
//
// x: (m, heads * head_dim) bf16; positions: u32 (m); inv_freq: f32 (half), already including
// any rope scaling (llama3 etc. is folded into inv_freq on the host).
//
// Precision, matching the CPU reference (src/backend/cpu/rope.rs) up to the final bf16 rounding:
// the angle is one f32 product (as HF computes it in float32), cos/sin come from the accurate
// sincosf (positions reach ~1e5, far beyond where __sincosf is usable; very large angles take
// sincosf's slow Payne-Hanek path, which is what the small stack frame in the ptxas report is),
// and the rotation uses explicitly rounded products (__fmul_rn) so that nvcc does not contract
// them into FMAs the CPU does not use. Each output is rounded to bf16 once.
//
// Parallelisation (src/cuda/ops/rope.rs): a work item is (token r, a chunk of V consecutive i),
// V = 8 when half % 8 == 0 and q, k and v are 16-byte aligned (then both halves of every head start
// 16-byte aligned and are moved with one 128-bit load/store each), V = 1 otherwise. A thread
// computes the V sines and cosines of its item once and applies them to the heads
// h = blockIdx.y, blockIdx.y + gridDim.y, ... so the sincosf cost is shared by several heads.
// grid.x strides over items (grid-stride loop), grid.y over heads.

#include "common.cuh"

// x1 * c - x2 * s and x2 * c + x1 * s, without FMA contraction
__device__ __forceinline__ void rotate_pair(float& x1, float& x2, float c, float s) {
    const float a = x1, b = x2;
    x1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    x2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// The tensors one launch handles: heads [0, a_heads) of a, then [0, b_heads) of b, both rotated,
// then [0, c_heads) of c, only biased (q, k and v in the forward; b_heads = c_heads = 0 in the
// backward). A bias (bf16, one row of heads × head_dim, or null) is added before the rotation, in
// f32, so each output is still rounded to bf16 once.
struct RopeTensors {
    __nv_bfloat16* a;
    const __nv_bfloat16* a_bias;
    int a_heads;
    __nv_bfloat16* b;
    const __nv_bfloat16* b_bias;
    int b_heads;
    __nv_bfloat16* c;
    const __nv_bfloat16* c_bias;
    int c_heads;
};

// direction = 1 rotates by +angle (the forward), -1 by -angle (the backward: the transpose of a
// rotation is the rotation back); multiplying the sine by +-1 is exact.
template <int V>
__device__ __forceinline__ void rope_rows(RopeTensors t, const uint32_t* positions, const float* inv_freq,
                                          int m, int head_dim, float direction) {
    const int half = head_dim / 2;
    const int chunks = half / V;  // items per token
    const size_t items = (size_t)m * chunks;
    const int rotated = t.a_heads + t.b_heads;
    const int heads = rotated + t.c_heads;
    for (size_t item = (size_t)blockIdx.x * blockDim.x + threadIdx.x; item < items;
         item += (size_t)gridDim.x * blockDim.x) {
        // the host guarantees m * half <= INT_MAX, so 32-bit division is exact here
        const int row = (int)item / chunks;
        const int i0 = ((int)item - row * chunks) * V;

        const float pos = (float)positions[row];  // u32 -> f32, round to nearest, as `pos as f32`
        float c[V], s[V];
        for (int k = 0; k < V; k++) {
            sincosf(__fmul_rn(pos, inv_freq[i0 + k]), &s[k], &c[k]);
            s[k] *= direction;
        }

        for (int h = blockIdx.y; h < heads; h += gridDim.y) {
            const int group = h < t.a_heads ? 0 : (h < rotated ? 1 : 2);
            const int head = h - (group == 0 ? 0 : (group == 1 ? t.a_heads : rotated));
            const int row_heads = group == 0 ? t.a_heads : (group == 1 ? t.b_heads : t.c_heads);
            __nv_bfloat16* base = group == 0 ? t.a : (group == 1 ? t.b : t.c);
            const __nv_bfloat16* bias = group == 0 ? t.a_bias : (group == 1 ? t.b_bias : t.c_bias);
            const bool rotate = group < 2;
            __nv_bfloat16* lo = base + ((size_t)row * row_heads + head) * head_dim + i0;
            __nv_bfloat16* hi = lo + half;
            float b_lo[V], b_hi[V];
            for (int k = 0; k < V; k++) {
                b_lo[k] = bias ? bf16_to_f32(bias[head * head_dim + i0 + k]) : 0.0f;
                b_hi[k] = bias ? bf16_to_f32(bias[head * head_dim + half + i0 + k]) : 0.0f;
            }
            if constexpr (V == x128::size) {
                const x128 lo_in = load128(lo);
                const x128 hi_in = load128(hi);
                x128 lo_out, hi_out;
                for (int k = 0; k < V; k++) {
                    float x1 = bf16_to_f32(lo_in[k]) + b_lo[k], x2 = bf16_to_f32(hi_in[k]) + b_hi[k];
                    if (rotate) { rotate_pair(x1, x2, c[k], s[k]); }
                    lo_out[k] = f32_to_bf16(x1);
                    hi_out[k] = f32_to_bf16(x2);
                }
                store128(lo, lo_out);
                store128(hi, hi_out);
            } else {
                for (int k = 0; k < V; k++) {
                    float x1 = bf16_to_f32(lo[k]) + b_lo[k], x2 = bf16_to_f32(hi[k]) + b_hi[k];
                    if (rotate) { rotate_pair(x1, x2, c[k], s[k]); }
                    lo[k] = f32_to_bf16(x1);
                    hi[k] = f32_to_bf16(x2);
                }
            }
        }
    }
}

__device__ __forceinline__ void rope(RopeTensors t, const uint32_t* positions, const float* inv_freq,
                                     int m, int head_dim, float direction) {
    constexpr int VEC = x128::size;
    // uniform over the grid; the host mirrors it only to size the grid (the loop is correct for any grid)
    if ((head_dim / 2) % VEC == 0 && is_aligned16(t.a) && is_aligned16(t.b) && is_aligned16(t.c)) {
        rope_rows<VEC>(t, positions, inv_freq, m, head_dim, direction);
    } else {
        rope_rows<1>(t, positions, inv_freq, m, head_dim, direction);
    }
}

// The attention inputs after their projections, in one launch (CPU reference:
// backend::cpu::rope::qkv_rope_forward): q = rope(q + q_bias), k = rope(k + k_bias),
// v = v + v_bias; a null bias adds nothing (the host passes v_heads = 0 without a v bias).
// q: (m, n_heads * head_dim); k, v: (m, n_kv_heads * head_dim); grid.y covers every head.
extern "C" __global__ void __launch_bounds__(256)
qkv_rope_forward(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, const __nv_bfloat16* q_bias,
                 const __nv_bfloat16* k_bias, const __nv_bfloat16* v_bias, const uint32_t* positions,
                 const float* inv_freq, int m, int n_heads, int n_kv_heads, int v_heads, int head_dim) {
    const RopeTensors t{q, q_bias, n_heads, k, k_bias, n_kv_heads, v, v_bias, v_heads};
    rope(t, positions, inv_freq, m, head_dim, 1.0f);
}

// Qwen3's attention inputs in one launch (CPU reference: backend::cpu::qkv_rope_forward with
// head norms): q = rope(rmsnorm(q_raw) * q_norm) and k = rope(rmsnorm(k_raw) * k_norm), each head
// normalised on its own, and v = v + v_bias in place (v_heads = 0 without a v bias). The norm
// rounds as the rmsnorm kernel does (rmsnorm_apply) and the rotation then starts from those bf16
// values as qkv_rope_forward does, so the result is rmsnorm_forward then qkv_rope_forward's up to
// the order of the sum of squares, in one launch instead of three.
// q, q_raw: (m, n_heads * head_dim); k, k_raw, v: (m, n_kv_heads * head_dim); q_norm, k_norm:
// (head_dim); v_bias: (n_kv_heads * head_dim). One warp per (token, head) item, grid-stride over m * (n_heads + n_kv_heads
// + v_heads) items; lane l holds the pairs (i, i + half) for i = l, l + 32, ...: a head's sum of
// squares is one warp reduction, and each pair is rotated by the lane that normalised it.
extern "C" __global__ void __launch_bounds__(256)
qkv_norm_rope_forward(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, const __nv_bfloat16* q_raw,
                      const __nv_bfloat16* k_raw, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                      const __nv_bfloat16* v_bias, const uint32_t* positions, const float* inv_freq, int m,
                      int n_heads, int n_kv_heads, int v_heads, int head_dim, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int half = head_dim / 2;
    const int normed_heads = n_heads + n_kv_heads;
    const int heads = normed_heads + v_heads;
    const size_t items = (size_t)m * heads;
    const size_t warps = (size_t)gridDim.x * (blockDim.x / WARP_SIZE);
    // the item is the warp's: every lane takes the same branches and meets the reduction
    for (size_t item = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE; item < items;
         item += warps) {
        const int row = (int)(item / heads);
        const int h = (int)(item - (size_t)row * heads);
        if (h >= normed_heads) {
            const int head = h - normed_heads;
            __nv_bfloat16* x = v + ((size_t)row * n_kv_heads + head) * head_dim;
            const __nv_bfloat16* bias = v_bias + (size_t)head * head_dim;
            for (int i = lane; i < head_dim; i += WARP_SIZE) {
                x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(bias[i]));
            }
            continue;
        }
        const bool is_q = h < n_heads;
        const int head = is_q ? h : h - n_heads;
        const size_t at = ((size_t)row * (is_q ? n_heads : n_kv_heads) + head) * head_dim;
        const __nv_bfloat16* raw = (is_q ? q_raw : k_raw) + at;
        __nv_bfloat16* out = (is_q ? q : k) + at;
        const __nv_bfloat16* weight = is_q ? q_norm : k_norm;

        float sum_sq = 0.0f;
        for (int i = lane; i < head_dim; i += WARP_SIZE) {
            const float x = bf16_to_f32(raw[i]);
            sum_sq += x * x;
        }
        sum_sq = warp_reduce_sum(sum_sq);
        // as the rmsnorm kernel and the CPU reference compute it
        const float rstd = 1.0f / sqrtf(sum_sq / (float)head_dim + eps);
        const float pos = (float)positions[row];  // u32 -> f32, round to nearest, as `pos as f32`
        for (int i = lane; i < half; i += WARP_SIZE) {
            float x1 = bf16_to_f32(rmsnorm_apply(raw[i], rstd, weight[i]));
            float x2 = bf16_to_f32(rmsnorm_apply(raw[i + half], rstd, weight[i + half]));
            float s, c;
            sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
            rotate_pair(x1, x2, c, s);
            out[i] = f32_to_bf16(x1);
            out[i + half] = f32_to_bf16(x2);
        }
    }
}

// the gradient, rotated back in place (CPU reference: backend::cpu::rope::rope_backward)
extern "C" __global__ void __launch_bounds__(256)
rope_backward(__nv_bfloat16* dx, const uint32_t* positions, const float* inv_freq, int m, int n_heads,
              int head_dim) {
    rope(RopeTensors{dx, nullptr, n_heads, dx, nullptr, 0, dx, nullptr, 0}, positions, inv_freq, m, head_dim, -1.0f);
}
