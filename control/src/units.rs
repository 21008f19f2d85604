//! Sizes, rates and durations as people type them, parsed once with one
//! meaning for every flag and every control request.
//!
//! - **Sizes** are binary: `K`, `M`, `G`, `T` (or `KiB`, `MiB`, ...) are
//!   powers of 1024, as `-m` of QEMU. A bare number is bytes on every flag
//!   (`--mem 256` is 256 bytes, and refused as too small for a guest).
//! - **Rates** are sizes per second, with or without `/s`: `100M` is
//!   100 MiB/s, and ferry shows rates in MiB/s too. Zero is refused.
//! - **Durations** take a unit (`250ms`, `5m`, `1h 30m`, via `humantime`);
//!   a bare number is in the unit the flag's name carries (`--deadline-s
//!   300`, `--max-downtime-ms 20`). Not finite, negative, zero and absurdly
//!   long durations are refused.
//!
//! Each parser returns an [`InputError`] whose message names what was wrong
//! and how to write it; the caller prefixes the flag or field name.

use std::time::Duration;

/// Longest deadline accepted: a week. Longer is a typo, not a plan.
pub const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest downtime limit accepted: a minute (a live migration that may
/// pause the guest longer is a cold one).
pub const MAX_DOWNTIME: Duration = Duration::from_secs(60);

/// Why a typed value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Not a size at all.
    #[error("`{0}` is not a size (e.g. 512M, 2G, 4096B)")]
    NotASize(String),
    /// Not a rate at all.
    #[error("`{0}` is not a rate (e.g. 100M or 100MiB/s; sizes are binary)")]
    NotARate(String),
    /// A rate of zero moves nothing.
    #[error("a rate of 0 would never finish")]
    ZeroRate,
    /// Not a duration at all.
    #[error("`{value}` is not a duration (e.g. {example})")]
    NotADuration {
        /// What was given.
        value: String,
        /// How to write one.
        example: &'static str,
    },
    /// Zero where a positive duration is needed.
    #[error("must be more than 0")]
    Zero,
    /// Above a sane bound.
    #[error("`{value}` is more than the {max} allowed")]
    TooLarge {
        /// What was given.
        value: String,
        /// The bound, in words.
        max: String,
    },
    /// Below a bound.
    #[error("`{value}` is less than the {min} needed")]
    TooSmall {
        /// What was given.
        value: String,
        /// The bound, in words.
        min: String,
    },
}

fn size_config() -> parse_size::Config {
    parse_size::Config::new().with_binary()
}

/// Parses a size in bytes: `64M`, `2G`, `2GiB`, `4096` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, InputError> {
    size_config()
        .parse_size(s.trim())
        .map_err(|_| InputError::NotASize(s.to_owned()))
}

/// Parses a size in bytes that must be at least `min` (named in the error
/// as `what`, e.g. "a page").
pub fn parse_bytes_at_least(s: &str, min: u64) -> Result<u64, InputError> {
    let v = parse_bytes(s)?;
    if v < min {
        return Err(InputError::TooSmall {
            value: s.to_owned(),
            min: format_bytes(min),
        });
    }
    Ok(v)
}

/// Parses a rate in bytes per second: `100M`, `100MiB/s`, `1G/s`. Zero is
/// refused.
pub fn parse_rate(s: &str) -> Result<u64, InputError> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let v = size_config()
        .parse_size(t)
        .map_err(|_| InputError::NotARate(s.to_owned()))?;
    if v == 0 {
        return Err(InputError::ZeroRate);
    }
    Ok(v)
}

/// Highest per-vCPU dirty limit accepted, MB/s (1 TB/s: no vCPU writes
/// memory faster; this machine's manages ~170 MB/s under dirty logging).
pub const MAX_VCPU_DIRTY_LIMIT_MBPS: u64 = 1_000_000;

