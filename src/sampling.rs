//! Choosing the next token from a row of logits, and the log-probability of a chosen token.

use crate::exp::exp_f64_in_place;

/// Decoding settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Where the uniform of each row of a batched draw comes from.
#[derive(Debug, Clone, Copy)]
pub enum TokenDraws<'a> {
    /// Row r draws `u[r]` (tests pick edge values this way).
    Given(&'a [f64]),
    /// Row r draws `rng::uniform(seed, first_stream + streams[r], step)`: the generation loop's
    /// numbers, which a GPU computes itself (Philox is a pure function of its counter).
    Philox {
        seed: u64,
        first_stream: u64,
        streams: &'a [u32],
        step: u64,
    },
}

impl TokenDraws<'_> {
    pub fn rows(&self) -> usize {
        match self {
            TokenDraws::Given(u) => u.len(),
            TokenDraws::Philox { streams, .. } => streams.len(),
        }
    }

    /// The uniform of row r.
    pub fn uniform(&self, r: usize) -> f64 {
        match *self {
            TokenDraws::Given(u) => u[r],
            TokenDraws::Philox {
                seed,
                first_stream,
                streams,
                step,
            } => crate::rng::uniform(seed, first_stream + streams[r] as u64, step),
        }
    }
}

/// Whether a row of logits can be drawn from: no NaN, no +∞ and at least one finite logit (−∞
/// masks a token). A model whose weights hold non-finite values, or whose activations overflow,
/// gives rows that cannot; the samplers mark them instead of drawing (see
/// `Backend::sample_tokens`).
pub fn drawable(logits: &[f32]) -> bool {
    // No early return: the loop then vectorizes.
    let (mut any_bad, mut any_finite) = (false, false);
    for &z in logits {
        any_bad |= z.is_nan() | (z == f32::INFINITY);
        any_finite |= z.is_finite();
    }
    !any_bad && any_finite
}

/// The largest logit, NaNs ignored (−∞ when there is none), as `f32::max` folds it. Taken over
/// 16 lanes, which vectorizes (the fold is a chain of dependent steps); the maximum does not
/// depend on the order, and where it is ±0 either sign gives the same results in the softmaxes
/// that subtract it (here and the CPU log-probs).
pub(crate) fn max_logit(logits: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &z) in lanes.iter_mut().zip(chunk) {
            *m = if z > *m { z } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws a token with the uniform `u` in [0, 1).
///
/// Candidates are ranked by logit (descending, ties to the lower index); top-k keeps the first
/// k, top-p then keeps the shortest prefix of those whose probability mass reaches top_p of
/// theirs. Either way the kept set is every token ranked at or above one cut-off token, which a
/// GPU kernel finds by a radix search instead of a sort. The kept set is walked in vocabulary
/// order for the inverse CDF, so the result depends only on (logits, params, u): a kernel that
/// draws the same `u` picks the same token.
pub fn sample(logits: &[f32], params: &SamplingParams, u: f64) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / params.temperature as f64;
    let max = max_logit(logits) as f64;
    // Unnormalised probabilities at temperature τ, in f64.
    let mut probs: Vec<f64> = logits.iter().map(|&z| (z as f64 - max) * inv_t).collect();
    exp_f64_in_place(&mut probs);

    let vocab = logits.len();
    let restrict_k = params.top_k > 0 && params.top_k < vocab;
    let restrict_p = params.top_p < 1.0;
    if restrict_k || restrict_p {
        // Ranked by logit (the order of the probabilities, which only ties where they underflow).
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut keep = if restrict_k { params.top_k } else { vocab };
        if restrict_p {
            let mass: f64 = order[..keep].iter().map(|&i| probs[i]).sum();
            let target = params.top_p as f64 * mass;
            let mut cum = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                cum += probs[i];
                if cum >= target {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
    }

    let total: f64 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last_kept = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last_kept = i;
            if target < cum {
                return i as u32;
            }
        }
    }
    last_kept as u32 // rounding left u·total at the very end of the CDF
}

