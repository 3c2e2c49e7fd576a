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
    /// The verdicts of the same problems, in the same order, before and after; None when the
    /// two evaluations did not judge the same number of problems.
    pub fn new(before: &[bool], after: &[bool]) -> Option<Self> {
        if before.len() != after.len() || before.is_empty() {
            return None;
        }
        let count = |from: bool| {
            before
                .iter()
                .zip(after)
                .filter(|&(&b, &a)| b == from && a != from)
                .count()
        };
        Some(PairedChange {
            problems: before.len(),
            gained: count(false),
            lost: count(true),
        })
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
        let p = PairedChange::new(&before, &after).unwrap();
        assert_eq!((p.problems, p.gained, p.lost), (200, 14, 24));
        assert!((p.change() + 0.05).abs() < 1e-15);
        let (lo, hi) = p.interval95().unwrap();
        assert!((lo - (-0.05 - 0.060012)).abs() < 1e-6, "{lo}");
        assert!((hi - (-0.05 + 0.060012)).abs() < 1e-6, "{hi}");
    }

    /// Nothing moved: a change of 0 and no interval; different problem counts: no comparison.
    #[test]
    fn no_change_and_mismatched_evaluations() {
        let v = [true, false, true];
        let p = PairedChange::new(&v, &v).unwrap();
        assert_eq!(
            (p.gained, p.lost, p.change(), p.interval95()),
            (0, 0, 0.0, None)
        );
        assert_eq!(PairedChange::new(&v, &v[..2]), None);
        assert_eq!(PairedChange::new(&[], &[]), None);
    }
}
