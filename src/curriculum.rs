//! Budget curricula (METHOD.md §6): the token budget B(t) written into the prompt and used as L
//! in the length reward, and the generation cap κ·B(t).
//!
//! [`Schedule`] is the configuration (the `[schedule]` table); [`Curriculum`] is the running
//! object: the fixed schedules are pure functions of the step, the adaptive one is a small
//! state machine fed by [`Curriculum::observe`]. A `Curriculum` serialises whole, so a resumed
//! run continues exactly where it stopped.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A budget schedule. In TOML it is the `[schedule]` table: `kind` plus that kind's
/// parameters; unset parameters take the paper's values (B0 = 256, γ = 0.7, T = 150, Bf = 87,
/// n = 3), `steps` unset means the run's total steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScheduleTable", into = "ScheduleTable")]
pub enum Schedule {
    /// B(t) = max(1, floor(B0·γ^floor(t/T))) (paper default).
    ExponentialStep {
        b0: usize,
        gamma: f64,
        interval: usize,
    },
    /// n geometric drops from B0 to Bf, d = (Bf/B0)^(1/n), one every steps/(n+1) steps.
    Generalised {
        b0: usize,
        bf: usize,
        n: usize,
        steps: Option<usize>,
    },
    /// n equal drops from B0 to Bf at the same steps as `Generalised`.
    Linear {
        b0: usize,
        bf: usize,
        n: usize,
        steps: Option<usize>,
    },
    /// A fixed budget (the paper's baseline: 87).
    Constant { b: usize },
    /// Explicit (first step, budget) pairs; the first starts at step 0, steps increase.
    List { budgets: Vec<(usize, usize)> },
    /// Ours: B0·γ^k after k tightenings, floored at Bf. The first tightening comes after
    /// `interval` steps; each later one waits until at least `interval` steps ran at the
    /// current budget and the mean training accuracy over the last `window` of them is within
    /// `tolerance` of the mean measured just before the previous tightening.
    Adaptive {
        b0: usize,
        gamma: f64,
        bf: usize,
        interval: usize,
        window: usize,
        tolerance: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ScheduleKind {
    #[default]
    ExponentialStep,
    Generalised,
    Linear,
    Constant,
    List,
    Adaptive,
}

impl ScheduleKind {
    fn name(self) -> &'static str {
        match self {
            ScheduleKind::ExponentialStep => "exponential-step",
            ScheduleKind::Generalised => "generalised",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Constant => "constant",
            ScheduleKind::List => "list",
            ScheduleKind::Adaptive => "adaptive",
        }
    }
}

/// The `[schedule]` table as written: a plain struct (rather than a tagged enum) so that type
/// errors name the field, e.g. `schedule.b0`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleTable {
    #[serde(default)]
    kind: ScheduleKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b0: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gamma: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bf: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<usize>,
    #[serde(
        default,
        deserialize_with = "step_budget_pairs",
        skip_serializing_if = "Option::is_none"
    )]
    budgets: Option<Vec<(usize, usize)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tolerance: Option<f64>,
}

/// `budgets = [[step, budget], ...]`, each entry exactly a pair (a tuple's deserializer leaves
/// a third number unread and unsaid).
fn step_budget_pairs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<(usize, usize)>>, D::Error> {
    let entries: Vec<Vec<usize>> = Vec::deserialize(d)?;
    let pair = |e: Vec<usize>| match e[..] {
        [step, budget] => Ok((step, budget)),
        _ => Err(serde::de::Error::custom(format!(
            "each entry is [step, budget], got {e:?}"
        ))),
    };
    entries
        .into_iter()
        .map(pair)
        .collect::<Result<_, _>>()
        .map(Some)
}

impl TryFrom<ScheduleTable> for Schedule {
    type Error = String;

