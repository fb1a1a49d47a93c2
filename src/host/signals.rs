//! Signals: SIGINT, SIGTERM and SIGHUP set one stop flag that the Lua hook and every host call
//! check. ctrlc runs our handler on its own thread (so it may print and exit); a thin sigaction
//! wrapper in front of ctrlc's handler records *which* signal came, for the exit code.
//!
//! First signal: stop at the next step boundary and save. Second: acknowledged. Third: abort at
//! once, removing a half-written temp file, so the previous checkpoint is what remains.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicU32 = AtomicU32::new(0);
/// Signals recorded by the handler, and those the handler thread has acted on: while they
/// differ, a signal is on its way and `clear` must not forget which one it was.
static RAISED: AtomicU32 = AtomicU32::new(0);
static HANDLED: AtomicU32 = AtomicU32::new(0);
static SAVING: AtomicBool = AtomicBool::new(false);
/// The code `os.exit` asked for (`NO_EXIT` when it was not called).
static EXIT_CODE: AtomicI32 = AtomicI32::new(NO_EXIT);
const NO_EXIT: i32 = i32::MIN;
/// In the REPL a first Ctrl+C cancels the running command instead of ending the program.
static REPL_MODE: AtomicBool = AtomicBool::new(false);
/// The REPL is waiting for input: a SIGTERM/SIGHUP there cannot reach the main thread, so the
/// handler thread runs this (save and exit) instead.
static AT_PROMPT: AtomicBool = AtomicBool::new(false);
type PromptExit = Box<dyn Fn(i32) + Send>;
static PROMPT_EXIT: std::sync::Mutex<Option<PromptExit>> = std::sync::Mutex::new(None);
static CHAINED: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];
const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The error a stopped script unwinds with (recognised by the guard and the xpcall prelude).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}
impl std::error::Error for Interrupted {}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// In a data-parallel run a signal only marks this rank: the ranks agree on a stop at the next
/// step boundary, and only then does the script unwind (on every rank at the same step).
static DEFER_TO_GROUP: AtomicBool = AtomicBool::new(false);
static AGREED: AtomicBool = AtomicBool::new(false);

/// Make signals wait for the group's agreement before the script unwinds.
pub fn defer_to_group() {
    DEFER_TO_GROUP.store(true, Ordering::SeqCst);
}

