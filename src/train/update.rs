//! The policy update of one GRPO step on the model's device: group advantages from the rewards,
//! then μ epochs of forward pass, clipped policy loss (with the k3 KL to the reference) fused
//! with the head's backward, backward pass, global-norm clipping and AdamW. Each epoch runs its
//! forward and backward passes over micro-batches of consecutive completions, whose gradients
//! add up in the one gradient buffer: the advantages and loss weights are those of the whole
//! batch, so the step is the whole batch's step (up to float summation order) while only one
//! micro-batch's activations are held at a time. Only the loss statistics (12 floats per
//! micro-batch) and the first epoch's log-probs come back to the host. Where the caller allows
//! it (`train` does), passes that run out of device memory run again at half the micro-batch
//! (`train::halving`), down to one completion per pass.
//! Written once for every backend; `selfcheck` runs it on CUDA and on the CPU and compares.

use super::halving::halving_on_out_of_memory;
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
use std::ops::Range;

/// The sampled completions of a step and what the loss needs about each.
pub struct UpdateBatch<'a> {
    /// (prompt, completion) token ids of each completion, group after group of `group_size`;
    /// every completion token is scored.
    pub seqs: &'a [(&'a [u32], &'a [u32])],
    /// Each completion's total reward.
    pub rewards: &'a [f64],
    pub group_size: usize,
    /// One flag per completion: stopped by the generation cap.
    pub truncated: &'a [bool],
    /// Groups kept by the dynamic-sampling filter (all when None).
    pub keep: Option<&'a [bool]>,
    /// Per-token log-probs under the reference policy, when β > 0: [R], completion after
    /// completion.
    pub ref_logp: Option<&'a [f32]>,
    /// Per-token logπold when given (the sampler's): [R]; else the first epoch's, recomputed.
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
    /// Completions per forward and backward pass (0: all of them in one).
    pub micro_batch: usize,
    /// When an epoch's passes run out of device memory: run them again with half as many
    /// completions each, instead of failing (the micro-batch changes only the memory held and
    /// the order of float sums).
    pub halve_on_out_of_memory: bool,
}

/// What the last epoch of an update measured.
pub struct UpdateResult {
    pub loss: f64,
    pub stats: LossStats,
    /// Mean entropy of the policy over the tokens in the loss.
    pub entropy: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss or gradient was not finite: that epoch's update (and any later) was skipped.
    pub skipped: bool,
    /// The policy's per-token log-probs at the first forward pass (before any step).
    pub first_logp: Vec<f32>,
    /// Completions per pass the update ended with: the options', or less where it ran out of
    /// device memory.
    pub micro_batch: usize,
}

/// One forward and backward pass of the update: a run of consecutive completions and the
/// range of their scored tokens in the batch's [R] per-token arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub completions: Range<usize>,
    pub scored: Range<usize>,
}

/// The completions of `lens` (scored tokens of each) cut into runs of `size` (the last one may
/// be shorter; 0 or more than there are: one run of all of them).
pub fn micro_batches(lens: &[usize], size: usize) -> Vec<MicroBatch> {
    let size = if size == 0 { lens.len().max(1) } else { size };
    let mut out = Vec::new();
    let mut scored = 0;
    for (i, chunk) in lens.chunks(size).enumerate() {
        let tokens: usize = chunk.iter().sum();
        out.push(MicroBatch {
            completions: i * size..i * size + chunk.len(),
            scored: scored..scored + tokens,
        });
        scored += tokens;
    }
    out
}

/// The packed batch of the completions `m` of `seqs`.
fn micro_train_batch(seqs: &[(&[u32], &[u32])], m: &MicroBatch) -> Result<TrainBatch> {
    TrainBatch::new(&seqs[m.completions.clone()])
}

