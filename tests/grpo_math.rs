//! The pure math of curriculum GRPO against independent references: hand-computed values,
//! central finite differences in f64, and hand-unrolled optimizer steps.

use thinkshort::curriculum::{generation_cap, Curriculum, Schedule};
use thinkshort::grpo::{
    advantages, has_answer, has_think, keep_mixed_groups, length_reward, policy_loss, reward,
    tag_span, AdvantageOptions, Aggregation, LengthShape, LossBatch, LossOptions, RewardWeights,
    Scale, StdKind, Truncated,
};
use thinkshort::optim::{clip_grad_norm, first_non_finite, lr_at, AdamW, LrDecay, LrSchedule};
use thinkshort::train_config::{AggregationKind, OldLogp, TrainConfig};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

macro_rules! assert_close {
    ($a:expr, $b:expr) => {
        assert_close!($a, $b, 1e-12)
    };
    ($a:expr, $b:expr, $tol:expr) => {{
        let (a, b) = ($a as f64, $b as f64);
        assert!(close(a, b, $tol), "{} = {a}, want {b}", stringify!($a));
    }};
}

// ---------------------------------------------------------------- reward (METHOD.md §3)

#[test]
fn triangular_length_reward() {
    let tri = |len| length_reward(len, 100, LengthShape::Triangular);
    assert_eq!(tri(0), 0.0); // an empty completion earns nothing
    assert_eq!(tri(50), 0.5);
    assert_eq!(tri(100), 1.0);
    assert_eq!(tri(150), 0.5);
    assert_eq!(tri(200), 0.0);
    assert_eq!(tri(201), 0.0); // longer than 2L
    assert_eq!(tri(10_000), 0.0);
    assert_close!(length_reward(4, 3, LengthShape::Triangular), 2.0 / 3.0);
    assert_close!(length_reward(2, 3, LengthShape::Triangular), 2.0 / 3.0);
}

#[test]
fn band_length_reward() {
    let band = |len| length_reward(len, 100, LengthShape::Band);
    assert_eq!(band(0), 1.0);
    assert_eq!(band(1), 1.0);
    assert_eq!(band(100), 1.0);
    assert_eq!(band(125), 0.75);
    assert_eq!(band(200), 0.0);
    assert_eq!(band(201), 0.0);
}

#[test]
fn zero_budget_counts_as_one() {
    assert_eq!(length_reward(1, 0, LengthShape::Triangular), 1.0);
    assert_eq!(length_reward(2, 0, LengthShape::Triangular), 0.0);
}

#[test]
fn format_indicators() {
    assert!(has_think("<think>a</think> <answer>4</answer>"));
    assert!(has_answer("<think>a</think> <answer>4</answer>"));
    assert!(has_think("<think></think>")); // empty content is still a span
    assert!(has_think("x <think>a</think> y <think>b</think>")); // duplicates: the first counts
    assert!(has_answer("<answer>1</answer><answer>2</answer>"));
    assert_eq!(
        tag_span("<answer>1</answer><answer>2</answer>", "answer"),
        Some("1")
    );
    assert_eq!(
        tag_span("pre <answer> 42 </answer> post", "answer"),
        Some(" 42 ")
    );

    assert!(!has_think("")); // empty completion
    assert!(!has_think("<think>never closed"));
    assert!(!has_think("</think>")); // close without open
    assert!(!has_think("</think> <think>")); // close before open
    assert!(has_think("</think><think>a</think>")); // a stray close tag first: still a span
    assert!(has_think("<think>a<think>b</think>")); // a stray open tag: <think>b</think> is one
    assert_eq!(tag_span("<think>a<think>b</think>", "think"), Some("b"));
    assert!(!has_think("<Think>a</Think>")); // case-sensitive
    assert!(!has_think("<think >a</think>"));
    assert!(!has_answer("<think>a</think>"));
    assert!(!has_answer("<answer>4</answr>"));
    assert!(has_think("<answer><think>x</think></answer>")); // the two tags are judged apart
}

/// The correctness term reads the span the format term looks for (METHOD.md §3: "the text
/// inside the first `<answer>…</answer>`", "a well-formed `<answer>…</answer>` span"), so a
/// completion is never judged right from an answer the format calls missing, nor from text that
/// holds another answer tag.
#[test]
fn correctness_and_the_answer_indicator_read_the_same_span() {
    use thinkshort::train::answer_is_correct;
    // (completion, gold 7 found, a well-formed answer span held)
    let cases = [
        ("<answer>7</answer>", true, true),
        ("</answer> <answer>7</answer>", true, true),
        ("<answer>1 <answer>7</answer>", true, true),
        ("<answer>7 <answer>1</answer>", false, true),
        ("<answer>1</answer> <answer>7</answer>", false, true),
        ("<answer>7", false, false),
        ("7 </answer>", false, false),
        ("<answer>7</answr>", false, false),
    ];
    for (text, correct, held) in cases {
        assert_eq!(answer_is_correct(text, "7"), correct, "{text}");
        assert_eq!(has_answer(text), held, "{text}");
    }
}

#[test]
fn reward_components_by_hand() {
    let w = RewardWeights::default();
    let tri = LengthShape::Triangular;
    let text = "<think>2+2</think> <answer>4</answer>";
    // 0.6·1 + 0.3·(50/100) + 0.1·(0.5 + 0.5)
    let r = reward(true, 50, 100, text, &w, tri);
    assert_eq!((r.correct, r.length, r.format), (1.0, 0.5, 1.0));
    assert_close!(r.total, 0.6 + 0.15 + 0.1);

    // Wrong, longer than 2L, only an answer span: 0.1·0.5.
    let r = reward(false, 300, 100, "blah <answer>5</answer>", &w, tri);
    assert_eq!((r.correct, r.length, r.format), (0.0, 0.0, 0.5));
    assert_close!(r.total, 0.05);

    // Empty completion: nothing at all (triangular), the full length reward (band).
    let r = reward(false, 0, 100, "", &w, tri);
    assert_eq!(r.total, 0.0);
    let r = reward(false, 0, 100, "", &w, LengthShape::Band);
    assert_close!(r.total, 0.3);

    // Custom weights, malformed tags: 1·1 + 2·(120→0.8) + 0.
    let w = RewardWeights {
        correct: 1.0,
        length: 2.0,
        format: 3.0,
        think: 0.25,
        answer: 0.75,
    };
    let r = reward(true, 120, 100, "<think>x<answer>4", &w, tri);
    assert_close!(r.length, 0.8);
    assert_close!(r.total, 1.0 + 1.6);
    let r = reward(false, 100, 100, "<think>x</think>", &w, tri);
    assert_close!(r.total, 2.0 + 3.0 * 0.25);
}

// ---------------------------------------------------------------- advantages (METHOD.md §4)

fn opts(std: StdKind, scale: Scale) -> AdvantageOptions {
    AdvantageOptions {
        std,
        scale,
        ..AdvantageOptions::default()
    }
}