    fn try_from(t: ScheduleTable) -> Result<Self, String> {
        let allowed: &[&str] = match t.kind {
            ScheduleKind::ExponentialStep => &["b0", "gamma", "interval"],
            ScheduleKind::Generalised | ScheduleKind::Linear => &["b0", "bf", "n", "steps"],
            ScheduleKind::Constant => &["b"],
            ScheduleKind::List => &["budgets"],
            ScheduleKind::Adaptive => &["b0", "gamma", "bf", "interval", "window", "tolerance"],
        };
        let present = [
            ("b0", t.b0.is_some()),
            ("gamma", t.gamma.is_some()),
            ("interval", t.interval.is_some()),
            ("bf", t.bf.is_some()),
            ("n", t.n.is_some()),
            ("steps", t.steps.is_some()),
            ("b", t.b.is_some()),
            ("budgets", t.budgets.is_some()),
            ("window", t.window.is_some()),
            ("tolerance", t.tolerance.is_some()),
        ];
        if let Some((name, _)) = present.iter().find(|(n, p)| *p && !allowed.contains(n)) {
            return Err(format!(
                "unknown field `{name}`, the {} schedule takes {}",
                t.kind.name(),
                allowed.join(", ")
            ));
        }
        let (b0, gamma, interval) = (
            t.b0.unwrap_or(PAPER_B0),
            t.gamma.unwrap_or(PAPER_GAMMA),
            t.interval.unwrap_or(PAPER_INTERVAL),
        );
        let (bf, n, steps) = (t.bf.unwrap_or(PAPER_BF), t.n.unwrap_or(PAPER_N), t.steps);
        Ok(match t.kind {
            ScheduleKind::ExponentialStep => Schedule::ExponentialStep {
                b0,
                gamma,
                interval,
            },
            ScheduleKind::Generalised => Schedule::Generalised { b0, bf, n, steps },
            ScheduleKind::Linear => Schedule::Linear { b0, bf, n, steps },
            ScheduleKind::Constant => Schedule::Constant {
                b: t.b.unwrap_or(PAPER_BF),
            },
            ScheduleKind::List => Schedule::List {
                budgets: t.budgets.ok_or("missing field `budgets`")?,
            },
            ScheduleKind::Adaptive => Schedule::Adaptive {
                b0,
                gamma,
                bf,
                interval,
                window: t.window.unwrap_or(ADAPTIVE_WINDOW),
                tolerance: t.tolerance.unwrap_or(ADAPTIVE_TOLERANCE),
            },
        })
    }
}

impl From<Schedule> for ScheduleTable {
    fn from(s: Schedule) -> Self {
        let t = ScheduleTable::default();
        match s {
            Schedule::ExponentialStep {
                b0,
                gamma,
                interval,
            } => ScheduleTable {
                kind: ScheduleKind::ExponentialStep,
                b0: Some(b0),
                gamma: Some(gamma),
                interval: Some(interval),
                ..t
            },
            Schedule::Generalised { b0, bf, n, steps } | Schedule::Linear { b0, bf, n, steps } => {
                let kind = if matches!(s, Schedule::Linear { .. }) {
                    ScheduleKind::Linear
                } else {
                    ScheduleKind::Generalised
                };
                ScheduleTable {
                    kind,
                    b0: Some(b0),
                    bf: Some(bf),
                    n: Some(n),
                    steps,
                    ..t
                }
            }
            Schedule::Constant { b } => ScheduleTable {
                kind: ScheduleKind::Constant,
                b: Some(b),
                ..t
            },
            Schedule::List { budgets } => ScheduleTable {
                kind: ScheduleKind::List,
                budgets: Some(budgets),
                ..t
            },
            Schedule::Adaptive {
                b0,
                gamma,
                bf,
                interval,
                window,
                tolerance,
            } => ScheduleTable {
                kind: ScheduleKind::Adaptive,
                b0: Some(b0),
                gamma: Some(gamma),
                bf: Some(bf),
                interval: Some(interval),
                window: Some(window),
                tolerance: Some(tolerance),
                ..t
            },
        }
    }
}

const PAPER_B0: usize = 256;
const PAPER_GAMMA: f64 = 0.7;
const PAPER_INTERVAL: usize = 150;
const PAPER_BF: usize = 87;
const PAPER_N: usize = 3;
const ADAPTIVE_WINDOW: usize = 50;
const ADAPTIVE_TOLERANCE: f64 = 0.02;

impl Default for Schedule {
    fn default() -> Self {
        Schedule::ExponentialStep {
            b0: PAPER_B0,
            gamma: PAPER_GAMMA,
            interval: PAPER_INTERVAL,
        }
    }
}

/// floor(b0·γ^k), at least 1. The tiny slack keeps products that are integers on paper
/// (100·0.7² = 49) from flooring one lower through binary rounding (48.999…).
fn geometric(b0: usize, gamma: f64, k: usize) -> usize {
    let x = b0 as f64 * gamma.powi(k as i32);
    ((x * (1.0 + 1e-12)).floor() as usize).max(1)
}

/// The index of the drop in effect at `step` for n drops spread evenly over `steps`
/// (interval steps/(n+1), in exact integer arithmetic).
fn drop_index(step: usize, n: usize, steps: usize) -> usize {
    (step.saturating_mul(n + 1) / steps.max(1)).min(n)
}

