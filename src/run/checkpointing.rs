//! Deciding and doing saves: what goes into a checkpoint, whether anything new was trained,
//! keeping an earlier run's file as `.prev`, and the one line that reports every save.

use super::context::RunContext;
use crate::ckpt::meta::{now_unix, SavedLoader, FORMAT_VERSION};
use crate::ckpt::{self, CkptMeta, SaveError};
use crate::train::Session;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub enum SaveResult {
    Saved {
        path: PathBuf,
        step: u64,
        bytes: u64,
        seconds: f64,
    },
    NothingNew(String),
}

pub fn prev_path(path: &Path) -> PathBuf {
    sibling(path, "prev")
}

pub fn diverged_path(path: &Path) -> PathBuf {
    sibling(path, "diverged")
}

/// full_model.ckpt → full_model.<tag>.ckpt
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ckpt".into());
    path.with_file_name(format!("{stem}.{tag}.{ext}"))
}

/// Build the metadata and tensor list of the session as it stands.
pub fn snapshot(
    ctx: &RunContext,
    session: &Session,
    state: serde_json::Value,
    reason: &str,
) -> Result<(CkptMeta, Vec<(String, candle_core::Tensor)>), String> {
    let mut tensors = Vec::new();
    for (name, var) in session.model.params() {
        tensors.push((format!("model.{name}"), var.as_tensor().clone()));
    }
    for (name, m) in &session.optim.m {
        tensors.push((format!("optim.m.{name}"), m.clone()));
    }
    for (name, v) in &session.optim.v {
        tensors.push((format!("optim.v.{name}"), v.clone()));
    }
    let mut loaders = BTreeMap::new();
    for (name, loader) in &ctx.loaders {
        let l = loader
            .lock()
            .map_err(|_| format!("data loader {name} is in an inconsistent state"))?;
        loaders.insert(
            name.clone(),
            SavedLoader {
                cursor: l.committed.clone(),
                tokenizer: l.tokenizer.identity(),
                batch: l.spec.batch,
                seq_len: l.spec.seq_len,
                sources: l
                    .spec
                    .sources
                    .iter()
                    .map(|(n, s, _)| (n.clone(), s.files.clone()))
                    .collect(),
            },
        );
    }
    let meta = CkptMeta {
        format_version: FORMAT_VERSION,
        wick_version: env!("CARGO_PKG_VERSION").to_string(),
        reason: reason.to_string(),
        step: session.step,
        tokens_seen: session.tokens_seen,
        loss: session.last_loss,
        lr: session.lr,
        model: session.model.config.clone(),
        optim: session.optim.config.clone(),
        optim_step: session.optim.step,
        seed: ctx.opts.seed,
        run_id: ctx.run_id.clone(),
        started_unix: ctx.started_unix,
        saved_unix: now_unix(),
        device: ctx.opts.compute.device_name.clone(),
        dtype: ctx.opts.compute.dtype_name().into(),
        world_size: crate::dist::group().size,
        loaders,
        state,
        recipe: ctx.opts.recipe.as_ref().map(|p| p.display().to_string()),
        recipe_hash: ctx.opts.recipe_hash.clone(),
        checksum: String::new(),
    };
    Ok((meta, tensors))
}

/// Save the session to `path` (default: the run's checkpoint path) unless nothing was trained
/// since the last checkpoint. `force` saves even then (an explicit `wick.save(path)`).
pub fn save(
    ctx: &mut RunContext,
    state: serde_json::Value,
    reason: &str,
    path: Option<PathBuf>,
    force: bool,
) -> Result<SaveResult, SaveError> {
    let target = path.clone().unwrap_or_else(|| ctx.opts.ckpt_path.clone());
    let session = match &ctx.session {
        Some(s) => s.clone(),
        None => {
            return Ok(SaveResult::NothingNew(
                "no session was created, so there is nothing to save".into(),
            ))
        }
    };
    let Ok(session) = session.lock() else {
        return Ok(SaveResult::NothingNew(format!(
            "the session was left inconsistent by a crash inside a step, so it was not saved; {} untouched",
            target.display()
        )));
    };
    if session.step == 0 {
        return Ok(SaveResult::NothingNew(format!(
            "no step was trained; nothing saved ({} untouched)",
            target.display()
        )));
    }
    if !force && path.is_none() && session.step == ctx.saved_step {
        return Ok(SaveResult::NothingNew(format!(
            "no step since the checkpoint at step {}; {} untouched",
            ctx.saved_step,
            target.display()
        )));
    }
    let (mut meta, tensors) =
        snapshot(ctx, &session, state, reason).map_err(|cause| SaveError {
            path: target.clone(),
            cause,
        })?;
    if path.is_none() {
        keep_earlier_run(ctx, &target);
    }
    // The metrics rows of the steps this checkpoint holds reach the disk first.
    super::metrics::flush(ctx);
    crate::host::signals::set_saving(true);
    let result = ckpt::save(&target, &mut meta, &tensors);
    crate::host::signals::set_saving(false);
    let report = result?;
    if path.is_none() {
        ctx.saved_step = session.step;
    }
    Ok(SaveResult::Saved {
        path: target,
        step: session.step,
        bytes: report.bytes,
        seconds: report.seconds,
    })
}

/// Where a run's state goes when its checkpoint directory cannot take it (disk full, no
/// permission): `--rescue-dir`, else `$XDG_STATE_HOME/wick/rescue` (`~/.local/state/...`),
/// else the temp directory; one subdirectory per run.
pub fn rescue_path(ctx: &RunContext) -> PathBuf {
    let base = ctx.opts.rescue_dir.clone().unwrap_or_else(|| {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .map(|p| p.join("wick").join("rescue"))
            .unwrap_or_else(|| std::env::temp_dir().join("wick-rescue"))
    });
    let file = ctx
        .opts
        .ckpt_path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("full_model.ckpt"));
    base.join(&ctx.run_id).join(file)
}

/// Save the session at the rescue location (after the real save failed).
pub fn rescue(
    ctx: &mut RunContext,
    state: serde_json::Value,
    reason: &str,
) -> Result<SaveResult, SaveError> {
    let path = rescue_path(ctx);
    save(ctx, state, reason, Some(path), true)
}

/// Before the first save over a file that belongs to another run, keep it as `.prev`.
fn keep_earlier_run(ctx: &mut RunContext, target: &Path) {
    if ctx.prev_handled {
        return;
    }
    ctx.prev_handled = true;
    if let Some(old) = ckpt::peek(target) {
        if old.run_id != ctx.run_id {
            let prev = prev_path(target);
            let _ = std::fs::remove_file(&prev);
            if std::fs::hard_link(target, &prev).is_err() {
                let _ = std::fs::copy(target, &prev);
            }
        }
    }
}

/// The line printed for every save.
pub fn describe(result: &SaveResult, reason: &str) -> String {
    match result {
        SaveResult::Saved {
            path,
            step,
            bytes,
            seconds,
        } => format!(
            "saved {} at step {step} (reason {reason}, {}, written in {:.2} s)",
            path.display(),
            human_bytes(*bytes),
            seconds
        ),
        SaveResult::NothingNew(msg) => msg.clone(),
    }
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// What the start of a fresh run says about a checkpoint already at its path.
pub fn announce_existing(path: &Path) -> Option<String> {
    let meta = ckpt::peek(path)?;
    Some(format!(
        "{} holds an earlier run (step {}, reason {}); this run will keep it as {} when it first saves (use --resume to continue it)",
        path.display(),
        meta.step,
        meta.reason,
        prev_path(path).display()
    ))
}
