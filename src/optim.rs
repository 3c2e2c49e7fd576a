//! AdamW over the flat parameter buffer, the learning-rate schedule, global-norm clipping and
//! the non-finite check that guards an update (METHOD.md §8).

use serde::{Deserialize, Serialize};

/// AdamW (decoupled weight decay) with f32 moments over one contiguous parameter buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far (for bias correction).
    pub t: u64,
    /// The moments: [N] each. A checkpoint keeps them in `optimizer.safetensors`
    /// (`checkpoint::save_moments`), not in trainer_state.json; they are read from the JSON only
    /// in checkpoints written before that file existed.
    #[serde(default, skip_serializing)]
    pub m: Vec<f32>,
    #[serde(default, skip_serializing)]
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(len: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// params −= lr · (m̂ / (√v̂ + eps) + weight_decay · params).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        assert!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "AdamW: size mismatch"
        );
        let step = self.next_step(lr, 1.0);
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            step.update(p, g, m, v);
        }
    }

    /// Counts one more update and returns its constants (the bias corrections of step t).
    pub fn next_step(&mut self, lr: f64, grad_scale: f32) -> AdamWStep {
        self.t += 1;
        self.step_constants(lr, grad_scale)
    }

    /// The constants of update number `self.t`.
    pub fn step_constants(&self, lr: f64, grad_scale: f32) -> AdamWStep {
        AdamWStep {
            lr: lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            c1: 1.0 / (1.0 - self.beta1.powi(self.t as i32)) as f32,
            c2: 1.0 / (1.0 - self.beta2.powi(self.t as i32)) as f32,
            grad_scale,
        }
    }
}

/// The constants of one AdamW update, in f32 as every backend computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Bias corrections 1 / (1 − β1ᵗ) and 1 / (1 − β2ᵗ).
    pub c1: f32,
    pub c2: f32,
    /// Multiplies every gradient first: the global-norm clipping factor (1 when not clipped).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The update of one parameter p with gradient g and moments m, v (the specification of the
    /// backends' `adamw_step`).
    #[inline]
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let g = g * self.grad_scale;
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *p -= self.lr
            * ((*m * self.c1) / ((*v * self.c2).sqrt() + self.eps) + self.weight_decay * *p);
    }
}

/// The global-norm clipping factor: max_norm / norm when the norm is larger, else 1 (also for a
/// non-finite norm, whose update is skipped anyway, or max_norm ≤ 0, which means no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    if norm.is_finite() && norm > max_norm && max_norm > 0.0 {
        (max_norm / norm) as f32
    } else {
        1.0
    }
}

/// What the learning rate does after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrDecay {
    /// Cosine from the peak down to `min_ratio`·peak at the last step (default).
    #[default]
    Cosine,
    /// Stay at the peak.
    Constant,
}

/// Linear warm-up to `peak` over `warmup` steps, then `decay` over the remaining steps up to
/// `total`. Step 0 already gets peak/warmup, so no step is spent at lr 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub decay: LrDecay,
    pub min_ratio: f64,
}

impl LrSchedule {
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        match self.decay {
            LrDecay::Constant => self.peak,
            LrDecay::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup) as f64 / span).min(1.0);
                let min = self.peak * self.min_ratio;
                min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Linear warm-up over `warmup` steps, then cosine decay to zero at `total` steps.
pub fn lr_at(step: usize, peak: f64, warmup: usize, total: usize) -> f64 {
    LrSchedule {
        peak,
        warmup,
        total,
        decay: LrDecay::Cosine,
        min_ratio: 0.0,
    }
    .at(step)
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (f64 accumulation). A non-finite norm is returned as is and nothing is scaled.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

/// The index of the first NaN or infinity in `xs`, if any: a step whose loss or gradient is not
/// finite is skipped and never reaches the weights, the moments or a checkpoint.
pub fn first_non_finite(xs: &[f32]) -> Option<usize> {
    xs.iter().position(|x| !x.is_finite())
}
