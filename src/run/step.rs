//! The one path a training step goes through, whoever calls it (a recipe's `session:step`,
//! the REPL, a test): the indivisible optimizer step, then the run's policy around it —
//! commit the data cursor, account the time, show progress, save every N steps, and keep a
//! diverged state beside (never over) the last good checkpoint.

use super::checkpointing::{self, diverged_path};
use super::context::{lock, SharedContext};
use crate::data::{Loader, NextError};
use crate::error::{Error, Result};
use crate::host::{progress, signals};
use crate::train::{Session, StepError, Windows};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The session, or a clear error when a crash inside an earlier step poisoned it.
pub fn lock_session(session: &Mutex<Session>) -> Result<MutexGuard<'_, Session>> {
    session.lock().map_err(|_| {
        Error::failed("the session is unusable: a previous host call crashed inside a step")
    })
}

/// Train one step on `windows`. `commit` runs once the step succeeded (the loader's cursor
/// moves past the batch only then); `state` reads the recipe's `wick.state` for a save.
pub fn train(
    ctx: &SharedContext,
    session: &Mutex<Session>,
    windows: &Windows,
    commit: impl FnOnce(),
    state: impl Fn() -> serde_json::Value,
) -> Result<f64> {
    let started = Instant::now();
    let step_tokens = (windows.global_rows() * (windows.width - 1)) as u64;
    if crate::dist::group().size > 1 {
        agree_on_step(session, windows)?;
    }
    let result = lock_session(session)?.train_step(windows);
    if result.is_ok() {
        commit();
    }
    lock(ctx).step_ms_total += started.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(loss) => {
            let (step, lr, tokens, grad_norm) = {
                let s = lock_session(session)?;
                (s.step, s.lr, s.tokens_seen, s.last_grad_norm)
            };
            let tokens_per_s = show_progress(ctx, started, (step, loss, lr, tokens, step_tokens));
            let row = super::metrics::StepRow {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                tokens_seen: tokens,
            };
            super::metrics::step(&mut lock(ctx), &row);
            let save_every = lock(ctx).opts.save_every;
            if save_every.is_some_and(|n| n > 0 && step % n == 0) && crate::dist::is_leader() {
                let state = state();
                let mut c = lock(ctx);
                let r = checkpointing::save(&mut c, state, "periodic", None, false)?;
                progress::warn(&checkpointing::describe(&r, "periodic"));
            }
            Ok(loss)
        }
        Err(StepError::Diverged { step, what }) => {
            let msg = format!(
                "training diverged at step {step}: {what}; lower the learning rate or clip harder"
            );
            let state = state();
            let mut c = lock(ctx);
            let path = diverged_path(&c.opts.ckpt_path);
            c.diverged = true;
            if crate::dist::is_leader() {
                match checkpointing::save(&mut c, state, "diverged", Some(path), true) {
                    Ok(r) => progress::warn(&checkpointing::describe(&r, "diverged")),
                    Err(e) => progress::warn(&format!("could not keep the diverged state: {e}")),
                }
            }
            Err(Error::diverged(msg))
        }
        Err(StepError::PeerLost(m)) => Err(Error::peer_lost(m)),
        Err(StepError::Interrupted) => Err(Error::interrupted()),
        Err(StepError::Failed(e)) => Err(Error::failed(format!(
            "session:step: {}",
            super::guard::strip_backtrace(&e.to_string())
        ))),
    }
}

/// Data-parallel: before a step, the ranks agree whether to take it (a stop asked of any rank
/// stops them all here, before the step) and check that they train the same model on the
/// same batch.
fn agree_on_step(session: &Mutex<Session>, windows: &Windows) -> Result<()> {
    let model_digest = {
        let s = lock_session(session)?;
        crate::dist::digest(&format!("{:?}", s.model.config))
    };
    let mark = if signals::stop_requested() {
        signals::received().unwrap_or(libc::SIGINT)
    } else {
        0
    };
    let batch_digest = windows.global_digest();
    match crate::dist::agree(mark, model_digest, batch_digest) {
        Ok(crate::dist::Agreement::Go) => Ok(()),
        Ok(crate::dist::Agreement::Stop(sig)) => {
            signals::agreed_stop(sig);
            Err(Error::interrupted())
        }
        Err(crate::dist::Disagreement::Lost(l)) if l.by_signal => Err(Error::interrupted()),
        Err(crate::dist::Disagreement::Lost(l)) => Err(Error::peer_lost(l.message)),
        Err(crate::dist::Disagreement::Differ(m)) => Err(Error::usage(m)),
    }
}

/// The progress line: loss, lr, tokens/s since the loop began, bad rows skipped so far.
/// Returns the tokens/s.
fn show_progress(
    ctx: &SharedContext,
    step_started: Instant,
    (step, loss, lr, tokens, step_tokens): (u64, f64, f64, u64, u64),
) -> f64 {
    let mut c = lock(ctx);
    let (t0, tokens0) = *c
        .loop_clock
        .get_or_insert((step_started, tokens.saturating_sub(step_tokens)));
    let secs = t0.elapsed().as_secs_f64();
    let tps = if secs > 0.0 {
        (tokens - tokens0) as f64 / secs
    } else {
        0.0
    };
    let bad = c.bad_rows();
    let extra = if bad > 0 {
        format!(" ({bad} bad rows skipped)")
    } else {
        String::new()
    };
    progress::update(step, loss, lr, tps, &extra);
    tps
}

/// Mean loss over the next `n` batches of `loader`, changing no training state.
pub fn eval(session: &Mutex<Session>, loader: &Arc<Mutex<Loader>>, n: usize) -> Result<f64> {
    let batches = {
        let mut l = loader
            .lock()
            .map_err(|_| Error::failed("loader is unusable after a crash"))?;
        l.eval_batches(n.max(1), &signals::should_unwind)
            .map_err(|e| match e {
                NextError::Interrupted => Error::interrupted(),
                NextError::Data(m) => Error::failed(m),
            })?
    };
    let s = lock_session(session)?;
    let mut total = 0.0;
    for b in &batches {
        if signals::should_unwind() {
            return Err(Error::interrupted());
        }
        s.check_windows(b)?;
        total += s
            .eval_loss(b)
            .map_err(|e| Error::failed(format!("session:eval: {e}")))?;
    }
    Ok(total / batches.len() as f64)
}