#[test]
fn group_advantages_population_and_unbiased() {
    let r = [1.0, 0.0, 0.0, 0.0];
    // mean 1/4; population std √3/4; unbiased std √(0.75/3) = 1/2.
    let a = advantages(&r, 4, &AdvantageOptions::default()).unwrap();
    let s = 3f64.sqrt() / 4.0 + 1e-4;
    assert_close!(a[0], 0.75 / s);
    for &x in &a[1..] {
        assert_close!(x, -0.25 / s);
    }
    assert_close!(a[0], 1.731650899923592);

    let a = advantages(&r, 4, &opts(StdKind::Unbiased, Scale::Group)).unwrap();
    assert_close!(a[0], 0.75 / 0.5001);
    assert_close!(a[3], -0.25 / 0.5001);

    let a = advantages(
        &r,
        4,
        &AdvantageOptions {
            eps: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_close!(a.iter().map(|x| x * x).sum::<f64>() / 4.0, 1.0); // unit variance
}

#[test]
fn dr_grpo_and_batch_scaling() {
    let r = [1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1];
    let a = advantages(&r, 4, &opts(StdKind::Population, Scale::None)).unwrap();
    assert_eq!(&a[..4], &[0.75, -0.25, -0.25, -0.25]);
    assert_eq!(&a[4..], &[0.0; 4]);

    // Batch std of all eight rewards: mean 0.175, variance 0.795/8.
    let a = advantages(&r, 4, &opts(StdKind::Population, Scale::Batch)).unwrap();
    let s = (0.795f64 / 8.0).sqrt() + 1e-4;
    assert_close!(a[0], 0.75 / s, 1e-10);
    assert_close!(a[1], -0.25 / s, 1e-10);
    assert_eq!(&a[4..], &[0.0; 4]);
    let a = advantages(&r, 4, &opts(StdKind::Unbiased, Scale::Batch)).unwrap();
    assert_close!(a[0], 0.75 / ((0.795f64 / 7.0).sqrt() + 1e-4), 1e-10);
}

#[test]
fn zero_variance_group_gives_exact_zeros() {
    // 0.1 summed eight times is not 0.8: equality has to be decided by comparison.
    let r = [0.1; 8];
    for std in [StdKind::Population, StdKind::Unbiased] {
        for scale in [Scale::Group, Scale::Batch, Scale::None] {
            let a = advantages(&r, 8, &opts(std, scale)).unwrap();
            assert!(a.iter().all(|&x| x == 0.0), "{std:?} {scale:?}: {a:?}");
        }
    }
    // A group of one has nothing to compare with.
    assert_eq!(
        advantages(&[0.3, 0.7], 1, &AdvantageOptions::default()).unwrap(),
        vec![0.0, 0.0]
    );
    assert_eq!(
        advantages(&[], 4, &AdvantageOptions::default()).unwrap(),
        Vec::<f64>::new()
    );
}

#[test]
fn advantages_reject_ragged_groups() {
    let err = advantages(&[1.0, 0.0, 0.0], 2, &AdvantageOptions::default()).unwrap_err();
    assert!(err.to_string().contains("groups of 2"), "{err}");
    assert!(advantages(&[1.0], 0, &AdvantageOptions::default()).is_err());
}

#[test]
fn group_filter_judges_raw_correctness() {
    let correct = [
        true, false, false, false, // mixed: kept
        false, false, false,
        false, // all wrong (even if their length rewards differ): dropped
        true, true, true, true, // all right: dropped
    ];
    let keep = keep_mixed_groups(&correct, 4).unwrap();
    assert_eq!(keep, [[true; 4], [false; 4], [false; 4]].concat());
    assert!(keep_mixed_groups(&correct, 5).is_err());
}

// ---------------------------------------------------------------- policy loss (METHOD.md §5)

/// The loss of one batch recomputed from METHOD.md's formula, token by token, with explicit
/// aggregation weights (the independent reference for the finite differences).
fn reference_loss(b: &LossBatch, o: &LossOptions) -> f64 {
    let inc: Vec<bool> = (0..b.lens.len())
        .map(|i| b.keep.is_none_or(|k| k[i]) && !(o.truncated == Truncated::Mask && b.truncated[i]))
        .collect();
    let mut seq_terms = Vec::new(); // (sum of token losses, len) per included completion
    let mut start = 0;
    for (i, &len) in b.lens.iter().enumerate() {
        let mut sum = 0.0;
        for t in start..start + len {
            let rho = (b.logp[t] - b.old_logp[t]).exp();
            let a = b.advantages[i];
            let sur = (rho * a).min(rho.clamp(1.0 - o.eps_low, 1.0 + o.eps_high) * a);
            let kl = b.ref_logp.map_or(0.0, |r| {
                let d = r[t] - b.logp[t];
                d.exp() - d - 1.0
            });
            sum += -sur + o.beta * kl;
        }
        start += len;
        if inc[i] {
            seq_terms.push((sum, len));
        }
    }
    match o.aggregation {
        Aggregation::SeqMeanTokenMean => {
            let per: Vec<f64> = seq_terms
                .iter()
                .filter(|s| s.1 > 0)
                .map(|s| s.0 / s.1 as f64)
                .collect();
            if per.is_empty() {
                0.0
            } else {
                per.iter().sum::<f64>() / per.len() as f64
            }
        }
        Aggregation::TokenMean => {
            let n: usize = seq_terms.iter().map(|s| s.1).sum();
            if n == 0 {
                0.0
            } else {
                seq_terms.iter().map(|s| s.0).sum::<f64>() / n as f64
            }
        }
        Aggregation::SeqMeanTokenSumNorm { max_len } => {
            if seq_terms.is_empty() {
                0.0
            } else {
                seq_terms.iter().map(|s| s.0).sum::<f64>() / (seq_terms.len() * max_len) as f64
            }
        }
    }
}

/// A deterministic batch whose log-ratios sit well away from the clip boundaries
/// (ln 0.8 ≈ −0.223, ln 1.2 ≈ 0.182), so central differences never straddle a kink.
struct Fixture {
    logp: Vec<f64>,
    old: Vec<f64>,
    refp: Vec<f64>,
    lens: Vec<usize>,
    adv: Vec<f64>,
    truncated: Vec<bool>,
    keep: Vec<bool>,
}

fn fixture() -> Fixture {
    let lens = vec![3, 0, 5, 2, 7, 1, 4];
    let adv = vec![1.3, 0.7, -0.9, 0.0, 0.4, -1.6, 2.0];
    let truncated = vec![false, false, true, false, true, false, false];
    let keep = vec![true, true, true, true, true, false, true];
    let log_ratios = [-0.5, -0.1, 0.0, 0.05, 0.3, 0.6, -0.35, 0.12];
    let n: usize = lens.iter().sum();
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut logp = Vec::new();
    let mut old = Vec::new();
    let mut refp = Vec::new();
    for t in 0..n {
        let lp = -0.1 - 3.0 * next();
        logp.push(lp);
        old.push(lp - log_ratios[t % log_ratios.len()]);
        refp.push(lp + 0.8 * (next() - 0.5));
    }
    Fixture {
        logp,
        old,
        refp,
        lens,
        adv,
        truncated,
        keep,
    }
}

impl Fixture {
    fn batch<'a>(&'a self, logp: &'a [f64], with_keep: bool) -> LossBatch<'a> {
        LossBatch {
            logp,
            old_logp: &self.old,
            ref_logp: Some(&self.refp),
            lens: &self.lens,
            advantages: &self.adv,
            truncated: &self.truncated,
            keep: with_keep.then_some(&self.keep[..]),
        }
    }
}

fn all_options() -> Vec<LossOptions> {
    let mut out = Vec::new();
    for aggregation in [
        Aggregation::SeqMeanTokenMean,
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 9 },
    ] {
        for truncated in [Truncated::Keep, Truncated::Mask] {
            for beta in [0.0, 0.05] {
                out.push(LossOptions {
                    eps_low: 0.2,
                    eps_high: 0.28,
                    beta,
                    aggregation,
                    truncated,
                });
            }
        }
    }
    out
}

#[test]
fn gradient_matches_central_differences() {
    let f = fixture();
    for o in all_options() {
        for with_keep in [false, true] {
            let out = policy_loss(&f.batch(&f.logp, with_keep), &o).unwrap();
            assert_close!(
                out.loss,
                reference_loss(&f.batch(&f.logp, with_keep), &o),
                1e-13
            );
            let h = 1e-6;
            for t in 0..f.logp.len() {
                let (mut up, mut down) = (f.logp.clone(), f.logp.clone());
                up[t] += h;
                down[t] -= h;
                let lu = reference_loss(&f.batch(&up, with_keep), &o);
                let ld = reference_loss(&f.batch(&down, with_keep), &o);
                let fd = (lu - ld) / (2.0 * h);
                assert!(
                    (out.grad[t] - fd).abs() <= 1e-8,
                    "{o:?} keep {with_keep} token {t}: grad {} vs finite difference {fd}",
                    out.grad[t]
                );
            }
        }
    }
}

#[test]
fn fixture_exercises_both_clip_bounds() {
    let f = fixture();
    let o = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    let s = policy_loss(&f.batch(&f.logp, false), &o).unwrap().stats;
    assert!(s.clip_frac_low > 0.0 && s.clip_frac_high > 0.0, "{s:?}");
    assert!(s.kl > 0.0); // the reference feeds the statistic even at β = 0
}

fn one_token(logp: f64, old: f64, adv: f64, o: &LossOptions) -> thinkshort::grpo::LossOutput {
    let refp = [logp];
    policy_loss(
        &LossBatch {
            logp: &[logp],
            old_logp: &[old],
            ref_logp: (o.beta > 0.0).then_some(&refp[..]),
            lens: &[1],
            advantages: &[adv],
            truncated: &[false],
            keep: None,
        },
        o,
    )
    .unwrap()
}

#[test]
fn clipping_by_hand() {
    let o = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    let up = 0.5f64.exp(); // ρ = 1.6487 > 1.2
    let down = (-0.5f64).exp(); // ρ = 0.6065 < 0.8

    // A > 0, ρ above 1 + ε: min picks 1.2·A, constant in logπθ → no gradient, clipped high.
    let out = one_token(0.5, 0.0, 1.0, &o);
    assert_close!(out.loss, -1.2);
    assert_eq!(out.grad, vec![0.0]);
    assert_eq!(
        (out.stats.clip_frac_low, out.stats.clip_frac_high),
        (0.0, 1.0)
    );
    assert_close!(out.stats.ratio_mean, up);

    // A < 0, ρ above 1 + ε: ρ·A = −1.65 is the smaller, the gradient flows: −A·ρ.
    let out = one_token(0.5, 0.0, -1.0, &o);
    assert_close!(out.loss, up);
    assert_close!(out.grad[0], up);
    assert_eq!(out.stats.clip_frac(), 0.0);

    // A < 0, ρ below 1 − ε: min picks 0.8·A → no gradient, clipped low.
    let out = one_token(-0.5, 0.0, -2.0, &o);
    assert_close!(out.loss, 1.6);
    assert_eq!(out.grad, vec![0.0]);
    assert_eq!(
        (out.stats.clip_frac_low, out.stats.clip_frac_high),
        (1.0, 0.0)
    );

    // A > 0, ρ below 1 − ε: ρ·A is the smaller → gradient −A·ρ.
    let out = one_token(-0.5, 0.0, 2.0, &o);
    assert_close!(out.loss, -2.0 * down);
    assert_close!(out.grad[0], -2.0 * down);

    // ρ = 1 (one update per batch): −A and gradient −A.
    let out = one_token(-1.3, -1.3, 0.7, &o);
    assert_close!(out.loss, -0.7);
    assert_close!(out.grad[0], -0.7);

    // A = 0: nothing, whatever ρ.
    let out = one_token(0.5, 0.0, 0.0, &o);
    assert_eq!(
        (out.loss, out.grad[0], out.stats.clip_frac()),
        (0.0, 0.0, 0.0)
    );

    // Asymmetric bounds (ε_high = 0.28, DAPO): ρ = 1.25 is inside.
    let o2 = LossOptions {
        eps_high: 0.28,
        beta: 0.0,
        ..LossOptions::default()
    };
    let out = one_token(1.25f64.ln(), 0.0, 1.0, &o2);
    assert_close!(out.grad[0], -1.25);
    assert_eq!(out.stats.clip_frac(), 0.0);
}

#[test]
fn k3_kl_by_hand() {
    // logπref − logπθ = ln 2: k3 = 2 − ln 2 − 1, ∂/∂logπθ = β·(1 − 2) = −β.
    let o = LossOptions {
        beta: 0.1,
        ..LossOptions::default()
    };
    let lp = -1.0;
    let refp = [lp + 2f64.ln()];
    let out = policy_loss(
        &LossBatch {
            logp: &[lp],
            old_logp: &[lp],
            ref_logp: Some(&refp),
            lens: &[1],
            advantages: &[0.0],
            truncated: &[false],
            keep: None,
        },
        &o,
    )
    .unwrap();
    assert_close!(out.stats.kl, 1.0 - 2f64.ln());
    assert_close!(out.loss, 0.1 * (1.0 - 2f64.ln()));
    assert_close!(out.grad[0], -0.1);
    // At the reference the KL and its gradient vanish.
    let out = one_token(-1.0, -1.0, 0.0, &o);
    assert_eq!((out.loss, out.grad[0], out.stats.kl), (0.0, 0.0, 0.0));
}

/// Two completions of 1 and 3 tokens, ρ = 1, β = 0, advantages 1 and 2.
fn aggregation_case(aggregation: Aggregation, lens: &[usize]) -> thinkshort::grpo::LossOutput {
    let n: usize = lens.iter().sum();
    let lp = vec![-0.5; n];
    let adv: Vec<f64> = (1..=lens.len()).map(|i| i as f64).collect();
    let o = LossOptions {
        beta: 0.0,
        aggregation,
        ..LossOptions::default()
    };
    policy_loss(
        &LossBatch {
            logp: &lp,
            old_logp: &lp,
            ref_logp: None,
            lens,
            advantages: &adv,
            truncated: &vec![false; lens.len()],
            keep: None,
        },
        &o,
    )
    .unwrap()
}

#[test]
fn aggregation_weights_by_hand() {
    let out = aggregation_case(Aggregation::SeqMeanTokenMean, &[1, 3]);
    assert_close!(out.loss, -(1.0 + 2.0) / 2.0);
    assert_close!(out.grad[0], -0.5);
    assert_close!(out.grad[1], -2.0 / 6.0);

    let out = aggregation_case(Aggregation::TokenMean, &[1, 3]);
    assert_close!(out.loss, -(1.0 + 6.0) / 4.0);
    assert_close!(out.grad[0], -0.25);
    assert_close!(out.grad[3], -0.5);

    let out = aggregation_case(Aggregation::SeqMeanTokenSumNorm { max_len: 4 }, &[1, 3]);
    assert_close!(out.loss, -(1.0 + 6.0) / 8.0);
    assert_close!(out.grad[0], -1.0 / 8.0);
    assert_close!(out.grad[2], -2.0 / 8.0);
}

#[test]
fn empty_completions() {
    // Advantages 1, 2, 3 for lengths 0, 2, 1. The empty completion has no token mean, so it
    // leaves the seq-mean; in the sum-norm mode its sum is 0 and it counts.
    let out = aggregation_case(Aggregation::SeqMeanTokenMean, &[0, 2, 1]);
    assert_close!(out.loss, -(2.0 + 3.0) / 2.0);
    assert_eq!(out.stats.tokens, 3);
    let out = aggregation_case(Aggregation::TokenMean, &[0, 2, 1]);
    assert_close!(out.loss, -(4.0 + 3.0) / 3.0);
    let out = aggregation_case(Aggregation::SeqMeanTokenSumNorm { max_len: 2 }, &[0, 2, 1]);
    assert_close!(out.loss, -(4.0 + 3.0) / 6.0);

    // Nothing but empty completions: a zero loss, not NaN.
    for agg in [
        Aggregation::SeqMeanTokenMean,
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 2 },
    ] {
        let out = aggregation_case(agg, &[0, 0]);
        assert_eq!(out.loss, 0.0);
        assert!(out.grad.is_empty());
        assert_eq!(
            out.stats.clip_frac() + out.stats.kl + out.stats.ratio_mean,
            0.0
        );
    }
}

