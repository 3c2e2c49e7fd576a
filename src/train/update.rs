//! The policy update of one GRPO step: μ epochs of forward pass, clipped policy loss (with the
//! k3 KL to the reference), backward pass, global-norm clipping and AdamW, on the model's device.
//! Written once for every backend; `selfcheck` runs it on CUDA and on the CPU and compares.

use super::metrics::mean;
use super::optimizer::DeviceOptimizer;
use crate::backend::TrainBackend;
use crate::grpo::policy_loss::{policy_loss, LossBatch, LossOptions, LossOutput};
use crate::model::Model;
use crate::model_backward::TrainBatch;
use crate::optim::clip_scale;
use anyhow::Result;

/// The sampled completions of a step and what the loss needs about each.
pub struct UpdateBatch<'a> {
    pub batch: &'a TrainBatch,
    /// Scored tokens of each completion (their log-probs are consecutive in `batch.targets`).
    pub lens: &'a [usize],
    pub advantages: &'a [f64],
    pub truncated: &'a [bool],
    /// Groups kept by the dynamic-sampling filter (all when None).
    pub keep: Option<&'a [bool]>,
    /// Per-token log-probs under the reference policy, when β > 0.
    pub ref_logp: Option<&'a [f64]>,
    /// Per-token logπold when given (the sampler's); else the first epoch's, recomputed.
    pub old_logp: Option<&'a [f64]>,
}

/// The settings of an update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateOptions<'a> {
    pub loss: &'a LossOptions,
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
    pub loss: LossOutput,
    /// Mean entropy of the policy over the scored tokens.
    pub entropy: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss or gradient was not finite: that epoch's update (and any later) was skipped.
    pub skipped: bool,
    /// The policy's per-token log-probs at the first forward pass (before any step).
    pub first_logp: Vec<f64>,
}

/// Runs the update on `model` and `opt`.
pub fn policy_update<B: TrainBackend>(
    model: &mut Model<B>,
    opt: &mut DeviceOptimizer<B>,
    u: &UpdateBatch,
    o: &UpdateOptions,
) -> Result<UpdateResult> {
    let mut first_logp: Option<Vec<f64>> = None;
    let mut last = None;
    for _ in 0..o.epochs.max(1) {
        let fwd = model.forward_train(u.batch, o.temperature)?;
        let logp = to_f64(&fwd.logp);
        let first = first_logp.get_or_insert_with(|| logp.clone());
        let old = u.old_logp.unwrap_or(first);
        let entropy = mean(&to_f64(&fwd.entropy));
        let lb = LossBatch {
            logp: &logp,
            old_logp: old,
            ref_logp: u.ref_logp,
            lens: u.lens,
            advantages: u.advantages,
            truncated: u.truncated,
            keep: u.keep,
        };
        let loss = policy_loss(&lb, o.loss)?;
        let dlogp: Vec<f32> = loss.grad.iter().map(|&x| x as f32).collect();
        opt.zero_grads(&model.backend);
        model.backward(u.batch, &fwd.acts, &dlogp, &mut opt.grads)?;
        let grad_norm = opt.grad_norm(&model.backend)?;
        let skipped = !(loss.loss.is_finite() && grad_norm.is_finite());
        if !skipped {
            opt.step(model, o.lr, clip_scale(grad_norm, o.grad_clip));
        }
        last = Some((loss, entropy, grad_norm, skipped));
        if skipped {
            // A non-finite loss or gradient never reaches the weights (or a checkpoint).
            break;
        }
    }
    let (loss, entropy, grad_norm, skipped) = last.expect("at least one epoch");
    Ok(UpdateResult {
        loss,
        entropy,
        grad_norm,
        skipped,
        first_logp: first_logp.expect("at least one epoch"),
    })
}

pub(crate) fn to_f64(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::config::ModelConfig;
    use crate::grpo::policy_loss::LossOptions;
    use crate::optim::AdamW;

    fn tiny_model() -> Model<CpuBackend> {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":32,"hidden_size":16,"intermediate_size":32,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap();
        Model::random(cfg, 3, CpuBackend).unwrap()
    }

    /// One update of a fresh tiny model on two completions; `old_logp` as the sampler's.
    fn run(old_logp: Option<&[f64]>) -> UpdateResult {
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
            advantages: &[1.0, -0.5],
            truncated: &[false, false],
            keep: None,
            ref_logp: None,
            old_logp,
        };
        let options = UpdateOptions {
            loss: &loss,
            epochs: 1,
            temperature: 1.0,
            lr: 1e-3,
            grad_clip: 0.0,
        };
        policy_update(&mut model, &mut opt, &u, &options).unwrap()
    }

    /// Recomputed: ρ = 1 and the loss is −mean over completions of A (= −0.25). Given old
    /// log-probs δ = 0.1 below the policy's: ρ = e^0.1 (inside the clip range) on every token,
    /// so the loss is e^0.1 times as large; the first forward's log-probs are the same.
    #[test]
    fn given_old_logprobs_set_the_ratio() {
        let recomputed = run(None);
        let old: Vec<f64> = recomputed.first_logp.iter().map(|lp| lp - 0.1).collect();
        let given = run(Some(&old));
        assert!(
            (recomputed.loss.loss + 0.25).abs() < 1e-12,
            "{}",
            recomputed.loss.loss
        );
        let want = 0.1f64.exp() * recomputed.loss.loss;
        assert!(
            (given.loss.loss - want).abs() < 1e-9,
            "{} vs {want}",
            given.loss.loss
        );
        assert_eq!(given.first_logp, recomputed.first_logp);
        assert_eq!(given.first_logp.len(), 5);
    }
}
