// Rotary position embedding (RoPE), Hugging Face `rotate_half` convention. The forward takes the
// one product of the q, k and v projections (rows of q, k, v side by side), adds their biases and
// writes q and k rotated and v apart, in one launch; its backward rotates dq and dk back and
// writes them beside dv, the gradient of that product; rope_backward rotates back in place:
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
// V = 8 when half % 8 == 0, every source and destination is 16-byte aligned and the source's row
// pitch is a multiple of 8 (then both halves of every head start 16-byte aligned and are moved
// with one 128-bit load/store each), V = 1 otherwise. A thread
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
// in-place backward). Rows of a tensor's source are src_pitch elements apart and rows of its
// destination dst_pitch apart, where 0 means the tensor's own heads × head_dim (contiguous): the
// product's rows are the source in the forward and the destination in qkv_rope_backward. A bias
// (bf16, one row of heads × head_dim, or null) is added before the rotation, in f32, so each
// output is still rounded to bf16 once.
struct RopeTensors {
    __nv_bfloat16* a;
    const __nv_bfloat16* a_src;
    const __nv_bfloat16* a_bias;
    int a_heads;
    __nv_bfloat16* b;
    const __nv_bfloat16* b_src;
    const __nv_bfloat16* b_bias;
    int b_heads;
    __nv_bfloat16* c;
    const __nv_bfloat16* c_src;
    const __nv_bfloat16* c_bias;
    int c_heads;
    int src_pitch;
    int dst_pitch;
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
            const __nv_bfloat16* src = group == 0 ? t.a_src : (group == 1 ? t.b_src : t.c_src);
            const __nv_bfloat16* bias = group == 0 ? t.a_bias : (group == 1 ? t.b_bias : t.c_bias);
            const bool rotate = group < 2;
            const int own_pitch = row_heads * head_dim;
            const int dst_pitch = t.dst_pitch ? t.dst_pitch : own_pitch;
            const int src_pitch = t.src_pitch ? t.src_pitch : own_pitch;
            const int col = head * head_dim + i0;
            __nv_bfloat16* lo = base + ((size_t)row * dst_pitch + col);
            __nv_bfloat16* hi = lo + half;
            const __nv_bfloat16* src_lo = src + ((size_t)row * src_pitch + col);
            const __nv_bfloat16* src_hi = src_lo + half;
            float b_lo[V], b_hi[V];
            for (int k = 0; k < V; k++) {
                b_lo[k] = bias ? bf16_to_f32(bias[head * head_dim + i0 + k]) : 0.0f;
                b_hi[k] = bias ? bf16_to_f32(bias[head * head_dim + half + i0 + k]) : 0.0f;
            }
            if constexpr (V == x128::size) {
                const x128 lo_in = load128(src_lo);
                const x128 hi_in = load128(src_hi);
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
                    float x1 = bf16_to_f32(src_lo[k]) + b_lo[k], x2 = bf16_to_f32(src_hi[k]) + b_hi[k];
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
    if ((head_dim / 2) % VEC == 0 && t.src_pitch % VEC == 0 && t.dst_pitch % VEC == 0 && is_aligned16(t.a) && is_aligned16(t.b) &&
        is_aligned16(t.c) && is_aligned16(t.a_src) && is_aligned16(t.b_src) && is_aligned16(t.c_src)) {
        rope_rows<VEC>(t, positions, inv_freq, m, head_dim, direction);
    } else {
        rope_rows<1>(t, positions, inv_freq, m, head_dim, direction);
    }
}

// The attention inputs from their projections' product, in one launch (CPU reference:
// backend::cpu::qkv_rope_forward): with qkv's rows holding q', k' and v' side by side,
// q = rope(q' + q_bias), k = rope(k' + k_bias), v = v' + v_bias; a null bias adds nothing.
// q: (m, n_heads * head_dim); k, v: (m, n_kv_heads * head_dim); qkv: (m, (n_heads + 2 n_kv_heads)
// * head_dim); grid.y covers every head.
extern "C" __global__ void __launch_bounds__(256)
qkv_rope_forward(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, const __nv_bfloat16* qkv,
                 const __nv_bfloat16* q_bias, const __nv_bfloat16* k_bias, const __nv_bfloat16* v_bias,
                 const uint32_t* positions, const float* inv_freq, int m, int n_heads, int n_kv_heads,
                 int head_dim) {
    const __nv_bfloat16* k_src = qkv + (size_t)n_heads * head_dim;
    const __nv_bfloat16* v_src = k_src + (size_t)n_kv_heads * head_dim;
    const RopeTensors t{q, qkv, q_bias, n_heads, k, k_src, k_bias, n_kv_heads,
                        v, v_src, v_bias, n_kv_heads, (n_heads + 2 * n_kv_heads) * head_dim, 0};
    rope(t, positions, inv_freq, m, head_dim, 1.0f);
}

// Qwen3's attention inputs in one launch (CPU reference: backend::cpu::qkv_rope_forward with
// head norms): with qkv's rows holding q', k' and v' side by side, q = rope(rmsnorm(q' + q_bias) *
// q_norm) and k = rope(rmsnorm(k' + k_bias) * k_norm), each head normalised on its own, and
// v = v' + v_bias; a null bias adds nothing. q_raw and k_raw, when not null, receive q' + q_bias
// and k' + k_bias (the backward's norm reads them). The sums are rounded to bf16 (as the bias
// kernel after a product rounds them), the norm rounds as the rmsnorm kernel does (rmsnorm_apply)
// and the rotation then starts from those bf16 values as qkv_rope_forward does, so the result is
// rmsnorm_forward then qkv_rope_forward's up to the order of the sum of squares, in one launch.
// q, q_raw: (m, n_heads * head_dim); k, k_raw, v: (m, n_kv_heads * head_dim); qkv: (m, (n_heads +
// 2 n_kv_heads) * head_dim); q_norm, k_norm: (head_dim); biases: (heads * head_dim). One warp per
// (token, head) item, grid-stride over m * (n_heads + 2 n_kv_heads) items; lane l holds the pairs
// (i, i + half) for i = l, l + 32, ...: a head's sum of squares is one warp reduction, and each
// pair is rotated by the lane that normalised it.
extern "C" __global__ void __launch_bounds__(256)
qkv_norm_rope_forward(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, __nv_bfloat16* q_raw,
                      __nv_bfloat16* k_raw, const __nv_bfloat16* qkv, const __nv_bfloat16* q_bias,
                      const __nv_bfloat16* k_bias, const __nv_bfloat16* v_bias,
                      const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                      const uint32_t* positions, const float* inv_freq, int m, int n_heads,
                      int n_kv_heads, int head_dim, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int half = head_dim / 2;
    const int normed_heads = n_heads + n_kv_heads;
    const int heads = normed_heads + n_kv_heads;
    const size_t items = (size_t)m * heads;
    const size_t warps = (size_t)gridDim.x * (blockDim.x / WARP_SIZE);
    // the item is the warp's: every lane takes the same branches and meets the reduction
    for (size_t item = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE; item < items;
         item += warps) {
        const int row = (int)(item / heads);
        const int h = (int)(item - (size_t)row * heads);
        // the product's heads lie in the order of the items: q's, k's, then v's
        const __nv_bfloat16* src = qkv + ((size_t)row * heads + h) * head_dim;
        // q' + q_bias (or k', v') at i, rounded to bf16
        const auto biased = [&](const __nv_bfloat16* bias, int i) {
            return bias ? f32_to_bf16(bf16_to_f32(src[i]) + bf16_to_f32(bias[i])) : src[i];
        };
        if (h >= normed_heads) {
            const int head = h - normed_heads;
            __nv_bfloat16* x = v + ((size_t)row * n_kv_heads + head) * head_dim;
            const __nv_bfloat16* bias = v_bias ? v_bias + (size_t)head * head_dim : nullptr;
            for (int i = lane; i < head_dim; i += WARP_SIZE) { x[i] = biased(bias, i); }
            continue;
        }
        const bool is_q = h < n_heads;
        const int head = is_q ? h : h - n_heads;
        const size_t at = ((size_t)row * (is_q ? n_heads : n_kv_heads) + head) * head_dim;
        const __nv_bfloat16* bias_row = is_q ? q_bias : k_bias;
        const __nv_bfloat16* bias = bias_row ? bias_row + (size_t)head * head_dim : nullptr;
        __nv_bfloat16* raw = is_q ? q_raw : k_raw;
        __nv_bfloat16* out = (is_q ? q : k) + at;
        const __nv_bfloat16* weight = is_q ? q_norm : k_norm;

        float sum_sq = 0.0f;
        for (int i = lane; i < head_dim; i += WARP_SIZE) {
            const __nv_bfloat16 x = biased(bias, i);
            if (raw) { raw[at + i] = x; }
            sum_sq += bf16_to_f32(x) * bf16_to_f32(x);
        }
        sum_sq = warp_reduce_sum(sum_sq);
        // as the rmsnorm kernel and the CPU reference compute it
        const float rstd = 1.0f / sqrtf(sum_sq / (float)head_dim + eps);
        const float pos = (float)positions[row];  // u32 -> f32, round to nearest, as `pos as f32`
        for (int i = lane; i < half; i += WARP_SIZE) {
            float s, c;  // first: fewer values live across sincosf's slow path (a call)
            sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
            float x1 = bf16_to_f32(rmsnorm_apply(biased(bias, i), rstd, weight[i]));
            float x2 = bf16_to_f32(rmsnorm_apply(biased(bias, i + half), rstd, weight[i + half]));
            rotate_pair(x1, x2, c, s);
            out[i] = f32_to_bf16(x1);
            out[i + half] = f32_to_bf16(x2);
        }
    }
}

// The gradient of qkv_rope_forward without head norms (CPU reference:
// backend::cpu::qkv_rope_backward): each row of dqkv: (m, (n_heads + 2 n_kv_heads) * head_dim)
// holds dq's and dk's rows rotated back and dv's row side by side: the gradient of the
// projections' product. dq: (m, n_heads * head_dim); dk, dv: (m, n_kv_heads * head_dim).
extern "C" __global__ void __launch_bounds__(256)
qkv_rope_backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dq, const __nv_bfloat16* dk,
                  const __nv_bfloat16* dv, const uint32_t* positions, const float* inv_freq, int m,
                  int n_heads, int n_kv_heads, int head_dim) {
    __nv_bfloat16* dk_dst = dqkv + (size_t)n_heads * head_dim;
    __nv_bfloat16* dv_dst = dk_dst + (size_t)n_kv_heads * head_dim;
    const RopeTensors t{dqkv, dq, nullptr, n_heads, dk_dst, dk, nullptr, n_kv_heads,
                        dv_dst, dv, nullptr, n_kv_heads, 0, (n_heads + 2 * n_kv_heads) * head_dim};
    rope(t, positions, inv_freq, m, head_dim, -1.0f);
}

// the gradient, rotated back in place (CPU reference: backend::cpu::rope::rope_backward)
extern "C" __global__ void __launch_bounds__(256)
rope_backward(__nv_bfloat16* dx, const uint32_t* positions, const float* inv_freq, int m, int n_heads,
              int head_dim) {
    const RopeTensors t{dx, dx, nullptr, n_heads, dx, dx, nullptr, 0, dx, dx, nullptr, 0, 0, 0};
    rope(t, positions, inv_freq, m, head_dim, -1.0f);
}