/// Parses a per-vCPU dirty limit in MB/s (MiB/s, QEMU's `vcpu-dirty-limit`
/// unit): a bare number (`64`) is MB/s; a rate with units (`64M`,
/// `64MiB/s`, `1G/s`) is rounded down to whole MB/s. From 1 MB/s to
/// [`MAX_VCPU_DIRTY_LIMIT_MBPS`].
pub fn parse_vcpu_dirty_limit(s: &str) -> Result<u64, InputError> {
    let t = s.trim();
    let mbps = match t.parse::<u64>() {
        Ok(v) => v,
        Err(_) => parse_rate(t)? >> 20,
    };
    check_vcpu_dirty_limit(mbps).map_err(|e| match e {
        InputError::TooSmall { min, .. } => InputError::TooSmall {
            value: s.to_owned(),
            min,
        },
        InputError::TooLarge { max, .. } => InputError::TooLarge {
            value: s.to_owned(),
            max,
        },
        other => other,
    })
}

/// Checks a per-vCPU dirty limit in MB/s (see [`parse_vcpu_dirty_limit`]).
pub fn check_vcpu_dirty_limit(mbps: u64) -> Result<u64, InputError> {
    if mbps == 0 {
        return Err(InputError::TooSmall {
            value: format!("{mbps} MB/s"),
            min: "1 MB/s a vCPU".into(),
        });
    }
    if mbps > MAX_VCPU_DIRTY_LIMIT_MBPS {
        return Err(InputError::TooLarge {
            value: format!("{mbps} MB/s"),
            max: format!("{MAX_VCPU_DIRTY_LIMIT_MBPS} MB/s a vCPU"),
        });
    }
    Ok(mbps)
}

/// The unit a bare number of a duration flag is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareUnit {
    /// `--max-downtime-ms 20`.
    Millis,
    /// `--deadline-s 300`.
    Secs,
}

impl BareUnit {
    fn example(self) -> &'static str {
        match self {
            BareUnit::Millis => "20, 20ms or 1s",
            BareUnit::Secs => "300, 300s or 5m",
        }
    }

    fn secs(self, v: f64) -> f64 {
        match self {
            BareUnit::Millis => v / 1e3,
            BareUnit::Secs => v,
        }
    }
}

/// Parses a positive duration of at most `max`: a bare number in `bare`
/// units, or a `humantime` duration (`250ms`, `5m`).
pub fn parse_duration(s: &str, bare: BareUnit, max: Duration) -> Result<Duration, InputError> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(v) => {
            if !v.is_finite() || v < 0.0 {
                return Err(InputError::NotADuration {
                    value: s.to_owned(),
                    example: bare.example(),
                });
            }
            let secs = bare.secs(v);
            if secs > max.as_secs_f64() {
                return Err(InputError::TooLarge {
                    value: s.to_owned(),
                    max: humantime::format_duration(max).to_string(),
                });
            }
            Duration::from_secs_f64(secs)
        }
        Err(_) => humantime::parse_duration(t).map_err(|_| InputError::NotADuration {
            value: s.to_owned(),
            example: bare.example(),
        })?,
    };
    check_duration(s, d, max)
}

/// Checks a duration that arrived as a number (a control request field).
pub fn check_duration(shown: &str, d: Duration, max: Duration) -> Result<Duration, InputError> {
    if d.is_zero() {
        return Err(InputError::Zero);
    }
    if d > max {
        return Err(InputError::TooLarge {
            value: shown.to_owned(),
            max: humantime::format_duration(max).to_string(),
        });
    }
    Ok(d)
}

/// Checks seconds that arrived as a float (a control request field):
/// finite, positive, at most `max`.
pub fn secs_to_duration(secs: f64, max: Duration) -> Result<Duration, InputError> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(InputError::NotADuration {
            value: secs.to_string(),
            example: BareUnit::Secs.example(),
        });
    }
    if secs > max.as_secs_f64() {
        return Err(InputError::TooLarge {
            value: format!("{secs} s"),
            max: humantime::format_duration(max).to_string(),
        });
    }
    check_duration(&format!("{secs} s"), Duration::from_secs_f64(secs), max)
}

