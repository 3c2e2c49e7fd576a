//! The sampling kernel's real source (kernels/sampling.cu, `sample_tokens`), run on the CPU by
//! the emulator in tests/cuda_emulator through thinkshort's own launcher
//! (src/cuda/ops/sampling.rs: one block of SAMPLE_THREADS per row, top-k clamped to the
//! vocabulary, given or Philox draws with the other pointer null, argument order and kinds),
//! against the CPU reference (`backend::cpu::sample_tokens`, i.e. `sampling::sample` and
//! `sampling::token_logprob`): greedy argmax with ties, tempered inverse-CDF draws, top-k and
//! top-p (the radix search for the cut-off and the walk over the tokens tied at it), both
//! together, and Philox draws made on the device. Vocabularies below a warp, of a warp per chunk
//! with a short last chunk (1001) and of several strides of the block with empty chunks at the end
//! (2500); draws at 0 and at the very end of the CDF (u = 1 after the hi + lo split); rows that
//! cannot be drawn from (NaN, +inf, nothing finite), which come out as NaN. Token ids
//! must be equal and log-probabilities equal to a few f32 ulps (both are f64 sums rounded to f32).
//! EOS detection and the per-sequence budget are not the kernel's (it draws one token per row) but
//! the generation loop's (src/generate.rs).

mod emulation_support;

use emulation_support::{assert_same, ptr, ptr_mut, Emulator, Rand};
use thinkshort::backend::cpu;
use thinkshort::cuda::ops::sampling::{self, DeviceDraws};
use thinkshort::sampling::{SamplingParams, TokenDraws};

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
    }
}

/// The last draw of the CDF: 1 − 2⁻⁵⁴ splits into hi = 1, lo = −2⁻⁵⁴, which add up to 1.0
/// (the kernel's "target at or past the end").
const U_END: f64 = 1.0 - f64::EPSILON / 4.0;

/// What a row of logits looks like.
#[derive(Clone, Copy)]
enum Row {
    /// Integers in [-6, 4]: about a fifth of the row tied at the maximum 4 and ~80 tokens tied at
    /// each lower value, so every cut-off falls inside a run of ties.
    Integers,
    /// One value repeated: every token tied.
    Constant,
    /// Uniform in [-4, 4): peaked, as a trained model's.
    Peaked,
}

/// Rows of logits of the given kinds, [rows.len(), vocab].
fn logits(rand: &mut Rand, rows: &[Row], vocab: usize) -> Vec<f32> {
    rows.iter()
        .flat_map(|row| {
            (0..vocab)
                .map(|_| match row {
                    Row::Integers => (rand.next() * 6.0).round().min(4.0),
                    Row::Constant => 0.5,
                    Row::Peaked => rand.next() * 4.0,
                })
                .collect::<Vec<f32>>()
        })
        .collect()
}

/// `u` as the device receives it, hi + lo in two floats (the values both sides then draw with).
fn device_uniforms(u: &[f64]) -> Vec<f64> {
    u.iter()
        .map(|&x| {
            let mut pair = [0.0f32; 2];
            cpu::split_f64(&mut pair, x);
            pair[0] as f64 + pair[1] as f64
        })
        .collect()
}

/// (ids, logp) of the sample_tokens launcher.
fn sample_on_emulator(
    logits: &[f32],
    vocab: usize,
    params: &SamplingParams,
    draws: &TokenDraws,
) -> (Vec<f32>, Vec<f32>) {
    let rows = draws.rows();
    assert_eq!(logits.len(), rows * vocab);
    // given draws as the backend uploads them: [rows, 2] f32, hi + lo
    let pairs: Vec<f32> = match *draws {
        TokenDraws::Given(u) => u
            .iter()
            .flat_map(|&x| {
                let mut pair = [0.0f32; 2];
                cpu::split_f64(&mut pair, x);
                assert_eq!(pair[0] as f64 + pair[1] as f64, x, "not a device uniform");
                pair
            })
            .collect(),
        TokenDraws::Philox { .. } => Vec::new(),
    };
    let device_draws = match *draws {
        TokenDraws::Given(_) => DeviceDraws::Given {
            uniforms: ptr(&pairs),
        },
        TokenDraws::Philox {
            seed,
            first_stream,
            streams,
            step,
        } => DeviceDraws::Philox {
            seed,
            first_stream,
            streams: ptr(streams), // [rows] u32
            step,
        },
    };
    let mut out = vec![f32::NAN; rows]; // [rows] token ids
    let mut logp = vec![f32::NAN; rows]; // [rows]
    sampling::sample_tokens(
        &Emulator,
        ptr_mut(&mut out),
        ptr_mut(&mut logp),
        ptr(logits), // [rows, vocab]
        &device_draws,
        rows,
        vocab,
        params,
    )
    .unwrap_or_else(|e| panic!("sample_tokens: {e:#}"));
    (out, logp)
}

