//! Log-probability of the chosen token at temperature τ, its gradient, and the entropy of the
//! tempered distribution (for the training logs).

use crate::exp::exp_f64_in_place;
use crate::sampling::max_logit;
use rayon::prelude::*;

/// Values per chunk of a row whose exponentials are taken together (on the stack).
const CHUNK: usize = 256;

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
            (*lp, *ent) = row_logprob(&row_stats(z, inv_t), z, y, inv_t)
        });
}

/// The shifted log-sum-exp statistics of one row of tempered logits s = z / τ: its max M,
/// S = Σ exp(s − M) and Σ exp(s − M)·(s − M), summed in f64 in index order.
#[derive(Clone, Copy)]
pub(super) struct RowStats {
    max: f64,
    sum: f64,
    sum_s: f64,
}

pub(super) fn row_stats(z: &[f32], inv_t: f64) -> RowStats {
    let max = max_logit(z) as f64 * inv_t;
    let (mut sum, mut sum_s) = (0.0f64, 0.0f64);
    // The exponentials a chunk at a time (vectorized), the sums in index order.
    let (mut s, mut e) = ([0.0f64; CHUNK], [0.0f64; CHUNK]);
    for z in z.chunks(CHUNK) {
        let (s, e) = (&mut s[..z.len()], &mut e[..z.len()]);
        s.iter_mut()
            .zip(z)
            .for_each(|(s, &v)| *s = v as f64 * inv_t - max);
        e.copy_from_slice(s);
        exp_f64_in_place(e);
        for (&e, &s) in e.iter().zip(s.iter()) {
            sum += e;
            sum_s += e * s;
        }
    }
    RowStats { max, sum, sum_s }
}

/// (log-prob of token y, entropy) of one row of logits at 1/τ = inv_t, from its `row_stats`.
pub(super) fn row_logprob(stats: &RowStats, z: &[f32], y: u32, inv_t: f64) -> (f32, f32) {
    let RowStats { max, sum, sum_s } = *stats;
    let lse = sum.ln();
    // H = lse − E[s] with s the shifted, tempered logits.
    (
        (z[y as usize] as f64 * inv_t - max - lse) as f32,
        (lse - sum_s / sum) as f32,
    )
}

/// dz = g · (onehot(y) − softmax(z / τ)) / τ for one row, overwritten, given its `row_stats`.
pub(super) fn row_logprob_backward(
    stats: &RowStats,
    dz: &mut [f32],
    z: &[f32],
    y: u32,
    g: f32,
    inv_t: f64,
) {
    let RowStats { max, sum, .. } = *stats;
    let g = g as f64 * inv_t;
    let mut e = [0.0f64; CHUNK];
    for (chunk, (dz, z)) in dz.chunks_mut(CHUNK).zip(z.chunks(CHUNK)).enumerate() {
        let e = &mut e[..z.len()];
        e.iter_mut()
            .zip(z)
            .for_each(|(e, &v)| *e = v as f64 * inv_t - max);
        exp_f64_in_place(e);
        for (i, (d, &e)) in dz.iter_mut().zip(e.iter()).enumerate() {
            let p = e / sum;
            let onehot = if chunk * CHUNK + i == y as usize {
                1.0
            } else {
                0.0
            };
            *d = (g * (onehot - p)) as f32;
        }
    }
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
            row_logprob_backward(&row_stats(z, inv_t), dz, z, y, g, inv_t)
        });
}