/// `bytes` in the largest binary unit that keeps a short number
/// (`64 MiB`, `1.5 GiB`, `512 B`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A rate in MiB/s, the unit `--max-bandwidth 100M` means.
pub fn format_rate(bytes_per_sec: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_sec / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_dirty_limit_is_mb_per_second_within_bounds() {
        assert_eq!(parse_vcpu_dirty_limit("64"), Ok(64));
        assert_eq!(parse_vcpu_dirty_limit("64M"), Ok(64));
        assert_eq!(parse_vcpu_dirty_limit("64MiB/s"), Ok(64));
        assert_eq!(parse_vcpu_dirty_limit("1G/s"), Ok(1024));
        assert_eq!(parse_vcpu_dirty_limit("1000000"), Ok(1_000_000));
        let e = parse_vcpu_dirty_limit("0").unwrap_err().to_string();
        assert_eq!(e, "`0` is less than the 1 MB/s a vCPU needed");
        let e = parse_vcpu_dirty_limit("512K").unwrap_err().to_string();
        assert!(e.contains("less than the 1 MB/s"), "{e}");
        let e = parse_vcpu_dirty_limit("1000001").unwrap_err().to_string();
        assert_eq!(e, "`1000001` is more than the 1000000 MB/s a vCPU allowed");
        assert!(parse_vcpu_dirty_limit("fast").is_err());
        assert!(parse_vcpu_dirty_limit("-5").is_err());
        assert_eq!(check_vcpu_dirty_limit(100), Ok(100));
        assert!(check_vcpu_dirty_limit(0).is_err());
    }

    #[test]
    fn sizes_are_binary_and_a_bare_number_is_bytes() {
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("256"), Ok(256));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("-1M").is_err());
    }

    #[test]
    fn a_size_below_the_minimum_names_the_minimum() {
        let e = parse_bytes_at_least("256", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 MiB"), "{e}");
    }

    #[test]
    fn rates_mean_mib_per_second_and_zero_is_refused() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("0"), Err(InputError::ZeroRate));
        assert_eq!(parse_rate("0M"), Err(InputError::ZeroRate));
        assert!(parse_rate("fast").is_err());
        assert_eq!(format_rate(f64::from(100u32 << 20)), "100.0 MiB/s");
    }

    #[test]
    fn durations_take_a_unit_or_the_flags_own() {
        let max = MAX_DEADLINE;
        assert_eq!(
            parse_duration("300", BareUnit::Secs, max),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            parse_duration("5m", BareUnit::Secs, max),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            parse_duration("20", BareUnit::Millis, MAX_DOWNTIME),
            Ok(Duration::from_millis(20))
        );
        assert_eq!(
            parse_duration("1.5", BareUnit::Secs, max),
            Ok(Duration::from_millis(1500))
        );
    }

    #[test]
    fn absurd_durations_are_refused_not_a_panic() {
        for bad in [
            "1e30", "nan", "inf", "-inf", "-1", "0", "0s", "soon", "1e400",
        ] {
            assert!(
                parse_duration(bad, BareUnit::Secs, MAX_DEADLINE).is_err(),
                "{bad} accepted"
            );
        }
        assert!(secs_to_duration(f64::NAN, MAX_DEADLINE).is_err());
        assert!(secs_to_duration(1e30, MAX_DEADLINE).is_err());
        assert!(secs_to_duration(f64::INFINITY, MAX_DEADLINE).is_err());
        assert!(secs_to_duration(-1.0, MAX_DEADLINE).is_err());
        assert!(secs_to_duration(0.0, MAX_DEADLINE).is_err());
        assert_eq!(
            secs_to_duration(2.5, MAX_DEADLINE),
            Ok(Duration::from_millis(2500))
        );
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(format_bytes(64 << 20), "64 MiB");
        assert_eq!(format_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(format_bytes(512), "512 B");
    }
}
