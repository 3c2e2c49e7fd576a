//! `sample_tokens` against the CPU's `sampling::sample`: the same draws must give the same token
//! ids (exact), greedy and at two temperatures, for vocabularies below, near and far above the
//! kernel's 32 warps × 32 lanes, with ties for the argmax and draws at both ends of [0, 1); then
//! top-k and top-p (the kernel's radix search for the cut-off), with rows of tied logits; then
//! the uniforms drawn on the device by Philox (flat logits: a wrong uniform moves the id); then
//! rows that cannot be drawn from (NaN, +inf, nothing finite), which give NaN. Every
//! shape has a second row, the drawn tokens' log-probabilities (f32 from f64 sums: TOL_F32).

use super::{get, put_f32, Checker, Compared, Rand, TOL_EXACT, TOL_F32};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, TrainBackend};
use crate::sampling::{SamplingParams, TokenDraws};
use anyhow::Result;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    for (rows, vocab) in [(5, 7), (64, 1001), (64, 151_936)] {
        for temperature in [0.0f32, 0.7, 1.0] {
            check_given(c, rows, vocab, &params(temperature, 0, 1.0))?;
        }
    }
    // Top-k 1 is argmax by sampling; 50 and 0.5 keep a few tokens, top-p 0.95 thousands.
    let restricted = [
        params(1.0, 1, 1.0),
        params(0.7, 50, 1.0),
        params(1.0, 0, 0.95),
        params(1.0, 50, 0.5),
    ];
    for (rows, vocab) in [(5, 7), (16, 1001), (8, 151_936)] {
        for p in &restricted {
            check_given(c, rows, vocab, p)?;
        }
    }
    for p in [params(1.0, 0, 1.0), params(1.0, 0, 0.95)] {
        check_philox(c, 64, 151_936, &p)?;
    }
    for p in [
        params(0.0, 0, 1.0),
        params(0.7, 0, 1.0),
        params(1.0, 50, 0.95),
    ] {
        check_undrawable(c, 151_936, &p)?;
    }
    Ok(())
}

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
    }
}

fn shape(rows: usize, vocab: usize, p: &SamplingParams) -> String {
    format!(
        "R={rows} V={vocab} T={} k={} p={}",
        p.temperature, p.top_k, p.top_p
    )
}

/// Logits of std 3 (peaked, as a trained model's); row 0 holds integers (its maximum and every
/// top-k/top-p cut-off is tied between many entries: the first ones must win) and row 1 one
/// value repeated (every token tied).
fn tied_logits(rand: &mut Rand, rows: usize, vocab: usize) -> Vec<f32> {
    let mut host = rand.normal(rows * vocab, 3.0);
    host[..vocab]
        .iter_mut()
        .for_each(|x| *x = x.round().min(4.0));
    if rows > 2 {
        host[vocab..2 * vocab].fill(0.5);
    }
    host
}

/// Draws given by the host, with 0 and the largest double below 1 among them.
fn check_given<D: TrainBackend>(
    c: &mut Checker<D>,
    rows: usize,
    vocab: usize,
    params: &SamplingParams,
) -> Result<()> {
    check_outputs(c, shape(rows, vocab, params), |dev, rand, output| {
        let (logits, logits_h) = put_f32(dev, &tied_logits(rand, rows, vocab))?;
        let mut uniforms = rand.uniform(rows);
        uniforms[0] = 0.0;
        uniforms[rows - 1] = 1.0 - f64::EPSILON / 2.0;
        let uniforms = device_uniforms(&uniforms);
        let draws = TokenDraws::Given(&uniforms);
        compare(dev, &logits, &logits_h, &draws, vocab, params, output)
    })
}

/// The device receives each given draw as two floats (hi + lo, ~48 bits): both sides draw with
/// that value.
fn device_uniforms(u: &[f64]) -> Vec<f64> {
    u.iter()
        .map(|&x| {
            let mut pair = [0.0f32; 2];
            crate::backend::cpu::split_f64(&mut pair, x);
            pair[0] as f64 + pair[1] as f64
        })
        .collect()
}

