//! One run setup for every entry point (`wick run`, `wick repl`, a `wick test` case, and any
//! future one: a distributed launcher, an embedding API): open the device, install the signal
//! handlers, sweep temp files a killed save left, name the checkpoint path, load and check the
//! checkpoint to resume, and build the Lua state with the `wick` API wired to the run.

use crate::ckpt::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::host::{lua, progress, signals};
use crate::run::checkpointing::announce_existing;
use crate::run::{RunContext, RunOptions, SharedContext};
use mlua::Lua;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The checkpoint file inside a checkpoint directory.
pub const CKPT_FILE: &str = "full_model.ckpt";

pub fn ckpt_path(ckpt_dir: &Path) -> PathBuf {
    ckpt_dir.join(CKPT_FILE)
}

/// Where to resume from.
#[derive(Clone, Debug, Default)]
pub enum Resume {
    #[default]
    No,
    /// The checkpoint in the run's `--ckpt-dir`.
    Default,
    Path(PathBuf),
}

/// What an entry point asks for.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub ckpt_dir: PathBuf,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub save_every: Option<u64>,
    /// A metrics row every N steps (0: none).
    pub metrics_every: u64,
    /// TensorBoard event files: None = `<ckpt-dir>/tb`, Some(None) = off.
    pub tensorboard: Option<Option<PathBuf>>,
    /// The recipe (or test file) and its source: its directory is on the module path and its
    /// hash is compared on resume.
    pub recipe: Option<(PathBuf, String)>,
    pub resume: Resume,
    /// Refuse to resume when the recipe changed.
    pub strict: bool,
    pub args: Vec<String>,
    /// No progress lines and no start-up notes (test cases).
    pub quiet: bool,
    pub golden_dir: Option<PathBuf>,
    pub bless: bool,
    /// The run owns its checkpoint directory: it takes the directory's lock and keeps its
    /// messages in `<ckpt-dir>/wick.log` (off only for throwaway states, e.g. listing tests).
    pub owns_dir: bool,
    /// Cap on the Lua heap in bytes (0: none).
    pub lua_memory: usize,
    pub rescue_dir: Option<PathBuf>,
    /// `wick run`: may be one rank of a data-parallel group (the REPL and test cases may not).
    pub data_parallel: bool,
}

impl RunSpec {
    pub fn new(ckpt_dir: impl Into<PathBuf>) -> RunSpec {
        RunSpec {
            ckpt_dir: ckpt_dir.into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: 1337,
            save_every: None,
            metrics_every: 1,
            tensorboard: None,
            recipe: None,
            resume: Resume::No,
            strict: false,
            args: Vec::new(),
            quiet: false,
            golden_dir: None,
            bless: false,
            owns_dir: true,
            lua_memory: default_lua_memory(),
            rescue_dir: None,
            data_parallel: false,
        }
    }
}

/// A run ready to execute Lua: the state and the context the guard checkpoints.
pub struct Run {
    pub lua: Lua,
    pub ctx: SharedContext,
    pub opts: RunOptions,
}

/// The default cap on the Lua heap: a quarter of physical memory (the rest is the model's,
/// the data's and the system's), at least 256 MiB.
pub fn default_lua_memory() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return 4 << 30;
    }
    ((pages as usize).saturating_mul(page as usize) / 4).max(256 << 20)
}

/// A size: `512M`, `4G`, `1.5G`, a byte count, or `0`/`none` (no limit).
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "none" || t == "0" {
        return Ok(0);
    }
    let (num, mult) = match t.trim_end_matches(['b', 'i']).chars().last() {
        Some('k') => (&t[..t.find('k').unwrap_or(0)], 1u64 << 10),
        Some('m') => (&t[..t.find('m').unwrap_or(0)], 1 << 20),
        Some('g') => (&t[..t.find('g').unwrap_or(0)], 1 << 30),
        Some('t') => (&t[..t.find('t').unwrap_or(0)], 1 << 40),
        _ => (t.as_str(), 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 512M, 4G or none"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("'{s}' is not a size; use e.g. 512M, 4G or none"));
    }
    Ok((v * mult as f64) as usize)
}

