//! Host power models: watts at 0, 10, ..., 100 % CPU (SPECpower_ssj2008),
//! linear interpolation in between, loaded from `power_models.csv`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the power model CSV could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PowerModelError {
    /// The file could not be read.
    #[error("cannot read power models {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the file is malformed.
    #[error("{path}:{line}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// No model of that name in the file.
    #[error("no power model named {name:?} in {path}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
}

/// A host's power draw as a function of CPU utilisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    /// Model name (e.g. `HP ProLiant ML110 G4`).
    pub name: String,
    /// Watts at 0 %, 10 %, ..., 100 % CPU.
    pub watts: [f64; 11],
}

impl PowerModel {
    /// Watts at `utilization` (0..=1; values outside are clamped), linear between
    /// the measured points, as CloudSim's `PowerModelSpecPower` does.
    pub fn power(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0);
        let scaled = u * 10.0;
        // Exact points first, like CloudSim (`utilization % 0.1 == 0`).
        let lo = scaled.floor();
        let lo_i = lo as usize;
        if lo_i >= 10 {
            return self.watts[10];
        }
        let frac = scaled - lo;
        if frac == 0.0 {
            return self.watts[lo_i];
        }
        let a = self.watts[lo_i];
        let b = self.watts[lo_i + 1];
        a + (b - a) * frac
    }

    /// Watts at full load.
    pub fn max_power(&self) -> f64 {
        self.watts[10]
    }
}

/// One row of `power_models.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerModelRow {
    /// The model (name + curve).
    pub model: PowerModel,
    /// Number of cores.
    pub cores: u32,
    /// MHz per core.
    pub mhz: u32,
    /// RAM in GB as in the SPEC result.
    pub ram_gb: u32,
    /// `used_in_beloglazov_ccpe2012 == yes`.
    pub used_in_ccpe2012: bool,
}

/// All models of a `power_models.csv` file.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerModels {
    path: PathBuf,
    /// The rows in file order.
    pub rows: Vec<PowerModelRow>,
}

impl PowerModels {
    /// Read and parse the CSV file.
    pub fn load(path: &Path) -> Result<Self, PowerModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| PowerModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse CSV text (`path` only names the source in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, PowerModelError> {
        let err = |line: usize, what: String| PowerModelError::Parse {
            path: path.to_path_buf(),
            line,
            what,
        };
        let mut lines = text.lines().enumerate();
        let (_, header) = lines.next().ok_or_else(|| err(1, "empty file".into()))?;
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        let find = |name: &str| {
            cols.iter()
                .position(|c| *c == name)
                .ok_or_else(|| err(1, format!("header lacks column {name:?}")))
        };
        let i_name = find("host_model")?;
        let i_cpu = find("cpu")?;
        let i_cores = find("cores_total")?;
        let i_mhz = find("mhz")?;
        let i_ram = find("ram_gb_spec")?;
        let i_used = find("used_in_beloglazov_ccpe2012")?;
        let i_w: Vec<usize> = (0..=10)
            .map(|k| find(&format!("w_{}", k * 10)))
            .collect::<Result<_, _>>()?;
        let mut rows = Vec::new();
        for (idx, line) in lines {
            let lineno = idx + 1;
            if line.trim().is_empty() {
                continue;
            }
            // Fields have no quoted commas in this file, except possibly the
            // free-text SPEC column which is not used; split plainly but
            // count from the right for the numeric tail.
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < cols.len() {
                return Err(err(
                    lineno,
                    format!("{} fields, header has {}", f.len(), cols.len()),
                ));
            }
            let num = |i: usize, what: &str| -> Result<f64, PowerModelError> {
                f[i].parse::<f64>()
                    .map_err(|_| err(lineno, format!("{what} {:?} is not a number", f[i])))
            };
            let mut watts = [0.0; 11];
            for (k, &i) in i_w.iter().enumerate() {
                watts[k] = num(i, &format!("w_{}", k * 10))?;
            }
            rows.push(PowerModelRow {
                model: PowerModel {
                    name: format!("{} {}", f[i_name], f[i_cpu]),
                    watts,
                },
                cores: num(i_cores, "cores_total")? as u32,
                mhz: num(i_mhz, "mhz")? as u32,
                ram_gb: num(i_ram, "ram_gb_spec")? as u32,
                used_in_ccpe2012: f[i_used] == "yes",
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            rows,
        })
    }

    /// The model whose name (`host_model cpu`) contains `needle`.
    pub fn find(&self, needle: &str) -> Result<&PowerModelRow, PowerModelError> {
        self.rows
            .iter()
            .find(|r| r.model.name.contains(needle))
            .ok_or_else(|| PowerModelError::Missing {
                path: self.path.clone(),
                name: needle.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "host_model,cpu,sockets,cores_total,mhz,ram_gb_spec,used_in_beloglazov_ccpe2012,spec_power_ssj2008_result,w_0,w_10,w_20,w_30,w_40,w_50,w_60,w_70,w_80,w_90,w_100\n\
HP ProLiant ML110 G4,Xeon 3040,1,2,1860,4,yes,x,86,89.4,92.6,96,99.5,102,106,108,112,114,117\n";

    #[test]
    fn interpolates_between_measured_points() {
        let m = PowerModels::parse(Path::new("p.csv"), CSV).unwrap();
        let g4 = &m.find("G4").unwrap().model;
        assert_eq!(g4.power(0.0), 86.0);
        assert_eq!(g4.power(1.0), 117.0);
        assert!((g4.power(0.05) - 87.7).abs() < 1e-9);
        assert!((g4.power(0.95) - 115.5).abs() < 1e-9);
        assert_eq!(g4.power(1.5), 117.0);
    }

    #[test]
    fn garbage_names_file_and_line() {
        let bad = format!("{CSV}HP X,Y,1,2,1,4,no,x,1,2,3,oops,5,6,7,8,9,10,11\n");
        let e = PowerModels::parse(Path::new("p.csv"), &bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("p.csv:3:"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_model_is_an_error() {
        let m = PowerModels::parse(Path::new("p.csv"), CSV).unwrap();
        assert!(m.find("G9").is_err());
    }
}
