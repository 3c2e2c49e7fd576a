//! The GRPO policy loss (METHOD.md §5) and its gradient with respect to each token's log-prob:
//!     ρ = exp(logπθ − logπold)
//!     L_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·(exp(logπref − logπθ) − (logπref − logπθ) − 1)
//!     ∂L/∂logπθ = w_t·[−A·ρ·1(unclipped branch) + β·(1 − exp(logπref − logπθ))]
//! aggregated over tokens with weights w_t (the aggregation mode). The backward pass of the
//! model takes the gradient from here and carries it to the logits.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How per-token losses become one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// Mean over each completion's tokens, then over completions (torchtune/TRL `grpo`).
    /// Completions with no tokens have no mean and are left out of the outer mean.
    SeqMeanTokenMean,
    /// Mean over all tokens of the batch (DAPO).
    TokenMean,
    /// Token sum per completion divided by a constant `max_len`, then mean over completions
    /// (Dr. GRPO); empty completions count in the outer mean, their sum being a well-defined 0.
    SeqMeanTokenSumNorm { max_len: usize },
}

/// What truncated completions (stopped by the cap) do in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Truncated {
    /// They count like any other completion (default).
    #[default]
    Keep,
    /// They are left out of the loss and of every divisor (still part of the group statistics:
    /// their rewards entered the advantages before this point).
    Mask,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    pub eps_low: f64,
    pub eps_high: f64,
    /// Weight of the k3 KL to the reference policy; 0 needs no reference log-probs.
    pub beta: f64,
    pub aggregation: Aggregation,
    pub truncated: Truncated,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            eps_low: 0.2,
            eps_high: 0.2,
            beta: 0.01,
            aggregation: Aggregation::SeqMeanTokenMean,
            truncated: Truncated::Keep,
        }
    }
}

impl LossOptions {
    /// Checks the ranges: 0 ≤ ε_low < 1, ε_high ≥ 0, β ≥ 0, and a max_len ≥ 1 to divide by.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps_low >= 0.0 && self.eps_low < 1.0 && self.eps_high >= 0.0 && self.beta >= 0.0)
        {
            bail!(
                "policy loss: need 0 ≤ ε_low < 1, ε_high ≥ 0, β ≥ 0 (got {}, {}, {})",
                self.eps_low,
                self.eps_high,
                self.beta
            );
        }
        if self.aggregation == (Aggregation::SeqMeanTokenSumNorm { max_len: 0 }) {
            bail!("policy loss: seq-mean-token-sum-norm needs max_len ≥ 1");
        }
        Ok(())
    }
}

/// One batch of completions, their tokens back to back: completion i owns the next `lens[i]`
/// entries of the per-token slices. Lengths count every scored token of a completion (a final
/// EOS included: the policy learns to stop), so masks come from positions, never from token ids.
#[derive(Debug, Clone, Copy)]
pub struct LossBatch<'a> {
    pub logp: &'a [f64],
    pub old_logp: &'a [f64],
    /// Required when β > 0; when given with β = 0 it only feeds the KL statistic.
    pub ref_logp: Option<&'a [f64]>,
    pub lens: &'a [usize],
    /// One advantage per completion.
    pub advantages: &'a [f64],
    /// One flag per completion: stopped by the generation cap.
    pub truncated: &'a [bool],
    /// Completions to keep (e.g. the group filter); None keeps all.
    pub keep: Option<&'a [bool]>,
}

/// Statistics over the tokens that entered the loss (each token counts once, whatever its
/// aggregation weight).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossStats {
    pub tokens: usize,
    pub sequences: usize,
    /// Tokens where the clipped branch won at the lower bound (A < 0, ρ < 1 − ε_low).
    pub clip_frac_low: f64,
    /// Tokens where the clipped branch won at the upper bound (A > 0, ρ > 1 + ε_high).
    pub clip_frac_high: f64,
    /// Mean k3 KL to the reference (0 without reference log-probs).
    pub kl: f64,
    pub ratio_mean: f64,
}

