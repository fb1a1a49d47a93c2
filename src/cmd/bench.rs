//! `wick bench`: numbers, not assertions. `train` measures training throughput on synthetic
//! tokens for the reference configs of shared/bench (one JSON line per config); `ckpt` measures
//! the checkpoint write against a plain sequential write + fsync of the same bytes.

use super::at_least_one;
use crate::ckpt::{self, CkptMeta};
use crate::error::{exit, Result as WickResult};
use crate::model::cpu::matmul::Precision;
use crate::model::{Llama, ModelConfig};
use crate::train::{AdamW, AdamWConfig, Session, Windows};
use crate::util::rng::Rng;
use candle_core::{Device, Tensor};
use clap::Subcommand;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training throughput on synthetic tokens (configs of shared/bench: tiny, small-bytes,
    /// small; and 124m, a GPT-2-small-sized llama for GPUs).
    Train {
        /// Configs to run, comma-separated.
        #[arg(long, default_value = "tiny,small-bytes,small")]
        configs: String,
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        batch: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Data path speed (read, decompress, parse, tokenize, pack) against raw decompression.
    Data {
        /// Files or directories.
        #[arg(default_value = "data/sample/train")]
        sources: Vec<String>,
        /// Also measure this tokenizer.json (BPE).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// GFLOP/s of the CPU step's matrix products on the small configs' shapes (2048 token
    /// rows; dim 288, hidden 768, vocab 256 and 32000), in f32 and bf16, beside
    /// `shared/bench/peak_gemm.py --model-shapes`.
    Gemm {
        #[arg(long, default_value_t = 2048, value_parser = at_least_one)]
        rows: usize,
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        reps: usize,
        /// Precisions to measure, comma-separated: f32, bf16.
        #[arg(long, default_value = "f32,bf16")]
        dtype: String,
    },
    /// Sampling speed: new tokens/s with the key/value cache, beside recomputing the window
    /// for every token (the small preset at seq_len 512, top-k 40, temperature 0.8).
    Generate {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 512, value_parser = at_least_one)]
        seq_len: usize,
        #[arg(long, default_value_t = 256, value_parser = at_least_one)]
        tokens: usize,
        /// Also time the window-recomputing way (slow: quadratic in the length).
        #[arg(long)]
        compare: bool,
    },
    /// Checkpoint write speed against a plain write + fsync of the same bytes.
    Ckpt {
        #[arg(long, default_value = "checkpoints")]
        dir: PathBuf,
        #[arg(long, default_value_t = 256, value_parser = at_least_one)]
        mb: usize,
        #[arg(long, default_value_t = 5, value_parser = at_least_one)]
        reps: usize,
    },
}

pub fn run(what: BenchCommand) -> WickResult<i32> {
    let results: Vec<Result<serde_json::Value, String>> = match what {
        BenchCommand::Train {
            configs,
            steps,
            warmup,
            batch,
            device,
            dtype,
        } => {
            let o = TrainBench {
                steps,
                warmup,
                batch,
                device,
                dtype,
            };
            let list: Vec<&str> = configs.split(',').map(str::trim).collect();
            // Under mpirun every rank runs the benchmark data-parallel, in this process.
            let group = crate::dist::init().map_err(crate::error::Error::usage)?;
            if list.len() == 1 || group.size > 1 {
                list.iter().map(|c| train(c, &o)).collect()
            } else {
                // One process per config: peak RSS is per process.
                list.iter().map(|c| train_in_child(c, &o)).collect()
            }
        }
        BenchCommand::Gemm { rows, reps, dtype } => {
            let mut precisions = Vec::new();
            for d in dtype.split(',').map(str::trim) {
                precisions.push(match d {
                    "f32" => Precision::F32,
                    "bf16" => Precision::Bf16,
                    other => {
                        return Err(crate::error::Error::usage(format!(
                            "bench gemm --dtype: unknown precision '{other}'; use f32, bf16 or f32,bf16"
                        )))
                    }
                });
            }
            gemm(
                rows,
                &[(288, 288), (288, 768), (768, 288), (288, 256), (288, 32000)],
                reps,
                &precisions,
            )
            .into_iter()
            .map(Ok)
            .collect()
        }
        BenchCommand::Ckpt { dir, mb, reps } => vec![ckpt(&dir, mb, reps)],
        BenchCommand::Generate {
            preset,
            seq_len,
            tokens,
            compare,
        } => vec![generate(&preset, seq_len, tokens, compare)],
        BenchCommand::Data { sources, tokenizer } => vec![data(&sources, tokenizer.as_deref())],
    };
    let mut code = exit::OK;
    for r in results {
        match r {
            Ok(_) if !crate::dist::is_leader() => {}
            Ok(v) => crate::outln!("{v}"),
            Err(e) => {
                crate::host::progress::error(&e);
                code = exit::USAGE;
            }
        }
    }
    Ok(code)
}

