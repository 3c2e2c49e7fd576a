//! One `metrics.jsonl` line per training step, and the summary statistics that fill it.

use serde::{Deserialize, Serialize};

/// The keys external checks read are the first seventeen; the rest add detail.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub budget: usize,
    pub reward: f64,
    pub reward_correct: f64,
    pub reward_length: f64,
    pub reward_format: f64,
    pub accuracy: f64,
    pub mean_len: f64,
    pub p50_len: f64,
    pub p90_len: f64,
    pub truncated_frac: f64,
    pub kl: f64,
    pub clip_frac: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub reward_std: f64,
    pub clip_frac_low: f64,
    pub clip_frac_high: f64,
    pub lr: f64,
    pub loss: f64,
    pub mean_len_finished: f64,
    pub mean_len_truncated: f64,
    /// The update was skipped because the loss or the gradient was not finite.
    pub skipped: bool,
    /// Mean |logπθ − logπsampler| over the scored tokens: the trainer's log-probs at the step's
    /// first forward pass against those the sampler saw (decode path, same weights).
    #[serde(default)]
    pub logp_gap: f64,
    /// Seconds of the step's rollout (sampling every completion).
    #[serde(default)]
    pub rollout_s: f64,
    /// Seconds of the step's update (reference log-probs when β > 0, then the policy update).
    #[serde(default)]
    pub update_s: f64,
    /// Population standard deviations of the reward's parts over the step's completions (the
    /// means are reward_correct, reward_length and reward_format).
    #[serde(default)]
    pub reward_correct_std: f64,
    #[serde(default)]
    pub reward_length_std: f64,
    #[serde(default)]
    pub reward_format_std: f64,
    /// Completions per forward and backward pass of the step's update: less than the run's
    /// `micro_batch` after a pass ran out of device memory.
    #[serde(default)]
    pub micro_batch: usize,
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Population standard deviation.
pub fn std(xs: &[f64]) -> f64 {
    let m = mean(xs);
    mean(&xs.iter().map(|x| (x - m) * (x - m)).collect::<Vec<_>>()).sqrt()
}

/// The q-quantile (0..=1) by linear interpolation between order statistics (numpy's default).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_numpy() {
        let xs = [7.0, 1.0, 3.0, 10.0];
        // numpy.quantile([1, 3, 7, 10], [0.5, 0.9]) = [5.0, 9.1]
        assert!((quantile(&xs, 0.5) - 5.0).abs() < 1e-12);
        assert!((quantile(&xs, 0.9) - 9.1).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert!((std(&[1.0, 3.0]) - 1.0).abs() < 1e-12);
    }
}
