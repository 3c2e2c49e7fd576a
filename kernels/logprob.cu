// Log-probability of the target token at temperature tau and the entropy of the tempered softmax
// (the CPU reference is src/backend/cpu/logprob.rs: logprob_forward).
//
//     s_i     = logits[r, i] / tau
//     M       = max_i s_i,   S = sum_i exp(s_i - M),   T = sum_i exp(s_i - M) * (s_i - M)
//     logp[r]    = s_target - M - log(S)
//     entropy[r] = log(S) - T / S          (= -sum p log p, with s shifted by the max)
//
// Layout: logits (r, vocab), f32 or bf16, row-major; targets (r) u32 (validated by the host);
// logp, entropy (r) f32. All arithmetic in fp32.
//
// Parallelisation: one thread block per row, grid = (r, 1, 1), block = about one 16-byte vector
// per thread, 32..1024 threads (src/cuda/ops/logprob.rs). A single pass over the row: each thread
// keeps an online state (m, S, T) relative to its own running max m and rescales it when the max
// grows (S *= c, T = c * (T + (m_old - m_new) * S) with c = exp(m_old - m_new)); then the states
// are combined across the warp with shuffles and across warps through shared memory.
// The logits are read once, with streaming 128-bit loads: each row is split into a scalar head
// up to the first 16-byte boundary, 16-byte vectors, and a scalar tail, so every row takes the
// vector path whatever its alignment (vocab may be odd).
// Shared memory: 3 x 32 floats (static).

#include "logprob.cuh"

// ----------------------------------------------------------------------------
// kernel body (templated on the logits' storage type)

template <class T>
__device__ __forceinline__ void logprob_forward_block(float* logp, float* entropy, const T* logits,
                                                      const uint32_t* targets, int r, int vocab,
                                                      float inv_temperature) {
    constexpr int VEC = Packed128<T>::size;  // elements per 16-byte vector
    const int row = blockIdx.x;
    if (row >= r) { return; }  // uniform over the block
    const T* z = logits + (size_t)row * vocab;

    // elements before the first 16-byte boundary of this row (the row start is element-aligned)
    const int misaligned = (int)((reinterpret_cast<uintptr_t>(z) & 15u) / sizeof(T));
    const int head = min(vocab, misaligned == 0 ? 0 : VEC - misaligned);
    const int n_vec = (vocab - head) / VEC;
    const int tail_start = head + n_vec * VEC;

    LseState st{-INFINITY, 0.0f, 0.0f};
    // scalar head and tail: at most 2 * (VEC - 1) elements, one per thread
    for (int i = threadIdx.x; i < head + (vocab - tail_start); i += blockDim.x) {
        const int col = i < head ? i : tail_start + (i - head);
        const float s[1] = {to_f32(z[col]) * inv_temperature};
        lse_add(st, s);
    }
    // the 16-byte-aligned body
    const T* body = z + head;
    for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
        const Packed128<T> packed = load128cs(body + (size_t)v * VEC);
        float s[VEC];
        for (int k = 0; k < VEC; k++) { s[k] = to_f32(packed[k]) * inv_temperature; }
        lse_add(st, s);
    }

    st = block_reduce_lse(st);
    if (threadIdx.x == 0) {
        const float log_sum = logf(st.sum);
        const float s_target = to_f32(z[targets[row]]) * inv_temperature;
        logp[row] = s_target - st.max - log_sum;
        entropy[row] = log_sum - st.sum_s / st.sum;
    }
}

// ----------------------------------------------------------------------------
// entry points (launched from src/cuda/ops/logprob.rs: grid = (r, 1, 1), block = (threads, 1, 1),
// no dynamic shared memory)

// bf16 logits (the LM head's output)
extern "C" __global__ void __launch_bounds__(1024)
logprob_forward(float* logp, float* entropy, const __nv_bfloat16* logits, const uint32_t* targets,
                int r, int vocab, float inv_temperature) {
    logprob_forward_block<__nv_bfloat16>(logp, entropy, logits, targets, r, vocab, inv_temperature);
}

// f32 logits
extern "C" __global__ void __launch_bounds__(1024)
logprob_forward_f32(float* logp, float* entropy, const float* logits, const uint32_t* targets,
                    int r, int vocab, float inv_temperature) {
    logprob_forward_block<float>(logp, entropy, logits, targets, r, vocab, inv_temperature);
}

// ----------------------------------------------------------------------------
// backward: dlogits[r, i] = dlogp[r] / tau * (onehot(targets[r])_i - softmax(logits[r] / tau)_i)
// (the CPU reference is src/backend/cpu/logprob.rs: logprob_backward). One block per row, as the
// forward; the row body is logprob.cuh's logprob_backward_row.

template <class T>
__device__ __forceinline__ void logprob_backward_block(__nv_bfloat16* dlogits, const float* dlogp,
                                                       const T* logits, const uint32_t* targets,
                                                       int r, int vocab, float inv_temperature) {
    const int row = blockIdx.x;
    if (row >= r) { return; }  // uniform over the block
    const float g = dlogp[row];
    logprob_backward_row(dlogits + (size_t)row * vocab, logits + (size_t)row * vocab,
                         (int)targets[row], vocab, inv_temperature,
                         [g](float, float) { return g; });
}

extern "C" __global__ void __launch_bounds__(1024)
logprob_backward(__nv_bfloat16* dlogits, const float* dlogp, const __nv_bfloat16* logits,
                 const uint32_t* targets, int r, int vocab, float inv_temperature) {
    logprob_backward_block<__nv_bfloat16>(dlogits, dlogp, logits, targets, r, vocab, inv_temperature);
}

extern "C" __global__ void __launch_bounds__(1024)
logprob_backward_f32(__nv_bfloat16* dlogits, const float* dlogp, const float* logits,
                     const uint32_t* targets, int r, int vocab, float inv_temperature) {
    logprob_backward_block<float>(dlogits, dlogp, logits, targets, r, vocab, inv_temperature);
}