/// The three configs of shared/bench/README.md (kv heads = heads, untied head, batch 8),
/// and a GPT-2-small-sized llama for GPUs.
pub fn config(name: &str) -> Option<ModelConfig> {
    let mut c = ModelConfig::preset("tiny")?;
    match name {
        "tiny" => {
            c.dim = 64;
            c.n_layers = 5;
            c.n_heads = 8;
            c.n_kv_heads = 8;
            c.hidden_dim = 192;
            c.vocab = 512;
            c.seq_len = 512;
        }
        "small-bytes" | "small" => {
            c.dim = 288;
            c.n_layers = 6;
            c.n_heads = 6;
            c.n_kv_heads = 6;
            c.hidden_dim = 768;
            c.vocab = if name == "small" { 32000 } else { 256 };
            c.seq_len = 256;
        }
        "124m" => {
            c.dim = 768;
            c.n_layers = 12;
            c.n_heads = 12;
            c.n_kv_heads = 12;
            c.hidden_dim = 2048;
            c.vocab = 32000;
            c.seq_len = 1024;
        }
        _ => return None,
    }
    Some(c)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Matmul FLOPs of one training step (forward + backward ≈ 3× forward), embedding lookup excluded.
fn train_flops(c: &ModelConfig, batch: usize) -> f64 {
    let tokens = (batch * c.seq_len) as f64;
    let kv = (c.n_kv_heads * c.dim / c.n_heads) as f64;
    let d = c.dim as f64;
    let per_layer = 2.0 * (2.0 * d * d + 2.0 * d * kv + 3.0 * d * c.hidden_dim as f64)
        + 4.0 * c.seq_len as f64 * d;
    let head = 2.0 * d * c.vocab as f64;
    3.0 * tokens * (c.n_layers as f64 * per_layer + head)
}

/// How `wick bench train` runs each config.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub steps: usize,
    pub warmup: usize,
    pub batch: usize,
    pub device: String,
    pub dtype: String,
}

