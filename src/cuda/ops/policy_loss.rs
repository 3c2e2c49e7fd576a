//! Launcher for kernels/policy_loss.cu: the GRPO policy loss fused with the log-prob backward
//! (the CPU reference is `backend::cpu::policy_loss_backward`).

use anyhow::Result;

use super::logprob::{check_logprob_args, logprob_config};
use crate::cuda::launch::{KernelLaunch, Launcher};
use crate::grpo::LossOptions;

/// Device pointers of the per-row and per-completion inputs (0 for an absent old or reference).
pub struct PolicyLossArgs {
    pub dlogits: u64,
    pub logp: u64,
    pub stats: u64,
    pub logits: u64,
    pub logits_f32: bool,
    pub targets: u64,
    pub seqs: u64,
    pub advantages: u64,
    pub weights: u64,
    pub old_logp: u64,
    pub ref_logp: u64,
}

/// One block per row, as `logprob_backward`: dlogits (bf16 [r, vocab]), logp (f32 [r]) and
/// stats (f32 [r, POLICY_STATS]) written; the caller checked every size and index.
pub fn policy_loss_backward(
    k: &dyn Launcher,
    a: &PolicyLossArgs,
    r: usize,
    vocab: usize,
    temperature: f32,
    o: &LossOptions,
) -> Result<()> {
    let (r_i, vocab_i, inv_temperature) =
        check_logprob_args("policy_loss_backward", r, vocab, temperature)?;
    if r == 0 {
        return Ok(());
    }
    let name = if a.logits_f32 {
        "policy_loss_backward_f32"
    } else {
        "policy_loss_backward"
    };
    let l = KernelLaunch::new("policy_loss", name, logprob_config(r, vocab, a.logits_f32))
        .ptr(a.dlogits)
        .ptr(a.logp)
        .ptr(a.stats)
        .ptr(a.logits)
        .ptr(a.targets)
        .ptr(a.seqs)
        .ptr(a.advantages)
        .ptr(a.weights)
        .ptr(a.old_logp)
        .ptr(a.ref_logp)
        .i32(r_i)
        .i32(vocab_i)
        .f32(inv_temperature)
        .f64(o.eps_low)
        .f64(o.eps_high)
        .f64(o.beta);
    // SAFETY: matches `(bf16* dlogits, float* logp, float* stats, const T* logits, const u32*
    // targets, const u32* seqs, const float* advantages, const float* weights, const float*
    // old_logp, const float* ref_logp, int r, int vocab, float inv_temperature, double eps_low,
    // double eps_high, double beta)` with T = f32 for the _f32 kernel, else bf16; the caller owns
    // buffers of the documented shapes (old and reference may be null), every target is < vocab
    // and every completion index < the advantages' length; whole warps up to 1024 threads.
    unsafe { k.launch(&l) }
}
