//! The GRPO loss kernels' real source (kernels/logprob.cu, kernels/policy_loss.cu,
//! kernels/advantage.cu), run on the CPU by the emulator in tests/cuda_emulator through
//! thinkshort's own launchers (src/cuda/ops/{logprob,policy_loss,advantage}.rs: one block per
//! row sized by the logits' vector width, the bf16 or f32 kernel by their dtype, 1/τ, null old
//! and reference pointers, the advantage options' codes, argument order and kinds), against the
//! CPU reference (`backend::cpu`): the log-prob forward (scalar head, 16-byte body and scalar
//! tail of rows at every alignment, blocks of 32 to 1024 threads) and backward, the policy loss
//! fused with it (old and reference log-probs given or not, KL with β > 0 or as a statistic only,
//! both clip bounds, the weights of the three aggregation modes with filtered, masked and empty
//! completions) and the group advantages under every option, NaN rewards included.

mod emulation_support;

use emulation_support::{assert_close, assert_same, ptr, ptr_mut, rel_err, to_f32, Emulator, Rand};
use thinkshort::backend::cpu::{self, CpuBackend};
use thinkshort::backend::{policy_stat, PolicyTokens, POLICY_STATS};
use thinkshort::cuda::ops::policy_loss::{self, PolicyLossArgs};
use thinkshort::cuda::ops::{advantage, logprob};
use thinkshort::grpo::{
    completion_weights, included_completions, AdvantageOptions, Aggregation, LossOptions, Scale,
    StdKind, Truncated,
};

/// Relative tolerance for the log-probs and entropies, computed in f32 by the kernels (in f64 by
/// the reference): their rounding gives about 5e-8, one logit more or less in a row of a few
/// thousand about 3e-5.
const F32_TOL: f64 = 1e-6;
/// Relative tolerance for the loss, KL and ratio statistics, f64 functions of the f32 log-prob:
/// the ratio and loss inherit its absolute rounding (about 5e-7), the k3 KL ≈ d²/2 of
/// d = logπref − logπθ amplifies it (about 4e-6 seen).
const STATS_TOL: f64 = 1e-4;

fn assert_within(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(
        e < tol,
        "{what}: relative error {e:.3e} (tolerance {tol:.0e})"
    );
}

/// Logits [r, vocab] in the kernel's storage type, in a buffer where they start `shift`
/// elements past a 16-byte boundary (as a view into a device allocation may), so successive
/// rows of an odd vocab take every head length of the kernels' vector path.
struct Logits {
    storage: Storage,
    /// Index of the first logit in the storage.
    at: usize,
    /// The same values in f32 (bf16-rounded for bf16 storage), for the CPU reference.
    values: Vec<f32>,
}

enum Storage {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

impl Logits {
    /// Uniform in [-3, 3).
    fn new(rand: &mut Rand, n: usize, f32_logits: bool, shift: usize) -> Self {
        fn place<T: Copy>(values: &[T], shift: usize) -> (Vec<T>, usize) {
            let per_16 = 16 / size_of::<T>();
            assert!(shift < per_16);
            let mut buf = vec![values[0]; values.len() + 2 * per_16];
            let misaligned = (buf.as_ptr() as usize % 16) / size_of::<T>();
            let at = (per_16 - misaligned) % per_16 + shift;
            buf[at..at + values.len()].copy_from_slice(values);
            (buf, at)
        }
        if f32_logits {
            let values: Vec<f32> = (0..n).map(|_| rand.next() * 3.0).collect();
            let (buf, at) = place(&values, shift);
            Logits {
                storage: Storage::F32(buf),
                at,
                values,
            }
        } else {
            let (bits, values) = rand.bf16s(n, 3.0);
            let (buf, at) = place(&bits, shift);
            Logits {
                storage: Storage::Bf16(buf),
                at,
                values,
            }
        }
    }