impl Schedule {
    /// Checks the parameters; errors name the key as `schedule.<field>`.
    pub fn validate(&self, total_steps: usize) -> Result<()> {
        let positive = |name: &str, v: usize| -> Result<()> {
            if v == 0 {
                bail!("schedule.{name} must be ≥ 1, got 0");
            }
            Ok(())
        };
        let gamma_ok = |g: f64| -> Result<()> {
            if !(g > 0.0 && g <= 1.0) {
                bail!("schedule.gamma must be in (0, 1], got {g}");
            }
            Ok(())
        };
        let decay = |b0: usize, bf: usize, n: usize, steps: Option<usize>| -> Result<()> {
            positive("b0", b0)?;
            positive("bf", bf)?;
            positive("n", n)?;
            if bf > b0 {
                bail!("schedule.bf ({bf}) must not exceed schedule.b0 ({b0})");
            }
            let steps = steps.unwrap_or(total_steps);
            if steps < n + 1 {
                bail!("schedule.steps ({steps}) must be ≥ schedule.n + 1 ({}) so every drop gets a step", n + 1);
            }
            Ok(())
        };
        match self {
            Schedule::ExponentialStep {
                b0,
                gamma,
                interval,
            } => {
                positive("b0", *b0)?;
                gamma_ok(*gamma)?;
                positive("interval", *interval)
            }
            Schedule::Generalised { b0, bf, n, steps } | Schedule::Linear { b0, bf, n, steps } => {
                decay(*b0, *bf, *n, *steps)
            }
            Schedule::Constant { b } => positive("b", *b),
            Schedule::List { budgets } => {
                if budgets.first().map(|s| s.0) != Some(0) {
                    bail!("schedule.budgets must start with a [0, budget] pair");
                }
                for w in budgets.windows(2) {
                    if w[1].0 <= w[0].0 {
                        bail!(
                            "schedule.budgets must have increasing steps, got {} after {}",
                            w[1].0,
                            w[0].0
                        );
                    }
                }
                if let Some(&(s, _)) = budgets.iter().find(|p| p.1 == 0) {
                    bail!("schedule.budgets: the budget from step {s} must be ≥ 1, got 0");
                }
                Ok(())
            }
            Schedule::Adaptive {
                b0,
                gamma,
                bf,
                interval,
                window,
                tolerance,
            } => {
                positive("b0", *b0)?;
                gamma_ok(*gamma)?;
                positive("bf", *bf)?;
                if bf > b0 {
                    bail!("schedule.bf ({bf}) must not exceed schedule.b0 ({b0})");
                }
                positive("interval", *interval)?;
                positive("window", *window)?;
                if !(*tolerance >= 0.0 && tolerance.is_finite()) {
                    bail!("schedule.tolerance must be a finite number ≥ 0, got {tolerance}");
                }
                Ok(())
            }
        }
    }
}

/// State of the adaptive schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveState {
    /// Tightenings so far (k in B0·γ^k).
    pub tightenings: usize,
    /// First step run at the current budget.
    pub since: usize,
    /// Mean accuracy over the window just before the last tightening (None before the first).
    pub reference: Option<f64>,
    /// The most recent accuracies at the current budget, at most `window` of them.
    pub recent: VecDeque<f64>,
    /// (first step, budget) of every budget so far, so past steps keep their budgets.
    pub history: Vec<(usize, usize)>,
}

/// A schedule bound to a run: its total steps and, for the adaptive schedule, its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curriculum {
    pub schedule: Schedule,
    pub total_steps: usize,
    pub adaptive: Option<AdaptiveState>,
}

impl Curriculum {
    pub fn new(schedule: Schedule, total_steps: usize) -> Result<Self> {
        schedule.validate(total_steps)?;
        let adaptive = match &schedule {
            Schedule::Adaptive { b0, .. } => Some(AdaptiveState {
                tightenings: 0,
                since: 0,
                reference: None,
                recent: VecDeque::new(),
                history: vec![(0, *b0)],
            }),
            _ => None,
        };
        Ok(Curriculum {
            schedule,
            total_steps,
            adaptive,
        })
    }

    /// The budget B(step). For the adaptive schedule: the budget in effect at that step as far
    /// as observed so far (future steps get the current budget).
    pub fn budget_at(&self, step: usize) -> usize {
        match &self.schedule {
            Schedule::ExponentialStep {
                b0,
                gamma,
                interval,
            } => geometric(*b0, *gamma, step / interval),
            Schedule::Generalised { b0, bf, n, steps } => {
                let k = drop_index(step, *n, steps.unwrap_or(self.total_steps));
                if k == *n {
                    return *bf; // exactly Bf at the end, whatever the rounding on the way
                }
                let d = (*bf as f64 / *b0 as f64).powf(1.0 / *n as f64);
                ((*b0 as f64 * d.powi(k as i32)).round() as usize).max(1)
            }
            Schedule::Linear { b0, bf, n, steps } => {
                let k = drop_index(step, *n, steps.unwrap_or(self.total_steps));
                let drop = (*b0 - *bf) as f64 * k as f64 / *n as f64;
                (*b0 as f64 - drop).round() as usize
            }
            Schedule::Constant { b } => *b,
            Schedule::List { budgets } => last_at(budgets, step),
            Schedule::Adaptive { .. } => last_at(
                &self.adaptive.as_ref().expect("adaptive state").history,
                step,
            ),
        }
    }