pub fn train(name: &str, o: &TrainBench) -> Result<serde_json::Value, String> {
    let (steps, warmup, batch) = (o.steps, o.warmup, o.batch);
    let c = config(name).ok_or_else(|| {
        format!("unknown bench config '{name}'; use tiny, small-bytes, small or 124m")
    })?;
    let compute = crate::device::open(&o.device, &o.dtype)?;
    let model = Arc::new(
        Llama::new(c.clone(), 1, &compute.device)
            .map_err(|e| e.to_string())?
            .with_compute_dtype(compute.dtype),
    );
    let optim = AdamWConfig {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: Some(1.0),
    };
    let mut session = Session::new(model, AdamW::new(optim));
    let mut rng = Rng::new(7);
    let width = c.seq_len + 1;
    let (mut step_ms, mut fwd, mut bwd, mut opt, mut data, mut allreduce) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let tokens: Vec<u32> = (0..batch * width)
            .map(|_| rng.below(c.vocab as u64) as u32)
            .collect();
        let windows = Windows {
            tokens,
            batch,
            width,
            share_of: None,
        };
        let data_ms = t0.elapsed().as_secs_f64() * 1e3;
        session.train_step(&windows).map_err(|e| e.to_string())?;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            let t = session.last_timing;
            step_ms.push(total);
            fwd.push(t.forward_ms);
            bwd.push(t.backward_ms);
            opt.push(t.optim_ms);
            allreduce.push(t.allreduce_ms);
            data.push(data_ms);
        }
    }
    let med = median(&mut step_ms);
    let tokens_per_s = (batch * c.seq_len) as f64 / (med / 1e3);
    Ok(serde_json::json!({
        "config": name,
        "params": c.param_count(),
        "batch": batch,
        "seq": c.seq_len,
        "steps": steps,
        "tokens_per_s": tokens_per_s.round(),
        "step_ms_median": (med * 10.0).round() / 10.0,
        "forward_ms": (median(&mut fwd) * 10.0).round() / 10.0,
        "backward_ms": (median(&mut bwd) * 10.0).round() / 10.0,
        "optimizer_ms": (median(&mut opt) * 10.0).round() / 10.0,
        "data_wait_ms": (median(&mut data) * 100.0).round() / 100.0,
        "achieved_gflops_excl_emb": (train_flops(&c, batch) / (med / 1e3) / 1e9 * 10.0).round() / 10.0,
        "peak_rss_mb": peak_rss_mb().round(),
        "peak_gpu_mem_mb": crate::device::gpu_peak_memory_mb(&compute.device).map(|m| m.round()),
        // Model FLOPs utilisation against a dense bf16 peak of 989 TFLOP/s (H100/H200; other
        // GPUs: WICK_PEAK_TFLOPS), as torch_llama.py reports it. GPUs only.
        "mfu": compute.device.is_cuda().then(|| {
            let peak = std::env::var("WICK_PEAK_TFLOPS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(989.0);
            (train_flops(&c, batch) / (med / 1e3) / (peak * 1e12) * 1e4).round() / 1e4
        }),
        "threads": rayon::current_num_threads(),
        "device": compute.device_name,
        "dtype": compute.dtype_name(),
        "step_path": session.model.step_path(),
        "ranks": crate::dist::group().size,
        "allreduce_ms": (median(&mut allreduce) * 100.0).round() / 100.0,
    }))
}

/// Checkpoint write vs plain write + fsync of the same number of bytes, in `dir`.
pub fn ckpt(dir: &Path, mb: usize, reps: usize) -> Result<serde_json::Value, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let n = mb * (1 << 20) / 4;
    let chunk = 1 << 20;
    let mut rng = Rng::new(3);
    let mut tensors = Vec::new();
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let k = left.min(chunk);
        let v: Vec<f32> = (0..k).map(|_| rng.next_f64() as f32).collect();
        tensors.push((
            format!("model.t{i}"),
            Tensor::from_vec(v, k, &Device::Cpu).map_err(|e| e.to_string())?,
        ));
        left -= k;
        i += 1;
    }
    let cfg = ModelConfig::preset("tiny").ok_or("preset")?;
    let mut meta = CkptMeta {
        format_version: 1,
        wick_version: env!("CARGO_PKG_VERSION").into(),
        reason: "bench".into(),
        step: 1,
        tokens_seen: 0,
        loss: None,
        lr: 0.0,
        model: cfg,
        optim: AdamWConfig::default(),
        optim_step: 0,
        seed: 0,
        run_id: "bench".into(),
        started_unix: 0.0,
        saved_unix: 0.0,
        device: "cpu".into(),
        dtype: "f32".into(),
        world_size: 1,
        loaders: Default::default(),
        state: serde_json::Value::Null,
        recipe: None,
        recipe_hash: None,
        checksum: String::new(),
    };
    let path = dir.join("bench.ckpt");
    let plain = dir.join("bench.plain");
    let raw: Vec<u8> = vec![0x5a; n * 4];
    let (mut wick_s, mut plain_s) = (vec![], vec![]);
    let mut bytes = 0;
    for _ in 0..reps {
        let r = ckpt::save(&path, &mut meta, &tensors).map_err(|e| e.to_string())?;
        bytes = r.bytes;
        wick_s.push(r.seconds);
        let t0 = Instant::now();
        let mut f = std::fs::File::create(&plain).map_err(|e| e.to_string())?;
        f.write_all(&raw[..(bytes as usize).min(raw.len())])
            .map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        plain_s.push(t0.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&plain);
    let (w, p) = (median(&mut wick_s), median(&mut plain_s));
    Ok(serde_json::json!({
        "bytes": bytes,
        "wick_write_mb_s": (bytes as f64 / w / 1e6).round(),
        "plain_write_fsync_mb_s": (bytes as f64 / p / 1e6).round(),
        "ratio": ((p / w) * 100.0).round() / 100.0,
        "reps": reps,
    }))
}