    /// The first logit as a device pointer, and whether the logits are f32 (the launchers pick
    /// the kernel by it).
    fn device(&self) -> (u64, bool) {
        match &self.storage {
            Storage::Bf16(z) => (ptr(&z[self.at..]), false),
            Storage::F32(z) => (ptr(&z[self.at..]), true),
        }
    }
}

/// `r` target ids below `vocab`: the first row's is 0 and the second's vocab − 1 (the row's
/// first and last logits).
fn targets(rand: &mut Rand, r: usize, vocab: usize) -> Vec<u32> {
    (0..r)
        .map(|i| match i {
            0 => 0,
            1 => vocab as u32 - 1,
            _ => (((rand.next() + 1.0) / 2.0 * vocab as f32) as u32).min(vocab as u32 - 1),
        })
        .collect()
}

/// dlogits [r, vocab] (bf16) against the reference row by row: rows the reference leaves at
/// zero must be exact zeros; elsewhere the target's entry and the others are compared apart,
/// since the one-hot term dominates a row's norm and would hide errors in the softmax term.
fn check_dlogits(what: &str, got: &[u16], want: &[f32], targets: &[u32], vocab: usize) {
    let got = to_f32(got);
    for (row, &t) in targets.iter().enumerate() {
        let (g, w) = (
            &got[row * vocab..(row + 1) * vocab],
            &want[row * vocab..(row + 1) * vocab],
        );
        if w.iter().all(|&x| x == 0.0) {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{what}: row {row} should be zeros"
            );
            continue;
        }
        let t = t as usize;
        let off = |x: &[f32]| [&x[..t], &x[t + 1..]].concat();
        assert_close(&format!("{what} row {row} off target"), &off(g), &off(w));
        assert_close(&format!("{what} row {row} at target"), &g[t..=t], &w[t..=t]);
    }
}

// ----------------------------------------------------------------------------
// logprob_forward, logprob_forward_f32

/// logp and entropy of `r` rows of `vocab` logits starting `shift` elements past a 16-byte
/// boundary, at τ = 0.7.
fn check_logprob_forward(seed: u64, r: usize, vocab: usize, f32_logits: bool, shift: usize) {
    const TEMPERATURE: f32 = 0.7;
    let mut rand = Rand(seed);
    let logits = Logits::new(&mut rand, r * vocab, f32_logits, shift);
    let targets = targets(&mut rand, r, vocab);
    let mut logp = vec![f32::NAN; r]; // [r]
    let mut entropy = vec![f32::NAN; r]; // [r]
    let (z, z_f32) = logits.device(); // [r, vocab]
    logprob::logprob_forward(
        &Emulator,
        ptr_mut(&mut logp),
        ptr_mut(&mut entropy),
        z,
        z_f32,
        ptr(&targets),
        r,
        vocab,
        TEMPERATURE,
    )
    .unwrap_or_else(|e| panic!("logprob_forward (f32 logits: {f32_logits}): {e:#}"));

    let (mut logp_ref, mut entropy_ref) = (vec![0.0; r], vec![0.0; r]);
    cpu::logprob_forward(
        &mut logp_ref,
        &mut entropy_ref,
        &logits.values,
        &targets,
        vocab,
        TEMPERATURE,
    );
    let what = format!("logprob_forward R={r} V={vocab} f32={f32_logits} shift={shift}");
    assert_within(&format!("{what} logp"), &logp, &logp_ref, F32_TOL);
    assert_within(&format!("{what} entropy"), &entropy, &entropy_ref, F32_TOL);
}

/// bf16, 384 threads: V = 3001 ≡ 1 (mod 8), so the 8 rows start at all 8 offsets from a 16-byte
/// boundary (heads of 5, 4, .., 0, .., 6 elements).
#[test]
fn logprob_forward_bf16_matches_the_cpu_at_every_row_alignment() {
    check_logprob_forward(1, 8, 3001, false, 3);
}

/// f32, 1024 threads (1050 vectors: the first threads take two) and the block reduction over 32
/// warps; V = 4201 ≡ 1 (mod 4) shifts each row by one element.
#[test]
fn logprob_forward_f32_matches_the_cpu_with_a_full_block() {
    check_logprob_forward(2, 4, 4201, true, 1);
}

/// Rows shorter than two vectors (one warp): V = 5 bf16 starting 1, 6, 3 and 0 elements past a
/// boundary (a head longer than the row, a head and a tail, a head covering the row exactly, a
/// tail only) and V = 3 f32 (heads of 3, 0, 1 and 2 elements).
#[test]
fn logprob_forward_short_rows_match_the_cpu() {
    check_logprob_forward(3, 4, 5, false, 1);
    check_logprob_forward(4, 4, 3, true, 1);
}

// ----------------------------------------------------------------------------
// logprob_backward, logprob_backward_f32

