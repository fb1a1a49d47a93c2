//! Every line wick prints goes through here, and none of them can decide how a run ends: a
//! terminal that hung up (EIO), a pipe whose reader left (EPIPE) or a full disk under a
//! redirect is noticed once and then ignored — never a panic, as `println!` would be. Since a
//! terminal can vanish, the run's own stderr lines also go to `<ckpt-dir>/wick.log`, so a user
//! who reconnects can read why and where the run stopped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static STDERR_GONE: AtomicBool = AtomicBool::new(false);
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// `println!` that never panics.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::host::output::stdout_line(&format!($($arg)*)) };
}

/// `eprintln!` that never panics, and also writes the line to the run's log.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::host::output::stderr_line(&format!($($arg)*)) };
}

fn lock_log() -> std::sync::MutexGuard<'static, Option<(PathBuf, File)>> {
    LOG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Append this run's stderr lines to `<dir>/wick.log` from now on (a header line first).
/// A log that cannot be opened is said once on stderr and otherwise ignored.
pub fn open_log(dir: &Path) {
    let path = dir.join("wick.log");
    let opened = std::fs::create_dir_all(dir).and_then(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    });
    match opened {
        Ok(mut f) => {
            let args: Vec<String> = std::env::args().collect();
            let _ = writeln!(
                f,
                "==== {} {} (pid {})",
                crate::ckpt::meta::format_unix(crate::ckpt::meta::now_unix()),
                args.join(" "),
                std::process::id()
            );
            *lock_log() = Some((path, f));
        }
        Err(e) => {
            stderr_only(&format!(
                "wick: warning: cannot write the run log {}: {e}",
                path.display()
            ));
        }
    }
}

/// Where the run's log is, if one is open.
pub fn log_path() -> Option<PathBuf> {
    lock_log().as_ref().map(|(p, _)| p.clone())
}

/// A line for the log only (e.g. progress that the terminal shows as a redrawn bar).
pub fn log_line(line: &str) {
    if let Some((_, f)) = lock_log().as_mut() {
        let _ = writeln!(f, "{line}");
    }
}

fn stderr_only(line: &str) -> bool {
    if STDERR_GONE.load(Ordering::Relaxed) {
        return false;
    }
    // One write per line: ranks of a data-parallel job share one stderr, and a line written in
    // pieces (text, then the newline) interleaves with theirs.
    let whole = format!("{line}\n");
    let mut e = std::io::stderr().lock();
    if let Err(err) = e.write_all(whole.as_bytes()).and_then(|_| e.flush()) {
        STDERR_GONE.store(true, Ordering::Relaxed);
        log_line(&format!(
            "wick: stderr is gone ({err}); messages continue in this log only"
        ));
        return false;
    }
    true
}

/// A line on stderr (if it is still there) and in the run's log.
pub fn stderr_line(line: &str) {
    stderr_only(line);
    log_line(line);
}

/// A line on stdout, if it is still there.
pub fn stdout_line(line: &str) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let whole = format!("{line}\n");
    let mut o = std::io::stdout().lock();
    if let Err(err) = o.write_all(whole.as_bytes()).and_then(|_| o.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        drop(o);
        stderr_line(&format!(
            "wick: stdout is gone ({err}); further output to it is dropped, the run goes on"
        ));
    }
}

/// Is stderr still writable (as far as we know)?
pub fn stderr_alive() -> bool {
    !STDERR_GONE.load(Ordering::Relaxed)
}
