//! One whole GRPO update on the device against the same update on the CPU: the tiny model, a
//! batch of two groups of two completions with rewards, the group advantages, the clipped loss
//! with the k3 KL fused with the head's backward, global-norm clipping and AdamW. Compares the
//! loss, the gradient norm and the change of every master weight, with the device's update run
//! in one pass, in micro-batches of one completion (four passes whose gradients add up), and
//! with the optimizer offloaded to host memory.
//!
//! One epoch: a second one would start from weights that differ by design (the device computes
//! with bf16 copies of the master weights, and an update of 1e-4 is below the bf16 spacing of a
//! weight of 0.1), so it would measure bf16, not the kernels. The loss ops alone are checked
//! against the CPU in src/selfcheck/policy_loss.rs.

use super::backward::tiny_train_config;
use super::{rel_error, tiny_model_weights, Checker};
use crate::backend::cpu::CpuBackend;
use crate::backend::TrainBackend;
use crate::grpo::advantage::AdvantageOptions;
use crate::grpo::policy_loss::{Aggregation, LossOptions};
use crate::model::Model;
use crate::model_backward::TrainBatch;
use crate::optim::AdamW;
use crate::train::optimizer::DeviceOptimizer;
use crate::train::update::{policy_update, UpdateBatch, UpdateOptions};
use anyhow::Result;

/// Relative error of the loss, the gradient norm and the weight update. The device rounds every
/// activation to bf16; simulating that on the CPU (tests/selfcheck.rs) gives 2e-4 (loss), 6e-5
/// (gradient norm) and 1.1e-2 (update: as the gradient itself, "model gradient"). A missing
/// clip factor moves the update by ~30 %, a wrong sign or a lost KL term by order 1.
pub const TOL_GRPO_STEP: f64 = 3e-2;

/// The weights the model computes with after the step against the new master weights rounded
/// to the device's storage type: both are the same rounding of the same f32 values, so any
/// difference is a copy the step did not rewrite (a stale copy differs by ~1e-3 here).
pub const TOL_WEIGHTS_COPY: f64 = 1e-7;

const TEMPERATURE: f32 = 0.7;

/// The inputs both backends share.
struct StepInputs {
    /// (prompt, completion) token ids.
    seqs: Vec<(Vec<u32>, Vec<u32>)>,
    rewards: Vec<f64>,
    truncated: Vec<bool>,
    ref_logp: Vec<f32>,
    loss: LossOptions,
}

/// What one update gave: last epoch's loss, the gradient norm, master weights after − before,
/// and how far the weights the model computes with are from the new master weights in the
/// device's storage type (0: the step rewrote them all).
struct StepOutcome {
    loss: f64,
    grad_norm: f64,
    update: Vec<f32>,
    copy_error: f64,
}

fn run_update<B: TrainBackend>(
    mut model: Model<B>,
    host: &[f32],
    inputs: &StepInputs,
    eps: f64,
    grad_clip: f64,
    micro_batch: usize,
    offload: bool,
) -> Result<StepOutcome> {
    let n = host.len();
    let seqs: Vec<(&[u32], &[u32])> = inputs.seqs.iter().map(|(p, q)| (&p[..], &q[..])).collect();
    let adam = AdamW::new(n, 0.9, 0.999, eps, 0.01);
    let mut opt = DeviceOptimizer::with_placement(&model.backend, adam, host.to_vec(), offload)?;
    // The tiny model fits one transfer of an offloaded step: three exercise the offsets.
    opt.split_offload_transfers(3);
    let result = policy_update(
        &mut model,
        &mut opt,
        &UpdateBatch {
            seqs: &seqs,
            rewards: &inputs.rewards,
            group_size: 2,
            truncated: &inputs.truncated,
            keep: None,
            ref_logp: Some(&inputs.ref_logp),
            old_logp: None,
        },
        &UpdateOptions {
            loss: &inputs.loss,
            advantage: &AdvantageOptions::default(),
            epochs: 1,
            temperature: TEMPERATURE,
            lr: 1e-4,
            grad_clip,
            micro_batch,
            halve_on_out_of_memory: false,
        },
    )?;
    anyhow::ensure!(
        !result.skipped,
        "the update was skipped (non-finite loss or gradient)"
    );
    let b = &model.backend;
    let after = opt.master_weights(b)?;
    let stored: Vec<f32> = match b.storage_bytes() {
        2 => after
            .iter()
            .map(|&w| half::bf16::from_f32(w).to_f32())
            .collect(),
        _ => after.clone(),
    };
    Ok(StepOutcome {
        loss: result.loss,
        grad_norm: result.grad_norm,
        update: after.iter().zip(host).map(|(a, b)| a - b).collect(),
        copy_error: rel_error(&b.download(b.full(&model.params))?, &stored),
    })
}

