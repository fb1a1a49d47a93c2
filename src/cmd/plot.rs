//! `wick plot METRICS.jsonl -o loss.png`: train/validation loss (and the learning rate) against
//! step, drawn with plotters. The font is embedded so it works on a bare machine.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans.ttf");

pub fn run(metrics: &Path, out: &Path) -> crate::Result<i32> {
    let msg = plot(metrics, out)?;
    crate::host::progress::warn(&msg);
    Ok(crate::error::exit::OK)
}

/// A named curve of (step, value) points.
type Series = (String, Vec<(f64, f64)>);

/// Curves by name, from metrics.jsonl rows.
fn series(text: &str, path: &Path) -> Result<Vec<Series>, String> {
    let mut out: Vec<Series> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a JSON object ({e})", path.display(), i + 1))?;
        let Some(step) = row.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        for key in ["loss", "train_loss", "val_loss", "lr"] {
            if let Some(v) = row
                .get(key)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite())
            {
                match out.iter_mut().find(|(k, _)| k == key) {
                    Some((_, s)) => s.push((step, v)),
                    None => out.push((key.to_string(), vec![(step, v)])),
                }
            }
        }
    }
    // `loss` is the last step's loss logged with each row; prefer an explicit train_loss.
    if out.iter().any(|(k, _)| k == "train_loss") {
        out.retain(|(k, _)| k != "loss");
    }
    for (_, s) in out.iter_mut() {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.dedup_by(|a, b| a.0 == b.0);
    }
    Ok(out)
}

pub fn plot(metrics: &Path, out: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(metrics)
        .map_err(|e| format!("cannot read {}: {e}", metrics.display()))?;
    let all = series(&text, metrics)?;
    let losses: Vec<&Series> = all
        .iter()
        .filter(|(k, s)| k != "lr" && !s.is_empty())
        .collect();
    if losses.is_empty() {
        return Err(format!(
            "{} has no rows with a step and a loss (log with wick.log{{...}})",
            metrics.display()
        ));
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (x0, x1) = losses
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.0))
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        let (y0, y1) = losses
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("wick: {}", metrics.display()), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?
            .set_secondary_coord(
                x0..x1.max(x0 + 1.0),
                0.0..all
                    .iter()
                    .find(|(k, _)| k == "lr")
                    .map(|(_, s)| s.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1)
                    .unwrap_or(1.0)
                    .max(1e-12),
            );
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .draw()?;
        let colors = [BLUE, RED, GREEN];
        for (i, (name, s)) in losses.iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        if let Some((_, s)) = all.iter().find(|(k, _)| k == "lr") {
            chart
                .draw_secondary_series(LineSeries::new(s.iter().copied(), BLACK.mix(0.4)))?
                .label("lr")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("cannot draw {}: {e}", out.display()))?;
    let names: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    Ok(format!("wrote {} ({})", out.display(), names.join(", ")))
}