#[test]
fn truncated_mask_leaves_loss_and_divisor() {
    let lp = [-1.0; 5];
    let batch = |truncated: &'static [bool]| LossBatch {
        logp: &lp,
        old_logp: &lp,
        ref_logp: None,
        lens: &[2, 3],
        advantages: &[1.0, -1.0],
        truncated,
        keep: None,
    };
    let o = |truncated, aggregation| LossOptions {
        beta: 0.0,
        truncated,
        aggregation,
        ..LossOptions::default()
    };

    let keep = policy_loss(
        &batch(&[false, true]),
        &o(Truncated::Keep, Aggregation::TokenMean),
    )
    .unwrap();
    assert_close!(keep.loss, (-2.0 + 3.0) / 5.0);
    assert_eq!(keep.stats.tokens, 5);

    let mask = policy_loss(
        &batch(&[false, true]),
        &o(Truncated::Mask, Aggregation::TokenMean),
    )
    .unwrap();
    assert_close!(mask.loss, -1.0); // divided by 2 tokens, not 5
    assert_eq!(&mask.grad[2..], &[0.0; 3]);
    assert_close!(mask.grad[0], -0.5);
    assert_eq!((mask.stats.tokens, mask.stats.sequences), (2, 1));

    let mask = policy_loss(
        &batch(&[false, true]),
        &o(Truncated::Mask, Aggregation::SeqMeanTokenMean),
    )
    .unwrap();
    assert_close!(mask.loss, -1.0); // one completion in the outer mean
    let mask = policy_loss(
        &batch(&[false, true]),
        &o(
            Truncated::Mask,
            Aggregation::SeqMeanTokenSumNorm { max_len: 4 },
        ),
    )
    .unwrap();
    assert_close!(mask.loss, -2.0 / 4.0);
}

