//! `<ckpt-dir>/metrics.jsonl`: one JSON object per logged step. A fresh run moves an earlier
//! run's file to metrics.prev.jsonl; a resumed run appends.

use super::context::RunContext;
use crate::error::{Error, Result};
use std::io::Write;

/// Append one row.
pub fn write(ctx: &mut RunContext, row: &serde_json::Value) -> Result<()> {
    if ctx.metrics.is_none() {
        let dir = ctx.ckpt_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("metrics.jsonl");
        if ctx.resume.is_none() && path.exists() {
            let _ = std::fs::rename(&path, dir.join("metrics.prev.jsonl"));
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::failed(format!("cannot open {}: {e}", path.display())))?;
        ctx.metrics = Some(f);
    }
    if let Some(f) = ctx.metrics.as_mut() {
        let line = serde_json::to_string(row).map_err(|e| Error::failed(e.to_string()))?;
        writeln!(f, "{line}")
            .map_err(|e| Error::failed(format!("cannot write metrics.jsonl: {e}")))?;
    }
    Ok(())
}

/// A row for the recipe's `fields` at the session's current step: step, lr, tokens and loss
/// from the session, the fields, data health, time. Returns the row and a one-line summary of
/// the fields for stderr.
pub fn log(
    ctx: &mut RunContext,
    fields: Vec<(String, serde_json::Value)>,
) -> Result<(serde_json::Value, String)> {
    let mut row = serde_json::Map::new();
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
    for (k, j) in fields {
        shown.push(match &j {
            serde_json::Value::Number(n) => format!("{k} {:.4}", n.as_f64().unwrap_or(0.0)),
            other => format!("{k} {other}"),
        });
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
    write(ctx, &row)?;
    shown.sort();
    let step = row
        .get("step")
        .map(|s| s.to_string())
        .unwrap_or_else(|| "-".into());
    Ok((row, format!("step {step}: {}", shown.join(", "))))
}
