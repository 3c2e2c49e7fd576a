//! Drawing one token per row of logits (the op behind the sampling kernel): the CPU runs the
//! specification itself, `crate::sampling::sample`, row by row.

use crate::sampling::{drawable, sample, token_logprob, SamplingParams, TokenDraws};

/// out[r] = sample(logits[r], params, draws.uniform(r)) as a float id, logp[r] = its
/// log-probability at the temperature (0 when greedy); both NaN for a row that is not
/// `drawable`.  logits: [R, V]; out, logp: [R].
pub fn sample_tokens(
    out: &mut [f32],
    logp: &mut [f32],
    logits: &[f32],
    draws: &TokenDraws,
    vocab: usize,
    params: &SamplingParams,
) {
    assert!(
        out.len() == draws.rows() && logp.len() == out.len() && logits.len() == out.len() * vocab,
        "sample_tokens: out [R], logp [R], draws [R] and logits [R, vocab] disagree"
    );
    for (r, row) in logits.chunks_exact(vocab).enumerate() {
        if !drawable(row) {
            out[r] = f32::NAN;
            logp[r] = f32::NAN;
            continue;
        }
        let token = sample(row, params, draws.uniform(r));
        out[r] = token as f32;
        logp[r] = if params.temperature == 0.0 {
            0.0
        } else {
            token_logprob(row, token, params.temperature)
        };
    }
}
