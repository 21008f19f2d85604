//! PlanetLab (CoMon) CPU traces: one file per VM, 288 integers (CPU % of the
//! VM's capacity, one per 300 s step). Paths may contain spaces; they are
//! never passed through a shell.

use std::path::{Path, PathBuf};

/// Samples per trace file (24 h of 300 s steps).
pub const SAMPLES_PER_DAY: usize = 288;

/// Why a trace could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not an integer percentage.
    #[error("{path}:{line}: {text:?} is not a CPU percentage (integer 0..=100)")]
    Garbage {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// The file has the wrong number of samples.
    #[error("{path}: {found} samples, expected {expected}")]
    Length {
        /// The file.
        path: PathBuf,
        /// Samples found.
        found: usize,
        /// Samples expected.
        expected: usize,
    },
    /// A day directory holds no trace files.
    #[error("{path}: no trace files")]
    Empty {
        /// The directory.
        path: PathBuf,
    },
}

/// One VM's CPU trace for one day.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// File name (not the full path), the VM's name.
    pub name: String,
    /// CPU % samples, `SAMPLES_PER_DAY` of them.
    pub samples: Vec<u8>,
}

impl Trace {
    /// Utilisation (0..=1) at `time` seconds, linear between samples, the
    /// last sample held (CloudSim's `UtilizationModelPlanetLabInMemory`).
    pub fn utilization_at(&self, time: f64, step: f64) -> f64 {
        let (i, frac) = sample_position(time, step);
        interpolate(
            self.sample_utilization(i),
            self.sample_utilization(i + 1),
            frac,
        )
    }

    /// Utilisation (0..=1) of sample `k`, the last sample held.
    pub fn sample_utilization(&self, k: usize) -> f64 {
        f64::from(self.samples[k.min(self.samples.len() - 1)]) / 100.0
    }
}

/// Where `time` falls among samples `step` seconds apart: the sample at or
/// before it and the fraction of the way to the next (0 exactly on a
/// sample).
pub fn sample_position(time: f64, step: f64) -> (usize, f64) {
    let pos = (time / step).max(0.0);
    (pos.floor() as usize, pos - pos.floor())
}

/// `a` to `b` linearly at `frac` (`a` itself at 0).
pub fn interpolate(a: f64, b: f64, frac: f64) -> f64 {
    if frac == 0.0 {
        a
    } else {
        a + (b - a) * frac
    }
}

/// Parse one trace file's text (`path` only names the source in errors).
pub fn parse_trace(path: &Path, text: &str) -> Result<Vec<u8>, TraceError> {
    let mut samples = Vec::with_capacity(SAMPLES_PER_DAY);
    for (idx, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        match t.parse::<u8>() {
            Ok(v) if v <= 100 => samples.push(v),
            _ => {
                return Err(TraceError::Garbage {
                    path: path.to_path_buf(),
                    line: idx + 1,
                    text: line.chars().take(80).collect(),
                })
            }
        }
    }
    if samples.len() != SAMPLES_PER_DAY {
        return Err(TraceError::Length {
            path: path.to_path_buf(),
            found: samples.len(),
            expected: SAMPLES_PER_DAY,
        });
    }
    Ok(samples)
}

/// Load one trace file.
pub fn load_trace(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Trace {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        samples: parse_trace(path, &text)?,
    })
}

/// Load every file of a day directory, sorted by file name (byte order, the
/// reproducible order of the reference results).
pub fn load_day(dir: &Path) -> Result<Vec<Trace>, TraceError> {
    let read_err = |source| TraceError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if entry.file_type().map_err(read_err)?.is_file() {
            paths.push(entry.path());
        }
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if paths.is_empty() {
        return Err(TraceError::Empty {
            path: dir.to_path_buf(),
        });
    }
    paths.iter().map(|p| load_trace(p)).collect()
}

/// The day directories (`YYYYMMDD`) under a PlanetLab root, sorted.
pub fn list_days(root: &Path) -> Result<Vec<String>, TraceError> {
    let read_err = |source| TraceError::Read {
        path: root.to_path_buf(),
        source,
    };
    let mut days = Vec::new();
    for entry in std::fs::read_dir(root).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if entry.file_type().map_err(read_err)?.is_dir() {
            days.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    days.sort();
    if days.is_empty() {
        return Err(TraceError::Empty {
            path: root.to_path_buf(),
        });
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day_text(v: u8) -> String {
        (0..SAMPLES_PER_DAY).map(|_| format!("{v}\n")).collect()
    }

    #[test]
    fn loads_sorted_and_handles_spaces_in_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b vm"), day_text(7)).unwrap();
        std::fs::write(dir.path().join("a"), day_text(3)).unwrap();
        let day = load_day(dir.path()).unwrap();
        assert_eq!(day.len(), 2);
        assert_eq!(day[0].name, "a");
        assert_eq!(day[1].name, "b vm");
        assert_eq!(day[1].samples[287], 7);
    }

    #[test]
    fn garbage_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = day_text(5);
        text.replace_range(4..5, "x"); // line 3 becomes "x"
        let p = dir.path().join("with space");
        std::fs::write(&p, text).unwrap();
        let e = load_trace(&p).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("with space:3:"), "{msg}");
        assert!(matches!(e, TraceError::Garbage { line: 3, .. }));
    }

    #[test]
    fn out_of_range_and_short_files_are_errors() {
        let p = Path::new("t");
        assert!(matches!(
            parse_trace(p, "101\n"),
            Err(TraceError::Garbage { line: 1, .. })
        ));
        assert!(matches!(
            parse_trace(p, "1\n2\n"),
            Err(TraceError::Length { found: 2, .. })
        ));
    }

    #[test]
    fn utilization_interpolates_and_holds_last_sample() {
        let mut samples = vec![0u8; SAMPLES_PER_DAY];
        samples[0] = 10;
        samples[1] = 20;
        samples[287] = 40;
        let t = Trace {
            name: "t".into(),
            samples,
        };
        assert!((t.utilization_at(150.0, 300.0) - 0.15).abs() < 1e-12);
        assert_eq!(t.utilization_at(300.0, 300.0), 0.2);
        assert!((t.utilization_at(287.5 * 300.0, 300.0) - 0.4).abs() < 1e-12);
    }
}