impl LossStats {
    pub fn clip_frac(&self) -> f64 {
        self.clip_frac_low + self.clip_frac_high
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    pub loss: f64,
    /// ∂loss/∂logπθ per token, laid out like `logp`; 0 for tokens left out.
    pub grad: Vec<f64>,
    pub stats: LossStats,
}

fn check(b: &LossBatch, o: &LossOptions) -> Result<()> {
    let n_tok: usize = b.lens.iter().sum();
    let n_seq = b.lens.len();
    if b.logp.len() != n_tok || b.old_logp.len() != n_tok {
        bail!(
            "policy loss: {} log-probs and {} old log-probs for {n_tok} tokens",
            b.logp.len(),
            b.old_logp.len()
        );
    }
    match b.ref_logp {
        Some(r) if r.len() != n_tok => {
            bail!(
                "policy loss: {} reference log-probs for {n_tok} tokens",
                r.len()
            )
        }
        None if o.beta != 0.0 => bail!("policy loss: β = {} needs reference log-probs", o.beta),
        _ => {}
    }
    let keep_len = b.keep.map_or(n_seq, |k| k.len());
    if b.advantages.len() != n_seq || b.truncated.len() != n_seq || keep_len != n_seq {
        bail!(
            "policy loss: {n_seq} completions but {} advantages, {} truncation flags, {keep_len} keep flags",
            b.advantages.len(),
            b.truncated.len()
        );
    }
    o.validate()
}

/// Which completions enter the loss: kept by the filter (all when `keep` is None) and, under
/// `Truncated::Mask`, not stopped by the cap.
pub fn included_completions(
    truncated: &[bool],
    keep: Option<&[bool]>,
    mode: Truncated,
) -> Vec<bool> {
    (0..truncated.len())
        .map(|i| keep.is_none_or(|k| k[i]) && !(mode == Truncated::Mask && truncated[i]))
        .collect()
}

/// (tokens, completions) that enter the loss.  lens, included: [N].
pub fn included_counts(lens: &[usize], included: &[bool]) -> (usize, usize) {
    let kept = lens.iter().zip(included).filter(|(_, &k)| k);
    (kept.clone().map(|(l, _)| l).sum(), kept.count())
}

/// The aggregation weight w_i of every token of completion i (the same for all its tokens);
/// 0 for completions left out (and for empty ones, which have no tokens). lens, included: [N].
pub fn completion_weights(lens: &[usize], included: &[bool], aggregation: Aggregation) -> Vec<f64> {
    let kept = || {
        lens.iter()
            .zip(included)
            .filter(|(_, &k)| k)
            .map(|(&l, _)| l)
    };
    let n_tok: usize = kept().sum();
    let n_nonempty = kept().filter(|&l| l > 0).count();
    let n_seq = kept().count();
    lens.iter()
        .zip(included)
        .map(|(&len, &inc)| match (inc && len > 0, aggregation) {
            (false, _) => 0.0,
            (true, Aggregation::SeqMeanTokenMean) => 1.0 / (n_nonempty as f64 * len as f64),
            (true, Aggregation::TokenMean) => 1.0 / n_tok as f64,
            (true, Aggregation::SeqMeanTokenSumNorm { max_len }) => {
                1.0 / (n_seq as f64 * max_len as f64)
            }
        })
        .collect()
}

/// Which side of min() won for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clip {
    /// The unclipped branch (it carries the gradient).
    None,
    /// Clipped at the lower bound (A < 0, ρ < 1 − ε_low).
    Low,
    /// Clipped at the upper bound (A > 0, ρ > 1 + ε_high).
    High,
}

/// One token's loss before its aggregation weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    /// L_t.
    pub loss: f64,
    /// ∂L_t/∂logπθ.
    pub grad: f64,
    /// k3 KL to the reference (0 without reference log-probs).
    pub kl: f64,
    pub ratio: f64,
    pub clip: Clip,
}

