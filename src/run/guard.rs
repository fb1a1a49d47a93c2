//! The guard: every entry point runs recipes through it. However the script ends — it returns,
//! raises, is stopped by a signal, or a host call panics — the guard classifies the ending,
//! writes the final checkpoint (unless nothing new was trained) and picks the exit code.

use super::checkpointing::{self, SaveResult};
use super::context::SharedContext;
use crate::error::{exit, Kind};
use crate::host::lua::is_interrupt;
use crate::host::{progress, signals};
use mlua::{Lua, LuaSerdeExt};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[derive(Debug)]
pub enum Ending {
    Completed,
    /// The REPL was left (Ctrl+D, :quit, end of piped input).
    ReplExit,
    Failed(String),
    Stopped(i32),
    Panicked(String),
    Refused(String),
    Diverged(String),
    /// The recipe called `os.exit(code)`.
    Exit(i32),
    /// Data-parallel: another rank stopped answering.
    PeerLost(String),
}

impl Ending {
    pub fn reason(&self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::ReplExit => "repl-exit",
            Ending::Failed(_) => "error",
            Ending::Stopped(_) => "interrupted",
            Ending::Panicked(_) => "panic",
            Ending::Refused(_) => "refused",
            Ending::Diverged(_) => "diverged",
            Ending::Exit(_) => "exit",
            Ending::PeerLost(_) => "peer-lost",
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Ending::Completed | Ending::ReplExit => exit::OK,
            Ending::Failed(_) | Ending::Diverged(_) | Ending::PeerLost(_) => exit::ERROR,
            Ending::Stopped(sig) => signals::exit_code(*sig),
            Ending::Panicked(_) => exit::PANIC,
            Ending::Refused(_) => exit::USAGE,
            Ending::Exit(code) => *code,
        }
    }
}

/// Run one chunk of Lua (a recipe file, a REPL line, a test case) and classify how it ended.
pub fn run_chunk(lua: &Lua, name: &str, src: &str) -> (Ending, Vec<mlua::Value>) {
    run_with(|| lua.load(src).set_name(name).eval::<mlua::MultiValue>())
}

/// Run any Lua entry (a chunk, a test case's function) and classify how it ended.
pub fn run_with(f: impl FnOnce() -> mlua::Result<mlua::MultiValue>) -> (Ending, Vec<mlua::Value>) {
    let result = catch_unwind(AssertUnwindSafe(f));
    match result {
        Ok(_) if signals::exit_requested().is_some() => (
            Ending::Exit(signals::exit_requested().unwrap_or(0)),
            Vec::new(),
        ),
        Ok(Ok(values)) => match signals::received().filter(|_| signals::stop_requested()) {
            Some(sig) => (Ending::Stopped(sig), Vec::new()),
            None => (Ending::Completed, values.into_iter().collect()),
        },
        Ok(Err(e)) => (classify_error(&e), Vec::new()),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            (Ending::Panicked(msg), Vec::new())
        }
    }
}

pub fn classify_error(e: &mlua::Error) -> Ending {
    if let Some(code) = signals::exit_requested() {
        return Ending::Exit(code);
    }
    // A lost peer explains a stop signal that came with it (the launcher's).
    if let Some(h) = crate::error::find_in(e).filter(|h| h.kind == Kind::PeerLost) {
        return Ending::PeerLost(h.message.clone());
    }
    if is_interrupt(e) || signals::stop_requested() {
        return Ending::Stopped(signals::received().unwrap_or(libc::SIGINT));
    }
    match crate::error::find_in(e) {
        Some(h) if h.kind == Kind::Usage => Ending::Refused(h.message.clone()),
        Some(h) if h.kind == Kind::Diverged => Ending::Diverged(h.message.clone()),
        _ => Ending::Failed(clean_message(e)),
    }
}

pub use crate::host::lua::clean_message;

/// The recipe's `wick.state` as JSON (null if absent or not plain data).
pub fn read_state(lua: &Lua) -> serde_json::Value {
    let state = lua
        .globals()
        .get::<mlua::Table>("wick")
        .and_then(|w| w.get::<mlua::Value>("state"));
    match state {
        Ok(mlua::Value::Nil) | Err(_) => serde_json::Value::Null,
        Ok(v) => match lua.from_value::<serde_json::Value>(v) {
            Ok(j) => j,
            Err(e) => {
                progress::warn(&format!(
                    "wick.state is not plain data (numbers, strings, booleans, tables) and was not saved: {e}"
                ));
                serde_json::Value::Null
            }
        },
    }
}

