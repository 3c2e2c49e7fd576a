//! thinkshort's GRPO policy loss against Hugging Face TRL 1.16.0 (torch 2.15.0, float64): the fixture
//! tests/fixtures/trl_grpo_loss.json holds what TRL's own `GRPOTrainer._compute_loss` gives on one
//! batch (loss, autograd gradient d loss / d logπθ, logged clip fractions and KL), made by
//! tools/make_trl_loss_fixture.py (its header says how to rerun it and which TRL settings it fixes).
//!
//! TRL loss types and thinkshort aggregations: grpo = SeqMeanTokenMean, dr_grpo =
//! SeqMeanTokenSumNorm { max_len: max_completion_length }, bnpo and dapo = TokenMean (one process,
//! one micro-batch). TRL's `mask_truncated_completions` = `Truncated::Mask`.

use serde::Deserialize;
use thinkshort::grpo::{policy_loss, Aggregation, LossBatch, LossOptions, LossOutput, Truncated};

/// Relative tolerance of loss and gradient: both sides compute in f64.
const TOL: f64 = 1e-12;
/// TRL computes its clip fractions in float32 (`is_low_clipped.float()`).
const TOL_F32: f64 = 1e-7;

#[derive(Deserialize)]
struct Fixture {
    max_completion_length: usize,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    advantages: Vec<f64>,
    logp: Vec<f64>,
    old_logp: Vec<f64>,
    ref_logp: Vec<f64>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    loss_type: String,
    beta: f64,
    epsilon: f64,
    epsilon_high: f64,
    mask_truncated_completions: bool,
    loss: f64,
    /// d loss / d logπθ per token, laid out like `Fixture::logp`.
    grad: Vec<f64>,
    clip_ratio_low: f64,
    clip_ratio_high: f64,
    /// Logged by TRL only when β ≠ 0.
    kl: Option<f64>,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} β={} ε=({}, {}) mask_truncated={}",
            self.loss_type,
            self.beta,
            self.epsilon,
            self.epsilon_high,
            self.mask_truncated_completions
        )
    }

    /// Whether TRL divides by all completions, masked ones included (its per-completion means).
    fn divides_by_all_completions(&self) -> bool {
        matches!(self.loss_type.as_str(), "grpo" | "dr_grpo")
    }
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/trl_grpo_loss.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// thinkshort's policy loss with the settings of one TRL case.
fn ours(f: &Fixture, c: &Case) -> LossOutput {
    let aggregation = match c.loss_type.as_str() {
        "grpo" => Aggregation::SeqMeanTokenMean,
        "dr_grpo" => Aggregation::SeqMeanTokenSumNorm {
            max_len: f.max_completion_length,
        },
        "bnpo" | "dapo" => Aggregation::TokenMean,
        other => panic!("no thinkshort aggregation for TRL loss type {other}"),
    };
    let options = LossOptions {
        eps_low: c.epsilon,
        eps_high: c.epsilon_high,
        beta: c.beta,
        aggregation,
        truncated: if c.mask_truncated_completions {
            Truncated::Mask
        } else {
            Truncated::Keep
        },
    };
    let batch = LossBatch {
        logp: &f.logp,
        old_logp: &f.old_logp,
        ref_logp: Some(&f.ref_logp),
        lens: &f.lens,
        advantages: &f.advantages,
        truncated: &f.truncated,
        keep: None,
    };
    policy_loss(&batch, &options).unwrap()
}

/// |a − b| / |b|, and 0 when both are 0 (clipped tokens at β = 0 have an exact zero gradient).
fn rel_err(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs()
    }
}

/// Asserts that our loss and every token's gradient equal TRL's times `scale`; returns the largest
/// relative error.
fn assert_matches_scaled(out: &LossOutput, c: &Case, scale: f64) -> f64 {
    let mut worst = rel_err(out.loss, c.loss * scale);
    assert!(
        worst <= TOL,
        "{}: loss {} vs TRL {} × {scale}",
        c.name(),
        out.loss,
        c.loss
    );
    assert_eq!(out.grad.len(), c.grad.len(), "{}", c.name());
    for (t, (&g, &want)) in out.grad.iter().zip(&c.grad).enumerate() {
        let e = rel_err(g, want * scale);
        assert!(
            e <= TOL,
            "{}: token {t} gradient {g} vs TRL {want} × {scale}",
            c.name()
        );
        worst = worst.max(e);
    }
    eprintln!("{}: max relative error {worst:.1e}", c.name());
    worst
}

#[test]
fn unmasked_loss_and_gradient_equal_trl_for_grpo_dr_grpo_bnpo_dapo() {
    let f = fixture();
    let cases: Vec<&Case> = f
        .cases
        .iter()
        .filter(|c| !c.mask_truncated_completions)
        .collect();
    assert_eq!(cases.len(), 8); // 4 loss types × (β = 0, β > 0 with ε_low ≠ ε_high)
    for c in cases {
        assert_matches_scaled(&ours(&f, c), c, 1.0);
    }
}

#[test]
fn masked_truncation_token_mean_equals_trl_bnpo_and_dapo() {
    // TRL zeroes the truncated rows of the completion mask, and both bnpo (mask.sum()) and dapo
    // (num_items_in_batch, counted after masking) then divide by the remaining tokens, as we do.
    let f = fixture();
    let cases: Vec<&Case> = f
        .cases
        .iter()
        .filter(|c| c.mask_truncated_completions && !c.divides_by_all_completions())
        .collect();
    assert_eq!(cases.len(), 2);
    for c in cases {
        assert_matches_scaled(&ours(&f, c), c, 1.0);
    }
}

#[test]
fn masked_truncation_seq_means_are_trl_times_all_over_included_completions() {
    // TRL's grpo (`.mean()` over rows) and dr_grpo (`/ (size(0) · max_completion_length)`) still
    // divide by all N completions, a masked one adding 0; we divide by the N_included left in the
    // loss (`completion_weights`). So ours = TRL × N / N_included, loss and every gradient entry.
    let f = fixture();
    let n = f.lens.len();
    let n_included = f.truncated.iter().filter(|&&t| !t).count();
    assert!(0 < n_included && n_included < n);
    let scale = n as f64 / n_included as f64;
    let cases: Vec<&Case> = f
        .cases
        .iter()
        .filter(|c| c.mask_truncated_completions && c.divides_by_all_completions())
        .collect();
    assert_eq!(cases.len(), 2);
    for c in cases {
        assert_matches_scaled(&ours(&f, c), c, scale);
    }
}

#[test]
fn clip_fractions_and_kl_equal_trl_logged_statistics() {
    let f = fixture();
    for c in &f.cases {
        let s = ours(&f, c).stats;
        for (what, a, b) in [
            ("clip_frac_low", s.clip_frac_low, c.clip_ratio_low),
            ("clip_frac_high", s.clip_frac_high, c.clip_ratio_high),
        ] {
            assert!(
                rel_err(a, b) <= TOL_F32,
                "{}: {what} {a} vs TRL {b}",
                c.name()
            );
        }
        assert!(
            s.clip_frac_low > 0.0 && s.clip_frac_high > 0.0,
            "{}",
            c.name()
        );
        assert_eq!(
            c.kl.is_some(),
            c.beta > 0.0,
            "{}: TRL logs a KL when β > 0",
            c.name()
        );
        if let Some(kl) = c.kl {
            assert!(
                rel_err(s.kl, kl) <= TOL,
                "{}: kl {} vs TRL {kl}",
                c.name(),
                s.kl
            );
        }
    }
}