/// log softmax(logits / τ)[token], accumulated in f64. τ = 1 gives the plain log-probability.
pub fn token_logprob(logits: &[f32], token: u32, temperature: f32) -> f32 {
    let inv_t = 1.0 / temperature as f64;
    let max = max_logit(logits) as f64 * inv_t;
    // The exponentials a chunk at a time (vectorized), summed in index order.
    let mut sum = 0.0f64;
    let mut e = [0.0f64; 256];
    for z in logits.chunks(e.len()) {
        let e = &mut e[..z.len()];
        e.iter_mut()
            .zip(z)
            .for_each(|(e, &z)| *e = z as f64 * inv_t - max);
        exp_f64_in_place(e);
        e.iter().for_each(|&e| sum += e);
    }
    (logits[token as usize] as f64 * inv_t - max - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
        }
    }

    /// `max_logit` against the plain fold it replaces: the same value for every row length (the
    /// 16-lane part and the tail), with NaNs, signed zeros and infinities among the logits (the
    /// fold's sign of a zero maximum is unspecified, so ±0 count as equal).
    #[test]
    fn max_logit_is_the_folded_maximum() {
        let fold = |l: &[f32]| l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut rng = crate::rng::Philox::new(11, 0);
        let specials = [f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, f32::INFINITY, 7.5];
        for len in [0, 1, 5, 15, 16, 17, 33, 100, 8192] {
            for case in 0..8 {
                let mut row: Vec<f32> = (0..len).map(|_| rng.next_normal()).collect();
                for (i, &v) in specials.iter().enumerate().take(case) {
                    if len > 0 {
                        row[(i * 37 + case) % len] = v;
                    }
                }
                if case == 7 {
                    row.iter_mut()
                        .for_each(|z| *z = if z.is_sign_negative() { -0.0 } else { 0.0 });
                }
                let (got, want) = (max_logit(&row), fold(&row));
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "len {len} case {case}: {got} vs {want}"
                );
            }
        }
        assert_eq!(max_logit(&[f32::NAN; 20]), f32::NEG_INFINITY);
    }

    #[test]
    fn drawable_refuses_nan_and_positive_infinity_anywhere_and_rows_without_a_finite_logit() {
        for len in [1, 16, 17, 40] {
            let row = vec![0.5f32; len];
            assert!(drawable(&row));
            for at in [0, len / 2, len - 1] {
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut r = row.clone();
                    r[at] = bad;
                    assert!(!drawable(&r), "len {len}: {bad} at {at}");
                }
                let mut masked = vec![f32::NEG_INFINITY; len];
                assert!(!drawable(&masked), "len {len}: all masked");
                masked[at] = -3.0;
                assert!(drawable(&masked), "len {len}: one finite logit at {at}");
            }
        }
        assert!(!drawable(&[]));
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(
            sample(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::greedy(), 0.99),
            1
        );
    }

    #[test]
    fn inverse_cdf_walks_vocabulary_order() {
        // softmax(ln [1, 2, 1]) = [0.25, 0.5, 0.25]
        let logits = [0.0f32, 2f32.ln(), 0.0];
        let p = params(1.0, 0, 1.0);
        assert_eq!(sample(&logits, &p, 0.0), 0);
        assert_eq!(sample(&logits, &p, 0.24), 0);
        assert_eq!(sample(&logits, &p, 0.26), 1);
        assert_eq!(sample(&logits, &p, 0.74), 1);
        assert_eq!(sample(&logits, &p, 0.76), 2);
    }

    #[test]
    fn top_k_and_top_p_remove_the_tail() {
        let logits = [0.0f32, 2f32.ln(), 0.0, 3f32.ln()]; // probs ∝ [1, 2, 1, 3]
        for i in 0..100 {
            let u = i as f64 / 100.0;
            assert!(matches!(sample(&logits, &params(1.0, 2, 1.0), u), 1 | 3));
            // top-p 0.5: 3/7 < 0.5, 3/7 + 2/7 >= 0.5 → {3, 1}
            assert!(matches!(sample(&logits, &params(1.0, 0, 0.5), u), 1 | 3));
            // top-p 0.4: 3/7 >= 0.4 → {3}
            assert_eq!(sample(&logits, &params(1.0, 0, 0.4), u), 3);
        }
    }

    /// Top-p cuts the tempered distribution (temperature first, as HF's warpers run), and the
    /// kept tokens are drawn with their tempered probabilities.
    #[test]
    fn top_p_applies_to_the_tempered_probabilities() {
        // probs ∝ [1, 2, 1, 3] at τ = 1. At τ = 2: probs ∝ [1, √2, 1, √3]; √3 / (2 + √2 + √3)
        // = 0.337 < 0.4, so top-p 0.4 keeps {3, 1} (at τ = 1 it keeps {3} alone: 3/7 ≥ 0.4);
        // within them token 1 has mass √2 / (√2 + √3) = 0.4495, first in vocabulary order.
        let logits = [0.0f32, 2f32.ln(), 0.0, 3f32.ln()];
        let p = params(2.0, 0, 0.4);
        assert_eq!(sample(&logits, &p, 0.44), 1);
        assert_eq!(sample(&logits, &p, 0.46), 3);
        assert_eq!(sample(&logits, &params(1.0, 0, 0.4), 0.44), 3);
    }

    #[test]
    fn top_k_and_top_p_break_ties_towards_the_lower_index() {
        // Ranked: 1 (logit 2), then the tied 2, 3, 4 (logit 1) in index order, then 0 and 5.
        let logits = [0.0f32, 2.0, 1.0, 1.0, 1.0, 0.0];
        let drawn = |p: &SamplingParams| -> Vec<u32> {
            let mut ids: Vec<u32> = (0..200)
                .map(|i| sample(&logits, p, (i as f64 + 0.5) / 200.0))
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        assert_eq!(drawn(&params(1.0, 3, 1.0)), [1, 2, 3]);
        // Mass (in units of e⁻²) e² + 3e + 2 ≈ 17.54; half of it, 8.77, is passed by e² + e ≈
        // 10.11: token 1 and the first of the ties.
        assert_eq!(drawn(&params(1.0, 0, 0.5)), [1, 2]);
        // -0.0 ranks below +0.0 (f32 total order): top-2 of [-0, +0, -1] keeps 0 and 1 only.
        let signed = [-0.0f32, 0.0, -1.0];
        for i in 0..50 {
            let u = i as f64 / 50.0;
            assert!(matches!(sample(&signed, &params(1.0, 2, 1.0), u), 0 | 1));
            assert_eq!(sample(&signed, &params(1.0, 1, 1.0), u), 1);
        }
    }

    #[test]
    fn philox_draws_are_the_generation_streams() {
        let streams = [4u32, 0, 9];
        let draws = TokenDraws::Philox {
            seed: 5,
            first_stream: 100,
            streams: &streams,
            step: 7,
        };
        assert_eq!(draws.rows(), 3);
        for (r, &s) in streams.iter().enumerate() {
            assert_eq!(draws.uniform(r), crate::rng::uniform(5, 100 + s as u64, 7));
        }
        let given = [0.25, 0.75];
        assert_eq!(TokenDraws::Given(&given).uniform(1), 0.75);
    }

    #[test]
    fn sampling_frequencies_follow_tempered_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let t = 0.5;
        let n = 20_000;
        let mut counts = [0usize; 3];
        for i in 0..n {
            counts[sample(&logits, &params(t, 0, 1.0), crate::rng::uniform(3, 0, i)) as usize] += 1;
        }
        let z: Vec<f64> = logits
            .iter()
            .map(|&l| (l as f64 / t as f64).exp())
            .collect();
        let total: f64 = z.iter().sum();
        for (c, zi) in counts.iter().zip(&z) {
            let expected = zi / total;
            assert!((*c as f64 / n as f64 - expected).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn token_logprob_matches_direct_formula() {
        let logits = [1.0f32, -2.0, 0.5, 3.0];
        for &t in &[1.0f32, 0.7] {
            let z: Vec<f64> = logits.iter().map(|&l| l as f64 / t as f64).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            for tok in 0..4 {
                let want = z[tok] - lse;
                assert!((token_logprob(&logits, tok as u32, t) as f64 - want).abs() < 1e-6);
            }
        }
    }
}