/// The kernel's ids equal the CPU's, and its log-probabilities agree to 4 f32 ulps.
fn check(what: &str, logits: &[f32], vocab: usize, params: &SamplingParams, draws: &TokenDraws) {
    let (ids, logp) = sample_on_emulator(logits, vocab, params, draws);
    let rows = draws.rows();
    let (mut ids_ref, mut logp_ref) = (vec![0.0; rows], vec![0.0; rows]);
    cpu::sample_tokens(&mut ids_ref, &mut logp_ref, logits, draws, vocab, params);
    let shape = format!(
        "{what} (V={vocab} T={} k={} p={})",
        params.temperature, params.top_k, params.top_p
    );
    // NaN marks a row that cannot be drawn from (on both sides, whatever its bits)
    let ids_or_none =
        |v: &[f32]| -> Vec<Option<f32>> { v.iter().map(|&x| (!x.is_nan()).then_some(x)).collect() };
    assert_same(
        &format!("{shape}: token ids"),
        &ids_or_none(&ids),
        &ids_or_none(&ids_ref),
    );
    for (r, (&got, &want)) in logp.iter().zip(&logp_ref).enumerate() {
        let tol = 4.0 * f32::EPSILON * want.abs().max(1.0);
        assert!(
            (got - want).abs() <= tol || (got.is_nan() && want.is_nan()),
            "{shape}: row {r} log-prob {got} (CPU {want})"
        );
    }
}

/// Draws with every kind of row, given by the host: the integer and constant rows at the end of
/// the CDF (the last kept token in vocabulary order: the last kept tie, so a cut-off off by one
/// tie moves it), then draws at 0 and inside.
fn check_kinds(seed: u64, vocab: usize, params: &SamplingParams) {
    let mut rand = Rand(seed);
    let rows = [
        Row::Integers,
        Row::Constant,
        Row::Integers,
        Row::Peaked,
        Row::Peaked,
    ];
    let z = logits(&mut rand, &rows, vocab);
    let mid = [
        0.5 + 0.5 * rand.next() as f64,
        0.5 + 0.5 * rand.next() as f64,
    ];
    let u = device_uniforms(&[U_END, U_END, mid[0], 0.0, mid[1]]);
    check("mixed rows", &z, vocab, params, &TokenDraws::Given(&u));
}

/// V = 7 (one warp's chunk, partly filled) and V = 2500 (two and a half block strides): rows
/// of integers (a fifth tied at the maximum), all tied, and a random row whose maximum sits
/// at indices 1076 and 2100 (one thread's) and 1500 (another's). Draws are ignored.
#[test]
fn greedy_picks_the_first_maximum_of_each_row() {
    let mut rand = Rand(1);
    let z = logits(&mut rand, &[Row::Integers, Row::Constant], 7);
    let u = device_uniforms(&[0.3, U_END]);
    check(
        "greedy",
        &z,
        7,
        &params(0.0, 0, 1.0),
        &TokenDraws::Given(&u),
    );

    let vocab = 2500;
    let mut z = logits(
        &mut rand,
        &[Row::Integers, Row::Constant, Row::Peaked],
        vocab,
    );
    for i in [2100, 1500, 1076] {
        z[2 * vocab + i] = 7.0;
    }
    let u = device_uniforms(&[0.3, 0.6, U_END]);
    check(
        "greedy",
        &z,
        vocab,
        &params(0.0, 0, 1.0),
        &TokenDraws::Given(&u),
    );
}

/// No top-k or top-p (top-k 0, and top-k past the vocabulary, which the launcher clamps to
/// "off"): the tempered inverse CDF over V = 7, 1001 and 2500, at τ = 0.7 and 1.
#[test]
fn tempered_draws_walk_the_cpu_inverse_cdf() {
    for (seed, vocab) in [(2, 7), (3, 1001), (4, 2500)] {
        check_kinds(seed, vocab, &params(0.7, 0, 1.0));
        check_kinds(seed + 10, vocab, &params(1.0, vocab + 5, 1.0));
    }
    // a top-k past the kernel's int: the launcher clamps it to the vocabulary (off)
    check_kinds(5, 7, &params(1.0, usize::MAX, 1.0));
}