/// Data path throughput: read + decompress + parse + tokenize + pack, against raw zstd
/// decompression of the same files (the limit), over one pass of the data.
pub fn data(sources: &[String], tokenizer: Option<&Path>) -> Result<serde_json::Value, String> {
    use crate::data::source::{discover, is_data_file};
    use crate::data::{Loader, LoaderSpec, SourceSpec, Tokenizer};
    let files = discover(sources, &is_data_file)?;
    // The limit: decompress every file once (plain files are just read).
    let t0 = Instant::now();
    let mut raw_bytes = 0u64;
    for f in &files {
        let file = std::fs::File::open(&f.path).map_err(|e| format!("{}: {e}", f.path))?;
        raw_bytes += if f.path.ends_with(".zst") {
            let mut dec = zstd::stream::read::Decoder::new(file).map_err(|e| e.to_string())?;
            std::io::copy(&mut dec, &mut std::io::sink()).map_err(|e| format!("{}: {e}", f.path))?
        } else {
            std::io::copy(&mut std::io::BufReader::new(file), &mut std::io::sink())
                .map_err(|e| e.to_string())?
        };
    }
    let raw_s = t0.elapsed().as_secs_f64();
    let mut out = serde_json::json!({
        "files": files.len(),
        "decompressed_mb": (raw_bytes as f64 / 1e6 * 10.0).round() / 10.0,
        "raw_decompress_mb_s": (raw_bytes as f64 / 1e6 / raw_s).round(),
    });
    // A trivial Lua filter on the data thread (issue: it must keep >= 50 % of the speed).
    let filter = {
        let lua = mlua::Lua::new();
        let f: mlua::Function = lua
            .load("return function(doc) return #doc.text > 200 end")
            .set_name("=bench-filter")
            .eval()
            .map_err(|e| e.to_string())?;
        crate::data::transform::LuaCode::Bytecode {
            name: "=bench-filter".into(),
            code: f.dump(false),
        }
    };
    let filtered = Arc::new(crate::data::transform::Transforms {
        filter: Some(filter),
        map: None,
        module_dirs: Vec::new(),
        seed: 0,
    });
    let mut toks: Vec<(String, Tokenizer, bool)> = vec![
        ("bytes".into(), Tokenizer::Bytes, false),
        ("bytes_lua_filter".into(), Tokenizer::Bytes, true),
    ];
    if let Some(p) = tokenizer {
        toks.push(("bpe".into(), Tokenizer::load(p)?, false));
    }
    for (label, tok, filter) in toks {
        let mut spec = SourceSpec::plain(files.clone());
        if filter {
            spec.transforms = Some(filtered.clone());
        }
        let lspec = LoaderSpec {
            name: "bench".into(),
            sources: vec![("bench".into(), Arc::new(spec), 1.0)],
            batch: 16,
            seq_len: 256,
            seed: 0,
            prefetch: 8,
        };
        let mut loader = Loader::new(lspec, Arc::new(tok), None);
        let t0 = Instant::now();
        let mut tokens = 0u64;
        loop {
            let (w, cursor) = loader.next(&|| false).map_err(|e| match e {
                crate::data::NextError::Data(m) => m,
                crate::data::NextError::Interrupted => "interrupted".into(),
            })?;
            tokens += w.tokens.len() as u64;
            if cursor.streams[0].epoch >= 1 {
                break;
            }
        }
        let s = t0.elapsed().as_secs_f64();
        out[format!("{label}_pipeline_mb_s")] = (raw_bytes as f64 / 1e6 / s).round().into();
        out[format!("{label}_tokens_per_s")] = (tokens as f64 / s).round().into();
        out[format!("{label}_ratio_to_raw_decompress")] = ((raw_s / s) * 1000.0)
            .round()
            .div_euclid(1.0)
            .mul_add(0.001, 0.0)
            .into();
    }
    out["rare_subset_mixture"] = rare_subset_mixture()?;
    Ok(out)
}