/// log π(token) at temperature τ of every completion token of `seqs` ([R], completion after
/// completion), `micro_batch` completions per forward pass (0: all at once).
pub fn completion_logprobs<B: TrainBackend>(
    model: &Model<B>,
    seqs: &[(&[u32], &[u32])],
    micro_batch: usize,
    temperature: f32,
) -> Result<Vec<f32>> {
    let lens: Vec<usize> = seqs.iter().map(|(_, c)| c.len()).collect();
    let mut logp = Vec::with_capacity(lens.iter().sum());
    for m in micro_batches(&lens, micro_batch) {
        if !m.scored.is_empty() {
            let batch = micro_train_batch(seqs, &m)?;
            logp.extend(model.forward_train(&batch, temperature)?.logp);
        }
    }
    Ok(logp)
}

fn check(u: &UpdateBatch) -> Result<usize> {
    let n = u.seqs.len();
    let r: usize = u.seqs.iter().map(|(_, c)| c.len()).sum();
    if u.rewards.len() != n || u.truncated.len() != n || u.keep.is_some_and(|k| k.len() != n) {
        bail!(
            "update: {n} completions but {} rewards, {} truncation flags, {} keep flags",
            u.rewards.len(),
            u.truncated.len(),
            u.keep.map_or(n, |k| k.len())
        );
    }
    check_groups(n, u.group_size)?;
    for (name, x) in [("reference", u.ref_logp), ("old", u.old_logp)] {
        if let Some(x) = x.filter(|x| x.len() != r) {
            bail!("update: {} {name} log-probs for {r} scored tokens", x.len());
        }
    }
    Ok(r)
}

/// What every pass of an update reads: the batch, the options, and on the device each
/// completion's advantage and loss weight ([N]); the completion of each scored token ([R]).
struct PassInputs<'a, B: TrainBackend> {
    u: &'a UpdateBatch<'a>,
    o: &'a UpdateOptions<'a>,
    advantages: B::Buf,
    weights: B::Buf,
    row_seqs: Vec<u32>,
}

/// One epoch's forward and backward passes over `passes`, their gradients summed in
/// `opt.grads` (cleared first); returns the loss statistics' sums over all passes. Epoch 0
/// appends each pass's log-probs to `first_logp`; later epochs take logπold from it.
fn gradient_passes<B: TrainBackend>(
    model: &Model<B>,
    opt: &mut DeviceOptimizer<B>,
    inputs: &PassInputs<B>,
    passes: &[MicroBatch],
    epoch: usize,
    first_logp: &mut Vec<f32>,
) -> Result<[f64; POLICY_STATS]> {
    let (b, u, o) = (&model.backend, inputs.u, inputs.o);
    opt.zero_grads(b);
    let mut sums = [0.0f64; POLICY_STATS]; // the statistics' column sums over all passes
    for m in passes {
        let batch = micro_train_batch(u.seqs, m)?;
        let acts = model.forward_activations(&batch, o.temperature)?;
        let rows_of = |x: &[f32]| b.upload_f32(&x[m.scored.clone()]);
        let old_logp = match u.old_logp {
            Some(given) => Some(rows_of(given)?),
            None if epoch > 0 => Some(rows_of(first_logp)?),
            None => None, // logπold = logπθ
        };
        let ref_logp = u.ref_logp.map(rows_of).transpose()?;
        let policy_inputs = PolicyInputs {
            seqs: &inputs.row_seqs[m.scored.clone()],
            advantages: &inputs.advantages,
            weights: &inputs.weights,
            old_logp: old_logp.as_ref(),
            ref_logp: ref_logp.as_ref(),
        };
        let rows = model.backward_policy(&batch, &acts, &policy_inputs, o.loss, &mut opt.grads)?;
        drop(acts);
        let mut pass_sums = b.zeros_f32(2 * POLICY_STATS)?;
        b.column_sums(
            b.full_mut(&mut pass_sums),
            b.full(&rows.stats),
            POLICY_STATS,
        );
        let pass_sums = b.download(b.full(&pass_sums))?;
        for (col, sum) in sums.iter_mut().enumerate() {
            *sum += pass_sums[2 * col] as f64 + pass_sums[2 * col + 1] as f64;
        }
        if epoch == 0 {
            first_logp.extend(b.download(b.full(&rows.logp))?);
        }
    }
    Ok(sums)
}