/// Top-k 1 (argmax by sampling: the first of the tied maxima) and 250 (a cut-off among the ~80
/// integer rows' 3s, the first 250 of a constant row), V = 1001.
#[test]
fn top_k_keeps_the_k_highest_ranked_ties_to_the_lower_index() {
    check_kinds(20, 1001, &params(1.0, 1, 1.0));
    check_kinds(21, 1001, &params(0.7, 250, 1.0));
}

/// Top-p 0.5 (a cut-off among the integer rows' tied maxima, exactly half of a constant row)
/// and 0.95 (a cut-off among the 2s), V = 2500.
#[test]
fn top_p_keeps_the_shortest_ranked_prefix_reaching_p() {
    check_kinds(30, 2500, &params(1.0, 0, 0.5));
    check_kinds(31, 2500, &params(1.0, 0, 0.95));
}

/// Top-k 50 then top-p 0.5 of those 50 (the tied maxima of an integer row: 25 of them), V = 1001.
#[test]
fn top_p_applies_within_the_top_k() {
    check_kinds(40, 1001, &params(1.0, 50, 0.5));
}

/// Vocabularies smaller than a warp, as in the CPU's unit tests: [0, 2, 1, 1, 1, 0] (top-k 3
/// keeps 1, 2, 3; top-p 0.5 keeps 1, 2) and [-0, +0, -1] (−0 ranks below +0: top-1 is token 1),
/// at both ends of the CDF.
#[test]
fn small_vocabularies_rank_ties_and_signed_zeros_like_the_cpu() {
    let tied = [0.0f32, 2.0, 1.0, 1.0, 1.0, 0.0];
    let z: Vec<f32> = tied.iter().chain(&tied).copied().collect();
    let u = device_uniforms(&[0.0, U_END]);
    for p in [params(1.0, 3, 1.0), params(1.0, 0, 0.5)] {
        check("ties", &z, 6, &p, &TokenDraws::Given(&u));
    }
    let signed = [-0.0f32, 0.0, -1.0];
    let z: Vec<f32> = signed.iter().chain(&signed).copied().collect();
    for k in [1, 2] {
        check(
            "signed zeros",
            &z,
            3,
            &params(1.0, k, 1.0),
            &TokenDraws::Given(&u),
        );
    }
}

/// Uniforms drawn on the device with Philox, stream and step above 2³² (both counter words in
/// use), streams in reverse order; flat logits (so a wrong uniform moves the id), V = 1001,
/// with and without top-p.
#[test]
fn philox_draws_are_the_cpu_streams() {
    let vocab = 1001;
    let mut rand = Rand(50);
    let z: Vec<f32> = (0..4 * vocab).map(|_| rand.next() * 0.1).collect();
    let streams = [10u32, 7, 4, 1];
    let draws = |rows: usize| TokenDraws::Philox {
        seed: 0x5EED_0000_0001,
        first_stream: (1 << 33) + 7,
        streams: &streams[..rows],
        step: (1 << 32) + 11,
    };
    check("philox", &z, vocab, &params(1.0, 0, 1.0), &draws(4));
    let two_rows = &z[..2 * vocab];
    check("philox", two_rows, vocab, &params(1.0, 0, 0.95), &draws(2));
}

/// Rows that cannot be drawn from (one NaN logit, a +inf at the row's end, every logit −inf: what
/// a model with non-finite weights gives) come out as NaN ids and log-probs, greedy and sampled,
/// with and without top-k / top-p, while a row beside them with −inf masks draws as the CPU's.
/// V = 1001.
#[test]
fn rows_that_cannot_be_drawn_from_give_nan() {
    let vocab = 1001;
    let mut rand = Rand(60);
    let mut z = logits(&mut rand, &[Row::Peaked; 4], vocab);
    z[17] = f32::NAN;
    z[2 * vocab - 1] = f32::INFINITY;
    z[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
    z[3 * vocab + 5..3 * vocab + 900].fill(f32::NEG_INFINITY);
    let u = device_uniforms(&[0.3, 0.6, 0.9, 0.5]);
    let draws = TokenDraws::Given(&u);
    for p in [
        params(0.0, 0, 1.0),
        params(0.7, 0, 1.0),
        params(1.0, 50, 0.9),
    ] {
        check("undrawable rows", &z, vocab, &p, &draws);
        let (ids, logp) = sample_on_emulator(&z, vocab, &p, &draws);
        assert!(
            ids[..3].iter().chain(&logp[..3]).all(|x| x.is_nan()),
            "T={}: {ids:?} {logp:?}",
            p.temperature
        );
        assert!(!ids[3].is_nan() && !logp[3].is_nan());
    }
}
