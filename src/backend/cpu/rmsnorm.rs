//! RMSNorm as in HF Qwen2/Llama: normalise in f32, then scale by the weight.

use rayon::prelude::*;

/// x, out: [M, dim]; weight: [dim].
pub fn rmsnorm_forward(out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
    assert_eq!(
        x.len(),
        out.len(),
        "rmsnorm_forward: x and out differ in size"
    );
    assert_eq!(weight.len(), dim, "rmsnorm_forward: weight is not [dim]");
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| {
            let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv_rms = 1.0 / (mean_sq + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
                *o = w * (x * inv_rms);
            }
        });
}
