//! Medians with min and max, and how sure a ratio of two engines' runs is.
//!
//! A row's runs spread by 20-50 % on a shared 2-core machine, so a ratio of
//! medians near a floor can land on either side of it from one window to
//! the next. [`RatioInterval`] says how far the ratio can be trusted: the
//! Hodges-Lehmann estimate of the ratio of two samples' locations (the
//! median of every pairwise ratio) with its distribution-free confidence
//! interval from the exact Mann-Whitney distribution (Bauer 1972; the
//! exact procedure of R's `wilcox.test(log(x), log(y), conf.int = TRUE)`,
//! exponentiated).
//! It assumes only that the runs of each engine are independent draws and
//! that the engines differ by a factor. Written out here because no
//! well-kept crate offers the exact interval (criterion bootstraps inside
//! itself and does not export it; bootstrapping 3-5 runs is no better).

use serde::Serialize;

/// Median, min and max of some values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// `None` for no values; NaNs are ignored.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(Self {
            median: median_of_sorted(&v),
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// The median of sorted, non-empty `v` (the mean of the middle two for an
/// even count).
fn median_of_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The confidence the interval aims for (it takes the nearest level the
/// exact distribution allows at or above it, or the highest there is).
pub const CONFIDENCE: f64 = 0.95;

/// The ratio of sample `x`'s location to sample `y`'s, with a
/// distribution-free confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioInterval {
    /// Hodges-Lehmann estimate: the median of every `x_i / y_j`.
    pub estimate: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// The confidence the interval has (exact, for these sample sizes):
    /// 0.968 for 5 runs against 5, 0.9 for 3 against 3.
    pub confidence: f64,
}

impl RatioInterval {
    /// For two samples of positive values (others are ignored); `None`
    /// when either has none left.
    pub fn of(x: &[f64], y: &[f64]) -> Option<Self> {
        let logs = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .filter(|a| a.is_finite() && **a > 0.0)
                .map(|a| a.ln())
                .collect()
        };
        let (x, y) = (logs(x), logs(y));
        let (n, m) = (x.len(), y.len());
        if n == 0 || m == 0 {
            return None;
        }
        let mut diffs: Vec<f64> = x
            .iter()
            .flat_map(|a| y.iter().map(move |b| a - b))
            .collect();
        diffs.sort_by(f64::total_cmp);
        let nm = diffs.len();
        let estimate = median_of_sorted(&diffs);
        // The smallest u with P(U <= u) >= alpha / 2 (at least 1): the
        // interval runs from the u-th smallest difference to the u-th
        // largest, and misses with probability 2 P(U <= u - 1).
        let cdf = mann_whitney_cdf(n, m);
        let alpha = 1.0 - CONFIDENCE;
        let u = cdf
            .iter()
            .position(|&p| p >= alpha / 2.0)
            .unwrap_or(0)
            .max(1);
        let confidence = 1.0 - 2.0 * cdf[u - 1];
        Some(Self {
            estimate: estimate.exp(),
            low: diffs[u - 1].exp(),
            high: diffs[nm - u].exp(),
            confidence: confidence.max(0.0),
        })
    }

    /// Where `max` (a floor: the ratio must be at most this) stands.
    pub fn against(&self, max: f64) -> Standing {
        if self.high <= max {
            Standing::Below
        } else if self.low > max {
            Standing::Above
        } else {
            Standing::Straddles
        }
    }
}

/// Where a [`RatioInterval`] lies against a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// All of it at or under the bound.
    Below,
    /// All of it over the bound.
    Above,
    /// The bound lies inside it: these runs cannot tell.
    Straddles,
}

