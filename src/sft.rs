//! Supervised fine-tuning on prompt/completion pairs: minimise the mean negative log-likelihood
//! of the completion tokens (prompt tokens are context only). Builds the demo model from scratch
//! and gives users a warm start before GRPO. Runs on either backend: AdamW on f32 master
//! weights beside the model (`DeviceOptimizer`), gradients added up over micro-batches.

use crate::backend::TrainBackend;
use crate::model::Model;
use crate::model_backward::TrainBatch;
use crate::optim::{clip_scale, AdamW};
use crate::rng;
use crate::train::halving::halving_on_out_of_memory;
use crate::train::optimizer::DeviceOptimizer;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct SftOptions {
    pub steps: usize,
    pub batch_size: usize,
    /// Examples per forward and backward pass (0: the whole batch in one).
    pub micro_batch: usize,
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

/// Trains `model` in place from its f32 weights `master` ([N] in layout order: what the model
/// was made from; on CUDA the model holds their bf16 copy); returns the trained f32 weights.
/// `on_step` sees every step (progress display, logs).
pub fn train_sft<B: TrainBackend>(
    model: &mut Model<B>,
    master: Vec<f32>,
    data: &[SftExample],
    opts: &SftOptions,
    mut on_step: impl FnMut(&SftStep),
) -> Result<Vec<f32>> {
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
    if master.len() != n {
        bail!("{} master weights for a model of {n}", master.len());
    }
    let state = AdamW::new(n, 0.9, 0.999, 1e-8, opts.weight_decay);
    let mut opt = DeviceOptimizer::with_placement(&model.backend, state, master, false)?;
    let mut micro_batch = match opts.micro_batch {
        0 => opts.batch_size.max(1),
        m => m,
    };
    for step in 0..opts.steps {
        // Examples drawn with the counter-based RNG: the batch of step t depends only on (seed, t).
        let picks: Vec<(&[u32], &[u32])> = (0..opts.batch_size)
            .map(|i| {
                let u = rng::uniform(opts.seed, 1, (step * opts.batch_size + i) as u64);
                let e = &data[(u * data.len() as f64) as usize % data.len()];
                (e.prompt.as_slice(), e.completion.as_slice())
            })
            .collect();
        // The mean over the step's completion tokens: every pass's gradient is divided by all
        // of them, so the passes add up to the whole batch's gradient.
        let tokens: usize = picks.iter().map(|(_, c)| c.len()).sum();
        let dlogp_value = -1.0 / tokens as f32;
        // passes that run out of device memory run again at half the micro-batch, for good
        let (nll, ran_with) = halving_on_out_of_memory(
            &model.backend,
            "the SFT step",
            micro_batch,
            picks.len(),
            true,
            |size| {
                let mut nll = 0.0f64;
                opt.zero_grads(&model.backend);
                for pass in picks.chunks(size) {
                    let batch = TrainBatch::new(pass)?;
                    let out = model.forward_train(&batch, 1.0)?;
                    nll -= out.logp.iter().map(|&l| l as f64).sum::<f64>();
                    let dlogp = vec![dlogp_value; out.logp.len()];
                    model.backward(&batch, &out.acts, &dlogp, &mut opt.grads)?;
                }
                Ok(nll)
            },
        )?;
        micro_batch = ran_with;
        let loss = nll / tokens as f64;
        let grad_norm = opt.grad_norm(&model.backend)?;
        let lr = crate::optim::lr_at(step, opts.lr, opts.warmup_steps, opts.steps);
        if !(loss.is_finite() && grad_norm.is_finite()) {
            eprintln!("step {step}: non-finite loss or gradient norm; the update is skipped");
        } else {
            opt.step(model, lr, clip_scale(grad_norm, opts.grad_clip))?;
        }
        on_step(&SftStep {
            step,
            loss,
            grad_norm,
            lr,
            tokens,
        });
    }
    opt.master_weights(&model.backend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::config::ModelConfig;

    const TINY: &str = r#"{"model_type":"qwen2","vocab_size":64,"hidden_size":32,
        "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"tie_word_embeddings":true}"#;

    /// (losses, gradient norms, trained weights) of a few steps on fixed examples.
    fn run(micro_batch: usize) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
        let cfg = ModelConfig::from_json_str(TINY).unwrap();
        let master = Model::random(cfg.clone(), 3, CpuBackend).unwrap().params;
        let mut model = Model::from_host(cfg, &master, CpuBackend).unwrap();
        let data: Vec<SftExample> = (0..7u32)
            .map(|i| SftExample {
                prompt: (0..3 + i % 4).map(|j| (i * 7 + j) % 64).collect(),
                completion: (0..2 + i % 5).map(|j| (i * 3 + j * 5 + 1) % 64).collect(),
            })
            .collect();
        let opts = SftOptions {
            steps: 5,
            batch_size: 5,
            micro_batch,
            lr: 1e-2,
            warmup_steps: 0,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 1,
        };
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        let trained = train_sft(&mut model, master, &data, &opts, |s| {
            losses.push(s.loss);
            norms.push(s.grad_norm);
        })
        .unwrap();
        (losses, norms, trained)
    }

    /// Micro-batches add up to the whole batch's step (up to the order of float sums), and the
    /// loss falls over the steps.
    #[test]
    fn micro_batches_give_the_whole_batch_step() {
        let (whole_loss, whole_norm, whole) = run(0);
        let (part_loss, part_norm, part) = run(2);
        assert!(whole_loss[4] < whole_loss[0], "{whole_loss:?}");
        for (a, b) in whole_loss
            .iter()
            .zip(&part_loss)
            .chain(whole_norm.iter().zip(&part_norm))
        {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
        }
        // Adam divides by √v: an element whose gradient is near zero can move by a good part
        // of lr on a last-bit difference of its sum, so the weights are compared as a whole
        // (a pass's gradient scaled wrongly moves them by whole steps: errors of order 1e-1).
        let error = crate::selfcheck::rel_error(&part, &whole);
        assert!(error < 1e-4, "weights differ by {error:.3e} (relative)");
    }
}
