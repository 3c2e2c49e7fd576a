//! The policy update of one GRPO step on the model's device: group advantages from the rewards,
//! then μ epochs of forward pass, clipped policy loss (with the k3 KL to the reference) fused
//! with the head's backward, backward pass, global-norm clipping and AdamW. Only the loss
//! statistics (12 floats) and, once, the first epoch's log-probs come back to the host.
//! Written once for every backend; `selfcheck` runs it on CUDA and on the CPU and compares.

use super::optimizer::DeviceOptimizer;
use crate::backend::{policy_stat, TrainBackend, POLICY_STATS};
use crate::grpo::advantage::{check_groups, AdvantageOptions};
use crate::grpo::policy_loss::{
    completion_weights, included_completions, included_counts, LossOptions, LossStats,
};
use crate::model::Model;
use crate::model_backward::{PolicyInputs, TrainBatch};
use crate::optim::clip_scale;
use anyhow::{bail, Result};

/// The sampled completions of a step and what the loss needs about each.
pub struct UpdateBatch<'a> {
    pub batch: &'a TrainBatch,
    /// Scored tokens of each completion (their log-probs are consecutive in `batch.targets`).
    pub lens: &'a [usize],
    /// Each completion's total reward, group after group of `group_size`.
    pub rewards: &'a [f64],
    pub group_size: usize,
    /// One flag per completion: stopped by the generation cap.
    pub truncated: &'a [bool],
    /// Groups kept by the dynamic-sampling filter (all when None).
    pub keep: Option<&'a [bool]>,
    /// Per-token log-probs under the reference policy, when β > 0.
    pub ref_logp: Option<&'a [f32]>,
    /// Per-token logπold when given (the sampler's); else the first epoch's, recomputed.
    pub old_logp: Option<&'a [f32]>,
}

/// The settings of an update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateOptions<'a> {
    pub loss: &'a LossOptions,
    pub advantage: &'a AdvantageOptions,
    /// μ: passes over the batch, the first one's log-probs being logπold.
    pub epochs: usize,
    /// Temperature of the log-probs (the sampling temperature).
    pub temperature: f32,
    pub lr: f64,
    /// Global gradient-norm clip (≤ 0: none).
    pub grad_clip: f64,
}

/// What the last epoch of an update measured.
pub struct UpdateResult {
    pub loss: f64,
    pub stats: LossStats,
    /// Mean entropy of the policy over the scored tokens.
    pub entropy: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss or gradient was not finite: that epoch's update (and any later) was skipped.
    pub skipped: bool,
    /// The policy's per-token log-probs at the first forward pass (before any step).
    pub first_logp: Vec<f32>,
}

fn check(u: &UpdateBatch) -> Result<()> {
    let n = u.lens.len();
    let r = u.batch.targets.len();
    if u.rewards.len() != n || u.truncated.len() != n || u.keep.is_some_and(|k| k.len() != n) {
        bail!(
            "update: {n} completions but {} rewards, {} truncation flags, {} keep flags",
            u.rewards.len(),
            u.truncated.len(),
            u.keep.map_or(n, |k| k.len())
        );
    }
    if u.lens.iter().sum::<usize>() != r {
        bail!(
            "update: completion lengths sum to {}, the batch scores {r} tokens",
            u.lens.iter().sum::<usize>()
        );
    }
    check_groups(n, u.group_size)?;
    for (name, x) in [("reference", u.ref_logp), ("old", u.old_logp)] {
        if let Some(x) = x.filter(|x| x.len() != r) {
            bail!("update: {} {name} log-probs for {r} scored tokens", x.len());
        }
    }
    Ok(())
}