/// P(U <= u) for u = 0..=n*m, U the Mann-Whitney statistic of samples of
/// `n` and `m` under the null hypothesis (every ordering equally likely).
fn mann_whitney_cdf(n: usize, m: usize) -> Vec<f64> {
    // ways[j][u]: orderings of i x-values among j y-values with statistic
    // u, built up one x-value at a time: the new largest x adds the count
    // of y-values below it (0..=j).
    let max = n * m;
    let mut ways = vec![vec![0f64; max + 1]; m + 1];
    for row in &mut ways {
        row[0] = 1.0;
    }
    for i in 1..=n {
        let mut next = vec![vec![0f64; max + 1]; m + 1];
        for j in 0..=m {
            for u in 0..=i * j {
                // The largest of the i + j values is an x (it is above all
                // j y-values: u - j from the rest) or a y (the rest are i
                // x-values among j - 1 y-values).
                let x_top = if u >= j { ways[j][u - j] } else { 0.0 };
                let y_top = if j > 0 { next[j - 1][u] } else { 0.0 };
                next[j][u] = x_top + y_top;
            }
        }
        ways = next;
    }
    let counts = &ways[m];
    let total: f64 = counts.iter().sum();
    let mut acc = 0.0;
    counts
        .iter()
        .map(|c| {
            acc += c;
            acc / total
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_even_and_empty() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of([4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of([]), None);
        assert_eq!(Spread::of([f64::NAN, 5.0]).unwrap().n, 1);
    }

    #[test]
    fn mann_whitney_counts_match_the_tables() {
        // 5 against 5: 252 orderings, 1, 1, 2, 3, 5, 7 of them with
        // U = 0..=5 (the published table).
        let cdf = mann_whitney_cdf(5, 5);
        let counts: Vec<f64> = (0..6)
            .map(|u| 252.0 * (cdf[u] - if u == 0 { 0.0 } else { cdf[u - 1] }))
            .collect();
        for (got, want) in counts.iter().zip([1.0, 1.0, 2.0, 3.0, 5.0, 7.0]) {
            assert!((got - want).abs() < 1e-9, "{counts:?}");
        }
        assert!((cdf[25] - 1.0).abs() < 1e-12);
        // Symmetric: P(U <= u) = P(U >= nm - u).
        let c = mann_whitney_cdf(3, 4);
        for u in 0..12 {
            assert!((c[u] - (1.0 - c[11 - u])).abs() < 1e-12);
        }
    }

    #[test]
    fn the_interval_follows_the_exact_procedure_r_uses() {
        // R's procedure (`wilcox.test(log(x), log(y), conf.int = TRUE)`,
        // exact): qwilcox(0.025, 5, 5) = 3, so the interval runs from the
        // 3rd smallest to the 3rd largest of the 25 pairwise differences
        // and misses with probability 2 * pwilcox(2, 5, 5) = 2 * 4 / 252.
        // (Session 17's 1G idle totals, ferry against QEMU multifd.)
        let x = [403.0, 356.0, 408.0, 437.0, 337.0];
        let y = [464.0, 348.0, 389.0, 371.0, 373.0];
        let r = RatioInterval::of(&x, &y).unwrap();
        // The 3rd smallest and 3rd largest of the 25 pairwise ratios.
        let mut ratios: Vec<f64> = x
            .iter()
            .flat_map(|a| y.iter().map(move |b| a / b))
            .collect();
        ratios.sort_by(f64::total_cmp);
        assert!((r.low - ratios[2]).abs() < 1e-12);
        assert!((r.high - ratios[22]).abs() < 1e-12);
        assert!((r.estimate - ratios[12]).abs() < 1e-12);
        assert!((r.confidence - (1.0 - 2.0 * 4.0 / 252.0)).abs() < 1e-12);
        assert_eq!(r.against(1.0), Standing::Straddles);
    }

    #[test]
    fn three_runs_each_give_the_full_range_at_ninety_percent() {
        let r = RatioInterval::of(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert!((r.low - 1.0 / 6.0).abs() < 1e-12 && (r.high - 0.75).abs() < 1e-12);
        assert!((r.confidence - 0.9).abs() < 1e-12);
        assert_eq!(r.against(1.0), Standing::Below);
        assert_eq!(r.against(0.1), Standing::Above);
    }

    #[test]
    fn clearly_apart_samples_lie_on_one_side() {
        let fast = [100.0, 104.0, 98.0, 101.0, 99.0];
        let slow = [150.0, 149.0, 160.0, 155.0, 151.0];
        let r = RatioInterval::of(&fast, &slow).unwrap();
        assert_eq!(r.against(1.0), Standing::Below);
        assert!(r.estimate > 0.6 && r.estimate < 0.7);
        assert_eq!(
            RatioInterval::of(&slow, &fast).unwrap().against(1.0),
            Standing::Above
        );
        assert_eq!(RatioInterval::of(&[], &fast), None);
        assert_eq!(RatioInterval::of(&[0.0, -1.0], &fast), None);
    }
}
