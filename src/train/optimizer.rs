//! AdamW for training: by default on the model's device, where the f32 master weights, both
//! moments and the gradient buffer live beside the model (CUDA: the model computes with a bf16
//! copy that every step rewrites), so a step moves no parameter data to the host. With
//! `offload`, the master weights and moments (12 bytes per parameter) stay in host memory
//! instead: each step brings the gradients over a chunk at a time, updates on the CPU
//! (`AdamWStep::update`, the same arithmetic) and writes the new weights back into the model.
//! The host-side [`AdamW`] holds the hyper-parameters and the step count.

use crate::backend::TrainBackend;
use crate::model::Model;
use crate::optim::{AdamW, AdamWStep};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// Parameters per transfer of an offloaded step: 64 Mi (256 MiB of f32 gradients on the host at
/// a time).
const OFFLOAD_CHUNK: usize = 1 << 26;

/// Where the master weights and the moments live: [N] f32 each.
enum OptimizerState<B: TrainBackend> {
    Device {
        master: B::Buf,
        m: B::Buf,
        v: B::Buf,
    },
    Host {
        master: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        /// Parameters per transfer of a step (OFFLOAD_CHUNK; smaller in tests).
        chunk: usize,
        /// Where each transfer's gradients land: [chunk], kept from step to step (a fresh
        /// allocation per transfer costs its page faults every time).
        grads_host: Vec<f32>,
    },
}

pub struct DeviceOptimizer<B: TrainBackend> {
    /// Hyper-parameters and updates taken; its `m` and `v` are empty (the moments are below).
    hyper: AdamW,
    state: OptimizerState<B>,
    /// d(loss)/d(params) of the last backward pass: [N] f32, on the device.
    pub grads: B::Buf,
    /// [hi, lo] of the last sum of squares (f32 [2]).
    sum_squares: B::Buf,
}

/// A part of the optimizer's state: [N] f32 each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerPart {
    Master = 0,
    M = 1,
    V = 2,
}

impl<B: TrainBackend> DeviceOptimizer<B> {
    /// Starts from `state` (fresh or from a checkpoint) with master weights `params`: [N], on
    /// the device.
    pub fn new(b: &B, state: &AdamW, params: &[f32]) -> Result<Self> {
        Self::with_placement(b, state.clone(), params.to_vec(), false)
    }

    /// [`DeviceOptimizer::new`] taking the host state over: with `offload` the master weights
    /// and moments stay in host memory, in these very vectors (no copy of a 7B model's 85 GiB).
    pub fn with_placement(b: &B, state: AdamW, params: Vec<f32>, offload: bool) -> Result<Self> {
        let n = params.len();
        if state.m.len() != n || state.v.len() != n {
            bail!(
                "optimizer state holds moments for {} parameters, the model has {n}",
                state.m.len()
            );
        }
        // The hyper-parameters and step count stay here; the moments move to their place.
        let mut hyper = state;
        let (m, v) = (std::mem::take(&mut hyper.m), std::mem::take(&mut hyper.v));
        let placed = if offload {
            OptimizerState::Host {
                master: params,
                m,
                v,
                chunk: OFFLOAD_CHUNK,
                grads_host: Vec::new(),
            }
        } else {
            // Each host vector is given up as it goes to the device (the CPU keeps it as the
            // buffer): the state is never in memory twice, which on the CPU would take 24
            // bytes per parameter at start where the estimate counts 12.
            OptimizerState::Device {
                master: b.upload_f32_owned(params)?,
                m: b.upload_f32_owned(m)?,
                v: b.upload_f32_owned(v)?,
            }
        };
        Ok(DeviceOptimizer {
            hyper,
            state: placed,
            grads: b.zeros_f32(n)?,
            sum_squares: b.zeros_f32(2)?,
        })
    }

    /// With the optimizer offloaded, steps in `transfers` transfers (the last one shorter) instead
    /// of OFFLOAD_CHUNK parameters at a time: how `selfcheck` and the tests run a small model's
    /// step through several.
    pub(crate) fn split_offload_transfers(&mut self, transfers: usize) {
        if let OptimizerState::Host { master, chunk, .. } = &mut self.state {
            *chunk = (master.len() / transfers.max(1) + 1).max(1);
        }
    }

