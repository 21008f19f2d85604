//! The SVG plot: bytes left to send over time, one panel per workload, one
//! line per engine profile (its first run), QEMU in warm colours and ferry
//! in cool ones.

use std::path::Path;

use plotters::prelude::*;

use crate::bench::error::BenchError;
use crate::bench::matrix::Engine;
use crate::bench::outcome::RunOutcome;

const QEMU_COLOURS: [RGBColor; 5] = [
    RGBColor(200, 30, 30),
    RGBColor(230, 120, 0),
    RGBColor(170, 60, 120),
    RGBColor(150, 110, 40),
    RGBColor(240, 60, 160),
];
const FERRY_COLOURS: [RGBColor; 4] = [
    RGBColor(20, 60, 200),
    RGBColor(0, 150, 160),
    RGBColor(40, 140, 40),
    RGBColor(110, 70, 200),
];

/// Draws the plot of `runs` to `path`.
pub fn bytes_left_svg(runs: &[RunOutcome], path: &Path) -> Result<(), BenchError> {
    let mut rows: Vec<&str> = Vec::new();
    for r in runs {
        if !rows.contains(&r.row.as_str()) {
            rows.push(&r.row);
        }
    }
    let panels = rows.len().max(1);
    let height = 360 * u32::try_from(panels).unwrap_or(1);
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    let perr = |e: &dyn std::fmt::Display| BenchError::Plot(e.to_string());
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let areas = root.split_evenly((panels, 1));
    for (row, area) in rows.iter().zip(areas.iter()) {
        let mut seen = Vec::new();
        let series: Vec<&RunOutcome> = runs
            .iter()
            .filter(|r| r.row == *row && !r.bytes_left.is_empty())
            .filter(|r| {
                let key = (r.profile, r.downtime_limit_ms);
                let first = !seen.contains(&key);
                seen.push(key);
                first
            })
            .collect();
        let x_max = series
            .iter()
            .flat_map(|r| r.bytes_left.iter().map(|b| b.t_ms / 1e3))
            .fold(0.1f64, f64::max);
        let y_max = series
            .iter()
            .flat_map(|r| {
                r.bytes_left
                    .iter()
                    .map(|b| b.bytes as f64 / (1u64 << 20) as f64)
            })
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{row}: MiB left to send over time"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max * 1.05)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds since migrate")
            .y_desc("MiB left")
            .draw()
            .map_err(|e| perr(&e))?;
        let (mut qi, mut fi) = (0, 0);
        for r in series {
            let colour = match r.engine {
                Engine::Qemu => {
                    qi += 1;
                    QEMU_COLOURS[(qi - 1) % QEMU_COLOURS.len()]
                }
                Engine::Ferry => {
                    fi += 1;
                    FERRY_COLOURS[(fi - 1) % FERRY_COLOURS.len()]
                }
            };
            let pts: Vec<(f64, f64)> = r
                .bytes_left
                .iter()
                .map(|b| (b.t_ms / 1e3, b.bytes as f64 / (1u64 << 20) as f64))
                .collect();
            let rounds = r.bytes_left.last().map_or(0, |b| b.round);
            chart
                .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(|e| perr(&e))?
                .label(format!(
                    "{} limit {} ms ({rounds} rounds)",
                    r.profile, r.downtime_limit_ms
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(&e))?;
    }
    root.present().map_err(|e| perr(&e))?;
    Ok(())
}
