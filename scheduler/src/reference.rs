//! The reference results of CloudSim 3.0.3 on the same traces
//! (`planetlab_cloudsim303_results.csv`).

use std::path::{Path, PathBuf};

/// Why the reference file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        what: String,
    },
}

/// One reference row.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceRow {
    /// Day.
    pub day: String,
    /// Policy (`thr_mmt_0.8`, ...).
    pub policy: String,
    /// Energy in kWh.
    pub energy_kwh: f64,
    /// Migrations.
    pub migrations: u64,
    /// SLATAH.
    pub slatah: f64,
    /// PDM.
    pub pdm: f64,
    /// SLAV.
    pub slav: f64,
    /// ESV.
    pub esv: f64,
    /// `cloudsim-3.0.3` (filesystem order) or `cloudsim-3.0.3-sorted-files`.
    pub simulator: String,
}

/// Load the reference CSV.
pub fn load(path: &Path) -> Result<Vec<ReferenceRow>, ReferenceError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReferenceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parse the reference CSV text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<ReferenceRow>, ReferenceError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let err = |what: String| ReferenceError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            what,
        };
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 12 {
            return Err(err(format!("{} fields, expected 12", f.len())));
        }
        let num = |k: usize| {
            f[k].parse::<f64>()
                .map_err(|_| err(format!("{:?} is not a number", f[k])))
        };
        rows.push(ReferenceRow {
            day: f[0].to_string(),
            policy: f[1].to_string(),
            energy_kwh: num(4)?,
            migrations: num(5)? as u64,
            slatah: num(6)?,
            pdm: num(7)?,
            slav: num(8)?,
            esv: num(9)?,
            simulator: f[11].to_string(),
        });
    }
    Ok(rows)
}

/// The reference row for (day, policy), preferring the sorted-file-order run.
pub fn lookup<'a>(rows: &'a [ReferenceRow], day: &str, policy: &str) -> Option<&'a ReferenceRow> {
    let matching = || rows.iter().filter(|r| r.day == day && r.policy == policy);
    matching()
        .find(|r| r.simulator.ends_with("sorted-files"))
        .or_else(|| matching().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_sorted_file_rows() {
        let text = "day,policy,vms,hosts,energy_kwh,migrations,slatah,pdm,slav,esv,host_shutdowns,simulator\n\
1,thr_mmt_0.8,1,800,198.08,27728,0.05,0.0007,3.5e-05,7e-03,6109,cloudsim-3.0.3\n\
1,thr_mmt_0.8,1,800,192.62,26711,0.0491,0.0006,3.18e-05,6.1e-03,5885,cloudsim-3.0.3-sorted-files\n";
        let rows = parse(Path::new("r.csv"), text).unwrap();
        assert_eq!(
            lookup(&rows, "1", "thr_mmt_0.8").unwrap().energy_kwh,
            192.62
        );
        let bad = format!("{text}1,x,1\n");
        let e = parse(Path::new("r.csv"), &bad).unwrap_err().to_string();
        assert!(e.starts_with("r.csv:4:"), "{e}");
    }
}