/// L_t and its gradient for a token with log-probs `logp` (πθ), `old_logp`, `ref_logp` and its
/// completion's advantage: the formula of the module doc. The device kernels compute the same in
/// f64 (kernels/policy_loss.cu: token_loss).
pub fn token_loss(
    logp: f64,
    old_logp: f64,
    ref_logp: Option<f64>,
    advantage: f64,
    o: &LossOptions,
) -> TokenLoss {
    let a = advantage;
    let rho = (logp - old_logp).exp();
    let unclipped = rho * a;
    let clipped = rho.clamp(1.0 - o.eps_low, 1.0 + o.eps_high) * a;
    // min() takes the clipped branch only when it is strictly smaller; that branch is constant
    // in logπθ, so it passes no gradient.
    let (surrogate, d_surrogate, clip) = if clipped < unclipped {
        let side = if rho < 1.0 - o.eps_low {
            Clip::Low
        } else {
            Clip::High
        };
        (clipped, 0.0, side)
    } else {
        (unclipped, a * rho, Clip::None)
    };
    let mut t = TokenLoss {
        loss: -surrogate,
        grad: -d_surrogate,
        kl: 0.0,
        ratio: rho,
        clip,
    };
    if let Some(r) = ref_logp {
        let d = r - logp;
        t.kl = d.exp() - d - 1.0;
        if o.beta != 0.0 {
            t.loss += o.beta * t.kl;
            t.grad += o.beta * (1.0 - d.exp());
        }
    }
    t
}

/// The loss, its gradient per token and statistics for one batch.
pub fn policy_loss(b: &LossBatch, o: &LossOptions) -> Result<LossOutput> {
    check(b, o)?;
    let included = included_completions(b.truncated, b.keep, o.truncated);
    let weights = completion_weights(b.lens, &included, o.aggregation);
    let (n_tok, n_seq) = included_counts(b.lens, &included);

    let mut grad = vec![0.0; b.logp.len()];
    let (mut loss, mut kl_sum, mut ratio_sum) = (0.0, 0.0, 0.0);
    let (mut clip_low, mut clip_high) = (0usize, 0usize);
    let mut start = 0;
    for (i, &len) in b.lens.iter().enumerate() {
        let range = start..start + len;
        start += len;
        if !included[i] {
            continue;
        }
        let w = weights[i];
        for t in range {
            let tl = token_loss(
                b.logp[t],
                b.old_logp[t],
                b.ref_logp.map(|r| r[t]),
                b.advantages[i],
                o,
            );
            match tl.clip {
                Clip::Low => clip_low += 1,
                Clip::High => clip_high += 1,
                Clip::None => {}
            }
            kl_sum += tl.kl;
            loss += w * tl.loss;
            grad[t] = w * tl.grad;
            ratio_sum += tl.ratio;
        }
    }

    let per_token = |x: f64| if n_tok == 0 { 0.0 } else { x / n_tok as f64 };
    Ok(LossOutput {
        loss,
        grad,
        stats: LossStats {
            tokens: n_tok,
            sequences: n_seq,
            clip_frac_low: per_token(clip_low as f64),
            clip_frac_high: per_token(clip_high as f64),
            kl: per_token(kl_sum),
            ratio_mean: per_token(ratio_sum),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_length_is_checked_even_at_zero_beta() {
        let lp = [-1.0, -2.0];
        let b = LossBatch {
            logp: &lp,
            old_logp: &lp,
            ref_logp: Some(&lp[..1]),
            lens: &[2],
            advantages: &[1.0],
            truncated: &[false],
            keep: None,
        };
        let o = LossOptions {
            beta: 0.0,
            ..LossOptions::default()
        };
        assert!(policy_loss(&b, &o).is_err());
    }

    #[test]
    fn kept_mask_and_truncation_combine() {
        // Three one-token completions, ρ = 1, advantages 1, 2, 4: the first is filtered out,
        // the second truncated and masked; only the third remains.
        let lp = [-1.0; 3];
        let b = LossBatch {
            logp: &lp,
            old_logp: &lp,
            ref_logp: None,
            lens: &[1, 1, 1],
            advantages: &[1.0, 2.0, 4.0],
            truncated: &[false, true, false],
            keep: Some(&[false, true, true]),
        };
        let o = LossOptions {
            beta: 0.0,
            truncated: Truncated::Mask,
            aggregation: Aggregation::TokenMean,
            ..LossOptions::default()
        };
        let out = policy_loss(&b, &o).unwrap();
        assert_eq!(out.loss, -4.0);
        assert_eq!(out.grad, vec![0.0, 0.0, -4.0]);
        assert_eq!((out.stats.tokens, out.stats.sequences), (1, 1));
    }
}
