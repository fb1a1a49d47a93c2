//! `<ckpt-dir>/metrics.jsonl` and TensorBoard events: a row for every training step (`"kind":
//! "step"`: loss, lr, grad_norm, tokens/s, tokens seen, elapsed seconds) and the recipe's own
//! `wick.log` rows (`"kind": "log"`) in one file. Buffered, flushed every few seconds and
//! before every checkpoint, so a step never waits for the disk; thinned (and said so in the
//! file) when steps are so fast the file would grow by more than a few hundred rows a second.
//!
//! A fresh run moves an earlier run's file to metrics.prev.jsonl; a resumed run first drops
//! the rows past its checkpoint's step (written by the interrupted run after its last save), so
//! the file reads as one run.

use super::context::RunContext;
use super::tensorboard::EventWriter;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Step rows per second at most, on average over the run; faster steps are thinned...
const MAX_STEP_ROWS_PER_S: f64 = 200.0;
/// ... after the first this many rows (a short run keeps every step).
const STEP_ROWS_BURST: f64 = 2000.0;
/// The longest a written row waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// The run's open metrics outputs.
pub struct MetricsSink {
    path: PathBuf,
    out: BufWriter<File>,
    last_flush: Instant,
    /// Step rows written, and when the first was.
    step_rows: u64,
    first_step_row: Option<Instant>,
    thinned: bool,
    /// A write failed (said once).
    write_failed: bool,
    tensorboard: Option<EventWriter>,
}

/// What a training step reports.
pub struct StepRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
}

/// Keep only rows at or before `step` (and rows without one) in `path`, atomically.
fn truncate_after(path: &Path, step: u64) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .collect();
    if keep.len() == text.lines().count() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = keep.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

fn open(ctx: &RunContext) -> Result<MetricsSink> {
    let dir = ctx.ckpt_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("metrics.jsonl");
    match &ctx.resume {
        None if path.exists() => {
            let _ = std::fs::rename(&path, dir.join("metrics.prev.jsonl"));
        }
        Some(c) => truncate_after(&path, c.meta.step)
            .map_err(|e| Error::failed(format!("cannot rewrite {}: {e}", path.display())))?,
        None => {}
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", path.display())))?;
    let tensorboard = match &ctx.opts.tensorboard {
        Some(tb) => match EventWriter::create(tb) {
            Ok(w) => Some(w),
            Err(e) => {
                crate::host::progress::warn(&format!(
                    "no TensorBoard events: cannot write in {}: {e}",
                    tb.display()
                ));
                None
            }
        },
        None => None,
    };
    Ok(MetricsSink {
        path,
        out: BufWriter::with_capacity(64 << 10, file),
        last_flush: Instant::now(),
        step_rows: 0,
        first_step_row: None,
        thinned: false,
        write_failed: false,
        tensorboard,
    })
}

/// The open sink; None when metrics cannot be written (said once: metrics never stop a run).
fn sink(ctx: &mut RunContext) -> Option<&mut MetricsSink> {
    // Data-parallel: rank 0 alone writes the run's metrics.
    if !crate::dist::is_leader() {
        return None;
    }
    if ctx.metrics.is_none() && !ctx.metrics_unavailable {
        match open(ctx) {
            Ok(s) => ctx.metrics = Some(s),
            Err(e) => {
                ctx.metrics_unavailable = true;
                crate::host::progress::warn(&format!(
                    "warning: {e}; training goes on without metrics"
                ));
            }
        }
    }
    ctx.metrics.as_mut()
}

impl MetricsSink {
    fn write_row(&mut self, row: &serde_json::Value) {
        if let Err(e) = writeln!(self.out, "{row}") {
            self.failed(&e);
        }
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        if !self.write_failed {
            self.write_failed = true;
            crate::host::progress::warn(&format!(
                "warning: cannot write {}: {e}; training goes on",
                self.path.display()
            ));
        }
    }

    /// Push buffered rows and events to disk (errors are said, not fatal: metrics never decide
    /// how a run ends).
    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if let Err(e) = self.out.flush() {
            self.failed(&e);
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            let _ = tb.flush();
        }
    }
}