/// Report the ending, write the final checkpoint, and return the process exit code.
pub fn finalize(lua: &Lua, ctx: &SharedContext, ending: &Ending) -> i32 {
    progress::finish();
    match ending {
        Ending::Completed | Ending::ReplExit => {}
        Ending::Failed(msg) => progress::error(msg),
        Ending::Stopped(sig) if crate::dist::is_leader() => {
            crate::errln!("wick: stopped by {}", signals::signal_name(*sig))
        }
        Ending::Stopped(_) => {}
        Ending::Panicked(msg) => crate::errln!("wick: internal error: a host call panicked: {msg}\n(this is a bug in wick; please report it)"),
        Ending::Refused(msg) => progress::error(msg),
        Ending::Diverged(msg) => progress::error(msg),
        Ending::Exit(code) => progress::warn(&format!("the recipe called os.exit({code})")),
        Ending::PeerLost(msg) => progress::error(msg),
    }
    let code = ending.exit_code();
    if crate::dist::group().size > 1 {
        return finalize_rank(lua, ctx, ending, code);
    }
    save_final(lua, ctx, ending, code)
}

/// Data-parallel ending: rank 0 alone saves; every rank then exits with rank 0's code (74 on
/// all when its save failed). After a lost peer no collective can be trusted: rank 0 saves and
/// ends the whole job, the others give it time to (a rank that exits first makes the launcher
/// kill the rest). A rank that stopped alone (the group broken) exits with its own code.
fn finalize_rank(lua: &Lua, ctx: &SharedContext, ending: &Ending, code: i32) -> i32 {
    let lost = matches!(ending, Ending::PeerLost(_));
    let code = if crate::dist::is_leader() {
        save_final(lua, ctx, ending, code)
    } else {
        code
    };
    if lost {
        if crate::dist::is_leader() {
            crate::dist::abort(code);
        }
        std::thread::sleep(crate::dist::peer_timeout().min(std::time::Duration::from_secs(30)));
        return code;
    }
    if crate::dist::broken() {
        return code;
    }
    crate::dist::leader_code(code).unwrap_or(code)
}

/// Write the final checkpoint for `ending`; the exit code (74 when the save failed).
fn save_final(lua: &Lua, ctx: &SharedContext, ending: &Ending, code: i32) -> i32 {
    if matches!(ending, Ending::Refused(_)) {
        crate::errln!("wick: nothing saved; the checkpoint is untouched");
        return code;
    }
    let mut ctx = match ctx.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    if ctx.diverged {
        if ctx.opts.ckpt_path.exists() {
            crate::errln!(
                "wick: {} was not overwritten with the diverged state",
                ctx.opts.ckpt_path.display()
            );
        } else {
            crate::errln!(
                "wick: no regular checkpoint was written: the run diverged before one was saved (--save-every N keeps earlier steps)"
            );
        }
        return code;
    }
    super::metrics::flush(&mut ctx);
    if !ctx.opts.quiet {
        if let Some(line) = super::metrics::sparkline(&ctx.loss_history, 50) {
            crate::errln!("wick: loss {line} ({} steps)", ctx.loss_history.len());
        }
    }
    if ctx.step_ms_total > 0.0 && !ctx.opts.quiet {
        let (pct, ms) = ctx.data_wait();
        crate::errln!(
            "wick: training time {:.1} s, waiting for data {:.2} s ({pct:.1} %)",
            ctx.step_ms_total / 1e3,
            ms / 1e3
        );
    }
    // A heap that ran full must not keep the host from reading `wick.state`.
    crate::host::lua::lift_heap_limit(lua);
    let _ = lua.gc_collect();
    let state = read_state(lua);
    let reason = ending.reason();
    match checkpointing::save(&mut ctx, state.clone(), reason, None, false) {
        Ok(r @ SaveResult::Saved { .. }) => {
            crate::errln!("wick: {}", checkpointing::describe(&r, reason))
        }
        Ok(r @ SaveResult::NothingNew(_)) => {
            crate::errln!("wick: {}", checkpointing::describe(&r, reason))
        }
        Err(e) => {
            progress::error(&format!(
                "{e}\nwick: the previous checkpoint (if any) is untouched"
            ));
            match checkpointing::rescue(&mut ctx, state, reason) {
                Ok(r @ SaveResult::Saved { .. }) => {
                    let SaveResult::Saved { path, step, .. } = &r else {
                        unreachable!()
                    };
                    crate::errln!(
                        "wick: {}\nwick: the state of step {step} is safe there: free space or fix permissions, then continue with --resume {}",
                        checkpointing::describe(&r, reason),
                        path.display()
                    );
                }
                Ok(r @ SaveResult::NothingNew(_)) => {
                    crate::errln!("wick: {}", checkpointing::describe(&r, reason))
                }
                Err(e2) => progress::error(&format!(
                    "the rescue save failed too: {e2}; the steps since the last checkpoint are lost"
                )),
            }
            return exit::SAVE_FAILED;
        }
    }
    code
}

/// Drop a Rust backtrace that candle may have appended to an error message.
pub fn strip_backtrace(text: &str) -> String {
    match text
        .find("\n   0: ")
        .or_else(|| text.find("\nStack backtrace"))
    {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}