#[test]
fn pipeline_group_with_overlong_and_truncated_completions() {
    // One group of four under budget L = 10: the truncated completion (25 > 2L tokens) still
    // shapes the group mean, but under `mask` it gets no gradient.
    let w = RewardWeights::default();
    let tri = LengthShape::Triangular;
    let good = "<think>x</think><answer>4</answer>";
    let rewards: Vec<f64> = [
        reward(true, 10, 10, good, &w, tri),
        reward(true, 15, 10, good, &w, tri),
        reward(false, 5, 10, "<answer>5</answer>", &w, tri),
        reward(false, 25, 10, "<think>never ends", &w, tri),
    ]
    .iter()
    .map(|r| r.total)
    .collect();
    assert_eq!(rewards[3], 0.0); // beyond 2L and no closed tag
    assert_close!(rewards[0], 0.6 + 0.3 + 0.1);
    assert_close!(rewards[1], 0.6 + 0.15 + 0.1);
    assert_close!(rewards[2], 0.3 * 0.5 + 0.05);

    let a = advantages(&rewards, 4, &opts(StdKind::Population, Scale::None)).unwrap();
    let mean = (1.0 + 0.85 + 0.2 + 0.0) / 4.0;
    assert_close!(a[0], 1.0 - mean);
    assert_close!(a[3], -mean);

    let lens = [3, 4, 2, 5];
    let lp = vec![-0.7; 14];
    let out = policy_loss(
        &LossBatch {
            logp: &lp,
            old_logp: &lp,
            ref_logp: None,
            lens: &lens,
            advantages: &a,
            truncated: &[false, false, false, true],
            keep: None,
        },
        &LossOptions {
            beta: 0.0,
            truncated: Truncated::Mask,
            ..LossOptions::default()
        },
    )
    .unwrap();
    assert_close!(out.loss, -(a[0] + a[1] + a[2]) / 3.0);
    assert_eq!(&out.grad[9..], &[0.0; 5]);
    assert!(out.loss.is_finite());
}