    /// The budget the run ends at: B(last step); for the adaptive schedule, whose later budgets
    /// depend on the training accuracy, its floor bf. The held-out evaluation and the
    /// fixed-budget preset use it.
    pub fn final_budget(&self) -> usize {
        match &self.schedule {
            Schedule::Adaptive { bf, .. } => *bf,
            _ => self.budget_at(self.total_steps.saturating_sub(1)),
        }
    }

    /// The generation cap κ·B(step), rounded up (at least 1).
    pub fn cap_at(&self, step: usize, kappa: f64) -> usize {
        generation_cap(self.budget_at(step), kappa)
    }

    /// Feeds the training accuracy (0..=1) of `step`; call once per step, in order. Only the
    /// adaptive schedule listens: a tightening decided here takes effect from `step + 1`.
    pub fn observe(&mut self, step: usize, accuracy: f64) {
        let Schedule::Adaptive {
            b0,
            gamma,
            bf,
            interval,
            window,
            tolerance,
        } = self.schedule
        else {
            return;
        };
        let s = self.adaptive.as_mut().expect("adaptive state");
        s.recent.push_back(accuracy);
        if s.recent.len() > window {
            s.recent.pop_front();
        }
        let budget = s.history.last().expect("history starts at step 0").1;
        let ran = step + 1 - s.since.min(step + 1);
        if budget <= bf || ran < interval || s.recent.len() < window {
            return;
        }
        let level = s.recent.iter().sum::<f64>() / s.recent.len() as f64;
        // The first tightening is unconditional: there is no earlier level to hold.
        if s.reference.is_some_and(|r| level < r - tolerance) {
            return;
        }
        s.tightenings += 1;
        s.reference = Some(level);
        s.since = step + 1;
        s.recent.clear();
        let next = geometric(b0, gamma, s.tightenings).max(bf);
        if next != budget {
            s.history.push((step + 1, next));
        }
    }
}

/// The budget of the last (first step, budget) pair starting at or before `step`.
fn last_at(pairs: &[(usize, usize)], step: usize) -> usize {
    pairs
        .iter()
        .take_while(|p| p.0 <= step)
        .last()
        .map_or(pairs[0].1, |p| p.1)
}

/// κ·budget rounded up, at least 1 (κ = 2: a completion longer than 2L earns no length reward).
pub fn generation_cap(budget: usize, kappa: f64) -> usize {
    ((budget as f64 * kappa * (1.0 - 1e-12)).ceil() as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_index_spreads_drops_evenly() {
        // 600 steps, 3 drops: intervals of 150.
        let idx: Vec<usize> = [0, 149, 150, 299, 300, 450, 599, 10_000]
            .iter()
            .map(|&s| drop_index(s, 3, 600))
            .collect();
        assert_eq!(idx, [0, 0, 1, 1, 2, 3, 3, 3]);
        // Uneven: 10 steps, 2 drops → drops at 10/3 and 20/3, i.e. at steps 4 and 7.
        let idx: Vec<usize> = (0..10).map(|s| drop_index(s, 2, 10)).collect();
        assert_eq!(idx, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }

    /// The paper's main setting ends at 87; the adaptive schedule's end is its floor bf, not
    /// the budget it starts from (its later budgets are not known before the run).
    #[test]
    fn final_budget_is_the_last_steps_or_the_adaptive_floor() {
        let paper = Curriculum::new(Schedule::default(), 600).unwrap();
        assert_eq!(paper.final_budget(), 87);
        assert_eq!(paper.final_budget(), paper.budget_at(599));
        let adaptive = Schedule::Adaptive {
            b0: 256,
            gamma: 0.7,
            bf: 87,
            interval: 150,
            window: 20,
            tolerance: 0.05,
        };
        let c = Curriculum::new(adaptive, 600).unwrap();
        assert_eq!(c.budget_at(599), 256);
        assert_eq!(c.final_budget(), 87);
    }

    #[test]
    fn schedule_table_round_trips_every_kind() {
        let kinds = [
            Schedule::default(),
            Schedule::Generalised {
                b0: 300,
                bf: 50,
                n: 2,
                steps: Some(90),
            },
            Schedule::Linear {
                b0: 300,
                bf: 50,
                n: 2,
                steps: None,
            },
            Schedule::Constant { b: 64 },
            Schedule::List {
                budgets: vec![(0, 9), (5, 3)],
            },
            Schedule::Adaptive {
                b0: 200,
                gamma: 0.5,
                bf: 20,
                interval: 7,
                window: 3,
                tolerance: 0.1,
            },
        ];
        for s in kinds {
            let back: Schedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(back, s);
        }
    }
}
