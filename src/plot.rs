//! PNG plots, drawn without text (font rendering would need system libraries):
//! - training.png beside metrics.jsonl: four stacked panels sharing the step axis, top to bottom
//!   budget (black), accuracy (blue), mean length (red, with the budget in grey), reward (green);
//!   the held-out evaluations (eval.jsonl) as black dots on the accuracy and length panels;
//! - frontier.png of `eval --budgets`: accuracy (y) against mean tokens (x), one line per
//!   dataset through its budgets, the average in thick black.

use crate::train::metrics::StepMetrics;
use crate::train::run_log::EvalLine;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Size of training.png.
const METRICS_PLOT_SIZE: (u32, u32) = (900, 900);

pub fn plot_metrics(metrics: &[StepMetrics], evals: &[EvalLine], path: &Path) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    draw_metrics(BitMapBackend::new(path, METRICS_PLOT_SIZE), metrics, evals).map_err(|e| err(&e))
}

/// One panel of training.png: its line's values per step, colour, whether the budget is drawn
/// under it, and its dots (step, value).
type Panel = (Vec<f64>, RGBColor, bool, Vec<(f64, f64)>);

fn draw_metrics(
    backend: BitMapBackend<'_>,
    metrics: &[StepMetrics],
    evals: &[EvalLine],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((4, 1));
    let steps = metrics.last().map_or(1, |m| m.step + 1) as f64;
    let budget: Vec<f64> = metrics.iter().map(|m| m.budget as f64).collect();
    // (step, value) of each held-out evaluation, for a panel
    let held_out = |f: fn(&EvalLine) -> f64| -> Vec<(f64, f64)> {
        evals.iter().map(|e| (e.step as f64, f(e))).collect()
    };
    let series: [Panel; 4] = [
        (budget.clone(), BLACK, false, Vec::new()),
        (
            metrics.iter().map(|m| m.accuracy).collect(),
            BLUE,
            false,
            held_out(|e| e.accuracy),
        ),
        (
            metrics.iter().map(|m| m.mean_len).collect(),
            RED,
            true,
            held_out(|e| e.mean_len),
        ),
        (
            metrics.iter().map(|m| m.reward).collect(),
            GREEN,
            false,
            Vec::new(),
        ),
    ];
    for (area, (ys, color, with_budget, dots)) in panels.iter().zip(series) {
        let mut top = ys.iter().copied().fold(f64::MIN, f64::max);
        if with_budget {
            top = top.max(budget.iter().copied().fold(f64::MIN, f64::max));
        }
        top = dots.iter().map(|d| d.1).fold(top, f64::max);
        let bottom = ys.iter().copied().fold(f64::MAX, f64::min).min(0.0);
        let top = if top > bottom {
            top * 1.05
        } else {
            bottom + 1.0
        };
        let mut chart = ChartBuilder::on(&area.margin(12, 12, 12, 12))
            .x_label_area_size(4)
            .y_label_area_size(4)
            .build_cartesian_2d(0f64..steps, bottom..top)?;
        if with_budget {
            let grey = RGBColor(160, 160, 160);
            chart.draw_series(LineSeries::new(
                metrics.iter().map(|m| (m.step as f64, m.budget as f64)),
                grey.stroke_width(1),
            ))?;
        }
        chart.draw_series(LineSeries::new(
            metrics.iter().zip(&ys).map(|(m, &y)| (m.step as f64, y)),
            color.stroke_width(2),
        ))?;
        chart.draw_series(dots.iter().map(|&d| Circle::new(d, 5, BLACK.filled())))?;
    }
    root.present()?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Near-black pixels in rows `rows` of an RGB image of METRICS_PLOT_SIZE.
    fn dark_pixels(rgb: &[u8], rows: std::ops::Range<usize>) -> usize {
        let width = METRICS_PLOT_SIZE.0 as usize;
        rgb.chunks(3)
            .enumerate()
            .filter(|(i, p)| rows.contains(&(i / width)) && p.iter().all(|&c| c < 40))
            .count()
    }

    /// The held-out evaluations appear as dots on the accuracy panel (the second quarter of
    /// the height) and the length panel (the third), nowhere else.
    #[test]
    fn evaluations_are_dots_on_the_accuracy_and_length_panels() {
        let metrics: Vec<StepMetrics> = (0..20)
            .map(|step| StepMetrics {
                step,
                budget: 40 - step,
                accuracy: 0.5,
                mean_len: 30.0,
                reward: 0.4,
                ..Default::default()
            })
            .collect();
        let evals: Vec<EvalLine> = [0, 10, 20]
            .iter()
            .map(|&step| EvalLine {
                step,
                budget: 20,
                accuracy: 0.25,
                mean_len: 10.0,
                truncated_frac: 0.0,
            })
            .collect();
        let (w, h) = (METRICS_PLOT_SIZE.0 as usize, METRICS_PLOT_SIZE.1 as usize);
        let draw = |evals: &[EvalLine]| {
            let mut rgb = vec![0u8; w * h * 3];
            draw_metrics(
                BitMapBackend::with_buffer(&mut rgb, METRICS_PLOT_SIZE),
                &metrics,
                evals,
            )
            .unwrap();
            rgb
        };
        let (without, with) = (draw(&[]), draw(&evals));
        let quarter = |k: usize| k * h / 4..(k + 1) * h / 4;
        for (panel, dotted) in [(0, false), (1, true), (2, true), (3, false)] {
            let added = dark_pixels(&with, quarter(panel)) as i64
                - dark_pixels(&without, quarter(panel)) as i64;
            if dotted {
                assert!(added > 3 * 40, "panel {panel}: {added} more dark pixels");
            } else {
                assert_eq!(added, 0, "panel {panel}");
            }
        }
    }
}