/// dlogits (bf16 [r, vocab], overwritten) from random dlogp at τ = 1.3.
fn check_logprob_backward(seed: u64, r: usize, vocab: usize, f32_logits: bool) {
    const TEMPERATURE: f32 = 1.3;
    let mut rand = Rand(seed);
    let logits = Logits::new(&mut rand, r * vocab, f32_logits, 1);
    let targets = targets(&mut rand, r, vocab);
    let dlogp: Vec<f32> = (0..r).map(|_| rand.next() * 2.0).collect();
    let mut dlogits = vec![0xffffu16; r * vocab]; // [r, vocab] bf16, overwritten
    let (z, z_f32) = logits.device(); // [r, vocab]
    logprob::logprob_backward(
        &Emulator,
        ptr_mut(&mut dlogits),
        ptr(&dlogp),
        z,
        ptr(&targets),
        r,
        vocab,
        TEMPERATURE,
        z_f32,
    )
    .unwrap_or_else(|e| panic!("logprob_backward (f32 logits: {f32_logits}): {e:#}"));

    let mut reference = vec![0.0; r * vocab];
    cpu::logprob_backward(
        &mut reference,
        &dlogp,
        &logits.values,
        &targets,
        vocab,
        TEMPERATURE,
    );
    let what = format!("logprob_backward R={r} V={vocab} f32={f32_logits}");
    check_dlogits(&what, &dlogits, &reference, &targets, vocab);
}

/// bf16, V = 3001 (384 threads, the last pass partial).
#[test]
fn logprob_backward_bf16_matches_the_cpu() {
    check_logprob_backward(5, 5, 3001, false);
}

/// f32, V = 1001 (256 threads) and a row of 5 logits (one warp, most threads idle).
#[test]
fn logprob_backward_f32_matches_the_cpu() {
    check_logprob_backward(6, 4, 1001, true);
    check_logprob_backward(7, 3, 5, true);
}

// ----------------------------------------------------------------------------
// policy_loss_backward, policy_loss_backward_f32

/// A batch for the fused policy loss: completions of `lens` rows (0 allowed), their inclusion
/// and aggregation as the trainer decides them (`grpo::completion_weights`).
struct LossCase {
    seed: u64,
    vocab: usize,
    f32_logits: bool,
    lens: &'static [usize],
    keep: Option<&'static [bool]>,
    truncated: &'static [bool],
    options: LossOptions,
    /// Whether old / reference log-probs are given (else null pointers).
    old: bool,
    reference: bool,
}

/// logπθ − logπold per row, cycled: ρ of 0.55, 0.70, 0.90, 1.05, 1.35, 1.73, each at least 0.05
/// in log space from the clip bounds used (0.8, and 1.2 or 1.28), so the kernel's f32 log-prob
/// (within 1e-6 of the reference's) picks the same branch.
const LOG_RATIOS: [f32; 6] = [-0.6, -0.35, -0.1, 0.05, 0.3, 0.55];
/// τ of the policy-loss tests.
const POLICY_TEMPERATURE: f32 = 0.7;

