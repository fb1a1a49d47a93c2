//! The run context: what the host knows about a run beyond the Lua state — options, the
//! checkpoint being resumed, the session and loaders to checkpoint, metrics output.
//! It lives in the Lua state's app data so bindings and the guard reach the same object.

use crate::ckpt::Checkpoint;
use crate::data::Loader;
use crate::device::Compute;

use crate::train::Session;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone)]
pub struct RunOptions {
    pub ckpt_path: PathBuf,
    pub seed: u64,
    /// Device and compute dtype (`--device`, `--dtype`).
    pub compute: Compute,
    pub save_every: Option<u64>,
    /// A metrics row every N steps (0: none; `--metrics-every`).
    pub metrics_every: u64,
    /// Where TensorBoard event files go (None: not written).
    pub tensorboard: Option<PathBuf>,
    pub recipe: Option<PathBuf>,
    pub recipe_hash: Option<String>,
    pub args: Vec<String>,
    /// Print progress lines (off inside `wick test` cases).
    pub quiet: bool,
    /// Where `expect.golden` files live (`golden/` beside a test file), and whether
    /// `wick test --bless` asked to (re)write them.
    pub golden_dir: Option<PathBuf>,
    pub bless: bool,
    /// Where the state goes when the checkpoint directory cannot take it (`--rescue-dir`).
    pub rescue_dir: Option<PathBuf>,
}

pub struct RunContext {
    pub opts: RunOptions,
    pub resume: Option<Arc<Checkpoint>>,
    /// The session the guard checkpoints (the last one created).
    pub session: Option<Arc<Mutex<Session>>>,
    pub loaders: Vec<(String, Arc<Mutex<Loader>>)>,
    pub run_id: String,
    pub started_unix: f64,
    /// Step of the last checkpoint written or resumed from: no newer step → nothing to save.
    pub saved_step: u64,
    /// The existing file at ckpt_path was already set aside (or did not need to be).
    pub prev_handled: bool,
    pub metrics: Option<super::metrics::MetricsSink>,
    /// Training loss of every step this process ran (the closing sparkline).
    pub loss_history: Vec<f32>,
    /// metrics.jsonl could not be opened (said once; training goes on).
    pub metrics_unavailable: bool,
    /// When this process's run began (elapsed seconds in metrics).
    pub started: std::time::Instant,
    /// Set when training diverged: the final checkpoint must not overwrite the good one.
    pub diverged: bool,
    /// For tokens/s on the progress line.
    pub loop_clock: Option<(std::time::Instant, u64)>,
    /// Milliseconds spent inside training steps (to report the share spent waiting for data).
    pub step_ms_total: f64,
    /// Golden files written under --bless: (name, "new" | "changed" | "unchanged").
    pub blessed: Vec<(String, String)>,
}

pub type SharedContext = Arc<Mutex<RunContext>>;

impl RunContext {
    pub fn new(opts: RunOptions, resume: Option<Arc<Checkpoint>>) -> RunContext {
        let (run_id, saved_step) = match &resume {
            Some(c) => (c.meta.run_id.clone(), c.meta.step),
            None => (new_run_id(), 0),
        };
        RunContext {
            opts,
            resume,
            session: None,
            loaders: Vec::new(),
            run_id,
            started_unix: crate::ckpt::meta::now_unix(),
            saved_step,
            prev_handled: false,
            metrics: None,
            loss_history: Vec::new(),
            metrics_unavailable: false,
            started: std::time::Instant::now(),
            diverged: false,
            loop_clock: None,
            step_ms_total: 0.0,
            blessed: Vec::new(),
        }
    }

    /// Time the loaders kept training waiting, as a share of training time (0 when the
    /// prefetch thread keeps ahead), and its total in ms.
    pub fn data_wait(&self) -> (f64, f64) {
        let wait: f64 = self
            .loaders
            .iter()
            .filter_map(|(_, l)| l.lock().ok().map(|l| l.wait_ms_total))
            .sum();
        let total = wait + self.step_ms_total;
        (
            if total > 0.0 {
                100.0 * wait / total
            } else {
                0.0
            },
            wait,
        )
    }

    pub fn ckpt_dir(&self) -> PathBuf {
        match self.opts.ckpt_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Bad rows the loaders have skipped so far.
    pub fn bad_rows(&self) -> u64 {
        self.loaders
            .iter()
            .filter_map(|(_, l)| l.lock().ok().map(|l| l.stats_snapshot().bad_rows))
            .sum()
    }
}

/// The context, even after a panic elsewhere poisoned its lock: the guard must still be able to
/// save, and every field stays consistent between host calls.
pub fn lock(ctx: &SharedContext) -> MutexGuard<'_, RunContext> {
    ctx.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_run_id() -> String {
    let t = crate::ckpt::meta::now_unix();
    let mix = xxhash_rust::xxh3::xxh3_64(format!("{t}/{}", std::process::id()).as_bytes());
    format!("{:x}-{:08x}", t as u64, mix as u32)
}
