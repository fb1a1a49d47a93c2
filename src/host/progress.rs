//! Human output on stderr: a progress bar on a terminal (step, loss, lr, tokens/s, ETA), plain
//! lines otherwise, and warnings that print above the bar instead of through it. Lines go
//! through `output`, so they reach the run's log and a failed write never ends the run.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

struct State {
    bar: Option<ProgressBar>,
    total: u64,
    first_step: u64,
    started: Instant,
    last_line: Option<Instant>,
    quiet: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silence progress lines (not warnings), e.g. inside `wick test` cases.
pub fn set_quiet(q: bool) {
    QUIET.store(q, std::sync::atomic::Ordering::Relaxed);
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A whole line on stderr, above the bar if one is drawn, and in the run's log.
fn line(text: String) {
    let guard = lock();
    match guard.as_ref().and_then(|s| s.bar.as_ref()) {
        Some(bar) if super::output::stderr_alive() => {
            // indicatif ignores write errors: a hung-up terminal costs nothing here.
            bar.println(&text);
            super::output::log_line(&text);
        }
        _ => super::output::stderr_line(&text),
    }
}

/// Print `wick: MSG` above the bar (or plainly).
pub fn warn(msg: &str) {
    line(format!("wick: {msg}"));
}

/// A training loop of `total` steps begins at `first_step` (non-zero after a resume).
pub fn start(first_step: u64, total: u64) {
    let quiet = QUIET.load(std::sync::atomic::Ordering::Relaxed);
    let bar = if !quiet && std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(8));
        let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(first_step);
        Some(bar)
    } else {
        None
    };
    let mut g = lock();
    if let Some(old) = g.take().and_then(|s| s.bar) {
        old.finish_and_clear();
    }
    *g = Some(State {
        bar,
        total,
        first_step,
        started: Instant::now(),
        last_line: None,
        quiet,
    });
}

/// Test-only: the step at which drawing progress panics (`WICK_TEST_HOOKS` and
/// `WICK_TEST_PANIC_IN_PROGRESS_AT=N`), to prove a panic in output still saves.
fn panic_hook_step() -> Option<u64> {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var_os("WICK_TEST_HOOKS")?;
        std::env::var("WICK_TEST_PANIC_IN_PROGRESS_AT")
            .ok()?
            .parse()
            .ok()
    })
}

pub fn update(step: u64, loss: f64, lr: f64, tokens_per_s: f64, extra: &str) {
    if panic_hook_step() == Some(step) {
        panic!("test panic while drawing progress at step {step}");
    }
    let mut g = lock();
    let Some(s) = g.as_mut() else { return };
    let msg = format!(
        "loss {loss:.4} lr {lr:.2e} {:.0} tok/s{extra}",
        tokens_per_s
    );
    if let Some(bar) = &s.bar {
        bar.set_position(step.min(s.total));
        bar.set_message(msg.clone());
    }
    if s.quiet {
        return;
    }
    // Plain lines: about every 5 % of the run and at its end, at most one per second.
    let every = (s.total / 20).max(1);
    let due = step == s.total || step.is_multiple_of(every) || step == s.first_step + 1;
    let spaced = s
        .last_line
        .map(|t| t.elapsed().as_secs_f64() >= 1.0)
        .unwrap_or(true);
    if due && (spaced || step == s.total) {
        let done = step.saturating_sub(s.first_step) as f64;
        let left = s.total.saturating_sub(step) as f64;
        let eta = if done > 0.0 {
            s.started.elapsed().as_secs_f64() / done * left
        } else {
            0.0
        };
        let text = format!("step {step}/{} {msg} eta {eta:.0}s", s.total);
        if s.bar.is_some() {
            super::output::log_line(&text); // the terminal shows the bar instead
        } else {
            super::output::stderr_line(&text);
        }
        s.last_line = Some(Instant::now());
    }
}

/// End the bar, leaving its last state on screen.
pub fn finish() {
    let mut g = lock();
    if let Some(bar) = g.take().and_then(|s| s.bar) {
        bar.abandon();
    }
}

/// The one place an error line is printed: `error: MESSAGE`, above the bar if one is drawn.
pub fn error(msg: &str) {
    line(format!("error: {msg}"));
}
