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
}

/// Runs the update on `model` and `opt`.
pub fn policy_update<B: TrainBackend>(
    model: &mut Model<B>,
    opt: &mut DeviceOptimizer<B>,
    u: &UpdateBatch,
    o: &UpdateOptions,
) -> Result<UpdateResult> {
    let mut old_logp: Option<Vec<f64>> = None;
    let mut result = None;
    for _ in 0..o.epochs.max(1) {
        let fwd = model.forward_train(u.batch, o.temperature)?;
        let logp = to_f64(&fwd.logp);
        let old = old_logp.get_or_insert_with(|| logp.clone());
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
        result = Some(UpdateResult {
            loss,
            entropy,
            grad_norm,
            skipped,
        });
        if skipped {
            // A non-finite loss or gradient never reaches the weights (or a checkpoint).
            break;
        }
    }
    Ok(result.expect("at least one epoch"))
}

pub(crate) fn to_f64(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}
