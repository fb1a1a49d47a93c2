//! `wick plot METRICS.jsonl [MORE.jsonl ...] -o loss.png|loss.svg`: what people look at when
//! they judge a run. Top panel: the per-step training loss (thin) with an exponential moving
//! average over it (bold), validation points, and the learning rate on its own axis. Bottom
//! panel: tokens/s. Several runs are overlaid, one colour each, with a legend. The font is
//! embedded so it works on a bare machine.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans.ttf");

pub fn run(metrics: &[std::path::PathBuf], out: &Path, smooth: f64) -> crate::Result<i32> {
    let msg = plot(metrics, out, smooth)?;
    crate::host::progress::warn(&msg);
    Ok(crate::error::exit::OK)
}

/// (step, value) points.
type Points = Vec<(f64, f64)>;

/// What one metrics file holds.
#[derive(Default)]
pub struct Run {
    pub name: String,
    pub train: Points,
    pub val: Points,
    pub lr: Points,
    pub tokens_per_s: Points,
}

fn push(points: &mut Points, row: &serde_json::Value, key: &str, step: f64) {
    if let Some(v) = row
        .get(key)
        .and_then(|v| v.as_f64())
        .filter(|v| v.is_finite())
    {
        points.push((step, v));
    }
}

fn sorted(mut p: Points) -> Points {
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p.dedup_by(|a, b| a.0 == b.0);
    p
}

/// Read a metrics.jsonl: per-step rows (`"kind": "step"`) give the training loss, lr and
/// tokens/s; the recipe's rows give validation losses (and, in files written before per-step
/// rows existed, the training loss they logged).
pub fn read_run(path: &Path) -> Result<Run, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut run = Run {
        name: run_name(path),
        ..Run::default()
    };
    let (mut logged_train, mut logged_lr) = (Points::new(), Points::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a JSON object ({e})", path.display(), i + 1))?;
        let Some(step) = row.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        match row.get("kind").and_then(|k| k.as_str()) {
            Some("step") => {
                push(&mut run.train, &row, "loss", step);
                push(&mut run.lr, &row, "lr", step);
                push(&mut run.tokens_per_s, &row, "tokens_per_s", step);
            }
            Some("note") => {}
            _ => {
                push(&mut run.val, &row, "val_loss", step);
                if row.get("train_loss").is_some() {
                    push(&mut logged_train, &row, "train_loss", step);
                } else {
                    push(&mut logged_train, &row, "loss", step);
                }
                push(&mut logged_lr, &row, "lr", step);
            }
        }
    }
    if run.train.is_empty() {
        run.train = logged_train;
        run.lr = logged_lr;
    }
    run.train = sorted(run.train);
    run.val = sorted(run.val);
    run.lr = sorted(run.lr);
    run.tokens_per_s = sorted(run.tokens_per_s);
    if run.train.is_empty() && run.val.is_empty() {
        return Err(format!(
            "{} has no rows with a step and a loss (wick run writes one per step; wick.log{{...}} adds yours)",
            path.display()
        ));
    }
    Ok(run)
}

/// `runs/a/metrics.jsonl` → "a"; `b.jsonl` → "b".
fn run_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    match stem.as_deref() {
        Some("metrics") => path
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into()),
        Some(s) => s.to_string(),
        None => "run".into(),
    }
}

