//! The subcommands: each prepares options, then hands over to the host (run) or to a module.

use crate::ckpt;
use crate::host::checkpointing::announce_existing;
use crate::host::context::{RunContext, RunOptions};
use crate::host::{exit, guard, lua, signals};
use crate::RunArgs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Flush denormals to zero on this thread (x86: FTZ + DAZ in MXCSR). A badly scaled value
/// otherwise makes a step 10× slower.
pub fn set_flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// A training step allocates and frees the same large buffers every time. glibc's defaults
/// return each one to the kernel (mmap above 128 KiB, heap trimming) and pay page faults to get
/// it back in the next step; keep freed memory in the process instead (up to glibc's 32 MiB
/// mmap ceiling per allocation). Peak memory is unchanged: it is the same buffers.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Denormal flushing on the main thread (threads spawned later inherit it) and on every rayon
/// worker (matmul runs there).
pub fn init_compute_threads() {
    set_flush_denormals();
    keep_freed_memory();
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| set_flush_denormals())
        .build_global();
}

fn read_recipe(path: &Path) -> Result<String, String> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read recipe {}: {e}", path.display()))?;
    // Allow a #! line; keep line numbers intact.
    Ok(if src.starts_with("#!") {
        format!("--{src}")
    } else {
        src
    })
}

pub fn run(
    recipe: &Path,
    common: &RunArgs,
    resume: Option<String>,
    strict: bool,
    args: Vec<String>,
) -> i32 {
    let src = match read_recipe(recipe) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let compute = match crate::device::open(&common.device, &common.dtype) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = signals::install() {
        eprintln!("error: {e}");
        return exit::ERROR;
    }
    let ckpt_path = common.ckpt_dir.join("full_model.ckpt");
    for stale in ckpt::sweep_stale(&ckpt_path) {
        eprintln!(
            "wick: removed a temp file left by an interrupted save: {}",
            stale.display()
        );
    }
    let recipe_hash = format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(src.as_bytes()));
    let resume_ckpt = match resume {
        None => None,
        Some(p) => {
            let path = if p.is_empty() {
                ckpt_path.clone()
            } else {
                PathBuf::from(p)
            };
            match ckpt::load(&path) {
                Ok(c) => {
                    if c.meta
                        .recipe_hash
                        .as_deref()
                        .is_some_and(|h| h != recipe_hash)
                    {
                        let msg = format!(
                            "the recipe {} changed since the checkpoint was written (it was {})",
                            recipe.display(),
                            c.meta.recipe.clone().unwrap_or_default()
                        );
                        if strict {
                            eprintln!("error: cannot resume: {msg}; rerun without --strict to accept the change");
                            return exit::USAGE;
                        }
                        eprintln!("wick: warning: {msg}; continuing (use --strict to refuse)");
                    }
                    eprintln!(
                        "wick: resuming from {} at step {} (reason {})",
                        path.display(),
                        c.meta.step,
                        c.meta.reason
                    );
                    Some(Arc::new(c))
                }
                Err(e) => {
                    eprintln!("error: cannot resume: {e}");
                    return exit::USAGE;
                }
            }
        }
    };
    if resume_ckpt.is_none() {
        if let Some(msg) = announce_existing(&ckpt_path) {
            eprintln!("wick: {msg}");
        }
    }
    let opts = RunOptions {
        ckpt_path,
        seed: common.seed,
        compute,
        save_every: common.save_every,
        recipe: Some(recipe.to_path_buf()),
        recipe_hash: Some(recipe_hash),
        args,
        quiet: false,
        golden_dir: None,
        bless: false,
    };
    let ctx = Arc::new(Mutex::new(RunContext::new(opts, resume_ckpt)));
    let lua = match lua::new_state(ctx.clone(), Some(recipe)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot start Lua: {e}");
            return exit::ERROR;
        }
    };
    let (ending, _) = guard::run_chunk(&lua, &format!("@{}", recipe.display()), &src);
    guard::finalize(&lua, &ctx, &ending)
}

pub fn inspect(path: &Path, json: bool) -> i32 {
    let c = match ckpt::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::ERROR;
        }
    };
    if json {
        let mut v = serde_json::to_value(&c.meta).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("file_size".into(), c.file_size.into());
            o.insert("checksum_ok".into(), true.into());
            o.insert("params".into(), c.meta.model.param_count().into());
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return exit::OK;
    }
    let m = &c.meta;
    let mc = &m.model;
    println!("checkpoint   {}", path.display());
    println!(
        "file size    {}",
        crate::host::checkpointing::human_bytes(c.file_size)
    );
    println!("checksum     {} (OK)", m.checksum);
    println!("step         {} (reason {})", m.step, m.reason);
    println!("saved        {}", ckpt::meta::format_unix(m.saved_unix));
    println!("tokens seen  {}", m.tokens_seen);
    println!(
        "loss         {}",
        m.loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into())
    );
    println!("lr           {:.3e}", m.lr);
    println!(
        "model        dim {} layers {} heads {} kv_heads {} hidden {} vocab {} seq_len {} tied {}",
        mc.dim,
        mc.n_layers,
        mc.n_heads,
        mc.n_kv_heads,
        mc.hidden_dim,
        mc.vocab,
        mc.seq_len,
        mc.tie_embeddings
    );
    println!("parameters   {}", mc.param_count());
    println!(
        "optimizer    adamw lr {:.3e} betas ({}, {}) wd {} clip {:?}, {} updates",
        m.optim.lr, m.optim.beta1, m.optim.beta2, m.optim.weight_decay, m.optim.clip, m.optim_step
    );
    println!(
        "seed         {}   run {}   device {}   dtype {} (weights stored f32)",
        m.seed, m.run_id, m.device, m.dtype
    );
    if let Some(r) = &m.recipe {
        println!("recipe       {r}");
    }
    for (name, l) in &m.loaders {
        let pos: Vec<String> = l
            .cursor
            .streams
            .iter()
            .zip(&l.sources)
            .map(|(s, (src, files))| {
                let file = files.get(s.file).map(|f| f.path.as_str()).unwrap_or("-");
                format!(
                    "{src}: epoch {} file {} line {} token {}",
                    s.epoch, file, s.line, s.token
                )
            })
            .collect();
        println!(
            "data         {name} ({} batches): {}",
            l.cursor.batches,
            pos.join("; ")
        );
    }
    exit::OK
}
