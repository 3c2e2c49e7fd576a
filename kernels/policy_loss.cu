// The GRPO policy loss fused with the log-prob backward (the CPU reference is
// src/backend/cpu/policy_loss.rs: policy_loss_backward, which runs src/grpo/policy_loss.rs:
// token_loss). For each scored row r of completion i = seqs[r] with weight w = weights[i]:
//
//     logp    = log softmax(logits[r] / tau)[targets[r]]           (fp32, logprob_forward's formula)
//     rho     = exp(logp - old)          old = old_logp[r], or logp when old_logp is null
//     L_t     = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3(ref - logp)
//     g       = w dL_t/dlogp             (f64 arithmetic, as the host specification)
//     dlogits = g / tau (onehot(targets[r]) - softmax(logits[r] / tau))     (bf16)
//
// plus logp[r] and the row's statistics stats[r, 0..6] = entropy, w L_t, k3 KL, rho, clipped low,
// clipped high (all 0 where w = 0: the completion is left out of the loss and of its logs).
//
// Layout: logits (r, vocab) f32 or bf16; dlogits (r, vocab) bf16; targets, seqs (r) u32 (checked by
// the host); advantages, weights (n) f32; old_logp, ref_logp (r) f32 or null; logp (r) f32;
// stats (r, 6) f32. One block per row (logprob.cuh: logprob_backward_row), launched from
// src/cuda/ops/policy_loss.rs.

#include "logprob.cuh"

#define POLICY_STATS 6

struct TokenLoss {
    double loss, grad, kl, ratio;
    int clip;  // 0 unclipped, 1 clipped at the lower bound, 2 at the upper bound
};

// The loss of one token before its aggregation weight (grpo::token_loss).
__device__ __forceinline__ TokenLoss token_loss(double logp, double old_logp, const float* ref_logp, double a,
                                double eps_low, double eps_high, double beta) {
    const double rho = exp(logp - old_logp);
    const double lo = 1.0 - eps_low, hi = 1.0 + eps_high;
    const double unclipped = rho * a;
    // clamp as Rust's f64::clamp: a NaN ratio stays NaN (and then takes the unclipped branch)
    const double clipped = (rho < lo ? lo : (rho > hi ? hi : rho)) * a;
    TokenLoss t;
    t.ratio = rho;
    t.kl = 0.0;
    if (clipped < unclipped) {  // the clipped branch is constant in logp: no gradient
        t.loss = -clipped;
        t.grad = -0.0;  // -(0): the sign the host's negation gives
        t.clip = rho < lo ? 1 : 2;
    } else {
        t.loss = -unclipped;
        t.grad = -a * rho;
        t.clip = 0;
    }
    if (ref_logp != nullptr) {
        const double d = (double)*ref_logp - logp;
        t.kl = exp(d) - d - 1.0;
        if (beta != 0.0) {
            t.loss += beta * t.kl;
            t.grad += beta * (1.0 - exp(d));
        }
    }
    return t;
}

template <class T>
__device__ __forceinline__ void policy_loss_backward_block(
    __nv_bfloat16* dlogits, float* logp_out, float* stats, const T* logits,
    const uint32_t* targets, const uint32_t* seqs, const float* advantages, const float* weights,
    const float* old_logp, const float* ref_logp, int r, int vocab, float inv_temperature,
    double eps_low, double eps_high, double beta) {
    const int row = blockIdx.x;
    if (row >= r) { return; }  // uniform over the block
    const int seq = (int)seqs[row];
    const auto row_grad = [&](float logp, float entropy) {
        float* st = stats + (size_t)row * POLICY_STATS;
        logp_out[row] = logp;
        for (int c = 0; c < POLICY_STATS; c++) { st[c] = 0.0f; }
        const double w = weights[seq];
        if (w == 0.0) { return 0.0f; }
        st[0] = entropy;
        const double lp = logp;
        const TokenLoss t =
            token_loss(lp, old_logp != nullptr ? (double)old_logp[row] : lp,
                       ref_logp != nullptr ? ref_logp + row : nullptr, (double)advantages[seq],
                       eps_low, eps_high, beta);
        st[1] = (float)(w * t.loss);
        st[2] = (float)t.kl;
        st[3] = (float)t.ratio;
        st[4] = t.clip == 1 ? 1.0f : 0.0f;
        st[5] = t.clip == 2 ? 1.0f : 0.0f;
        return (float)(w * t.grad);
    };
    logprob_backward_row(dlogits + (size_t)row * vocab, logits + (size_t)row * vocab,
                         (int)targets[row], vocab, inv_temperature, row_grad);
}

// entry points: grid = (r, 1, 1), block = whole warps up to 1024 threads, no dynamic shared memory

// (1024, 1): without the minimum of one block per SM, ptxas (CUDA 13) holds these at 32 registers
// and spills around the f64 loss; one 1024-thread block per SM allows 64.

// bf16 logits (the LM head's output)
extern "C" __global__ void __launch_bounds__(1024, 1)
policy_loss_backward(__nv_bfloat16* dlogits, float* logp, float* stats,
                     const __nv_bfloat16* logits, const uint32_t* targets, const uint32_t* seqs,
                     const float* advantages, const float* weights, const float* old_logp,
                     const float* ref_logp, int r, int vocab, float inv_temperature,
                     double eps_low, double eps_high, double beta) {
    policy_loss_backward_block<__nv_bfloat16>(dlogits, logp, stats, logits, targets, seqs,
                                              advantages, weights, old_logp, ref_logp, r, vocab,
                                              inv_temperature, eps_low, eps_high, beta);
}

// f32 logits
extern "C" __global__ void __launch_bounds__(1024, 1)
policy_loss_backward_f32(__nv_bfloat16* dlogits, float* logp, float* stats, const float* logits,
                         const uint32_t* targets, const uint32_t* seqs, const float* advantages,
                         const float* weights, const float* old_logp, const float* ref_logp,
                         int r, int vocab, float inv_temperature, double eps_low,
                         double eps_high, double beta) {
    policy_loss_backward_block<float>(dlogits, logp, stats, logits, targets, seqs, advantages,
                                      weights, old_logp, ref_logp, r, vocab, inv_temperature,
                                      eps_low, eps_high, beta);
}