#[test]
fn zero_variance_group_has_no_policy_gradient() {
    let a = advantages(&[0.45; 4], 4, &AdvantageOptions::default()).unwrap();
    let lp = [-0.3, -2.0, -0.1, -1.0];
    let old = [-0.1, -2.5, -0.1, -0.2];
    let out = policy_loss(
        &LossBatch {
            logp: &lp,
            old_logp: &old,
            ref_logp: None,
            lens: &[1, 1, 1, 1],
            advantages: &a,
            truncated: &[false; 4],
            keep: None,
        },
        &LossOptions {
            beta: 0.0,
            ..LossOptions::default()
        },
    )
    .unwrap();
    assert_eq!(out.loss, 0.0);
    assert!(out.grad.iter().all(|&g| g == 0.0));
}

#[test]
fn policy_loss_rejects_bad_inputs() {
    let lp = [-1.0, -1.0];
    let base = LossBatch {
        logp: &lp,
        old_logp: &lp,
        ref_logp: None,
        lens: &[2],
        advantages: &[1.0],
        truncated: &[false],
        keep: None,
    };
    let err = policy_loss(&base, &LossOptions::default()).unwrap_err();
    assert!(err.to_string().contains("reference"), "{err}");
    let zero_beta = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    assert!(policy_loss(&base, &zero_beta).is_ok());
    assert!(policy_loss(&LossBatch { lens: &[3], ..base }, &zero_beta).is_err());
    assert!(policy_loss(
        &LossBatch {
            advantages: &[],
            ..base
        },
        &zero_beta
    )
    .is_err());
    assert!(policy_loss(
        &LossBatch {
            keep: Some(&[true, true]),
            ..base
        },
        &zero_beta
    )
    .is_err());
    let bad = LossOptions {
        aggregation: Aggregation::SeqMeanTokenSumNorm { max_len: 0 },
        ..zero_beta
    };
    assert!(policy_loss(&base, &bad).is_err());
    assert!(policy_loss(
        &base,
        &LossOptions {
            eps_low: 1.0,
            ..zero_beta
        }
    )
    .is_err());
}

// ---------------------------------------------------------------- curriculum (METHOD.md §6)

fn budgets(c: &Curriculum, steps: &[usize]) -> Vec<usize> {
    steps.iter().map(|&s| c.budget_at(s)).collect()
}

#[test]
fn paper_exponential_schedule() {
    let c = Curriculum::new(Schedule::default(), 600).unwrap();
    assert_eq!(
        budgets(&c, &[0, 149, 150, 299, 300, 449, 450, 599]),
        [256, 256, 179, 179, 125, 125, 87, 87]
    );
    assert_eq!(c.cap_at(0, 2.0), 512);
    assert_eq!(c.cap_at(599, 2.0), 174);
}

#[test]
fn exponential_floors_like_exact_arithmetic() {
    // 100·0.7² is 49 on paper but 48.999… in binary.
    let s = Schedule::ExponentialStep {
        b0: 100,
        gamma: 0.7,
        interval: 1,
    };
    let c = Curriculum::new(s, 10).unwrap();
    assert_eq!(budgets(&c, &[0, 1, 2]), [100, 70, 49]);
    let s = Schedule::ExponentialStep {
        b0: 2,
        gamma: 0.1,
        interval: 1,
    };
    assert_eq!(Curriculum::new(s, 10).unwrap().budget_at(5), 1); // never below 1
}

#[test]
fn generalised_and_linear_schedules() {
    // d = (87/256)^(1/3): 256, 178.6, 124.7, 87; drops every 600/4 = 150 steps.
    let g = Schedule::Generalised {
        b0: 256,
        bf: 87,
        n: 3,
        steps: None,
    };
    let c = Curriculum::new(g, 600).unwrap();
    assert_eq!(
        budgets(&c, &[0, 149, 150, 300, 449, 450, 599, 700]),
        [256, 256, 179, 125, 125, 87, 87, 87]
    );
    // n = 1: one drop at 300; n = 7: every 75 steps.
    let c = Curriculum::new(
        Schedule::Generalised {
            b0: 256,
            bf: 87,
            n: 1,
            steps: None,
        },
        600,
    )
    .unwrap();
    assert_eq!(budgets(&c, &[299, 300]), [256, 87]);
    let c = Curriculum::new(
        Schedule::Generalised {
            b0: 256,
            bf: 87,
            n: 7,
            steps: None,
        },
        600,
    )
    .unwrap();
    assert_eq!(
        budgets(&c, &[0, 75, 150, 225, 300, 375, 450, 525, 599]),
        [256, 219, 188, 161, 138, 118, 102, 87, 87]
    );
    // An explicit horizon overrides the run length.
    let c = Curriculum::new(
        Schedule::Generalised {
            b0: 256,
            bf: 87,
            n: 3,
            steps: Some(400),
        },
        600,
    )
    .unwrap();
    assert_eq!(budgets(&c, &[99, 100, 300, 599]), [256, 179, 87, 87]);

    // Linear: 256 − k·169/3 = 256, 199.7, 143.3, 87.
    let c = Curriculum::new(
        Schedule::Linear {
            b0: 256,
            bf: 87,
            n: 3,
            steps: None,
        },
        600,
    )
    .unwrap();
    assert_eq!(
        budgets(&c, &[0, 150, 300, 450, 599]),
        [256, 200, 143, 87, 87]
    );
}

#[test]
fn constant_and_list_schedules() {
    let c = Curriculum::new(Schedule::Constant { b: 87 }, 600).unwrap();
    assert_eq!(budgets(&c, &[0, 599]), [87, 87]);
    let l = Schedule::List {
        budgets: vec![(0, 256), (100, 128), (300, 64)],
    };
    let c = Curriculum::new(l, 600).unwrap();
    assert_eq!(
        budgets(&c, &[0, 99, 100, 299, 300, 5000]),
        [256, 256, 128, 128, 64, 64]
    );
}

#[test]
fn schedule_validation_names_the_key() {
    let err = |s: Schedule| Curriculum::new(s, 600).unwrap_err().to_string();
    assert!(err(Schedule::ExponentialStep {
        b0: 256,
        gamma: 1.5,
        interval: 150
    })
    .contains("schedule.gamma"));
    assert!(err(Schedule::ExponentialStep {
        b0: 256,
        gamma: 0.0,
        interval: 150
    })
    .contains("schedule.gamma"));
    assert!(err(Schedule::ExponentialStep {
        b0: 0,
        gamma: 0.7,
        interval: 150
    })
    .contains("schedule.b0"));
    assert!(err(Schedule::ExponentialStep {
        b0: 256,
        gamma: 0.7,
        interval: 0
    })
    .contains("schedule.interval"));
    assert!(err(Schedule::Constant { b: 0 }).contains("schedule.b "));
    assert!(err(Schedule::Generalised {
        b0: 87,
        bf: 256,
        n: 3,
        steps: None
    })
    .contains("schedule.bf"));
    assert!(err(Schedule::Linear {
        b0: 256,
        bf: 87,
        n: 0,
        steps: None
    })
    .contains("schedule.n"));
    assert!(err(Schedule::Linear {
        b0: 256,
        bf: 87,
        n: 3,
        steps: Some(3)
    })
    .contains("schedule.steps"));
    assert!(err(Schedule::List {
        budgets: vec![(5, 100)]
    })
    .contains("schedule.budgets"));
    assert!(err(Schedule::List {
        budgets: vec![(0, 100), (0, 50)]
    })
    .contains("schedule.budgets"));
    assert!(err(Schedule::List {
        budgets: vec![(0, 100), (10, 0)]
    })
    .contains("schedule.budgets"));
    let adaptive = Schedule::Adaptive {
        b0: 256,
        gamma: 0.7,
        bf: 87,
        interval: 4,
        window: 0,
        tolerance: 0.05,
    };
    assert!(err(adaptive).contains("schedule.window"));
}

