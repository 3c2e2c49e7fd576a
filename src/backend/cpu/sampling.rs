//! Drawing one token per row of logits (the op behind the sampling kernel): the CPU runs the
//! specification itself, `crate::sampling::sample`, row by row.

use crate::sampling::{sample, SamplingParams};

/// out[r] = sample(logits[r], temperature, uniforms[r]) as a float id.  logits: [R, V]; out: [R].
pub fn sample_tokens(
    out: &mut [f32],
    logits: &[f32],
    uniforms: &[f64],
    vocab: usize,
    temperature: f32,
) {
    assert!(
        out.len() == uniforms.len() && logits.len() == out.len() * vocab,
        "sample_tokens: out [R], uniforms [R] and logits [R, vocab] disagree"
    );
    let params = SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
    };
    for ((o, row), &u) in out.iter_mut().zip(logits.chunks_exact(vocab)).zip(uniforms) {
        *o = sample(row, &params, u) as f32;
    }
}