pub(super) fn grpo_step_check<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    let cfg = tiny_train_config(false)?;
    let host = tiny_model_weights(&cfg, c.seed);
    let mut rand = c.rand("grpo step");
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = [(1, 15), (17, 40), (100, 60), (9, 3)]
        .iter()
        .map(|&(p, q)| (rand.ids(p, cfg.vocab_size), rand.ids(q, cfg.vocab_size)))
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, q)| (&p[..], &q[..])).collect();
    let batch = TrainBatch::new(&pairs)?;
    // The reference policy's log-probs: the start model's, moved by noise so the KL term has a
    // gradient from the first epoch on.
    let start =
        Model::from_host(cfg.clone(), &host, CpuBackend)?.forward_train(&batch, TEMPERATURE)?;
    let noise = rand.normal(start.logp.len(), 0.3);
    let inputs = StepInputs {
        rewards: rand
            .normal(seqs.len(), 1.0)
            .iter()
            .map(|&a| a as f64)
            .collect(),
        truncated: vec![false, false, true, false],
        ref_logp: start
            .logp
            .iter()
            .zip(&noise)
            .map(|(&l, &e)| l + e)
            .collect(),
        // Token-mean: under a per-completion mean the first epoch's policy term (ρ = 1, advantages
        // summing to 0 in each group) would cancel exactly and leave only the KL in the loss.
        loss: LossOptions {
            beta: 0.1,
            aggregation: Aggregation::TokenMean,
            ..LossOptions::default()
        },
        seqs,
    };
    // AdamW's eps at the gradient's RMS keeps the update linear in the gradient for small
    // gradients (with eps ≈ 0 it is ±lr whatever their size, and bf16 noise flips the sign of
    // the smallest); the clip at half the norm makes clipping part of the step.
    let probe = run_update(
        Model::from_host(cfg.clone(), &host, CpuBackend)?,
        &host,
        &inputs,
        1e-8,
        0.0,
        0,
        false,
    )?;
    let eps = probe.grad_norm / (host.len() as f64).sqrt();
    let clip = probe.grad_norm / 2.0;
    let reference = run_update(
        Model::from_host(cfg.clone(), &host, CpuBackend)?,
        &host,
        &inputs,
        eps,
        clip,
        0,
        false,
    )?;

    let scored = batch.rows.len();
    let shape = format!(
        "{} layers h={} heads={}/{} V={}; 2 groups of 2, {} scored tokens, token-mean, beta 0.1, clipped",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        scored
    );
    // The whole batch in one pass, then one completion per pass (the gradients of four passes
    // added up on the device), then with the master weights and moments in host memory (AdamW
    // on the CPU, the new weights uploaded into the device's bf16 copy); each against the CPU's
    // one pass.
    for (check, micro_batch, offload) in [
        ("grpo step", 0, false),
        ("grpo step micro-batched", 1, false),
        ("grpo step offloaded optimizer", 0, true),
    ] {
        let result = (|| -> Result<StepOutcome> {
            let dev_model = Model::from_host(cfg.clone(), &host, (c.make_device)()?)?;
            run_update(dev_model, &host, &inputs, eps, clip, micro_batch, offload)
        })();
        let rows: [(&str, Result<f64, String>, f64); 4] = match &result {
            Ok(got) => [
                (
                    "loss",
                    Ok(rel_error(&[got.loss as f32], &[reference.loss as f32])),
                    TOL_GRPO_STEP,
                ),
                (
                    "grad_norm",
                    Ok(rel_error(
                        &[got.grad_norm as f32],
                        &[reference.grad_norm as f32],
                    )),
                    TOL_GRPO_STEP,
                ),
                (
                    "update",
                    Ok(rel_error(&got.update, &reference.update)),
                    TOL_GRPO_STEP,
                ),
                ("weights", Ok(got.copy_error), TOL_WEIGHTS_COPY),
            ],
            Err(e) => {
                let m = format!("{e:#}");
                [
                    ("loss", Err(m.clone()), TOL_GRPO_STEP),
                    ("grad_norm", Err(m.clone()), TOL_GRPO_STEP),
                    ("update", Err(m.clone()), TOL_GRPO_STEP),
                    ("weights", Err(m), TOL_WEIGHTS_COPY),
                ]
            }
        };
        for (name, row, tolerance) in rows {
            let (error, message) = match row {
                Ok(e) => (e, None),
                Err(m) => (f64::NAN, Some(m)),
            };
            c.push(
                format!("{check}/{name}"),
                shape.clone(),
                "rel",
                error,
                tolerance,
                message,
            );
        }
    }
    Ok(())
}