/// `--lua-memory`: a size (see `parse_size`) of at least 1M, or none.
pub fn parse_lua_memory(s: &str) -> std::result::Result<usize, String> {
    let bytes = parse_size(s)?;
    if bytes > 0 && bytes < 1 << 20 {
        return Err(format!(
            "{s} is too small for Lua to start; use at least 1M"
        ));
    }
    Ok(bytes)
}

/// Read a recipe, allowing a `#!` line (kept as a comment so line numbers stay right).
pub fn read_recipe(path: &Path) -> Result<String> {
    let src = if path == Path::new("-") {
        // `wick run -`: the recipe on stdin (a heredoc, a generated script).
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::usage(format!("cannot read the recipe from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("cannot read recipe {}: {e}", path.display())))?
    };
    Ok(if src.starts_with("#!") {
        format!("--{src}")
    } else {
        src
    })
}

fn recipe_hash(src: &str) -> String {
    format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(src.as_bytes()))
}

/// Join the launcher's group if one started several copies of this process (`mpirun`,
/// `srun`): only `wick run` trains data-parallel; rank 0 alone owns the checkpoint directory,
/// prints and writes metrics.
fn join_group(spec: &RunSpec) -> Result<crate::dist::Group> {
    let group = crate::dist::init().map_err(Error::usage)?;
    if group.size > 1 {
        if !spec.data_parallel {
            return Err(Error::usage(format!(
                "this process is one of {} started by a launcher, but only wick run trains data-parallel; start wick repl and wick test as one process (without mpirun/srun)",
                group.size
            )));
        }
        signals::defer_to_group();
    }
    Ok(group)
}

/// Everything before the first line of Lua runs.
pub fn open(spec: &RunSpec) -> Result<Run> {
    let group = join_group(spec)?;
    let leader = group.rank == 0;
    let quiet = spec.quiet || !leader;
    if !leader {
        progress::set_quiet(true);
    }
    let compute = crate::device::open(&spec.device, &spec.dtype).map_err(Error::usage)?;
    crate::dist::check_gpu_reduce(&compute.device).map_err(Error::usage)?;
    signals::install()?;
    if spec.owns_dir && leader {
        crate::run::lock::acquire(&spec.ckpt_dir)?;
        crate::host::output::open_log(&spec.ckpt_dir);
    }
    let ckpt_path = ckpt_path(&spec.ckpt_dir);
    let stale = if leader {
        ckpt::sweep_stale(&ckpt_path)
    } else {
        Vec::new()
    };
    for stale in stale {
        if !spec.quiet {
            progress::warn(&format!(
                "removed a temp file left by an interrupted save: {}",
                stale.display()
            ));
        }
    }
    let hash = spec.recipe.as_ref().map(|(_, src)| recipe_hash(src));
    let resume = load_resume(spec, &ckpt_path, hash.as_deref(), quiet)?;
    crate::dist::same_everywhere(&[
        ("recipe", crate::dist::digest(hash.as_deref().unwrap_or(""))),
        (
            "recipe arguments",
            crate::dist::digest(&spec.args.join("\0")),
        ),
        ("--seed", spec.seed),
        (
            "--device/--dtype",
            crate::dist::digest(&format!("{} {}", spec.device, spec.dtype)),
        ),
        (
            "checkpoint to resume (its step)",
            resume.as_ref().map(|c| c.meta.step).unwrap_or(u64::MAX),
        ),
    ])
    .map_err(Error::usage)?;
    if let Some(c) = resume.as_ref().filter(|c| c.meta.world_size != group.size) {
        if !quiet {
            progress::warn(&format!(
                "the checkpoint was written by {} rank(s) and this run has {}: the data cursor is global, so training continues on the same data in the same order; each rank now trains on 1/{} of every batch{}",
                c.meta.world_size,
                group.size,
                group.size,
                if c.meta.world_size.max(group.size) <= 2 {
                    " (between 1 and 2 ranks the numbers stay bit for bit the same)"
                } else {
                    " (sums over the batch are now taken in another order, so the numbers drift apart in the last bits)"
                }
            ));
        }
    }
    if resume.is_none() && !quiet {
        if let Some(msg) = announce_existing(&ckpt_path) {
            progress::warn(&msg);
        }
    }
    let opts = RunOptions {
        ckpt_path,
        seed: spec.seed,
        compute,
        save_every: spec.save_every,
        metrics_every: if leader { spec.metrics_every } else { 0 },
        tensorboard: match &spec.tensorboard {
            _ if !leader => None,
            None => Some(spec.ckpt_dir.join("tb")),
            Some(dir) => dir.clone(),
        },
        recipe: spec.recipe.as_ref().map(|(p, _)| p.clone()),
        recipe_hash: hash,
        args: spec.args.clone(),
        quiet,
        golden_dir: spec.golden_dir.clone(),
        bless: spec.bless,
        rescue_dir: spec.rescue_dir.clone(),
    };
    let (lua, ctx) = new_state(&opts, resume)?;
    if spec.lua_memory > 0 {
        lua::set_heap_limit(&lua, spec.lua_memory)
            .map_err(|e| Error::failed(format!("cannot limit the Lua heap: {e}")))?;
    }
    Ok(Run { lua, ctx, opts })
}

fn load_resume(
    spec: &RunSpec,
    ckpt_path: &Path,
    hash: Option<&str>,
    quiet: bool,
) -> Result<Option<Arc<Checkpoint>>> {
    let path = match &spec.resume {
        Resume::No => return Ok(None),
        // `--resume` alone in a job script that both starts and continues a run (a preemptible
        // SLURM job, a restart loop): the first time there is nothing yet, so start fresh. Only
        // a missing file does that; one that exists but cannot be read is refused below.
        Resume::Default
            if !ckpt_path.exists() && !crate::run::checkpointing::prev_path(ckpt_path).exists() =>
        {
            if !quiet {
                progress::warn(&format!(
                    "no checkpoint at {} yet: starting a new run (--resume continues it next time)",
                    ckpt_path.display()
                ));
            }
            return Ok(None);
        }
        Resume::Default => ckpt_path.to_path_buf(),
        Resume::Path(p) => p.clone(),
    };
    let c = ckpt::load(&path).map_err(|e| Error::usage(format!("cannot resume: {e}")))?;
    if let (Some((recipe, _)), Some(hash)) = (&spec.recipe, hash) {
        if let Some(warning) = crate::run::resume::check_recipe(&c.meta, recipe, hash, spec.strict)?
        {
            progress::warn(&format!("warning: {warning}"));
        }
    }
    if !quiet {
        progress::warn(&format!(
            "resuming from {} at step {} (reason {})",
            path.display(),
            c.meta.step,
            c.meta.reason
        ));
    }
    Ok(Some(Arc::new(c)))
}

/// A fresh Lua state and run context for `opts` (also the REPL's `:reset`).
pub fn new_state(
    opts: &RunOptions,
    resume: Option<Arc<Checkpoint>>,
) -> Result<(Lua, SharedContext)> {
    let ctx: SharedContext = Arc::new(Mutex::new(RunContext::new(opts.clone(), resume)));
    let recipe = opts.recipe.clone();
    let lua = lua::new_state(recipe.as_deref(), |lua| {
        lua.set_app_data(ctx.clone());
        crate::api::install(lua)
    })
    .map_err(|e| Error::failed(format!("cannot start Lua: {e}")))?;
    Ok((lua, ctx))
}