/// Runs the update on `model` and `opt`.
pub fn policy_update<B: TrainBackend>(
    model: &mut Model<B>,
    opt: &mut DeviceOptimizer<B>,
    u: &UpdateBatch,
    o: &UpdateOptions,
) -> Result<UpdateResult> {
    let r = check(u)?;
    o.loss.validate()?;
    if o.loss.beta != 0.0 && u.ref_logp.is_none() {
        bail!("update: β = {} needs reference log-probs", o.loss.beta);
    }
    let b = &model.backend;
    let n = u.seqs.len();
    let lens: Vec<usize> = u.seqs.iter().map(|(_, c)| c.len()).collect();
    let mut advantages = b.zeros_f32(n)?; // [N]
    b.group_advantages(
        b.full_mut(&mut advantages),
        u.rewards,
        u.group_size,
        o.advantage,
    );
    let included = included_completions(u.truncated, u.keep, o.loss.truncated);
    let weights: Vec<f32> = completion_weights(&lens, &included, o.loss.aggregation)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let inputs = PassInputs {
        u,
        o,
        advantages,
        weights: b.upload_f32(&weights)?, // [N]
        // the completion of each scored token: [R], indices into the whole batch's [N] arrays
        row_seqs: (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, lens[i as usize]))
            .collect(),
    };
    let (tokens, sequences) = included_counts(&lens, &included);
    let per_token = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };

    let mut first_logp: Vec<f32> = Vec::with_capacity(r); // [R], filled by the first epoch
    let mut micro_batch = o.micro_batch;
    let mut last = None;
    for epoch in 0..o.epochs.max(1) {
        let (sums, ran_with) = halving_on_out_of_memory(
            &model.backend,
            "the update",
            micro_batch,
            n,
            o.halve_on_out_of_memory,
            |size| {
                // A micro-batch without scored tokens adds nothing to the loss or the gradient.
                let passes: Vec<MicroBatch> = micro_batches(&lens, size)
                    .into_iter()
                    .filter(|m| !m.scored.is_empty())
                    .collect();
                if epoch == 0 {
                    first_logp.clear(); // from a try that ran out of memory
                }
                gradient_passes(model, opt, &inputs, &passes, epoch, &mut first_logp)
            },
        )?;
        micro_batch = ran_with;
        let b = &model.backend;

        let loss = sums[policy_stat::LOSS];
        let stats = LossStats {
            tokens,
            sequences,
            clip_frac_low: per_token(sums[policy_stat::CLIP_LOW]),
            clip_frac_high: per_token(sums[policy_stat::CLIP_HIGH]),
            kl: per_token(sums[policy_stat::KL]),
            ratio_mean: per_token(sums[policy_stat::RATIO]),
        };
        let entropy = per_token(sums[policy_stat::ENTROPY]);
        let grad_norm = opt.grad_norm(b)?;
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if !skipped {
            opt.step(model, o.lr, clip_scale(grad_norm, o.grad_clip))?;
        }
        last = Some((loss, stats, entropy, grad_norm, skipped));
        if skipped {
            // A non-finite loss or gradient never reaches the weights (or a checkpoint).
            break;
        }
    }
    let (loss, stats, entropy, grad_norm, skipped) = last.expect("at least one epoch");
    Ok(UpdateResult {
        loss,
        stats,
        entropy,
        grad_norm,
        skipped,
        first_logp,
        micro_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
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

    /// A two-layer Qwen2 (q/k/v biases, GQA 2:1) of vocabulary 40.
    fn two_layer_qwen2() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"qwen2","vocab_size":40,"hidden_size":16,"intermediate_size":24,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#,
        )
        .unwrap()
    }

    /// AdamW (β = 0.9, 0.999) from zero moments over `model`'s weights (on the CPU, the host copy).
    fn fresh_optimizer(
        model: &Model<CpuBackend>,
        eps: f64,
        wd: f64,
    ) -> DeviceOptimizer<CpuBackend> {
        let adam = AdamW::new(model.params.len(), 0.9, 0.999, eps, wd);
        DeviceOptimizer::new(&model.backend, &adam, &model.params).unwrap()
    }

    /// One update of a fresh tiny model on a group of two completions, the second filtered
    /// out; rewards 1 and 0 without scaling give the first A = 0.5. `old_logp` as the sampler's.
    fn run(old_logp: Option<&[f32]>) -> UpdateResult {
        let mut model = tiny_model();
        let mut opt = fresh_optimizer(&model, 1e-8, 0.0);
        let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5]), (&[6], &[7, 8, 9])];
        let loss = LossOptions {
            beta: 0.0,
            ..LossOptions::default()
        };
        let u = UpdateBatch {
            seqs: &seqs,
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
            micro_batch: 0,
            halve_on_out_of_memory: false,
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

    #[test]
    fn micro_batches_cut_consecutive_completions() {
        let lens = [2, 0, 3, 1, 4];
        let mb = |c: Range<usize>, s: Range<usize>| MicroBatch {
            completions: c,
            scored: s,
        };
        assert_eq!(
            micro_batches(&lens, 2),
            vec![mb(0..2, 0..2), mb(2..4, 2..6), mb(4..5, 6..10)]
        );
        for whole in [0, 5, 9] {
            assert_eq!(micro_batches(&lens, whole), vec![mb(0..5, 0..10)]);
        }
        assert_eq!(micro_batches(&lens, 1)[1], mb(1..2, 2..2));
    }

    /// The loss settings and inputs of one equivalence case.
    struct PassCase {
        loss: LossOptions,
        keep: Option<&'static [bool]>,
        /// logπold from the sampler (made up), else recomputed.
        sampler_old: bool,
        epochs: usize,
    }

    /// The cases: the token-mean (a batch-wide normaliser) with a truncated completion masked,
    /// the KL and two epochs (the second's logπold from the first's passes); the per-completion
    /// mean with a group filtered out and the sampler's logπold over two epochs; the constant
    /// length normaliser with the KL.
    fn pass_cases() -> Vec<PassCase> {
        use crate::grpo::{Aggregation, Truncated};
        vec![
            PassCase {
                loss: LossOptions {
                    beta: 0.1,
                    aggregation: Aggregation::TokenMean,
                    truncated: Truncated::Mask,
                    ..LossOptions::default()
                },
                keep: None,
                sampler_old: false,
                epochs: 2,
            },
            PassCase {
                loss: LossOptions {
                    beta: 0.0,
                    aggregation: Aggregation::SeqMeanTokenMean,
                    ..LossOptions::default()
                },
                keep: Some(&[true, true, false, false, true, true]),
                sampler_old: true,
                epochs: 2,
            },
            PassCase {
                loss: LossOptions {
                    beta: 0.1,
                    aggregation: Aggregation::SeqMeanTokenSumNorm { max_len: 8 },
                    ..LossOptions::default()
                },
                keep: None,
                sampler_old: false,
                epochs: 1,
            },
        ]
    }

    /// Three groups of two completions of a two-layer model (the third completion truncated)
    /// under `case`, `micro_batch` completions per pass. What the update returns and the
    /// weights after it.
    fn update_in_passes(case: &PassCase, micro_batch: usize) -> (UpdateResult, Vec<f32>) {
        let cfg = two_layer_qwen2();
        let mut model = Model::random(cfg, 11, CpuBackend).unwrap();
        let mut opt = fresh_optimizer(&model, 1e-6, 0.01);
        let ids =
            |n: usize, k: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 7 + k) % 40).collect() };
        let owned: Vec<(Vec<u32>, Vec<u32>)> = [(3, 4), (5, 2), (2, 6), (4, 3), (1, 5), (6, 1)]
            .iter()
            .enumerate()
            .map(|(i, &(p, c))| (ids(p, i as u32), ids(c, 3 * i as u32 + 1)))
            .collect();
        let seqs: Vec<(&[u32], &[u32])> = owned.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let r: usize = seqs.iter().map(|(_, c)| c.len()).sum();
        let ref_logp: Vec<f32> = (0..r).map(|i| -3.0 - 0.05 * i as f32).collect();
        let sampler_logp: Vec<f32> = (0..r).map(|i| -3.5 + 0.04 * i as f32).collect();
        let u = UpdateBatch {
            seqs: &seqs,
            rewards: &[1.0, 0.2, 0.0, 0.9, 0.5, 0.4],
            group_size: 2,
            truncated: &[false, false, true, false, false, false],
            keep: case.keep,
            ref_logp: (case.loss.beta > 0.0).then_some(&ref_logp[..]),
            old_logp: case.sampler_old.then_some(&sampler_logp[..]),
        };
        let options = UpdateOptions {
            loss: &case.loss,
            advantage: &AdvantageOptions::default(),
            epochs: case.epochs,
            temperature: 0.8,
            lr: 1e-2,
            grad_clip: 0.0,
            micro_batch,
            halve_on_out_of_memory: false,
        };
        let result = policy_update(&mut model, &mut opt, &u, &options).unwrap();
        let after = opt.master_weights(&model.backend).unwrap();
        (result, after)
    }

    /// μ = 2 (METHOD.md §5): the second epoch's ratio is against the first epoch's log-probs
    /// (logπold frozen before any step), not the policy's current ones. Its loss and statistics
    /// are the host's policy loss (`grpo::policy_loss`, the spec checked against TRL) on the
    /// log-probs of the model after one epoch, with the first epoch's as logπold.
    #[test]
    fn the_second_epoch_takes_its_ratio_from_the_first_epochs_logprobs() {
        let cfg = two_layer_qwen2();
        let owned: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (vec![1, 2, 3], vec![4, 5, 6, 7]),
            (vec![1, 2, 3], vec![8, 9]),
            (vec![10, 11], vec![12, 13, 14]),
            (vec![10, 11], vec![15, 16, 17, 18, 19]),
        ];
        let seqs: Vec<(&[u32], &[u32])> = owned.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let lens: Vec<usize> = seqs.iter().map(|(_, c)| c.len()).collect();
        let ref_logp: Vec<f32> = (0..14).map(|i| -3.0 - 0.05 * i as f32).collect();
        let rewards = [1.0, 0.2, 0.0, 0.9];
        let (loss, advantage) = (
            LossOptions {
                beta: 0.1,
                ..LossOptions::default()
            },
            AdvantageOptions::default(),
        );
        let update = |epochs: usize| {
            let mut model = Model::random(cfg.clone(), 11, CpuBackend).unwrap();
            let mut opt = fresh_optimizer(&model, 1e-8, 0.0);
            let u = UpdateBatch {
                seqs: &seqs,
                rewards: &rewards,
                group_size: 2,
                truncated: &[false; 4],
                keep: None,
                ref_logp: Some(&ref_logp),
                old_logp: None,
            };
            let options = UpdateOptions {
                loss: &loss,
                advantage: &advantage,
                epochs,
                temperature: 0.8,
                lr: 3e-2,
                grad_clip: 0.0,
                micro_batch: 0,
                halve_on_out_of_memory: false,
            };
            let result = policy_update(&mut model, &mut opt, &u, &options).unwrap();
            (result, model)
        };
        let (two, _) = update(2);
        let (one, after_one) = update(1);
        assert_eq!(two.first_logp, one.first_logp);

        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let logp = completion_logprobs(&after_one, &seqs, 0, 0.8).unwrap();
        let want = crate::grpo::policy_loss(
            &crate::grpo::LossBatch {
                logp: &wide(&logp),
                old_logp: &wide(&one.first_logp),
                ref_logp: Some(&wide(&ref_logp)),
                lens: &lens,
                advantages: &crate::grpo::advantages(&rewards, 2, &advantage).unwrap(),
                truncated: &[false; 4],
                keep: None,
            },
            &loss,
        )
        .unwrap();
        let (got, stats) = (two.stats, want.stats);
        assert!(
            stats.clip_frac() > 0.0 && (stats.ratio_mean - 1.0).abs() > 1e-2,
            "the first epoch should move the ratio past the clip range: {stats:?}"
        );
        for (what, a, b) in [
            ("loss", two.loss, want.loss),
            ("ratio", got.ratio_mean, stats.ratio_mean),
            ("KL", got.kl, stats.kl),
            ("clipped low", got.clip_frac_low, stats.clip_frac_low),
            ("clipped high", got.clip_frac_high, stats.clip_frac_high),
        ] {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                "{what}: {a} vs {b}"
            );
        }
    }

    /// With truncated completions masked, the logged entropy is the mean over the tokens of the
    /// loss, as every other statistic (METHOD.md §2: the policy applies alike to the logs): the
    /// mean of the forward pass's per-token entropies over the completions kept.
    #[test]
    fn entropy_is_averaged_over_the_tokens_in_the_loss() {
        let mut model = tiny_model();
        let mut opt = fresh_optimizer(&model, 1e-8, 0.0);
        let owned: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (vec![1, 2], vec![3, 4, 5]),
            (vec![1, 2], vec![6, 7, 8, 9, 2]),
        ];
        let seqs: Vec<(&[u32], &[u32])> = owned.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let forward = model
            .forward_train(&TrainBatch::new(&seqs).unwrap(), 0.9)
            .unwrap();
        let mean = |x: &[f32]| x.iter().map(|&e| e as f64).sum::<f64>() / x.len() as f64;
        let (kept, all) = (mean(&forward.entropy[..3]), mean(&forward.entropy));
        assert!(
            (kept - all).abs() > 1e-4,
            "the test needs different means: {kept} vs {all}"
        );
        let loss = LossOptions {
            truncated: crate::grpo::Truncated::Mask,
            ..LossOptions::default()
        };
        let u = UpdateBatch {
            seqs: &seqs,
            rewards: &[1.0, 0.0],
            group_size: 2,
            truncated: &[false, true],
            keep: None,
            ref_logp: Some(&[-2.0; 8]),
            old_logp: None,
        };
        let options = UpdateOptions {
            loss: &loss,
            advantage: &AdvantageOptions::default(),
            epochs: 1,
            temperature: 0.9,
            lr: 1e-3,
            grad_clip: 0.0,
            micro_batch: 0,
            halve_on_out_of_memory: false,
        };
        let result = policy_update(&mut model, &mut opt, &u, &options).unwrap();
        assert_eq!(result.stats.tokens, 3);
        assert!(
            (result.entropy - kept).abs() < 1e-5,
            "entropy {} vs {kept} over the kept tokens",
            result.entropy
        );
    }

    /// Passes of 1, 2 and 4 completions (the last pass shorter) give the whole batch's step in
    /// every case: the same loss, statistics, gradient norm and log-probs, and the same weights
    /// after the epochs, up to the order of f32 sums.
    #[test]
    fn micro_batched_update_equals_the_whole_batch_update() {
        for case in pass_cases() {
            let (whole, whole_weights) = update_in_passes(&case, 0);
            assert!(whole.loss.abs() > 1e-3 && whole.grad_norm > 1e-3);
            for micro_batch in [1, 2, 4] {
                let (part, weights) = update_in_passes(&case, micro_batch);
                let close = |a: f64, b: f64, what: &str| {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                        "{what} with micro-batches of {micro_batch}, {:?}: {a} vs {b}",
                        case.loss.aggregation
                    )
                };
                close(part.loss, whole.loss, "loss");
                close(part.grad_norm, whole.grad_norm, "gradient norm");
                close(part.entropy, whole.entropy, "entropy");
                close(part.stats.kl, whole.stats.kl, "KL");
                close(part.stats.ratio_mean, whole.stats.ratio_mean, "ratio");
                assert_eq!(
                    (part.stats.tokens, part.stats.sequences),
                    (whole.stats.tokens, whole.stats.sequences)
                );
                assert_eq!(part.first_logp.len(), whole.first_logp.len());
                for (a, b) in part.first_logp.iter().zip(&whole.first_logp) {
                    assert!((a - b).abs() <= 1e-5, "log-prob {a} vs {b}");
                }
                let moved = whole_weights
                    .iter()
                    .zip(&weights)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    moved <= 1e-5,
                    "weights differ by up to {moved} with micro-batches of {micro_batch}"
                );
            }
        }
    }
}
