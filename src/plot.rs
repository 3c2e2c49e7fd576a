//! PNG plots, drawn without text (font rendering would need system libraries):
//! - training.png beside metrics.jsonl: four stacked panels sharing the step axis, top to bottom
//!   budget (black), accuracy (blue), mean length (red, with the budget in grey), reward (green);
//! - frontier.png of `eval --budgets`: accuracy (y) against mean tokens (x), one line per
//!   dataset through its budgets, the average in thick black.

use crate::train::metrics::StepMetrics;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

pub fn plot_metrics(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((4, 1));
    let steps = metrics.last().map_or(1, |m| m.step + 1) as f64;
    let budget: Vec<f64> = metrics.iter().map(|m| m.budget as f64).collect();
    let series: [(Vec<f64>, RGBColor, bool); 4] = [
        (budget.clone(), BLACK, false),
        (metrics.iter().map(|m| m.accuracy).collect(), BLUE, false),
        (metrics.iter().map(|m| m.mean_len).collect(), RED, true),
        (metrics.iter().map(|m| m.reward).collect(), GREEN, false),
    ];
    for (area, (ys, color, with_budget)) in panels.iter().zip(series) {
        let mut top = ys.iter().copied().fold(f64::MIN, f64::max);
        if with_budget {
            top = top.max(budget.iter().copied().fold(f64::MIN, f64::max));
        }
        let bottom = ys.iter().copied().fold(f64::MAX, f64::min).min(0.0);
        let top = if top > bottom {
            top * 1.05
        } else {
            bottom + 1.0
        };
        let mut chart = ChartBuilder::on(&area.margin(12, 12, 12, 12))
            .x_label_area_size(4)
            .y_label_area_size(4)
            .build_cartesian_2d(0f64..steps, bottom..top)
            .map_err(|e| err(&e))?;
        if with_budget {
            let grey = RGBColor(160, 160, 160);
            chart
                .draw_series(LineSeries::new(
                    metrics.iter().map(|m| (m.step as f64, m.budget as f64)),
                    grey.stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(
                metrics.iter().zip(&ys).map(|(m, &y)| (m.step as f64, y)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Accuracy (%) against mean tokens, one polyline per dataset (points in budget order); the
/// series named "average" is drawn thick and black, the others in a fixed palette.
pub fn plot_frontier(series: &[(String, Vec<(f64, f64)>)], path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let max_x = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let root = BitMapBackend::new(path, (800, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root.margin(20, 20, 20, 20))
        .build_cartesian_2d(0f64..max_x, 0f64..100f64)
        .map_err(|e| err(&e))?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, RGBColor(255, 140, 0)];
    for (i, (name, pts)) in series.iter().enumerate() {
        let (color, width) = if name == "average" {
            (BLACK, 3)
        } else {
            (palette[i % palette.len()], 1)
        };
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color.stroke_width(width),
            ))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, 3 + width, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
