// The online log-sum-exp of a row of tempered logits and the two-pass row backward of its
// log-softmax, shared by kernels/logprob.cu (log-probs and their gradient) and
// kernels/policy_loss.cu (the same gradient scaled by the GRPO loss).
#pragma once

#include "common.cuh"

#include <math.h>

// The online log-sum-exp state of a set of tempered logits, relative to its max m:
// sum = sum exp(s - m), sum_s = sum exp(s - m) * (s - m). The empty set is {-inf, 0, 0}.
struct LseState {
    float max;
    float sum;
    float sum_s;
};

// Re-expresses a non-empty state relative to new_max >= st.max.
__device__ __forceinline__ void lse_rebase(LseState& st, float new_max) {
    const float shift = st.max - new_max;  // <= 0
    const float c = expf(shift);
    st.sum_s = c * (st.sum_s + shift * st.sum);
    st.sum *= c;
    st.max = new_max;
}

// The state of the union of two sets.
__device__ __forceinline__ LseState lse_combine(LseState a, LseState b) {
    // an empty side would give (-inf) * 0 = NaN in the rebase: skip it
    if (a.max == -INFINITY) { return b; }
    if (b.max == -INFINITY) { return a; }
    const float new_max = fmaxf(a.max, b.max);
    lse_rebase(a, new_max);
    lse_rebase(b, new_max);
    return LseState{new_max, a.sum + b.sum, a.sum_s + b.sum_s};
}

// Adds n tempered logits s[0..n) to the state: one rebase for the whole group.
template <int N>
__device__ __forceinline__ void lse_add(LseState& st, const float (&s)[N]) {
    float group_max = s[0];
    for (int k = 1; k < N; k++) { group_max = fmaxf(group_max, s[k]); }
    if (group_max > st.max) {
        if (st.max == -INFINITY) {
            st.max = group_max;  // empty state: nothing to rescale
        } else {
            lse_rebase(st, group_max);
        }
    }
    for (int k = 0; k < N; k++) {
        const float d = s[k] - st.max;
        const float e = expf(d);
        st.sum += e;
        st.sum_s += e * d;
    }
}

// Combines the states of all threads of the block; thread 0 receives the result.
// blockDim.x is a multiple of 32, at most 1024.
__device__ __forceinline__ LseState block_reduce_lse(LseState st) {
    __shared__ float max_s[WARP_SIZE], sum_s[WARP_SIZE], sums_s[WARP_SIZE];
    const int lane_id = threadIdx.x % WARP_SIZE;
    const int warp_id = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        const LseState other{__shfl_xor_sync(FULL_MASK, st.max, offset),
                             __shfl_xor_sync(FULL_MASK, st.sum, offset),
                             __shfl_xor_sync(FULL_MASK, st.sum_s, offset)};
        st = lse_combine(st, other);
    }
    if (lane_id == 0) {
        max_s[warp_id] = st.max;
        sum_s[warp_id] = st.sum;
        sums_s[warp_id] = st.sum_s;
    }
    __syncthreads();
    if (warp_id == 0) {
        st = (lane_id < num_warps) ? LseState{max_s[lane_id], sum_s[lane_id], sums_s[lane_id]}
                                   : LseState{-INFINITY, 0.0f, 0.0f};
        for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
            const LseState other{__shfl_xor_sync(FULL_MASK, st.max, offset),
                                 __shfl_xor_sync(FULL_MASK, st.sum, offset),
                                 __shfl_xor_sync(FULL_MASK, st.sum_s, offset)};
            st = lse_combine(st, other);
        }
    }
    return st;
}

// ----------------------------------------------------------------------------
// The backward of one row's log-softmax: one block per row.
//   pass 1: the row's state (max, S, T) over s_i = logits[i] / tau;
//   thread 0: logp = s_target - max - log(S), entropy = log(S) - T / S, and the row's gradient
//             g = row_grad(logp, entropy) (d(loss)/d(logp), written to shared memory);
//   pass 2: dlogits[i] = g / tau * (onehot(target)_i - softmax_i), as bf16 (it feeds the LM
//           head's bf16 matrix products).
// Scalar loads: the backward reads each row twice anyway. row_grad runs on thread 0 only.
// Pass 2 walks the row backwards, from the end pass 1 read last: at Qwen's vocabulary a row is a
// 1024-thread block, one per multiprocessor for the policy loss (its registers), two for the
// log-prob backward, so the rows in flight hold 80-160 MB of f32 logits on an H100, more than its
// 50 MB L2, and the latest reads are the likeliest to be there still. Its loads are the logits'
// last use and its stores are not read before they leave L2 (the head's products read a whole
// chunk of rows after), so both are marked evict-first (__ldcs, __stcs).
template <class T, class RowGrad>
__device__ __forceinline__ void logprob_backward_row(__nv_bfloat16* dz, const T* z, int target,
                                                     int vocab, float inv_temperature,
                                                     RowGrad row_grad) {
    __shared__ float stats_s[3];  // max, log(sum), g
    LseState st{-INFINITY, 0.0f, 0.0f};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float s[1] = {to_f32(z[i]) * inv_temperature};
        lse_add(st, s);
    }
    st = block_reduce_lse(st);
    if (threadIdx.x == 0) {
        const float log_sum = logf(st.sum);
        const float logp = to_f32(z[target]) * inv_temperature - st.max - log_sum;
        stats_s[0] = st.max;
        stats_s[1] = log_sum;
        stats_s[2] = row_grad(logp, log_sum - st.sum_s / st.sum);
    }
    __syncthreads();
    const float shift = stats_s[0] + stats_s[1];  // log-softmax = s - shift
    const float g = stats_s[2] * inv_temperature;
    if (threadIdx.x < vocab) {
        const int last = threadIdx.x + (vocab - 1 - threadIdx.x) / blockDim.x * blockDim.x;
        for (int i = last; i >= 0; i -= blockDim.x) {
            const float p = expf(to_f32(__ldcs(z + i)) * inv_temperature - shift);
            __stcs(dz + i, f32_to_bf16(g * ((i == target ? 1.0f : 0.0f) - p)));
        }
    }
}
