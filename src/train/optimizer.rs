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
