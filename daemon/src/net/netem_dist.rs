//! netem's delay distribution tables (`TCA_NETEM_DELAY_DIST`). netem draws
//! jitter as `table[random % size] * jitter / NETEM_DIST_SCALE`, so a table
//! is 4,096 samples of a distribution's inverse CDF in units of 1/8192 of
//! the jitter. tc(8) reads them from iproute2's `.dist` files; chaosd
//! computes the same tables itself (the way iproute2's maketable programs
//! do) so that it needs no file from another package, and the tests compare
//! the result with the files Debian ships.

use std::sync::OnceLock;

use crate::spec::Distribution;

/// NETEM_DIST_SCALE: one standard deviation (normal) in table units.
const SCALE: f64 = 8192.0;
/// Resolution of the inverse CDF before every fourth value is kept.
const FINE: usize = 16384;
/// Shape of the Pareto distribution.
const PARETO_A: f64 = 3.0;

/// The table for `d`, or None for uniform (netem's default, no table).
pub fn table(d: Distribution) -> Option<&'static [i16]> {
    static NORMAL: OnceLock<Vec<i16>> = OnceLock::new();
    static PARETO: OnceLock<Vec<i16>> = OnceLock::new();
    static PARETO_NORMAL: OnceLock<Vec<i16>> = OnceLock::new();
    match d {
        Distribution::Uniform => None,
        Distribution::Normal => Some(NORMAL.get_or_init(normal)),
        Distribution::Pareto => Some(PARETO.get_or_init(|| (0..FINE / 4).map(|k| clamp(pareto_at(4 * k))).collect())),
        Distribution::ParetoNormal => Some(PARETO_NORMAL.get_or_init(pareto_normal)),
    }
}

/// The table as netlink carries it: native-endian i16s.
pub fn table_bytes(d: Distribution) -> Option<Vec<u8>> {
    table(d).map(|t| t.iter().flat_map(|v| v.to_ne_bytes()).collect())
}

fn clamp(v: f64) -> i16 {
    v.round().clamp(i16::MIN as f64, i16::MAX as f64) as i16
}

/// x for each of FINE quantiles of the standard normal distribution: the
/// last x of a fine sweep whose CDF rounds to that quantile (as maketable).
fn normal_fine() -> Vec<f64> {
    let mut fine = vec![0.0; FINE + 1];
    let mut x: f64 = -10.0;
    while x < 10.05 {
        let cdf = 0.5 + 0.5 * libm::erf(x / std::f64::consts::SQRT_2);
        fine[(FINE as f64 * cdf).round() as usize] = x;
        x += 0.00005;
    }
    fine
}

fn normal() -> Vec<i16> {
    normal_fine().iter().take(FINE).step_by(4).map(|x| clamp(x * SCALE)).collect()
}

/// Pareto sample for fine quantile `i` (shifted so that its mean is about
/// zero, scaled like the normal table).
fn pareto_at(i: usize) -> f64 {
    let u = (65536 - 4 * i) as f64 / 65536.0;
    ((1.0 / u.powf(1.0 / PARETO_A) - 1.5) * (4.0 / 3.0) * SCALE).min(i16::MAX as f64)
}

/// A quarter normal, three quarters Pareto.
fn pareto_normal() -> Vec<i16> {
    let fine = normal_fine();
    (0..FINE)
        .step_by(4)
        .map(|i| {
            let normal = (fine[i] * SCALE).round() as i64;
            let pareto = pareto_at(i).round() as i64;
            // maketable's integer division truncates towards zero.
            ((normal + 3 * pareto) / 4).clamp(i16::MIN as i64, i16::MAX as i64) as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iproute2's own table (Debian's iproute2, a dependency of the tests).
    fn shipped(name: &str) -> Vec<i16> {
        let path = ["/usr/lib/x86_64-linux-gnu/tc", "/usr/lib/tc", "/usr/share/tc"]
            .iter()
            .map(|d| std::path::Path::new(d).join(format!("{name}.dist")))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{name}.dist not found: install iproute2 (scripts/setup.sh does)"));
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace().map(|v| v.parse::<i16>().unwrap()).collect::<Vec<_>>())
            .collect()
    }

    fn assert_same(d: Distribution, name: &str) {
        let ours = table(d).unwrap();
        let theirs = shipped(name);
        assert_eq!(ours.len(), 4096);
        assert_eq!(ours.len(), theirs.len(), "{name}: table sizes differ");
        let off: Vec<(usize, i16, i16)> =
            ours.iter().zip(&theirs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, (a, b))| (i, *a, *b)).collect();
        assert!(off.is_empty(), "{name}: {} entries differ from iproute2's (index, ours, theirs): {off:?}", off.len());
    }

    #[test]
    fn tables_match_the_ones_tc_loads() {
        assert_same(Distribution::Normal, "normal");
        assert_same(Distribution::Pareto, "pareto");
        assert_same(Distribution::ParetoNormal, "paretonormal");
    }

    #[test]
    fn the_normal_table_has_one_jitter_as_its_standard_deviation() {
        let t = table(Distribution::Normal).unwrap();
        let n = t.len() as f64;
        let mean = t.iter().map(|v| *v as f64).sum::<f64>() / n;
        let sd = (t.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 50.0, "mean {mean}");
        assert!((sd / SCALE - 1.0).abs() < 0.02, "sd {sd}");
        assert!(table(Distribution::Uniform).is_none(), "uniform is netem's default: no table");
        assert_eq!(table_bytes(Distribution::Normal).unwrap().len(), 8192);
    }
}
