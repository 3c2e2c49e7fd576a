//! AdamW over the flat parameter buffer, the learning-rate schedule and global-norm clipping.

/// AdamW (decoupled weight decay) with f32 moments over one contiguous parameter buffer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far (for bias correction).
    pub t: u64,
    pub m: Vec<f32>,
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
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let c1 = 1.0 / (1.0 - self.beta1.powi(self.t as i32)) as f32;
        let c2 = 1.0 / (1.0 - self.beta2.powi(self.t as i32)) as f32;
        let (lr, eps, wd) = (lr as f32, self.eps as f32, self.weight_decay as f32);
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * ((*m * c1) / ((*v * c2).sqrt() + eps) + wd * *p);
        }
    }
}

/// Linear warm-up over `warmup` steps, then cosine decay to zero at `total` steps.
pub fn lr_at(step: usize, peak: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (f64 accumulation). A non-finite norm is returned as is and nothing is scaled.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    if norm.is_finite() && norm > max_norm && max_norm > 0.0 {
        let scale = (max_norm / norm) as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}
