//! The GRPO loss ops against the CPU: `group_advantages` under every option, the fused
//! `policy_loss_backward` (log-probs, statistics, dlogits) with and without old and reference
//! log-probs, and the `column_sums` that reduce its statistics.

use super::optimizer::TOL_F64_SUM;
use super::{get, put, put_f32, Checker, Compared, TOL_BF16, TOL_EXACT};
use crate::backend::cpu::CpuBackend;
use crate::backend::{policy_stat, PolicyTokens, TrainBackend, POLICY_STATS};
use crate::grpo::{AdvantageOptions, LossOptions, Scale, StdKind};
use anyhow::Result;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    let cpu = CpuBackend;

    // group_advantages: f64 arithmetic in the CPU's order on both sides, so equal bit for bit.
    // Rewards on a coarse grid so some groups are all equal (exact zeros).
    for (n, g) in [(8, 4), (1024, 8), (300, 3)] {
        for std in [StdKind::Population, StdKind::Unbiased] {
            for scale in [Scale::Group, Scale::Batch, Scale::None] {
                let opts = AdvantageOptions {
                    std,
                    scale,
                    ..AdvantageOptions::default()
                };
                let shape = format!("N={n} G={g} std={std:?} scale={scale:?}");
                c.check("group_advantages", shape, TOL_EXACT, |dev, rand| {
                    let rewards: Vec<f64> = rand
                        .uniform(n)
                        .iter()
                        .map(|u| (u * 3.0).floor() * 0.7)
                        .collect();
                    let mut out = dev.zeros_f32(n)?;
                    dev.group_advantages(dev.full_mut(&mut out), &rewards, g, &opts);
                    let mut reference = vec![0.0; n];
                    cpu.group_advantages(&mut reference, &rewards, g, &opts);
                    Ok(vec![("", get(dev, &out)?, reference)])
                })?;
            }
        }
    }

    // policy_loss_backward: completions of 1..40 rows, two of them left out (weight 0).
    // "given" runs old log-probs ~0.3 away (both clip bounds hit) and the KL at β = 0.05.
    for (r, v, f32_logits) in [(3, 151_936, false), (3, 151_936, true), (97, 1001, false)] {
        for given in [false, true] {
            let shape = format!(
                "R={r} V={v} T=0.7 logits={} old/ref={}",
                if f32_logits { "f32" } else { "bf16" },
                if given { "given, beta 0.05" } else { "none" }
            );
            c.check("policy_loss_backward", shape, TOL_BF16, |dev, rand| {
                let host = rand.normal(r * v, 3.0);
                let (logits, logits_h) = if f32_logits {
                    put_f32(dev, &host)?
                } else {
                    put(dev, &host)?
                };
                let targets = rand.ids(r, v);
                let mut seqs = Vec::with_capacity(r);
                let mut lens = Vec::new();
                while seqs.len() < r {
                    let len = (1 + rand.ids(1, 40)[0] as usize).min(r - seqs.len());
                    seqs.extend(std::iter::repeat_n(lens.len() as u32, len));
                    lens.push(len);
                }
                let n = lens.len();
                let weights_h: Vec<f32> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        if i % 3 == 1 {
                            0.0
                        } else {
                            1.0 / (n * l) as f32
                        }
                    })
                    .collect();
                let (advantages, adv_h) = put_f32(dev, &rand.normal(n, 1.0))?;
                let (weights, weights_h) = put_f32(dev, &weights_h)?;
                // Old and reference log-probs ~0.3 from the device's own log-probs, so ρ spreads
                // over both clip bounds instead of overflowing.
                let (mut logp0, _) = put_f32(dev, &vec![0.0; r])?;
                let (mut entropy0, _) = put_f32(dev, &vec![0.0; r])?;
                dev.logprob_forward(
                    dev.full_mut(&mut logp0),
                    dev.full_mut(&mut entropy0),
                    dev.full(&logits),
                    &targets,
                    v,
                    0.7,
                );
                let logp0 = get(dev, &logp0)?;
                let near = |rand: &mut super::Rand| -> Vec<f32> {
                    logp0
                        .iter()
                        .zip(rand.normal(r, 0.3))
                        .map(|(l, e)| l + e)
                        .collect()
                };
                let (old, old_h) = put_f32(dev, &near(rand))?;
                let (reference, ref_h) = put_f32(dev, &near(rand))?;
                let o = LossOptions {
                    beta: if given { 0.05 } else { 0.0 },
                    ..LossOptions::default()
                };
                let (mut dlogits, _) = put(dev, &rand.normal(r * v, 1.0))?; // overwritten
                let (mut logp, _) = put_f32(dev, &rand.normal(r, 1.0))?;
                let (mut stats, _) = put_f32(dev, &rand.normal(r * POLICY_STATS, 1.0))?;
                let tokens = PolicyTokens::<D> {
                    seqs: &seqs,
                    advantages: dev.full(&advantages),
                    weights: dev.full(&weights),
                    old_logp: given.then(|| dev.full(&old)),
                    ref_logp: given.then(|| dev.full(&reference)),
                };
                dev.policy_loss_backward(
                    dev.full_mut(&mut dlogits),
                    dev.full_mut(&mut logp),
                    dev.full_mut(&mut stats),
                    dev.full(&logits),
                    &targets,
                    &tokens,
                    v,
                    0.7,
                    &o,
                );
                let (mut dlogits_ref, mut logp_ref) = (vec![0.0; r * v], vec![0.0; r]);
                let mut stats_ref = vec![0.0; r * POLICY_STATS];
                let tokens_ref = PolicyTokens::<CpuBackend> {
                    seqs: &seqs,
                    advantages: &adv_h,
                    weights: &weights_h,
                    old_logp: given.then_some(&old_h[..]),
                    ref_logp: given.then_some(&ref_h[..]),
                };
                cpu.policy_loss_backward(
                    &mut dlogits_ref,
                    &mut logp_ref,
                    &mut stats_ref,
                    &logits_h,
                    &targets,
                    &tokens_ref,
                    v,
                    0.7,
                    &o,
                );
                let stats = get(dev, &stats)?;
                let mut out: Vec<Compared> = vec![
                    ("dlogits", get(dev, &dlogits)?, dlogits_ref),
                    ("logp", get(dev, &logp)?, logp_ref),
                ];
                for (name, col) in [
                    ("entropy", policy_stat::ENTROPY),
                    ("loss", policy_stat::LOSS),
                    ("kl", policy_stat::KL),
                    ("ratio", policy_stat::RATIO),
                    ("clip_low", policy_stat::CLIP_LOW),
                    ("clip_high", policy_stat::CLIP_HIGH),
                ] {
                    let column = |s: &[f32]| -> Vec<f32> {
                        s.iter().skip(col).step_by(POLICY_STATS).copied().collect()
                    };
                    out.push((name, column(&stats), column(&stats_ref)));
                }
                Ok(out)
            })?;
        }
    }

    // column_sums over the statistics' shape, at and well above one block's 256 threads.
    for rows in [1, 1000, 100_003] {
        let shape = format!("R={rows} cols={POLICY_STATS}");
        c.check("column_sums", shape, TOL_F64_SUM, |dev, rand| {
            let (x, x_h) = put_f32(dev, &rand.normal(rows * POLICY_STATS, 1.0))?;
            let (mut out, _) = put_f32(dev, &rand.normal(2 * POLICY_STATS, 1.0))?; // overwritten
            dev.column_sums(dev.full_mut(&mut out), dev.full(&x), POLICY_STATS);
            let mut reference = vec![0.0; 2 * POLICY_STATS];
            cpu.column_sums(&mut reference, &x_h, POLICY_STATS);
            Ok(vec![("", get(dev, &out)?, reference)])
        })?;
    }
    Ok(())
}
