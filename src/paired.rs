//! The accuracy change between two evaluations of the same problems (before and after training),
//! judged problem by problem: a paired comparison separates a real change from the noise of a
//! few hundred problems better than the two accuracies alone.

/// How the problems' verdicts moved from the first evaluation to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PairedChange {
    /// Problems evaluated both times.
    pub problems: usize,
    /// Wrong before, right after.
    pub gained: usize,
    /// Right before, wrong after.
    pub lost: usize,
}

impl PairedChange {
    /// From the (before, after) verdicts of the problems evaluated both times; None when there
    /// are none.
    pub fn new(verdicts: impl IntoIterator<Item = (bool, bool)>) -> Option<Self> {
        let mut c = PairedChange {
            problems: 0,
            gained: 0,
            lost: 0,
        };
        for (before, after) in verdicts {
            c.problems += 1;
            c.gained += (!before && after) as usize;
            c.lost += (before && !after) as usize;
        }
        (c.problems > 0).then_some(c)
    }

    /// The accuracy change, as a fraction: (gained − lost) / problems.
    pub fn change(&self) -> f64 {
        (self.gained as f64 - self.lost as f64) / self.problems as f64
    }

    /// The 95 % confidence interval of the change (Wald interval for the difference of paired
    /// proportions: standard error √(g + l − (g − l)²/n) / n); None when no problem changed its
    /// verdict, where that interval degenerates to a width of 0.
    pub fn interval95(&self) -> Option<(f64, f64)> {
        if self.gained + self.lost == 0 {
            return None;
        }
        let (g, l, n) = (self.gained as f64, self.lost as f64, self.problems as f64);
        let se = (g + l - (g - l) * (g - l) / n).max(0.0).sqrt() / n;
        let d = self.change();
        Some((d - 1.96 * se, d + 1.96 * se))
    }
}

/// Several sets' changes pooled: their problems and moves add up.
impl std::iter::Sum for PairedChange {
    fn sum<I: Iterator<Item = Self>>(changes: I) -> Self {
        changes.fold(
            PairedChange {
                problems: 0,
                gained: 0,
                lost: 0,
            },
            |a, c| PairedChange {
                problems: a.problems + c.problems,
                gained: a.gained + c.gained,
                lost: a.lost + c.lost,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 problems, 14 gained and 24 lost: −5 points, standard error √(38 − 100/200) / 200 =
    /// 0.0306186, so the interval is −5 ± 6.0012 points (by hand).
    #[test]
    fn interval_of_a_change_by_hand() {
        let mut before = vec![true; 200];
        let mut after = vec![true; 200];
        before[..14].fill(false); // gained
        after[14..38].fill(false); // lost
        before[38..50].fill(false); // wrong both times
        after[38..50].fill(false);
        let p = PairedChange::new(before.into_iter().zip(after)).unwrap();
        assert_eq!((p.problems, p.gained, p.lost), (200, 14, 24));
        assert!((p.change() + 0.05).abs() < 1e-15);
        let (lo, hi) = p.interval95().unwrap();
        assert!((lo - (-0.05 - 0.060012)).abs() < 1e-6, "{lo}");
        assert!((hi - (-0.05 + 0.060012)).abs() < 1e-6, "{hi}");
    }

    /// Nothing moved: a change of 0 and no interval; no problem: no comparison.
    #[test]
    fn no_change_and_no_problems() {
        let v = [(true, true), (false, false), (true, true)];
        let p = PairedChange::new(v).unwrap();
        assert_eq!(
            (p.problems, p.gained, p.lost, p.change(), p.interval95()),
            (3, 0, 0, 0.0, None)
        );
        assert_eq!(PairedChange::new([]), None);
    }

    /// Pooled changes count every set's problems: 3 of 10 gained and 1 of 30 lost is +2 of 40.
    #[test]
    fn pooled_changes_add_their_counts() {
        let a = PairedChange::new((0..10).map(|i| (false, i < 3))).unwrap();
        let b = PairedChange::new((0..30).map(|i| (true, i != 0))).unwrap();
        let all: PairedChange = [a, b].into_iter().sum();
        assert_eq!((all.problems, all.gained, all.lost), (40, 3, 1));
        assert!((all.change() - 0.05).abs() < 1e-15);
    }
}
