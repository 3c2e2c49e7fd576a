//! Group-normalised advantages (METHOD.md §4): A_i = (r_i − mean_g) / (std + ε) within each
//! group of G completions of one prompt, and the optional filter that drops groups whose
//! completions are all right or all wrong.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which standard deviation divides the centred rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StdKind {
    /// Divide by n (the paper, DeepSeekMath).
    #[default]
    Population,
    /// Divide by n − 1 (TRL, torchtune); a group of one has std 0.
    Unbiased,
}

/// What the centred rewards are divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scale {
    /// The group's own std (default).
    #[default]
    Group,
    /// The std of all rewards in the batch (centring stays per group).
    Batch,
    /// No scaling: A = r − mean (Dr. GRPO).
    None,
}

/// The `[advantage]` knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageOptions {
    pub std: StdKind,
    /// Added to the std before dividing.
    pub eps: f64,
    pub scale: Scale,
    /// Drop groups whose raw correctness is all equal (applied by the caller through
    /// [`keep_mixed_groups`]; not used by [`advantages`]).
    pub filter_groups: bool,
}

impl Default for AdvantageOptions {
    fn default() -> Self {
        AdvantageOptions {
            std: StdKind::Population,
            eps: 1e-4,
            scale: Scale::Group,
            filter_groups: false,
        }
    }
}

/// Checks that `n` completions split into whole groups of `group_size`.
pub fn check_groups(n: usize, group_size: usize) -> Result<()> {
    if group_size == 0 || !n.is_multiple_of(group_size) {
        bail!("{n} completions do not split into groups of {group_size}");
    }
    Ok(())
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn std(xs: &[f64], kind: StdKind) -> f64 {
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    let dof = match kind {
        StdKind::Population => xs.len(),
        StdKind::Unbiased => xs.len().saturating_sub(1),
    };
    if dof == 0 {
        0.0
    } else {
        (ss / dof as f64).sqrt()
    }
}

/// Advantages for a flat reward vector laid out group after group (G = `group_size`).
/// A group whose rewards are all equal gets exact zeros under every option (the float mean of
/// equal numbers need not equal them, so this is decided by comparison, not arithmetic).
pub fn advantages(rewards: &[f64], group_size: usize, opts: &AdvantageOptions) -> Result<Vec<f64>> {
    check_groups(rewards.len(), group_size)?;
    let batch_std = std(rewards, opts.std);
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        if group.iter().all(|&r| r == group[0]) {
            out.extend(std::iter::repeat_n(0.0, group.len()));
            continue;
        }
        let m = mean(group);
        let denom = match opts.scale {
            Scale::Group => std(group, opts.std) + opts.eps,
            Scale::Batch => batch_std + opts.eps,
            Scale::None => 1.0,
        };
        out.extend(group.iter().map(|&r| (r - m) / denom));
    }
    Ok(out)
}

/// The group filter's keep mask, one entry per completion (equal within a group): false for
/// groups whose completions are all correct or all wrong. It judges raw correctness, never the
/// length-shaped total, which would keep all-wrong groups that differ only in length and push
/// the policy toward short wrong answers (METHOD.md §5).
pub fn keep_mixed_groups(correct: &[bool], group_size: usize) -> Result<Vec<bool>> {
    check_groups(correct.len(), group_size)?;
    let mut keep = Vec::with_capacity(correct.len());
    for group in correct.chunks(group_size) {
        let mixed = group.iter().any(|&c| c != group[0]);
        keep.extend(std::iter::repeat_n(mixed, group.len()));
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_kinds_by_hand() {
        // The textbook set: mean 5, squared deviations sum to 32.
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(std(&xs, StdKind::Population), 2.0);
        assert!((std(&xs, StdKind::Unbiased) - (32.0f64 / 7.0).sqrt()).abs() < 1e-15);
        assert_eq!(std(&[3.0], StdKind::Unbiased), 0.0); // no degrees of freedom
    }
}
