//! The GRPO loss ops on the CPU: group advantages and the policy loss fused with the log-prob
//! backward. Both run the host specification (`crate::grpo`) on the values a device would see.

use super::logprob::{row_logprob, row_logprob_backward, row_stats};
use super::CpuBackend;
use crate::backend::{policy_stat, PolicyTokens, POLICY_STATS};
use crate::grpo::{advantages, token_loss, AdvantageOptions, Clip, LossOptions};
use rayon::prelude::*;

/// out[i] = advantages(rewards, group_size, opts)[i] as f32.  rewards, out: [N].
pub fn group_advantages(
    out: &mut [f32],
    rewards: &[f64],
    group_size: usize,
    opts: &AdvantageOptions,
) {
    assert_eq!(
        out.len(),
        rewards.len(),
        "group_advantages: out and rewards disagree"
    );
    let a = advantages(rewards, group_size, opts)
        .unwrap_or_else(|e| panic!("group_advantages: {e} (the caller checks the groups)"));
    for (o, a) in out.iter_mut().zip(a) {
        *o = a as f32;
    }
}

/// See `TrainBackend::policy_loss_backward`.  dlogits, logits: [R, V]; logp, targets: [R];
/// stats: [R, POLICY_STATS].
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_backward(
    dlogits: &mut [f32],
    logp: &mut [f32],
    stats: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    tokens: &PolicyTokens<'_, CpuBackend>,
    vocab: usize,
    temperature: f32,
    o: &LossOptions,
) {
    let r = targets.len();
    assert!(
        dlogits.len() == r * vocab
            && logits.len() == r * vocab
            && logp.len() == r
            && stats.len() == r * POLICY_STATS
            && tokens.seqs.len() == r
            && tokens.old_logp.is_none_or(|x| x.len() == r)
            && tokens.ref_logp.is_none_or(|x| x.len() == r)
            && tokens.advantages.len() == tokens.weights.len(),
        "policy_loss_backward: dlogits, logits [R, V], logp, targets, seqs, old, ref [R], stats \
         [R, {POLICY_STATS}] and advantages, weights [N] disagree"
    );
    let inv_t = 1.0 / temperature as f64;
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(logp.par_iter_mut().zip(stats.par_chunks_mut(POLICY_STATS)))
        .enumerate()
        .for_each(|(row, ((dz, z), (lp, st)))| {
            let (y, seq) = (targets[row], tokens.seqs[row] as usize);
            // one pass for the row's softmax statistics, shared by the log-prob and its gradient
            let softmax = row_stats(z, inv_t);
            let (logp_row, entropy) = row_logprob(&softmax, z, y, inv_t);
            *lp = logp_row;
            st.fill(0.0);
            let w = tokens.weights[seq] as f64;
            let mut g = 0.0f32;
            if w != 0.0 {
                st[policy_stat::ENTROPY] = entropy;
                let lp = logp_row as f64;
                let t = token_loss(
                    lp,
                    tokens.old_logp.map_or(lp, |x| x[row] as f64),
                    tokens.ref_logp.map(|x| x[row] as f64),
                    tokens.advantages[seq] as f64,
                    o,
                );
                g = (w * t.grad) as f32;
                st[policy_stat::LOSS] = (w * t.loss) as f32;
                st[policy_stat::KL] = t.kl as f32;
                st[policy_stat::RATIO] = t.ratio as f32;
                st[policy_stat::CLIP_LOW] = (t.clip == Clip::Low) as u8 as f32;
                st[policy_stat::CLIP_HIGH] = (t.clip == Clip::High) as u8 as f32;
            }
            row_logprob_backward(&softmax, dz, z, y, g, inv_t);
        });
}