/// Runs the update on `model` and `opt`.
pub fn policy_update<B: TrainBackend>(
    model: &mut Model<B>,
    opt: &mut DeviceOptimizer<B>,
    u: &UpdateBatch,
    o: &UpdateOptions,
) -> Result<UpdateResult> {
    check(u)?;
    o.loss.validate()?;
    if o.loss.beta != 0.0 && u.ref_logp.is_none() {
        bail!("update: β = {} needs reference log-probs", o.loss.beta);
    }
    let b = &model.backend;
    let n = u.lens.len();
    let mut advantages = b.zeros_f32(n)?;
    b.group_advantages(
        b.full_mut(&mut advantages),
        u.rewards,
        u.group_size,
        o.advantage,
    );
    let included = included_completions(u.truncated, u.keep, o.loss.truncated);
    let weights: Vec<f32> = completion_weights(u.lens, &included, o.loss.aggregation)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let weights = b.upload_f32(&weights)?;
    let seqs: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, u.lens[i as usize]))
        .collect();
    let given_old = u.old_logp.map(|x| b.upload_f32(x)).transpose()?;
    let ref_logp = u.ref_logp.map(|x| b.upload_f32(x)).transpose()?;
    let (tokens, sequences) = included_counts(u.lens, &included);
    let per_token = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };

    let mut first_logp: Option<B::Buf> = None;
    let mut last = None;
    for _ in 0..o.epochs.max(1) {
        let b = &model.backend;
        let acts = model.forward_activations(u.batch, o.temperature)?;
        opt.zero_grads(b);
        let inputs = PolicyInputs {
            seqs: &seqs,
            advantages: &advantages,
            weights: &weights,
            old_logp: given_old.as_ref().or(first_logp.as_ref()),
            ref_logp: ref_logp.as_ref(),
        };
        let rows = model.backward_policy(u.batch, &acts, &inputs, o.loss, &mut opt.grads)?;
        drop(acts);
        let mut sums = b.zeros_f32(2 * POLICY_STATS)?;
        b.column_sums(b.full_mut(&mut sums), b.full(&rows.stats), POLICY_STATS);
        let sums = b.download(b.full(&sums))?;
        let sum = |col: usize| sums[2 * col] as f64 + sums[2 * col + 1] as f64;
        first_logp.get_or_insert(rows.logp);

        let loss = sum(policy_stat::LOSS);
        let stats = LossStats {
            tokens,
            sequences,
            clip_frac_low: per_token(sum(policy_stat::CLIP_LOW)),
            clip_frac_high: per_token(sum(policy_stat::CLIP_HIGH)),
            kl: per_token(sum(policy_stat::KL)),
            ratio_mean: per_token(sum(policy_stat::RATIO)),
        };
        let r = u.batch.targets.len();
        let entropy = if r == 0 {
            0.0
        } else {
            sum(policy_stat::ENTROPY) / r as f64
        };
        let grad_norm = opt.grad_norm(b)?;
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if !skipped {
            opt.step(model, o.lr, clip_scale(grad_norm, o.grad_clip));
        }
        last = Some((loss, stats, entropy, grad_norm, skipped));
        if skipped {
            // A non-finite loss or gradient never reaches the weights (or a checkpoint).
            break;
        }
    }
    let (loss, stats, entropy, grad_norm, skipped) = last.expect("at least one epoch");
    let first_logp = first_logp.expect("at least one epoch");
    Ok(UpdateResult {
        loss,
        stats,
        entropy,
        grad_norm,
        skipped,
        first_logp: model.backend.download(model.backend.full(&first_logp))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::config::ModelConfig;
    use crate::optim::AdamW;

    fn tiny_model() -> Model<CpuBackend> {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":32,"hidden_size":16,"intermediate_size":32,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap();
        Model::random(cfg, 3, CpuBackend).unwrap()
    }

    /// One update of a fresh tiny model on a group of two completions, the second filtered
    /// out; rewards 1 and 0 without scaling give the first A = 0.5. `old_logp` as the sampler's.
    fn run(old_logp: Option<&[f32]>) -> UpdateResult {
        let mut model = tiny_model();
        let host = model
            .backend
            .download(model.backend.full(&model.params))
            .unwrap();
        let adam = AdamW::new(host.len(), 0.9, 0.999, 1e-8, 0.0);
        let mut opt = DeviceOptimizer::new(&model.backend, &adam, &host).unwrap();
        let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5]), (&[6], &[7, 8, 9])];
        let batch = TrainBatch::new(&seqs).unwrap();
        let loss = LossOptions {
            beta: 0.0,
            ..LossOptions::default()
        };
        let u = UpdateBatch {
            batch: &batch,
            lens: &[2, 3],
            rewards: &[1.0, 0.0],
            group_size: 2,
            truncated: &[false, false],
            keep: Some(&[true, false]),
            ref_logp: None,
            old_logp,
        };
        let options = UpdateOptions {
            loss: &loss,
            advantage: &AdvantageOptions {
                scale: crate::grpo::Scale::None,
                ..AdvantageOptions::default()
            },
            epochs: 1,
            temperature: 1.0,
            lr: 1e-3,
            grad_clip: 0.0,
        };
        policy_update(&mut model, &mut opt, &u, &options).unwrap()
    }

    /// Recomputed: ρ = 1 and the loss is −A = −0.5 over the one completion kept. Given old
    /// log-probs 0.1 below the policy's (up to their f32 rounding): ρ = e^0.1 (inside the clip
    /// range) on every token, so the loss is e^0.1 times as large; the first forward's
    /// log-probs are the same.
    #[test]
    fn given_old_logprobs_set_the_ratio() {
        let recomputed = run(None);
        let old: Vec<f32> = recomputed.first_logp.iter().map(|lp| lp - 0.1).collect();
        let given = run(Some(&old));
        assert_eq!(recomputed.loss, -0.5);
        assert_eq!(recomputed.stats.ratio_mean, 1.0);
        assert_eq!(
            (recomputed.stats.tokens, recomputed.stats.sequences),
            (2, 1)
        );
        let want = 0.1f64.exp() * recomputed.loss;
        assert!((given.loss - want).abs() < 1e-6, "{} vs {want}", given.loss);
        assert_eq!(given.first_logp, recomputed.first_logp);
        assert_eq!(given.first_logp.len(), 5);
    }
}