/// The group agreed to stop (some rank was signalled with `sig`): unwind here, and exit as
/// that signal would.
pub fn agreed_stop(sig: i32) {
    if LAST_SIGNAL.load(Ordering::SeqCst) == 0 {
        LAST_SIGNAL.store(sig, Ordering::SeqCst);
    }
    AGREED.store(true, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
}

/// Whether the script should unwind now: a stop was asked for, and (in a data-parallel run)
/// the ranks agreed on it, or the user insisted with a second signal.
pub fn should_unwind() -> bool {
    STOP.load(Ordering::Relaxed)
        && (!DEFER_TO_GROUP.load(Ordering::Relaxed)
            || AGREED.load(Ordering::Relaxed)
            || COUNT.load(Ordering::Relaxed) >= 2
            || EXIT_CODE.load(Ordering::Relaxed) != NO_EXIT)
}

/// The signal that asked to stop, if any.
pub fn received() -> Option<i32> {
    match LAST_SIGNAL.load(Ordering::Relaxed) {
        0 if STOP.load(Ordering::Relaxed) => Some(libc::SIGINT),
        0 => None,
        s => Some(s),
    }
}

pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// The recipe called `os.exit(code)`: stop at this boundary like a signal would (no `pcall`
/// can swallow it), then save and exit with `code`.
pub fn request_exit(code: i32) {
    EXIT_CODE.store(code, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
}

/// The code of an `os.exit` that is ending the script, if one is.
pub fn exit_requested() -> Option<i32> {
    match EXIT_CODE.load(Ordering::SeqCst) {
        NO_EXIT => None,
        code => Some(code),
    }
}

/// Forget a handled stop (the REPL, after cancelling a command). A signal still on its way to
/// the handler thread is kept: it belongs to what comes next.
pub fn clear() {
    if RAISED.load(Ordering::SeqCst) != HANDLED.load(Ordering::SeqCst) {
        return;
    }
    EXIT_CODE.store(NO_EXIT, Ordering::SeqCst);
    STOP.store(false, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    LAST_SIGNAL.store(0, Ordering::SeqCst);
}

pub fn set_saving(on: bool) {
    SAVING.store(on, Ordering::SeqCst);
}

pub fn set_repl_mode(on: bool) {
    REPL_MODE.store(on, Ordering::SeqCst);
}

extern "C" fn record_then_chain(sig: libc::c_int) {
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    RAISED.fetch_add(1, Ordering::SeqCst);
    if let Some(i) = SIGNALS.iter().position(|&s| s == sig) {
        let prev = CHAINED[i].load(Ordering::SeqCst);
        if prev != 0 && prev != libc::SIG_IGN && prev != libc::SIG_DFL {
            // SAFETY: `prev` is the handler ctrlc installed (a plain `extern "C" fn(c_int)`).
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
            f(sig);
        }
    }
}

pub fn set_at_prompt(on: bool) {
    AT_PROMPT.store(on, Ordering::SeqCst);
}

pub fn set_prompt_exit(f: PromptExit) {
    if let Ok(mut g) = PROMPT_EXIT.lock() {
        *g = Some(f);
    }
}

fn on_signal() {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    STOP.store(true, Ordering::SeqCst);
    let sig = LAST_SIGNAL.load(Ordering::SeqCst);
    if AT_PROMPT.load(Ordering::SeqCst) {
        if let Ok(g) = PROMPT_EXIT.lock() {
            if let Some(f) = g.as_ref() {
                f(if sig == 0 { libc::SIGINT } else { sig });
            }
        }
    }
    let name = signal_name(if sig == 0 { libc::SIGINT } else { sig });
    match n {
        // In a data-parallel group rank 0 speaks for all: every rank gets mpirun's or srun's
        // signal, and N copies of the notice say nothing more than one.
        1 | 2 if !crate::dist::is_leader() => {}
        1 if REPL_MODE.load(Ordering::SeqCst) => {}
        1 => crate::host::progress::warn(&format!(
            "{name} received: stopping at the next step boundary, then saving the checkpoint (Ctrl+C twice more aborts without saving)"
        )),
        2 if SAVING.load(Ordering::SeqCst) => {
            crate::host::progress::warn("saving checkpoint, please wait (one more Ctrl+C aborts; the previous checkpoint stays)")
        }
        2 => crate::host::progress::warn("stopping, please wait (one more Ctrl+C aborts without saving)"),
        _ => {
            let tmp = crate::ckpt::WRITING.try_lock().ok().and_then(|g| g.clone());
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            crate::errln!("\nwick: aborted by {name} without saving; the previous checkpoint (if any) is intact");
            std::process::exit(exit_code(if sig == 0 { libc::SIGINT } else { sig }));
        }
    }
}

/// Install the handlers (once per process; later calls do nothing).
pub fn install() -> Result<(), String> {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return Ok(());
    }
    *installed = true;
    ctrlc::set_handler(on_signal).map_err(|e| format!("cannot install signal handlers: {e}"))?;
    for (i, &sig) in SIGNALS.iter().enumerate() {
        // SAFETY: plain sigaction calls; the new handler only stores an atomic and chains.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            CHAINED[i].store(old.sa_sigaction, Ordering::SeqCst);
            let mut new = old;
            new.sa_sigaction = record_then_chain as *const () as usize;
            new.sa_flags &= !libc::SA_SIGINFO;
            libc::sigaction(sig, &new, std::ptr::null_mut());
        }
    }
    // A file-size limit must surface as a write error (exit 74), not kill the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    Ok(())
}
