//! Log-probability of the chosen token at temperature τ, its gradient, and the entropy of the
//! tempered distribution (for the training logs).

use rayon::prelude::*;

/// logp[r] = log softmax(logits[r] / τ)[targets[r]];  entropy[r] = −Σ p log p of that softmax.
/// logits: [R, V]; targets, logp, entropy: [R]. Sums in f64.
pub fn logprob_forward(
    logp: &mut [f32],
    entropy: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    temperature: f32,
) {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "logprob_forward: logits is not [R, V]"
    );
    let inv_t = 1.0 / temperature as f64;
    logp.par_iter_mut()
        .zip(entropy.par_iter_mut())
        .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
        .for_each(|((lp, ent), (z, &y))| {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 * inv_t;
            let (mut sum, mut sum_zs) = (0.0f64, 0.0f64);
            for &v in z {
                let s = v as f64 * inv_t - max;
                let e = s.exp();
                sum += e;
                sum_zs += e * s;
            }
            let lse = sum.ln();
            *lp = (z[y as usize] as f64 * inv_t - max - lse) as f32;
            // H = lse − E[s] with s the shifted, tempered logits.
            *ent = (lse - sum_zs / sum) as f32;
        });
}

/// dlogits[r] = dlogp[r] · (onehot(targets[r]) − softmax(logits[r] / τ)) / τ. Overwrites dlogits.
pub fn logprob_backward(
    dlogits: &mut [f32],
    dlogp: &[f32],
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    temperature: f32,
) {
    assert_eq!(
        dlogits.len(),
        logits.len(),
        "logprob_backward: size mismatch"
    );
    let inv_t = 1.0 / temperature as f64;
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(dlogp.par_iter().zip(targets.par_iter()))
        .for_each(|((dz, z), (&g, &y))| {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 * inv_t;
            let sum: f64 = z.iter().map(|&v| (v as f64 * inv_t - max).exp()).sum();
            let g = g as f64 * inv_t;
            for (i, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
                let p = (v as f64 * inv_t - max).exp() / sum;
                let onehot = if i == y as usize { 1.0 } else { 0.0 };
                *d = (g * (onehot - p)) as f32;
            }
        });
}
