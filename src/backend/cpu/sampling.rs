//! Drawing one token per row of logits (the op behind the sampling kernel): the CPU runs the
//! specification itself, `crate::sampling::sample`, row by row.

use crate::sampling::{drawable, sample, token_logprob, SamplingParams, TokenDraws};
use rayon::prelude::*;

/// Logits below this many (tens of µs of work) are drawn on the calling thread: waking the pool
/// costs ~15 µs (measured for `matmul_few_rows`).
const PARALLEL_LOGITS: usize = 1 << 14;

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
    let draw_row = |r: usize, row: &[f32], out: &mut f32, logp: &mut f32| {
        if !drawable(row) {
            *out = f32::NAN;
            *logp = f32::NAN;
            return;
        }
        let token = sample(row, params, draws.uniform(r));
        *out = token as f32;
        *logp = if params.temperature == 0.0 {
            0.0
        } else {
            token_logprob(row, token, params.temperature)
        };
    };
    // Rows are independent: in parallel when there is enough to share (a decode step of a batch
    // of sequences), each row the same arithmetic whatever the split.
    if logits.len() < PARALLEL_LOGITS || out.len() < 2 {
        for (r, ((row, out), logp)) in logits.chunks_exact(vocab).zip(out).zip(logp).enumerate() {
            draw_row(r, row, out, logp);
        }
    } else {
        logits
            .par_chunks_exact(vocab)
            .zip(out)
            .zip(logp)
            .enumerate()
            .for_each(|(r, ((row, out), logp))| draw_row(r, row, out, logp));
    }
}