/// Draws computed by the device: stream and step above 2^32 (both counter words in use).
fn check_philox<D: TrainBackend>(
    c: &mut Checker<D>,
    rows: usize,
    vocab: usize,
    params: &SamplingParams,
) -> Result<()> {
    let shape = format!("{} philox", shape(rows, vocab, params));
    check_outputs(c, shape, |dev, rand, output| {
        let (logits, logits_h) = put_f32(dev, &rand.normal(rows * vocab, 0.1))?;
        let streams: Vec<u32> = (0..rows as u32).rev().map(|s| 3 * s + 1).collect();
        let draws = TokenDraws::Philox {
            seed: 0x5EED_0000_0001,
            first_stream: (1 << 33) + 7,
            streams: &streams,
            step: (1 << 32) + 11,
        };
        compare(dev, &logits, &logits_h, &draws, vocab, params, output)
    })
}

/// Rows that cannot be drawn from (a NaN logit, a +inf, every logit −inf) give NaN ids and
/// log-probs, as the CPU's; a fourth row, with −inf masks, draws as the CPU's. NaN is compared as
/// −1 (ids) and +1 (log-probs), values neither output takes otherwise.
fn check_undrawable<D: TrainBackend>(
    c: &mut Checker<D>,
    vocab: usize,
    params: &SamplingParams,
) -> Result<()> {
    let shape = format!("{} undrawable rows", shape(4, vocab, params));
    check_outputs(c, shape, |dev, rand, output| {
        let mut host = rand.normal(4 * vocab, 3.0);
        host[17] = f32::NAN;
        host[2 * vocab - 1] = f32::INFINITY;
        host[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
        host[3 * vocab + 5..3 * vocab + vocab / 2].fill(f32::NEG_INFINITY);
        let (logits, logits_h) = put_f32(dev, &host)?;
        let uniforms = device_uniforms(&[0.3, 0.6, 0.9, 0.5]);
        let draws = TokenDraws::Given(&uniforms);
        let mut rows = compare(dev, &logits, &logits_h, &draws, vocab, params, output)?;
        let marker = match output {
            Output::Ids => -1.0,
            Output::Logp => 1.0,
        };
        for (_, got, want) in &mut rows {
            for x in got.iter_mut().chain(want.iter_mut()) {
                if x.is_nan() {
                    *x = marker;
                }
            }
        }
        Ok(rows)
    })
}

/// The two rows of a shape, the ids and then the log-probs, each from its own run.
fn check_outputs<D: TrainBackend>(
    c: &mut Checker<D>,
    shape: String,
    run: impl Fn(&D, &mut Rand, Output) -> Result<Vec<Compared>>,
) -> Result<()> {
    for output in [Output::Ids, Output::Logp] {
        c.check(
            output.op(),
            shape.clone(),
            output.tolerance(),
            |dev, rand| run(dev, rand, output),
        )?;
    }
    Ok(())
}

/// Which output of `sample_tokens` a row compares.
#[derive(Clone, Copy)]
enum Output {
    Ids,
    Logp,
}

impl Output {
    fn op(self) -> &'static str {
        match self {
            Output::Ids => "sample_tokens",
            Output::Logp => "sample_tokens/logp",
        }
    }

    fn tolerance(self) -> f64 {
        match self {
            Output::Ids => TOL_EXACT,
            Output::Logp => TOL_F32,
        }
    }
}

fn compare<D: TrainBackend>(
    dev: &D,
    logits: &D::Buf,
    logits_h: &[f32],
    draws: &TokenDraws,
    vocab: usize,
    params: &SamplingParams,
    output: Output,
) -> Result<Vec<Compared>> {
    let rows = draws.rows();
    let mut ids = dev.upload_f32(&vec![-1.0; rows])?; // overwritten
    let mut logp = dev.upload_f32(&vec![1.0; rows])?; // overwritten
    dev.sample_tokens(
        dev.full_mut(&mut ids),
        dev.full_mut(&mut logp),
        dev.full(logits),
        draws,
        vocab,
        params,
    );
    let (mut ids_ref, mut logp_ref) = (vec![0.0; rows], vec![0.0; rows]);
    CpuBackend.sample_tokens(&mut ids_ref, &mut logp_ref, logits_h, draws, vocab, params);
    Ok(vec![match output {
        Output::Ids => ("", get(dev, &ids)?, ids_ref),
        Output::Logp => ("", get(dev, &logp)?, logp_ref),
    }])
}