/// New tokens per second from `preset` at `seq_len` (random weights: speed does not depend
/// on them), sampling with top-k 40 at temperature 0.8 from a 6-token prompt.
pub fn generate(
    preset: &str,
    seq_len: usize,
    tokens: usize,
    compare: bool,
) -> Result<serde_json::Value, String> {
    use crate::model::generate::{generate, SampleOptions};
    let mut c = ModelConfig::preset(preset).ok_or_else(|| format!("unknown preset '{preset}'"))?;
    c.seq_len = seq_len;
    let model = Llama::new(c, 1, &Device::Cpu).map_err(|e| e.to_string())?;
    let opts = SampleOptions {
        max_tokens: tokens,
        temperature: 0.8,
        top_k: Some(40),
        seed: 7,
        stop_token: None,
        cache: true,
    };
    let prompt: Vec<u32> = b"ROMEO:".iter().map(|&b| b as u32).collect();
    let run = |m: &Llama, opts: &SampleOptions| -> Result<(f64, usize), String> {
        let t0 = Instant::now();
        let out = generate(m, &prompt, opts, &|| false).map_err(|e| e.to_string())?;
        Ok((t0.elapsed().as_secs_f64(), out.len()))
    };
    let _ = run(&model, &opts)?; // warm-up (page faults, thread pool)
    let (s, n) = run(&model, &opts)?;
    let mut out = serde_json::json!({
        "preset": preset, "seq_len": seq_len, "new_tokens": n,
        "params": model.param_count(),
        "kv_cache_tokens_per_s": (n as f64 / s * 10.0).round() / 10.0,
        "threads": rayon::current_num_threads(),
    });
    if compare {
        let recompute = SampleOptions {
            cache: false,
            ..opts.clone()
        };
        let (s, n) = run(&model, &recompute)?;
        out["recompute_window_tokens_per_s"] = ((n as f64 / s) * 10.0).round().into();
    }
    Ok(out)
}

/// A SlimPajama-layout corpus of 11 files where the upweighted subset is rare: one 21-character
/// `RedPajamaBook` row among thousands of Github and C4 rows (the shape that made every subset
/// stream re-read the corpus). Mixed Book=3, Github=1, C4=1, as a recipe would.
fn rare_subset_mixture() -> Result<serde_json::Value, String> {
    use crate::data::{Loader, LoaderSpec, SourceSpec, Tokenizer};
    let dir = tempfile_dir()?;
    let chunk = dir.join("train/chunk1");
    std::fs::create_dir_all(&chunk).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(5);
    for f in 0..11 {
        let mut body = String::new();
        for i in 0..1500 {
            let subset = if f == 5 && i == 700 {
                "RedPajamaBook"
            } else if rng.next_f64() < 0.7 {
                "RedPajamaGithub"
            } else {
                "RedPajamaC4"
            };
            let text = if subset == "RedPajamaBook" {
                "A very short book..".to_string()
            } else {
                format!(
                    "fn item_{i}() {{ return {}; }}",
                    "x + 1; ".repeat(10 + i % 60)
                )
            };
            body.push_str(
                &serde_json::json!({"text": text, "meta": {"redpajama_set_name": subset}})
                    .to_string(),
            );
            body.push('\n');
        }
        let bytes = zstd::encode_all(body.as_bytes(), 3).map_err(|e| e.to_string())?;
        std::fs::write(chunk.join(format!("example_train_{f}.jsonl.zst")), bytes)
            .map_err(|e| e.to_string())?;
    }
    let files = crate::data::slimpajama::discover(&dir, "train", None)?;
    let mut result = serde_json::json!({ "files": files.len(), "mix": "Book=3,Github=1,C4=1" });
    // The slow way gets fewer batches: its rate is what matters, not its total.
    for (label, share, batches) in [("shared_parse", true, 100), ("parse_per_subset", false, 10)] {
        crate::data::loader::share_subset_parses(share);
        let sources = [
            ("RedPajamaBook", 3.0),
            ("RedPajamaGithub", 1.0),
            ("RedPajamaC4", 1.0),
        ]
        .iter()
        .map(|(s, w)| {
            let mut spec = SourceSpec::plain(files.clone());
            spec.subsets = Some(vec![s.to_string()]);
            (s.to_string(), Arc::new(spec), *w)
        })
        .collect();
        let lspec = LoaderSpec {
            name: "bench".into(),
            sources,
            batch: 8,
            seq_len: 128,
            seed: 0,
            prefetch: 8,
        };
        let mut loader = Loader::new(lspec, Arc::new(Tokenizer::Bytes), None);
        let t0 = Instant::now();
        for _ in 0..batches {
            loader.next(&|| false).map_err(|e| match e {
                crate::data::NextError::Data(m) => m,
                crate::data::NextError::Interrupted => "interrupted".into(),
            })?;
        }
        let s = t0.elapsed().as_secs_f64();
        let rows = loader.stats_snapshot().rows;
        result[format!("{label}_tokens_per_s")] = ((batches * 8 * 129) as f64 / s).round().into();
        result[format!("{label}_rows_parsed")] = rows.into();
    }
    crate::data::loader::share_subset_parses(true);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("wick-bench-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Run one training config in a fresh `wick bench train` process (so peak RSS is its own).
pub fn train_in_child(name: &str, o: &TrainBench) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["bench", "train", "--configs", name])
        .args([
            "--steps",
            &o.steps.to_string(),
            "--warmup",
            &o.warmup.to_string(),
            "--batch",
            &o.batch.to_string(),
            "--device",
            &o.device,
            "--dtype",
            &o.dtype,
        ])
        .output()
        .map_err(|e| format!("cannot run the benchmark for {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{name}: unreadable benchmark output ({e})"))
}

