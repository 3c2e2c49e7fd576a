//! AdamW on the model's device: the f32 master weights, both moments and the gradient buffer
//! live beside the model (CUDA: the model computes with a bf16 copy that every step rewrites),
//! so a step moves no parameter data to the host. The host-side [`AdamW`] is the checkpoint
//! format and holds the hyper-parameters and the step count.

use crate::backend::TrainBackend;
use crate::model::Model;
use crate::optim::AdamW;
use anyhow::{bail, Result};

pub struct DeviceOptimizer<B: TrainBackend> {
    /// Hyper-parameters and updates taken; its `m` and `v` are empty (the moments are below).
    hyper: AdamW,
    master: B::Buf, // [N] f32 master weights
    m: B::Buf,      // [N] f32 first moment
    v: B::Buf,      // [N] f32 second moment
    /// d(loss)/d(params) of the last backward pass: [N] f32.
    pub grads: B::Buf,
    /// [hi, lo] of the last sum of squares (f32 [2]).
    sum_squares: B::Buf,
}

impl<B: TrainBackend> DeviceOptimizer<B> {
    /// Starts from `state` (fresh or from a checkpoint) with master weights `params`: [N].
    pub fn new(b: &B, state: &AdamW, params: &[f32]) -> Result<Self> {
        let n = params.len();
        if state.m.len() != n || state.v.len() != n {
            bail!(
                "optimizer state holds moments for {} parameters, the model has {n}",
                state.m.len()
            );
        }
        let hyper = AdamW {
            m: Vec::new(),
            v: Vec::new(),
            ..state.clone()
        };
        Ok(DeviceOptimizer {
            hyper,
            master: b.upload_f32(params)?,
            m: b.upload_f32(&state.m)?,
            v: b.upload_f32(&state.v)?,
            grads: b.zeros_f32(n)?,
            sum_squares: b.zeros_f32(2)?,
        })
    }

    /// Zeroes the gradient buffer before a backward pass (which accumulates).
    pub fn zero_grads(&mut self, b: &B) {
        b.fill_zero(b.full_mut(&mut self.grads));
    }

    /// The global L2 norm of the gradients (f64 sum of squares in a fixed order).
    pub fn grad_norm(&mut self, b: &B) -> Result<f64> {
        b.sum_squares(b.full_mut(&mut self.sum_squares), b.full(&self.grads));
        let hi_lo = b.download(b.full(&self.sum_squares))?;
        Ok((hi_lo[0] as f64 + hi_lo[1] as f64).sqrt())
    }

    /// One AdamW update of `model`'s weights from the gradients times `grad_scale`.
    pub fn step(&mut self, model: &mut Model<B>, lr: f64, grad_scale: f32) {
        let step = self.hyper.next_step(lr, grad_scale);
        let b = &model.backend;
        b.adamw_step(
            b.full_mut(&mut model.params),
            b.full_mut(&mut self.master),
            b.full_mut(&mut self.m),
            b.full_mut(&mut self.v),
            b.full(&self.grads),
            &step,
        );
    }

    /// The master weights, on the host: [N].
    pub fn master_weights(&self, b: &B) -> Result<Vec<f32>> {
        b.download(b.full(&self.master))
    }

    /// The whole optimizer state, on the host (for a checkpoint).
    pub fn state(&self, b: &B) -> Result<AdamW> {
        Ok(AdamW {
            m: b.download(b.full(&self.m))?,
            v: b.download(b.full(&self.v))?,
            ..self.hyper.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::config::ModelConfig;
    use crate::optim::clip_grad_norm;
    use crate::rng::Philox;

    /// On the CPU, DeviceOptimizer (the backends' adamw_step with the clip factor fused in)
    /// gives exactly what the host AdamW gives after clip_grad_norm, step after step: the
    /// specification and the path every backend runs agree bit for bit.
    #[test]
    fn device_adamw_with_fused_clipping_equals_host_adamw_after_clipping() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let mut rng = Philox::new(3, 0);
        let n = crate::params::ParamLayout::new(&cfg).total_len();
        let host: Vec<f32> = (0..n).map(|_| 0.1 * rng.next_normal()).collect();
        let mut model = Model::from_host(cfg, &host, CpuBackend).unwrap();
        let state = AdamW::new(n, 0.9, 0.999, 1e-8, 0.1);
        let mut reference = (host.clone(), state.clone());
        let mut opt = DeviceOptimizer::new(&CpuBackend, &state, &host).unwrap();
        for step in 0..4 {
            let grads: Vec<f32> = (0..n).map(|_| rng.next_normal()).collect();
            opt.grads.copy_from_slice(&grads);
            let clip = if step % 2 == 0 { 1.0 } else { 1e3 }; // clipped, then not
            let norm = opt.grad_norm(&CpuBackend).unwrap();
            opt.step(&mut model, 1e-3, crate::optim::clip_scale(norm, clip));

            let mut clipped = grads.clone();
            let host_norm = clip_grad_norm(&mut clipped, clip);
            reference.1.step(&mut reference.0, &clipped, 1e-3);
            assert!(
                (norm - host_norm).abs() <= 1e-12 * host_norm,
                "{norm} vs {host_norm}"
            );
            assert_eq!(opt.master_weights(&CpuBackend).unwrap(), reference.0);
            assert_eq!(model.params, reference.0);
        }
        assert_eq!(opt.state(&CpuBackend).unwrap(), reference.1);
    }
}
