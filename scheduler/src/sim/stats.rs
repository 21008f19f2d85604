//! The statistics CloudSim 3.0.3's `MathUtil` uses for the adaptive
//! overload detectors, reproduced operation for operation.

/// Median as commons-math `DescriptiveStatistics.getPercentile(50)`:
/// the average of the two middle values for an even count.
pub fn median(data: &[f64]) -> f64 {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, 50.0)
}

/// Percentile with commons-math's default estimation
/// (`pos = p (n + 1) / 100`, linear between neighbours, clamped).
pub fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return v[0];
    }
    let pos = p * (n as f64 + 1.0) / 100.0;
    let fpos = pos.floor();
    let d = pos - fpos;
    if pos < 1.0 {
        return v[0];
    }
    if pos >= n as f64 {
        return v[n - 1];
    }
    let lower = v[fpos as usize - 1];
    let upper = v[fpos as usize];
    lower + d * (upper - lower)
}

/// Median absolute deviation (`MathUtil.mad`).
pub fn mad(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let m = median(data);
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Interquartile range (`MathUtil.iqr`: rounded ranks on the sorted data).
pub fn iqr(data: &[f64]) -> f64 {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let q1 = ((0.25 * (n + 1.0)).round() as usize).saturating_sub(1);
    let q3 = ((0.75 * (n + 1.0)).round() as usize)
        .saturating_sub(1)
        .min(v.len() - 1);
    v[q3] - v[q1]
}

/// Leading non-zero values (`MathUtil.countNonZeroBeginning`).
pub fn count_non_zero_beginning(data: &[f64]) -> usize {
    data.iter().take_while(|x| **x != 0.0).count()
}

/// Tricube weights (`MathUtil.getTricubeWeigts`).
fn tricube_weights(n: usize) -> Vec<f64> {
    let mut w = vec![0.0; n];
    let top = n as f64 - 1.0;
    let spread = top;
    for (i, wi) in w.iter_mut().enumerate().skip(2) {
        let k = (1.0 - ((top - i as f64) / spread).powi(3)).powi(3);
        *wi = if k > 0.0 { 1.0 / k } else { f64::MAX };
    }
    if n > 2 {
        w[0] = w[2];
        w[1] = w[2];
    }
    w
}

/// Tricube-bisquare weights (`MathUtil.getTricubeBisquareWeigts`).
fn tricube_bisquare_weights(residuals: &[f64]) -> Vec<f64> {
    let n = residuals.len();
    let w = tricube_weights(n);
    let abs: Vec<f64> = residuals.iter().map(|r| r.abs()).collect();
    let s6 = median(&abs) * 6.0;
    let mut w2 = vec![0.0; n];
    for i in 2..n {
        let k = (1.0 - (residuals[i] / s6).powi(2)).powi(2);
        w2[i] = if k > 0.0 { (1.0 / k) * w[i] } else { f64::MAX };
    }
    if n > 2 {
        w2[0] = w2[2];
        w2[1] = w2[2];
    }
    w2
}

/// Ordinary least squares `y = a + b x`; `None` when undefined.
fn ols(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let sxx: f64 = x.iter().map(|v| (v - mx) * (v - mx)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    if sxx == 0.0 {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// `MathUtil.createWeigthedLinearRegression`: weights are applied only when
/// at least 40 % of them are non-positive. Tricube weights never are, so in
/// CloudSim 3.0.3 "local regression" is plain least squares: kept as is.
fn weighted_regression(x: &[f64], y: &[f64], w: &[f64]) -> Option<(f64, f64)> {
    let zeros = w.iter().filter(|v| **v <= 0.0).count();
    if zeros as f64 >= 0.4 * w.len() as f64 {
        let xw: Vec<f64> = x.iter().zip(w).map(|(a, b)| b.sqrt() * a).collect();
        let yw: Vec<f64> = y.iter().zip(w).map(|(a, b)| b.sqrt() * a).collect();
        ols(&xw, &yw)
    } else {
        ols(x, y)
    }
}

/// `MathUtil.getLoessParameterEstimates` (intercept, slope) for `y` at x = 1..=n.
pub fn loess_estimates(y: &[f64]) -> Option<(f64, f64)> {
    let x: Vec<f64> = (1..=y.len()).map(|i| i as f64).collect();
    weighted_regression(&x, y, &tricube_weights(y.len()))
}

/// `MathUtil.getRobustLoessParameterEstimates`.
pub fn robust_loess_estimates(y: &[f64]) -> Option<(f64, f64)> {
    let x: Vec<f64> = (1..=y.len()).map(|i| i as f64).collect();
    let (a, b) = weighted_regression(&x, y, &tricube_weights(y.len()))?;
    let residuals: Vec<f64> = x.iter().zip(y).map(|(xi, yi)| yi - (a + b * xi)).collect();
    match weighted_regression(&x, y, &tricube_bisquare_weights(&residuals)) {
        Some((a2, b2)) if !a2.is_nan() && !b2.is_nan() => Some((a2, b2)),
        _ => Some((a, b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_mad_iqr_match_hand_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        // deviations from 2.5: 1.5 .5 .5 1.5 -> median 1.0
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0]), 1.0);
        // n=8: q1 rank round(2.25)=2 -> v[1], q3 round(6.75)=7 -> v[6]
        let d = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(iqr(&d), 7.0 - 2.0);
        assert_eq!(count_non_zero_beginning(&[0.5, 0.1, 0.0, 0.3]), 2);
    }

    #[test]
    fn regression_recovers_a_line() {
        let y: Vec<f64> = (1..=10).map(|x| 0.1 + 0.05 * f64::from(x)).collect();
        let (a, b) = loess_estimates(&y).unwrap();
        assert!((a - 0.1).abs() < 1e-12 && (b - 0.05).abs() < 1e-12);
        let (a, b) = robust_loess_estimates(&y).unwrap();
        assert!((a - 0.1).abs() < 1e-9 && (b - 0.05).abs() < 1e-9);
    }
}