fn adaptive() -> Curriculum {
    let s = Schedule::Adaptive {
        b0: 256,
        gamma: 0.7,
        bf: 87,
        interval: 4,
        window: 2,
        tolerance: 0.05,
    };
    Curriculum::new(s, 100).unwrap()
}

#[test]
fn adaptive_schedule_tightens_only_while_accuracy_holds() {
    let mut c = adaptive();
    let accs = [0.8, 0.8, 0.8, 0.8, 0.5, 0.5, 0.5, 0.5, 0.78, 0.78];
    let mut seen = Vec::new();
    for (step, &acc) in accs.iter().enumerate() {
        seen.push(c.budget_at(step));
        c.observe(step, acc);
    }
    // Steps 0–3 at 256; the first tightening is unconditional (reference 0.8). At 179 the
    // accuracy drops to 0.5 < 0.8 − 0.05: hold. Step 8's window [0.5, 0.78] still holds;
    // step 9's [0.78, 0.78] is within tolerance: 125 from step 10.
    assert_eq!(seen, [256, 256, 256, 256, 179, 179, 179, 179, 179, 179]);
    assert_eq!(c.budget_at(10), 125);
    assert_eq!(budgets(&c, &[0, 3, 4, 9, 10]), [256, 256, 179, 179, 125]); // past steps keep theirs

    // Holding accuracy: one more tightening to 87 (= Bf), then it stays there.
    for step in 10..40 {
        c.observe(step, 0.9);
    }
    assert_eq!(budgets(&c, &[13, 14, 40]), [125, 87, 87]);
}

#[test]
fn adaptive_state_resumes_exactly() {
    let accs: Vec<f64> = (0..30)
        .map(|i| 0.5 + 0.3 * ((i * 7 % 11) as f64 / 11.0))
        .collect();
    let mut straight = adaptive();
    for (s, &a) in accs.iter().enumerate() {
        straight.observe(s, a);
    }
    let mut first = adaptive();
    for (s, &a) in accs[..13].iter().enumerate() {
        first.observe(s, a);
    }
    let saved = serde_json::to_string(&first).unwrap();
    let mut resumed: Curriculum = serde_json::from_str(&saved).unwrap();
    assert_eq!(resumed, first);
    for (s, &a) in accs.iter().enumerate().skip(13) {
        resumed.observe(s, a);
    }
    assert_eq!(resumed, straight);
    assert!(straight.budget_at(30) < 256);
}

#[test]
fn fixed_schedules_ignore_observations() {
    let mut c = Curriculum::new(Schedule::default(), 600).unwrap();
    let before = c.clone();
    c.observe(0, 0.0);
    assert_eq!(c, before);
}

#[test]
fn generation_cap_rounds_up() {
    assert_eq!(generation_cap(87, 2.0), 174);
    assert_eq!(generation_cap(87, 1.5), 131);
    assert_eq!(generation_cap(100, 1.0), 100);
    assert_eq!(generation_cap(0, 2.0), 1);
}

// ---------------------------------------------------------------- optimizer (METHOD.md §8)

/// PyTorch's AdamW written out in f64 for one parameter.
fn adamw_reference(
    p0: f64,
    grads: &[f64],
    lrs: &[f64],
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
) -> f64 {
    let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
    for (t, (&g, &lr)) in grads.iter().zip(lrs).enumerate() {
        let t = (t + 1) as i32;
        p *= 1.0 - lr * wd; // decoupled decay on the old weight
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let m_hat = m / (1.0 - b1.powi(t));
        let v_hat = v / (1.0 - b2.powi(t));
        p -= lr * m_hat / (v_hat.sqrt() + eps);
    }
    p
}

#[test]
fn adamw_matches_hand_unrolled_reference() {
    let params0 = [0.5f32, -1.25, 2.0, 0.0];
    let grads = [
        [0.1f32, -0.3, 0.02, 1.5],
        [-0.2, -0.1, 0.05, 1.0],
        [0.4, 0.3, -0.01, -2.0],
        [0.0, 0.2, 0.03, 0.5],
    ];
    let lrs = [1e-2, 8e-3, 5e-3, 1e-3];
    let (b1, b2, eps, wd) = (0.9, 0.999, 1e-8, 0.1);
    let mut opt = AdamW::new(4, b1, b2, eps, wd);
    let mut p = params0;
    for (g, &lr) in grads.iter().zip(&lrs) {
        opt.step(&mut p, g, lr);
    }
    assert_eq!(opt.t, 4);
    for i in 0..4 {
        let g: Vec<f64> = grads.iter().map(|g| g[i] as f64).collect();
        let want = adamw_reference(params0[i] as f64, &g, &lrs, b1, b2, eps, wd);
        assert_close!(p[i], want, 1e-6);
    }
    // First step by hand: m̂ = g, v̂ = g², so the step is lr·sign(g) (plus decay).
    let mut opt = AdamW::new(1, b1, b2, eps, 0.0);
    let mut p = [1.0f32];
    opt.step(&mut p, &[-3.0], 0.1);
    assert_close!(p[0], 1.1, 1e-6);
}

/// AdamW's JSON (trainer_state.json) keeps the settings and the step count; the moments go to
/// optimizer.safetensors (tests/checkpoint.rs), but an older JSON that holds them still reads.
#[test]
fn adamw_json_keeps_settings_and_step_not_moments() {
    let mut opt = AdamW::new(3, 0.9, 0.999, 1e-8, 0.01);
    let mut p = [1.0f32, 2.0, 3.0];
    opt.step(&mut p, &[0.1, 0.2, 0.3], 1e-3);
    let json = serde_json::to_string(&opt).unwrap();
    assert!(!json.contains("\"m\"") && !json.contains("\"v\""), "{json}");
    let back: AdamW = serde_json::from_str(&json).unwrap();
    assert_eq!(
        back,
        AdamW {
            m: Vec::new(),
            v: Vec::new(),
            ..opt.clone()
        }
    );
    let mut older: serde_json::Value = serde_json::from_str(&json).unwrap();
    older["m"] = serde_json::json!(opt.m);
    older["v"] = serde_json::json!(opt.v);
    let back: AdamW = serde_json::from_value(older).unwrap();
    assert_eq!(back, opt);
}

