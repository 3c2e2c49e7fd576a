//! Drawing one token per row of logits (the op behind the sampling kernel): the CPU runs the
//! specification itself, `crate::sampling::sample`, row by row.

use crate::sampling::{sample, SamplingParams, TokenDraws};

/// out[r] = sample(logits[r], params, draws.uniform(r)) as a float id.  logits: [R, V]; out: [R].
pub fn sample_tokens(
    out: &mut [f32],
    logits: &[f32],
    draws: &TokenDraws,
    vocab: usize,
    params: &SamplingParams,
) {
    assert!(
        out.len() == draws.rows() && logits.len() == out.len() * vocab,
        "sample_tokens: out [R], draws [R] and logits [R, vocab] disagree"
    );
    for (r, (o, row)) in out.iter_mut().zip(logits.chunks_exact(vocab)).enumerate() {
        *o = sample(row, params, draws.uniform(r)) as f32;
    }
}
