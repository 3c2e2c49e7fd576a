//! Supervised fine-tuning on prompt/completion pairs: minimise the mean negative log-likelihood
//! of the completion tokens (prompt tokens are context only). Builds the demo model from scratch
//! and gives users a warm start before GRPO.

use crate::backend::cpu::CpuBackend;
use crate::model::Model;
use crate::model_backward::TrainBatch;
use crate::optim::{clip_grad_norm, AdamW};
use crate::rng;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct SftOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
}

/// One (prompt, completion) token pair.
#[derive(Debug, Clone)]
pub struct SftExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// Per-step record for progress and logs.
#[derive(Debug, Clone, Copy)]
pub struct SftStep {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
}

/// Trains `model` in place; `on_step` sees every step (progress display, logs).
pub fn train_sft(
    model: &mut Model<CpuBackend>,
    data: &[SftExample],
    opts: &SftOptions,
    mut on_step: impl FnMut(&SftStep),
) -> Result<()> {
    if data.is_empty() {
        bail!("no SFT examples");
    }
    if let Some(i) = data
        .iter()
        .position(|e| e.prompt.is_empty() || e.completion.is_empty())
    {
        bail!("SFT example {i} has an empty prompt or completion");
    }
    let n = model.layout.total_len();
    let mut opt = AdamW::new(n, 0.9, 0.999, 1e-8, opts.weight_decay);
    let mut grads = vec![0.0f32; n];
    for step in 0..opts.steps {
        // Examples drawn with the counter-based RNG: the batch of step t depends only on (seed, t).
        let picks: Vec<&SftExample> = (0..opts.batch_size)
            .map(|i| {
                let u = rng::uniform(opts.seed, 1, (step * opts.batch_size + i) as u64);
                &data[(u * data.len() as f64) as usize % data.len()]
            })
            .collect();
        let seqs: Vec<(&[u32], &[u32])> = picks
            .iter()
            .map(|e| (e.prompt.as_slice(), e.completion.as_slice()))
            .collect();
        let batch = TrainBatch::new(&seqs)?;
        let mut out = model.forward_train(&batch, 1.0)?;
        let tokens = out.logp.len();
        let loss = -out.logp.iter().map(|&l| l as f64).sum::<f64>() / tokens as f64;
        let dlogp = vec![-1.0 / tokens as f32; tokens];
        grads.fill(0.0);
        model.backward(&batch, &mut out.acts, &dlogp, &mut grads)?;
        let grad_norm = clip_grad_norm(&mut grads, opts.grad_clip);
        let lr = crate::optim::lr_at(step, opts.lr, opts.warmup_steps, opts.steps);
        if !(loss.is_finite() && grad_norm.is_finite()) {
            eprintln!("step {step}: non-finite loss or gradient norm; the update is skipped");
        } else {
            opt.step(&mut model.params, &grads, lr);
        }
        on_step(&SftStep {
            step,
            loss,
            grad_norm,
            lr,
            tokens,
        });
    }
    Ok(())
}