#[test]
fn learning_rate_schedule() {
    let s = LrSchedule {
        peak: 1e-5,
        warmup: 50,
        total: 600,
        decay: LrDecay::Cosine,
        min_ratio: 0.0,
    };
    assert_close!(s.at(0), 1e-5 / 50.0);
    assert_close!(s.at(49), 1e-5);
    assert_close!(s.at(50), 1e-5);
    assert_close!(s.at(325), 0.5e-5); // halfway through the decay
    assert!(s.at(599) < 1e-9);
    assert_eq!(s.at(600), 0.0);
    assert_eq!(s.at(599), lr_at(599, 1e-5, 50, 600));
    let floor = LrSchedule {
        min_ratio: 0.1,
        ..s
    };
    assert_close!(floor.at(325), 1e-6 + 0.5 * 9e-6);
    assert_close!(floor.at(600), 1e-6);
    let constant = LrSchedule {
        decay: LrDecay::Constant,
        ..s
    };
    assert_close!(constant.at(10), 1e-5 * 11.0 / 50.0);
    assert_eq!(constant.at(599), 1e-5);
    let no_warmup = LrSchedule { warmup: 0, ..s };
    assert_eq!(no_warmup.at(0), 1e-5);
}

#[test]
fn grad_norm_clipping_and_finite_check() {
    let mut g = [3.0f32, 4.0];
    assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
    assert_close!(g[0], 0.6, 1e-7);
    assert_close!(g[1], 0.8, 1e-7);
    let mut g = [0.3f32, 0.4];
    assert_close!(clip_grad_norm(&mut g, 1.0), 0.5, 1e-7);
    assert_eq!(g, [0.3, 0.4]); // under the limit: untouched
    let mut g = [1.0f32, f32::NAN];
    assert!(clip_grad_norm(&mut g, 1.0).is_nan());
    assert_eq!(first_non_finite(&g), Some(1));
    assert_eq!(first_non_finite(&[0.0, f32::INFINITY]), Some(1));
    assert_eq!(first_non_finite(&[0.0, -1.0]), None);
}

// ---------------------------------------------------------------- training config

fn config_err(text: &str) -> String {
    format!("{:#}", TrainConfig::from_toml_str(text).unwrap_err())
}

#[test]
fn default_config_is_valid_and_round_trips() {
    let c = TrainConfig::default();
    c.validate().unwrap();
    assert_eq!((c.steps, c.prompts_per_step, c.group_size), (600, 16, 8));
    assert_eq!(
        (c.loss.eps_low, c.loss.eps_high, c.loss.beta, c.loss.epochs),
        (0.2, 0.2, 0.01, 1)
    );
    assert_eq!(
        (c.optim.lr, c.optim.warmup, c.optim.grad_clip),
        (1e-5, 50, 1.0)
    );
    assert_eq!(c.sampling.cap_factor, 2.0);
    // METHOD.md §2: temperature 1, top-p 1, top-k off, truncated completions kept
    assert_eq!(
        (c.sampling.temperature, c.sampling.top_p, c.sampling.top_k),
        (1.0, 1.0, 0)
    );
    assert_eq!(c.loss.truncated, Truncated::Keep);
    // §4: population std plus 1e-4, scaled by the group's, no filtering
    let a = c.advantage;
    assert_eq!(
        (a.std, a.eps, a.scale, a.filter_groups),
        (StdKind::Population, 1e-4, Scale::Group, false)
    );
    // §5: seq-mean-token-mean, logπold recomputed by the training forward pass
    assert_eq!(c.loss.aggregation, AggregationKind::SeqMeanTokenMean);
    assert_eq!(c.loss.old_logp, OldLogp::Recompute);
    // §8: AdamW β = (0.9, 0.999), no weight decay, cosine decay (to 0)
    let o = c.optim;
    assert_eq!((o.beta1, o.beta2, o.weight_decay), (0.9, 0.999, 0.0));
    assert_eq!((o.decay, o.min_lr_ratio), (LrDecay::Cosine, 0.0));
    // §3: weights 0.6 / 0.3 / 0.1, the format split evenly, the triangular length reward
    let w = c.reward.weights;
    assert_eq!(
        (w.correct, w.length, w.format, w.think, w.answer),
        (0.6, 0.3, 0.1, 0.5, 0.5)
    );
    assert_eq!(c.reward.shape, LengthShape::Triangular);
    let text = c.to_toml_string();
    assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), c);
    assert_eq!(TrainConfig::from_toml_str("").unwrap(), c);
    let cur = c.curriculum().unwrap();
    assert_eq!(budgets(&cur, &[0, 150, 300, 450]), [256, 179, 125, 87]);
}

#[test]
fn partial_config_keeps_defaults() {
    let c = TrainConfig::from_toml_str(
        "steps = 100\nmodel = \"m\"\n[loss]\nbeta = 0\naggregation = \"seq-mean-token-sum-norm\"\n[schedule]\nkind = \"constant\"\n[reward.weights]\ncorrect = 1\n",
    )
    .unwrap();
    assert_eq!(c.steps, 100);
    assert_eq!(c.model.as_deref(), Some(std::path::Path::new("m")));
    assert_eq!(c.loss.beta, 0.0);
    assert_eq!(c.loss.eps_low, 0.2);
    assert_eq!(c.schedule, Schedule::Constant { b: 87 });
    assert_eq!(c.reward.weights.correct, 1.0);
    assert_eq!(c.reward.weights.length, 0.3);
    // The sum-norm constant defaults to the cap at step 0: 2·87.
    assert_eq!(
        c.loss_options().unwrap().aggregation,
        Aggregation::SeqMeanTokenSumNorm { max_len: 174 }
    );
    assert_eq!(TrainConfig::from_toml_str(&c.to_toml_string()).unwrap(), c);
}