/// GFLOP/s of the CPU training step's matrix products on a model's shapes, in the three
/// layouts it uses: forward `x·wᵀ`, input gradient `dy·w`, weight gradient `dyᵀ·x`.
/// Compare with `shared/bench/peak_gemm.py --model-shapes` (PyTorch/MKL on the same shapes).
pub fn gemm(
    rows: usize,
    shapes: &[(usize, usize)],
    reps: usize,
    precisions: &[Precision],
) -> Vec<serde_json::Value> {
    use crate::model::cpu::matmul::{bf16_kernel, matmul_new};
    let mut out = Vec::new();
    for (&(inp, out_dim), &p) in shapes
        .iter()
        .flat_map(|s| precisions.iter().map(move |p| (s, p)))
    {
        let fill = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0
                        - 0.5
                })
                .collect()
        };
        let x = fill(rows * inp, 1);
        let w = fill(out_dim * inp, 2);
        let dy = fill(rows * out_dim, 3);
        type Run<'a> = Box<dyn Fn() -> Vec<f32> + 'a>;
        let layouts: [(&str, Run); 3] = [
            (
                "forward x·wT",
                Box::new(|| matmul_new((&x, inp, 1), (&w, 1, inp), (rows, out_dim, inp), p)),
            ),
            (
                "input grad dy·w",
                Box::new(|| matmul_new((&dy, out_dim, 1), (&w, inp, 1), (rows, inp, out_dim), p)),
            ),
            (
                "weight grad dyT·x",
                Box::new(|| matmul_new((&dy, 1, out_dim), (&x, inp, 1), (out_dim, inp, rows), p)),
            ),
        ];
        for (name, run) in layouts {
            for _ in 0..3 {
                std::hint::black_box(run());
            }
            let mut ms: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(run());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            let med = median(&mut ms);
            let flops = 2.0 * (rows * inp * out_dim) as f64;
            out.push(serde_json::json!({
                "layout": name, "rows": rows, "in": inp, "out": out_dim,
                "dtype": if p == Precision::Bf16 { "bf16" } else { "f32" },
                "kernel": if p == Precision::Bf16 { bf16_kernel() } else { "f32" },
                "ms_median": (med * 1000.0).round() / 1000.0,
                "gflops_median": (flops / med / 1e6 * 10.0).round() / 10.0,
                "threads": rayon::current_num_threads(),
            }));
        }
    }
    out
}
