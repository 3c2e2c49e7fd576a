//! RMSNorm as in HF Qwen2/Llama: normalise in f32, then scale by the weight.

use crate::backend::GradWrite;
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

/// Backward of `rmsnorm_forward`. With r = 1/sqrt(mean(x²) + eps) and g = weight ⊙ dout:
/// dx = r·g − x · r³ · Σ(g ⊙ x) / dim (overwritten, or added to dx with `GradWrite::Add`);
/// dweight += Σ_rows dout ⊙ x · r.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dx_write: GradWrite,
    dweight: &mut [f32],
    dout: &[f32],
    x: &[f32],
    weight: &[f32],
    dim: usize,
    eps: f32,
) {
    assert!(
        dx.len() == x.len() && dout.len() == x.len(),
        "rmsnorm_backward: size mismatch"
    );
    assert!(
        dweight.len() == dim && weight.len() == dim,
        "rmsnorm_backward: weight is not [dim]"
    );
    // Rows in fixed blocks, in parallel; each block sums its rows' weight gradient, and the
    // blocks are added in order, so the result does not depend on thread scheduling (resumed
    // runs must reproduce uninterrupted ones bit for bit).
    const ROWS_PER_BLOCK: usize = 32;
    let block = ROWS_PER_BLOCK * dim;
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dout.par_chunks(block)))
        .map(|(dx, (x, dout))| {
            let mut dw = vec![0.0f32; dim];
            for (dx, (x, dout)) in dx.chunks_mut(dim).zip(x.chunks(dim).zip(dout.chunks(dim))) {
                let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                let r = 1.0 / (mean_sq + eps).sqrt();
                let gx: f32 = x
                    .iter()
                    .zip(dout)
                    .zip(weight)
                    .map(|((x, d), w)| w * d * x)
                    .sum();
                let c = r * r * r * gx / dim as f32;
                for i in 0..dim {
                    let g = r * weight[i] * dout[i] - c * x[i];
                    match dx_write {
                        GradWrite::Add => dx[i] += g,
                        GradWrite::Overwrite => dx[i] = g,
                    }
                    dw[i] += dout[i] * x[i] * r;
                }
            }
            dw
        })
        .collect();
    for p in partial {
        dweight.iter_mut().zip(&p).for_each(|(d, p)| *d += p);
    }
}