/// The per-step row (and TensorBoard scalars), unless thinned or switched off.
pub fn step(ctx: &mut RunContext, r: &StepRow) {
    ctx.loss_history.push(r.loss as f32);
    let every = ctx.opts.metrics_every;
    if every == 0 || !r.step.is_multiple_of(every) {
        return;
    }
    let elapsed = ctx.started.elapsed().as_secs_f64();
    let Some(s) = sink(ctx) else { return };
    let since_first = s
        .first_step_row
        .get_or_insert_with(Instant::now)
        .elapsed()
        .as_secs_f64();
    if s.step_rows as f64 >= STEP_ROWS_BURST + MAX_STEP_ROWS_PER_S * since_first {
        if !s.thinned {
            s.thinned = true;
            s.write_row(&serde_json::json!({
                "kind": "note",
                "step": r.step,
                "note": format!("steps are faster than {MAX_STEP_ROWS_PER_S} a second: step rows are thinned to that rate from here on"),
            }));
        }
        return;
    }
    s.step_rows += 1;
    let mut row = serde_json::json!({
        "kind": "step",
        "step": r.step,
        "loss": r.loss,
        "lr": r.lr,
        "tokens_per_s": (r.tokens_per_s * 10.0).round() / 10.0,
        "tokens_seen": r.tokens_seen,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
    });
    if let Some(g) = r.grad_norm {
        row["grad_norm"] = g.into();
    }
    s.write_row(&row);
    if let Some(tb) = s.tensorboard.as_mut() {
        let mut scalars = vec![
            ("train/loss", r.loss as f32),
            ("train/lr", r.lr as f32),
            ("train/tokens_per_s", r.tokens_per_s as f32),
        ];
        if let Some(g) = r.grad_norm {
            scalars.push(("train/grad_norm", g as f32));
        }
        let _ = tb.scalars(r.step, &scalars);
    }
}

/// A row for the recipe's `fields` at the session's current step: step, lr, tokens and loss
/// from the session, the fields, data health, time. Returns the row and a one-line summary of
/// the fields for stderr.
pub fn log(
    ctx: &mut RunContext,
    fields: Vec<(String, serde_json::Value)>,
) -> Result<(serde_json::Value, String)> {
    let mut row = serde_json::Map::new();
    row.insert("kind".into(), "log".into());
    if let Some(s) = &ctx.session {
        let s = super::step::lock_session(s)?;
        row.insert("step".into(), s.step.into());
        row.insert("lr".into(), s.lr.into());
        row.insert("tokens".into(), s.tokens_seen.into());
        if let Some(l) = s.last_loss {
            row.insert("loss".into(), l.into());
        }
    }
    let mut shown = Vec::new();
    let mut scalars = Vec::new();
    for (k, j) in fields {
        shown.push(match &j {
            serde_json::Value::Number(n) => format!("{k} {:.4}", n.as_f64().unwrap_or(0.0)),
            other => format!("{k} {other}"),
        });
        if let Some(v) = j.as_f64() {
            scalars.push((format!("log/{k}"), v as f32));
        }
        row.insert(k, j);
    }
    let bad = ctx.bad_rows();
    if bad > 0 {
        row.insert("bad_rows".into(), bad.into());
    }
    row.insert(
        "data_wait_pct".into(),
        ((ctx.data_wait().0 * 100.0).round() / 100.0).into(),
    );
    row.insert("time".into(), crate::ckpt::meta::now_unix().into());
    let row = serde_json::Value::Object(row);
    let step = row.get("step").and_then(|s| s.as_u64());
    if let Some(s) = sink(ctx) {
        s.write_row(&row);
        if let (Some(step), Some(tb)) = (step, s.tensorboard.as_mut()) {
            let tagged: Vec<(&str, f32)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let _ = tb.scalars(step, &tagged);
        }
    }
    shown.sort();
    let step = step.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    Ok((row, format!("step {step}: {}", shown.join(", "))))
}

/// Write out what is buffered (before a checkpoint, at the end of a run).
pub fn flush(ctx: &mut RunContext) {
    if let Some(s) = ctx.metrics.as_mut() {
        s.flush();
    }
}

/// The training loss of this process's steps as one line of Unicode blocks, with its first
/// and last values: the shape of the run for a terminal user.
pub fn sparkline(losses: &[f32], width: usize) -> Option<String> {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let finite: Vec<f32> = losses.iter().copied().filter(|l| l.is_finite()).collect();
    if finite.len() < 2 {
        return None;
    }
    let bins = width.min(finite.len()).max(1);
    let means: Vec<f32> = (0..bins)
        .map(|b| {
            let (a, z) = (b * finite.len() / bins, (b + 1) * finite.len() / bins);
            let part = &finite[a..z.max(a + 1)];
            part.iter().sum::<f32>() / part.len() as f32
        })
        .collect();
    let (lo, hi) = means
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &m| (a.min(m), b.max(m)));
    let line: String = means
        .iter()
        .map(|&m| {
            let t = if hi > lo { (m - lo) / (hi - lo) } else { 0.5 };
            BLOCKS[((t * 7.0).round() as usize).min(7)]
        })
        .collect();
    Some(format!(
        "{line} {:.4} → {:.4}",
        finite[0],
        finite[finite.len() - 1]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_follows_the_curve() {
        let falling: Vec<f32> = (0..100).map(|i| 5.0 - i as f32 * 0.04).collect();
        let s = sparkline(&falling, 10).unwrap();
        assert!(s.starts_with("█"), "{s}");
        assert!(s.contains("▁ 5.0000 → 1.0400"), "{s}");
        assert_eq!(s.chars().take_while(|c| !c.is_whitespace()).count(), 10);
        assert!(sparkline(&[1.0], 10).is_none());
    }
}