fn check_policy_loss(c: &LossCase) {
    let mut rand = Rand(c.seed);
    let n = c.lens.len();
    let r: usize = c.lens.iter().sum();
    let vocab = c.vocab;
    let logits = Logits::new(&mut rand, r * vocab, c.f32_logits, 3);
    let targets = targets(&mut rand, r, vocab);
    let seqs: Vec<u32> = c
        .lens
        .iter()
        .enumerate()
        .flat_map(|(i, &len)| std::iter::repeat_n(i as u32, len))
        .collect();
    // advantages of alternating sign, so both clip bounds win somewhere
    let advantages: Vec<f32> = (0..n)
        .map(|i| (0.2 + rand.next().abs()) * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let included = included_completions(c.truncated, c.keep, c.options.truncated);
    let weights: Vec<f32> = completion_weights(c.lens, &included, c.options.aggregation)
        .iter()
        .map(|&w| w as f32)
        .collect();
    // old and reference log-probs around the reference's own log-probs
    let (mut logp0, mut entropy0) = (vec![0.0; r], vec![0.0; r]);
    cpu::logprob_forward(
        &mut logp0,
        &mut entropy0,
        &logits.values,
        &targets,
        vocab,
        POLICY_TEMPERATURE,
    );
    let old: Vec<f32> = (0..r)
        .map(|i| logp0[i] - LOG_RATIOS[i % LOG_RATIOS.len()])
        .collect();
    let reference: Vec<f32> = logp0.iter().map(|l| l + 0.4 * rand.next()).collect();
    let old = c.old.then_some(&old[..]);
    let reference = c.reference.then_some(&reference[..]);

    let mut dlogits = vec![0xffffu16; r * vocab]; // [r, vocab] bf16
    let mut logp = vec![f32::NAN; r]; // [r]
    let mut stats = vec![f32::NAN; r * POLICY_STATS]; // [r, POLICY_STATS]
    let (z, z_f32) = logits.device(); // [r, vocab]
    let ptr_or_null = |x: Option<&[f32]>| x.map_or(0, ptr);
    let args = PolicyLossArgs {
        dlogits: ptr_mut(&mut dlogits),
        logp: ptr_mut(&mut logp),
        stats: ptr_mut(&mut stats),
        logits: z,
        logits_f32: z_f32,
        targets: ptr(&targets),       // [r]
        seqs: ptr(&seqs),             // [r]
        advantages: ptr(&advantages), // [n]
        weights: ptr(&weights),       // [n]
        old_logp: ptr_or_null(old),   // [r] or null
        ref_logp: ptr_or_null(reference),
    };
    policy_loss::policy_loss_backward(&Emulator, &args, r, vocab, POLICY_TEMPERATURE, &c.options)
        .unwrap_or_else(|e| panic!("policy_loss_backward (f32 logits: {}): {e:#}", c.f32_logits));

    let mut dlogits_ref = vec![0.0; r * vocab];
    let mut logp_ref = vec![0.0; r];
    let mut stats_ref = vec![0.0; r * POLICY_STATS];
    let tokens = PolicyTokens::<CpuBackend> {
        seqs: &seqs,
        advantages: &advantages,
        weights: &weights,
        old_logp: old,
        ref_logp: reference,
    };
    cpu::policy_loss_backward(
        &mut dlogits_ref,
        &mut logp_ref,
        &mut stats_ref,
        &logits.values,
        &targets,
        &tokens,
        vocab,
        POLICY_TEMPERATURE,
        &c.options,
    );

    let what = format!(
        "policy_loss_backward V={vocab} f32={} {:?}",
        c.f32_logits, c.options.aggregation
    );
    check_dlogits(
        &format!("{what} dlogits"),
        &dlogits,
        &dlogits_ref,
        &targets,
        vocab,
    );
    assert_within(&format!("{what} logp"), &logp, &logp_ref, F32_TOL);
    let column = |s: &[f32], col: usize| -> Vec<f32> {
        s.iter().skip(col).step_by(POLICY_STATS).copied().collect()
    };
    for (name, col, tol) in [
        ("entropy", policy_stat::ENTROPY, F32_TOL),
        ("loss", policy_stat::LOSS, STATS_TOL),
        ("kl", policy_stat::KL, STATS_TOL),
        ("ratio", policy_stat::RATIO, STATS_TOL),
    ] {
        let (got, want) = (column(&stats, col), column(&stats_ref, col));
        if want.iter().all(|&x| x == 0.0) {
            assert!(got.iter().all(|&x| x == 0.0), "{what} {name}: not zeros");
        } else {
            assert_within(&format!("{what} {name}"), &got, &want, tol);
        }
    }
    for (name, col) in [
        ("clip_low", policy_stat::CLIP_LOW),
        ("clip_high", policy_stat::CLIP_HIGH),
    ] {
        assert_same(
            &format!("{what} {name}"),
            &column(&stats, col),
            &column(&stats_ref, col),
        );
    }
    // rows of completions left out of the loss: zeros in every column
    for (row, &seq) in seqs.iter().enumerate() {
        if weights[seq as usize] == 0.0 {
            let cols = &stats[row * POLICY_STATS..(row + 1) * POLICY_STATS];
            assert!(
                cols.iter().all(|&x| x == 0.0),
                "{what}: row {row} of left-out completion {seq} has statistics {cols:?}"
            );
        }
    }
    if c.old {
        // the shapes must reach both clip bounds for the clip columns to say anything
        for col in [policy_stat::CLIP_LOW, policy_stat::CLIP_HIGH] {
            assert!(
                column(&stats_ref, col).contains(&1.0),
                "column {col} never set"
            );
        }
    }
}

/// bf16, V = 3001: old and reference log-probs with β = 0.05 (both clip bounds, the KL in the
/// loss and its gradient); completions of 3, 0, 4, 2 and 5 rows, the third filtered out
/// (weight 0), weights 1 / (4 · len).
#[test]
fn policy_loss_seq_mean_token_mean_with_old_and_reference_matches_the_cpu() {
    check_policy_loss(&LossCase {
        seed: 8,
        vocab: 3001,
        f32_logits: false,
        lens: &[3, 0, 4, 2, 5],
        keep: Some(&[true, true, false, true, true]),
        truncated: &[false; 5],
        options: LossOptions {
            beta: 0.05,
            aggregation: Aggregation::SeqMeanTokenMean,
            ..LossOptions::default()
        },
        old: true,
        reference: true,
    });
}

/// f32 logits, V = 1001: no old or reference log-probs (ρ = 1, KL 0, null pointers), token-mean
/// weights with the truncated second completion masked (weight 0).
#[test]
fn policy_loss_token_mean_without_old_or_reference_matches_the_cpu_f32() {
    check_policy_loss(&LossCase {
        seed: 9,
        vocab: 1001,
        f32_logits: true,
        lens: &[4, 3, 5, 2],
        keep: None,
        truncated: &[false, true, false, false],
        options: LossOptions {
            beta: 0.0,
            aggregation: Aggregation::TokenMean,
            truncated: Truncated::Mask,
            ..LossOptions::default()
        },
        old: false,
        reference: false,
    });
}

/// bf16, V = 777: old log-probs and reference log-probs at β = 0 (the KL a statistic only),
/// Dr. GRPO weights 1 / (3 · 8) with asymmetric clip bounds (ε_low 0.2, ε_high 0.28).
#[test]
fn policy_loss_seq_mean_token_sum_norm_with_kl_statistic_only_matches_the_cpu() {
    check_policy_loss(&LossCase {
        seed: 10,
        vocab: 777,
        f32_logits: false,
        lens: &[2, 6, 3],
        keep: None,
        truncated: &[false, true, false],
        options: LossOptions {
            eps_high: 0.28,
            beta: 0.0,
            aggregation: Aggregation::SeqMeanTokenSumNorm { max_len: 8 },
            ..LossOptions::default()
        },
        old: true,
        reference: true,
    });
}

// ----------------------------------------------------------------------------
// group_advantages

/// group_advantages under every (std, scale) against `cpu::group_advantages`, bit for bit (NaN
/// where the reference gives NaN).
fn check_advantages(rewards: &[f64], group_size: usize) {
    let n = rewards.len();
    for std in [StdKind::Population, StdKind::Unbiased] {
        for scale in [Scale::Group, Scale::Batch, Scale::None] {
            let opts = AdvantageOptions {
                std,
                scale,
                ..AdvantageOptions::default()
            };
            let mut out = vec![f32::NAN; n]; // [n]
            advantage::group_advantages(
                &Emulator,
                ptr_mut(&mut out),
                ptr(rewards),
                n,
                group_size,
                &opts,
            )
            .unwrap_or_else(|e| panic!("group_advantages {std:?} {scale:?}: {e:#}"));
            let mut reference = vec![0.0; n];
            cpu::group_advantages(&mut reference, rewards, group_size, &opts);
            for (i, (&got, &want)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "group_advantages N={n} G={group_size} {std:?} {scale:?}: out[{i}] = {got}, \
                     expected {want}"
                );
            }
        }
    }
}