/// Exponential moving average with bias correction (TensorBoard's smoothing): `weight` in
/// [0, 1), 0 = none.
pub fn ema(points: &[(f64, f64)], weight: f64) -> Points {
    let mut avg = 0.0;
    let mut norm = 0.0;
    points
        .iter()
        .map(|&(x, y)| {
            avg = avg * weight + (1.0 - weight) * y;
            norm = norm * weight + (1.0 - weight);
            (x, avg / norm)
        })
        .collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn range(points: impl Iterator<Item = (f64, f64)>) -> ((f64, f64), (f64, f64)) {
    points.fold(
        ((f64::MAX, f64::MIN), (f64::MAX, f64::MIN)),
        |((x0, x1), (y0, y1)), (x, y)| ((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y))),
    )
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    runs: &[Run],
    smooth: f64,
    title: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let has_speed = runs.iter().any(|r| !r.tokens_per_s.is_empty());
    let (top, bottom) = if has_speed {
        root.split_vertically((root.dim_in_pixel().1 as f64 * 0.7) as u32)
    } else {
        (root.clone(), root.clone())
    };
    let ((x0, x1), (y0, y1)) = range(
        runs.iter()
            .flat_map(|r| r.train.iter().chain(&r.val).copied()),
    );
    let x1 = x1.max(x0 + 1.0);
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let lr_max = runs
        .iter()
        .flat_map(|r| r.lr.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-12)
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .right_y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?
        .set_secondary_coord(x0..x1, 0.0..lr_max);
    let whole = |x: &f64| format!("{x:.0}");
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&whole)
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let raw = c.mix(0.25);
        chart.draw_series(LineSeries::new(
            run.train.iter().copied(),
            raw.stroke_width(1),
        ))?;
        let label = if smooth > 0.0 {
            format!("{} train (EMA {smooth})", run.name)
        } else {
            format!("{} train", run.name)
        };
        chart
            .draw_series(LineSeries::new(ema(&run.train, smooth), c.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if !run.val.is_empty() {
            chart
                .draw_series(run.val.iter().map(|&p| Circle::new(p, 4, c.filled())))?
                .label(format!("{} validation", run.name))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
        }
        if !run.lr.is_empty() {
            let dashed = c.mix(0.6);
            chart
                .draw_secondary_series(DashedLineSeries::new(
                    run.lr.iter().copied(),
                    6,
                    4,
                    dashed.stroke_width(1),
                ))?
                .label(format!("{} lr", run.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], dashed));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    if has_speed {
        let ((_, _), (_, s1)) = range(runs.iter().flat_map(|r| r.tokens_per_s.iter().copied()));
        let mut speed = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0.0..(s1 * 1.1).max(1.0))?;
        speed
            .configure_mesh()
            .x_desc("step")
            .y_desc("tokens/s")
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .draw()?;
        for (i, run) in runs.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            speed.draw_series(LineSeries::new(
                run.tokens_per_s.iter().copied(),
                c.stroke_width(1),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

pub fn plot(metrics: &[std::path::PathBuf], out: &Path, smooth: f64) -> Result<String, String> {
    if !(0.0..1.0).contains(&smooth) {
        return Err(format!(
            "--smooth {smooth}: the EMA weight must be in [0, 1)"
        ));
    }
    let runs = metrics
        .iter()
        .map(|p| read_run(p))
        .collect::<Result<Vec<_>, _>>()?;
    let title = if runs.len() == 1 {
        format!("wick: {}", metrics[0].display())
    } else {
        format!(
            "wick: {}",
            runs.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(" vs ")
        )
    };
    let size = (1100, 750);
    let svg = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    // Both backends measure text with the embedded font.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let drawn = if svg {
        draw(
            SVGBackend::new(out, size).into_drawing_area(),
            &runs,
            smooth,
            &title,
        )
    } else {
        draw(
            BitMapBackend::new(out, size).into_drawing_area(),
            &runs,
            smooth,
            &title,
        )
    };
    drawn.map_err(|e| format!("cannot draw {}: {e}", out.display()))?;
    let what: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{}: {} train points, {} validation",
                r.name,
                r.train.len(),
                r.val.len()
            )
        })
        .collect();
    Ok(format!("wrote {} ({})", out.display(), what.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_bias_corrected_and_zero_weight_is_the_data() {
        let p = vec![(1.0, 4.0), (2.0, 2.0), (3.0, 2.0)];
        assert_eq!(ema(&p, 0.0), p);
        let s = ema(&p, 0.5);
        assert_eq!(
            s[0],
            (1.0, 4.0),
            "the first point is itself, not pulled to 0"
        );
        assert!((s[1].1 - (0.5 * 2.0 + 0.25 * 4.0) / 0.75).abs() < 1e-12);
    }
}