    /// Whether the master weights and moments are in host memory.
    pub fn offloaded(&self) -> bool {
        matches!(self.state, OptimizerState::Host { .. })
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
    pub fn step(&mut self, model: &mut Model<B>, lr: f64, grad_scale: f32) -> Result<()> {
        let step = self.hyper.next_step(lr, grad_scale);
        let b = &model.backend;
        match &mut self.state {
            OptimizerState::Device { master, m, v } => {
                b.adamw_step(
                    b.full_mut(&mut model.params),
                    b.full_mut(master),
                    b.full_mut(m),
                    b.full_mut(v),
                    b.full(&self.grads),
                    &step,
                );
                Ok(())
            }
            OptimizerState::Host {
                master,
                m,
                v,
                chunk,
                grads_host,
            } => {
                grads_host.resize((*chunk).min(master.len()), 0.0);
                for start in (0..master.len()).step_by(*chunk) {
                    let r = start..(start + *chunk).min(master.len());
                    let grads = &mut grads_host[..r.len()];
                    b.download_into(grads, b.view(&self.grads, r.clone()))?;
                    host_adamw(
                        &mut master[r.clone()],
                        &mut m[r.clone()],
                        &mut v[r.clone()],
                        grads,
                        &step,
                    );
                    b.upload_into(b.view_mut(&mut model.params, r.clone()), &master[r])?;
                }
                Ok(())
            }
        }
    }

    /// Hyper-parameters and updates taken (no moments: see [`DeviceOptimizer::part`]).
    pub fn hyper(&self) -> &AdamW {
        &self.hyper
    }

    /// The master weights, on the host: [N].
    pub fn master_weights(&self, b: &B) -> Result<Vec<f32>> {
        Ok(self.part(b, OptimizerPart::Master)?.into_owned())
    }

    /// The whole optimizer state, on the host.
    pub fn state(&self, b: &B) -> Result<AdamW> {
        Ok(AdamW {
            m: self.part(b, OptimizerPart::M)?.into_owned(),
            v: self.part(b, OptimizerPart::V)?.into_owned(),
            ..self.hyper.clone()
        })
    }

    /// One part of the state on the host: borrowed where it lives there already (offload, or
    /// the CPU backend's buffers), else copied from the device.
    pub fn part<'a>(&'a self, b: &B, part: OptimizerPart) -> Result<Cow<'a, [f32]>> {
        Ok(match &self.state {
            OptimizerState::Device { master, m, v } => {
                let buf = [master, m, v][part as usize];
                match b.host_values(buf) {
                    Some(values) => Cow::Borrowed(values),
                    None => Cow::Owned(b.download(b.full(buf))?),
                }
            }
            OptimizerState::Host { master, m, v, .. } => {
                Cow::Borrowed([master, m, v][part as usize])
            }
        })
    }
}

/// `AdamWStep::update` of every element, in parallel over blocks (each element's arithmetic is
/// the same whatever the split).
fn host_adamw(master: &mut [f32], m: &mut [f32], v: &mut [f32], grads: &[f32], step: &AdamWStep) {
    const BLOCK: usize = 1 << 16;
    master
        .par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .zip(grads.par_chunks(BLOCK))
        .for_each(|(((w, m), v), g)| {
            for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
                step.update(w, g, m, v);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::config::ModelConfig;
    use crate::optim::clip_grad_norm;
    use crate::rng::Philox;

    /// On the CPU, DeviceOptimizer (the backends' adamw_step with the clip factor fused in, or
    /// the offloaded host update in chunks) gives exactly what the host AdamW gives after
    /// clip_grad_norm, step after step: the specification and both paths agree bit for bit.
    #[test]
    fn device_adamw_with_fused_clipping_equals_host_adamw_after_clipping() {
        for offload in [false, true] {
            adamw_matches_the_host_reference(offload);
        }
    }

    fn adamw_matches_the_host_reference(offload: bool) {
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
        let mut opt =
            DeviceOptimizer::with_placement(&CpuBackend, state.clone(), host.clone(), offload)
                .unwrap();
        assert_eq!(opt.offloaded(), offload);
        opt.split_offload_transfers(3);
        for step in 0..4 {
            let grads: Vec<f32> = (0..n).map(|_| rng.next_normal()).collect();
            opt.grads.copy_from_slice(&grads);
            let clip = if step % 2 == 0 { 1.0 } else { 1e3 }; // clipped, then not
            let norm = opt.grad_norm(&CpuBackend).unwrap();
            opt.step(&mut model, 1e-3, crate::optim::clip_scale(norm, clip))
                .unwrap();

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

    /// A checkpoint reads the CPU optimizer's state where it is (a copy would need 8 bytes per
    /// parameter more than the run, at every checkpoint): each part is lent, not copied.
    #[test]
    fn the_cpu_optimizer_lends_its_state_without_a_copy() {
        let n = 10;
        let master: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut state = AdamW::new(n, 0.9, 0.999, 1e-8, 0.0);
        state.m.fill(2.0);
        state.v.fill(3.0);
        for offload in [false, true] {
            let opt = DeviceOptimizer::with_placement(
                &CpuBackend,
                state.clone(),
                master.clone(),
                offload,
            )
            .unwrap();
            for (part, want) in [
                (OptimizerPart::Master, &master),
                (OptimizerPart::M, &state.m),
                (OptimizerPart::V, &state.v),
            ] {
                let got = opt.part(&CpuBackend, part).unwrap();
                assert!(matches!(got, Cow::Borrowed(_)), "offload {offload}: a copy");
                assert_eq!(&*got, &want[..]);
            }
        }
    }
}