/// Rewards on a coarse grid (some groups all equal: exact zeros), the first group all 0.1 (whose
/// f64 mean is not 0.1), for 2 groups of 4, 260 groups of 3 (more groups than the block's 256
/// threads) and groups of 1 (no degree of freedom for the unbiased std).
#[test]
fn group_advantages_match_the_cpu_bit_for_bit_under_every_option() {
    let mut rand = Rand(11);
    for (n, g) in [(8, 4), (780, 3), (5, 1)] {
        let mut rewards: Vec<f64> = (0..n)
            .map(|_| (rand.next() as f64 * 3.0).floor() * 0.7 + 0.35)
            .collect();
        if g > 1 {
            rewards[..g].fill(0.1);
        }
        check_advantages(&rewards, g);
    }
}

/// NaN rewards: a group with a NaN first or later reward is not "all equal" (NaN ≠ NaN, even in
/// a group of one) and gives NaN, as does the batch std under `Scale::Batch`; an all-equal group
/// still gives zeros.
#[test]
fn group_advantages_with_nan_rewards_match_the_cpu() {
    let nan = f64::NAN;
    check_advantages(
        &[
            nan, 1.0, 1.0, 1.0, 0.5, 2.0, nan, 1.0, 3.0, 3.0, 3.0, 3.0, 0.25, 1.5, 0.75, 1.0,
        ],
        4,
    );
    check_advantages(&[nan, 1.0, 2.0], 1);
}