/// The sum-norm constant defaults to the largest cap of the run: a `list` schedule that raises
/// the budget at step 50 divides by the cap there (2·120), not by step 0's.
#[test]
fn sum_norm_divides_by_the_runs_largest_cap() {
    let c = TrainConfig::from_toml_str(
        "steps = 100\n[loss]\naggregation = \"seq-mean-token-sum-norm\"\n[schedule]\nkind = \"list\"\nbudgets = [[0, 40], [50, 120], [80, 30]]\n",
    )
    .unwrap();
    assert_eq!(
        c.loss_options().unwrap().aggregation,
        Aggregation::SeqMeanTokenSumNorm { max_len: 240 }
    );
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        ("stepz = 3", "stepz"),
        ("[loss]\nbetta = 0.1", "loss.betta"),
        ("[schedule]\ngamma = 0.5\nwindow = 3", "schedule.window"),
        ("[schedule]\nkind = \"constant\"\nb0 = 5", "schedule.b0"),
        ("[schedule]\nkind = \"list\"", "schedule.budgets"),
        // a third number in an entry was read as the pair and dropped
        (
            "[schedule]\nkind = \"list\"\nbudgets = [[0, 20, 5]]",
            "schedule.budgets: each entry is [step, budget], got [0, 20, 5]",
        ),
        ("[schedule]\nkind = \"weekly\"", "schedule.kind"),
        ("[schedule]\ngamma = 1.5", "schedule.gamma"),
        ("[schedule]\ngamma = 0.0", "schedule.gamma"),
        ("[schedule]\ngamma = \"fast\"", "schedule.gamma"),
        ("[schedule]\nb0 = 0", "schedule.b0"),
        ("[schedule]\nb0 = -5", "schedule.b0"),
        ("[schedule]\nkind = \"constant\"\nb = 0", "schedule.b"),
        ("steps = 0", "steps"),
        ("steps = -1", "steps"),
        ("group_size = 1", "group_size"),
        ("prompts_per_step = 0", "prompts_per_step"),
        ("prompt = \"\"", "prompt"),
        ("eval_every = 10\neval_size = 0", "eval_size"),
        ("[loss]\neps_low = -0.1", "loss.eps_low"),
        ("[loss]\neps_high = -0.1", "loss.eps_high"),
        ("[loss]\nbeta = -1", "loss.beta"),
        ("[loss]\nepochs = 0", "loss.epochs"),
        ("[loss]\nnorm_len = 0", "loss.norm_len"),
        ("[loss]\naggregation = \"sum\"", "loss.aggregation"),
        ("[loss]\ntruncated = \"drop\"", "loss.truncated"),
        ("[optim]\nlr = 0", "optim.lr"),
        ("[optim]\nlr = -1e-5", "optim.lr"),
        ("[optim]\nbeta2 = 1.0", "optim.beta2"),
        ("[optim]\ngrad_clip = -1", "optim.grad_clip"),
        ("[optim]\nmin_lr_ratio = 2", "optim.min_lr_ratio"),
        ("[sampling]\ntemperature = 0", "sampling.temperature"),
        ("[sampling]\ntop_p = 0", "sampling.top_p"),
        ("[sampling]\ncap_factor = 0.5", "sampling.cap_factor"),
        ("[reward.weights]\nlength = -0.3", "reward.weights.length"),
        ("[reward]\nshape = \"square\"", "reward.shape"),
        ("[advantage]\neps = -1", "advantage.eps"),
        ("[advantage]\nscale = \"global\"", "advantage.scale"),
    ];
    for (text, key) in cases {
        let err = config_err(text);
        assert!(
            err.starts_with(key),
            "{text:?}: error {err:?} should name {key}"
        );
    }
    assert!(config_err("steps = [").contains("line 1"));
}

#[test]
fn set_overrides_with_dotted_keys() {
    let mut c = TrainConfig::default();
    c.set("steps", "100").unwrap();
    c.set("loss.beta", "0").unwrap();
    c.set("optim.lr", "3e-6").unwrap();
    c.set("model", "runs/sft model").unwrap(); // a bare string needs no quotes
    c.set("reward.weights.correct", "0.8").unwrap();
    c.set("reward.shape", "band").unwrap();
    c.set("sampling.stop", "[\"</answer>\"]").unwrap();
    assert_eq!((c.steps, c.loss.beta, c.optim.lr), (100, 0.0, 3e-6));
    assert_eq!(
        c.model.as_deref(),
        Some(std::path::Path::new("runs/sft model"))
    );
    assert_eq!(c.reward.weights.correct, 0.8);
    assert_eq!(c.reward.shape, LengthShape::Band);
    assert_eq!(c.sampling.stop, vec!["</answer>".to_string()]);

    // Changing the kind starts that schedule from its defaults.
    c.set("schedule.kind", "constant").unwrap();
    assert_eq!(c.schedule, Schedule::Constant { b: 87 });
    c.set("schedule.b", "64").unwrap();
    assert_eq!(c.schedule, Schedule::Constant { b: 64 });
    c.set("schedule.kind", "list").unwrap_err();
    c.set("schedule.kind", "exponential-step").unwrap();
    c.set("schedule.gamma", "0.5").unwrap();
    assert_eq!(c.curriculum().unwrap().budget_at(150), 128);

    let big = TrainConfig {
        seed: u64::MAX,
        ..TrainConfig::default()
    };
    assert!(format!("{:#}", big.validate().unwrap_err()).starts_with("seed"));

    let before = c.clone();
    let err = |c: &mut TrainConfig, k: &str, v: &str| format!("{:#}", c.set(k, v).unwrap_err());
    assert!(err(&mut c, "stepz", "1").starts_with("stepz"));
    assert!(err(&mut c, "loss.betta", "1").starts_with("loss.betta"));
    assert!(err(&mut c, "steps.x", "1").starts_with("steps"));
    assert!(err(&mut c, "nope.x", "1").starts_with("nope"));
    assert!(err(&mut c, "steps", "many").starts_with("steps"));
    assert!(err(&mut c, "schedule.gamma", "2").starts_with("schedule.gamma"));
    assert!(err(&mut c, "group_size", "1").starts_with("group_size"));
    assert!(err(&mut c, "", "1").contains("malformed"));
    assert_eq!(c, before); // a failed --set changes nothing
}

#[test]
fn config_from_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(
        &path,
        "steps = 12\n[schedule]\nkind = \"generalised\"\nn = 1\n",
    )
    .unwrap();
    let c = TrainConfig::from_file(&path).unwrap();
    assert_eq!(budgets(&c.curriculum().unwrap(), &[5, 6]), [256, 87]);
    std::fs::write(&path, "[optim]\nlr = 0\n").unwrap();
    let err = format!("{:#}", TrainConfig::from_file(&path).unwrap_err());
    assert!(
        err.contains("run.toml") && err.contains("optim.lr"),
        "{err}"
    );
    assert!(TrainConfig::from_file(&dir.path().join("missing.toml")).is_err());
}

#[test]
fn config_resolves_prompt_and_sampling() {
    let mut c = TrainConfig::default();
    assert_eq!(
        c.prompt_template().unwrap(),
        thinkshort::prompt::PromptTemplate::paper()
    );
    c.set("prompt", "Q: {question} ({budget} tokens)\nA:")
        .unwrap();
    assert_eq!(
        c.prompt_template().unwrap(),
        thinkshort::prompt::PromptTemplate::plain("Q: {question} ({budget} tokens)\nA:").unwrap()
    );
    c.set("prompt", "/no/such/template.txt").unwrap();
    assert!(c.prompt_template().is_err());
    let p = c.sampling_params();
    assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, 0));
    let lr = c.lr_schedule();
    assert_eq!((lr.peak, lr.warmup, lr.total), (1e-5, 50, 600));
}
