//! wick: a training host for language models. Lua recipes decide the data schedule; the host
//! owns the model, the training and the promise that a final checkpoint is written however the
//! run ends.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod api;
mod bench;
mod ckpt;
mod cli;
mod data;
mod device;
mod docs;
mod export;
mod golden;
mod host;
mod model;
mod plot;
mod progress;
mod regress;
mod repl;
mod rng;
mod train;

#[derive(Parser)]
#[command(
    name = "wick",
    version,
    about = "Train language models from Lua recipes; the final checkpoint is guaranteed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Directory for the checkpoint (full_model.ckpt) and metrics.jsonl.
    #[arg(long, default_value = "checkpoints")]
    ckpt_dir: PathBuf,
    /// Compute device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16 (bf16 matrix products with f32 master weights and AdamW
    /// moments; for GPUs: the CPU supports it, slowly, by widening to f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Seed for initialisation, data order and sampling.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Also save every N steps (off by default: no I/O in the training loop).
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe: wick run RECIPE.lua [-- ARGS...]
    Run {
        recipe: PathBuf,
        #[command(flatten)]
        common: RunArgs,
        /// Continue from a checkpoint (default: the one in --ckpt-dir).
        #[arg(long, value_name = "CKPT", num_args = 0..=1, default_missing_value = "")]
        resume: Option<String>,
        /// Refuse to resume when the recipe file changed since the checkpoint.
        #[arg(long)]
        strict: bool,
        /// Arguments for the recipe (wick.args and Lua's arg).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// An interactive Lua prompt on the wick API (reads statements from stdin when piped).
    Repl {
        #[command(flatten)]
        common: RunArgs,
        /// Start from a checkpoint: `model` and `session` are ready.
        #[arg(long, value_name = "CKPT")]
        resume: Option<PathBuf>,
    },
    /// Run regression cases: *_test.lua files with test("name", fn) cases.
    Test {
        /// Test files or directories (default tests/regress).
        paths: Vec<PathBuf>,
        /// Only cases whose "file::name" contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Cases run at once (default: the number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Seconds a case may run before it is stopped and failed.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Write or update golden files instead of comparing with them.
        #[arg(long)]
        bless: bool,
        /// Also write a JUnit XML report.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Compute device for every case: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compute dtype for every case: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// (internal) run one test case; used by `wick test`.
    #[command(hide = true)]
    TestCase {
        file: PathBuf,
        #[arg(long)]
        case: String,
        #[arg(long)]
        ckpt_dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        bless: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        result: PathBuf,
    },
    /// Summarise a checkpoint (and verify its checksum).
    Inspect {
        ckpt: PathBuf,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Plot train/validation loss and lr from a metrics.jsonl.
    Plot {
        metrics: PathBuf,
        #[arg(short, long, default_value = "loss.png")]
        out: PathBuf,
    },
    /// Data tools.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        what: TokenizerCommand,
    },
    /// Benchmarks that print numbers (one JSON line each).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Export a checkpoint's model for other tools.
    Export {
        ckpt: PathBuf,
        /// Write a Hugging Face Llama directory (config.json + model.safetensors).
        #[arg(long, value_name = "DIR")]
        hf: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize sources in parallel into token shards (u16/u32) with a per-document index.
    Prepare {
        /// A tokenizer.json, or "bytes" for the byte-level tokenizer.
        #[arg(long, default_value = "bytes")]
        tokenizer: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        sources: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE on local data: wick tokenizer train --vocab N --out tok.json SOURCES...
    Train {
        #[arg(long)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
        /// Stop reading after this many MB of text.
        #[arg(long, default_value_t = 200)]
        max_mb: u64,
        /// Files or directories (.txt, .jsonl, .jsonl.zst).
        #[arg(required = true)]
        sources: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    /// rows; dim 288, hidden 768, vocab 256), beside `shared/bench/peak_gemm.py --model-shapes`.
    Gemm {
        #[arg(long, default_value_t = 2048, value_parser = at_least_one)]
        rows: usize,
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        reps: usize,
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

/// Counts that must be positive (steps, batch, rows, repetitions): clap names the option.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    // Rust backtraces belong in bug reports, not in messages about a user's recipe.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    cli::init_compute_threads();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run {
            recipe,
            common,
            resume,
            strict,
            args,
        } => cli::run(&recipe, &common, resume, strict, args),
        Command::Inspect { ckpt, json } => cli::inspect(&ckpt, json),
        Command::Repl { common, resume } => repl::run(&common, resume),
        Command::Test {
            paths,
            filter,
            jobs,
            timeout,
            seed,
            bless,
            junit,
            device,
            dtype,
        } => regress::run(regress::TestArgs {
            paths: if paths.is_empty() {
                vec![PathBuf::from("tests/regress")]
            } else {
                paths
            },
            filter,
            jobs: jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }),
            timeout,
            seed,
            bless,
            junit,
            device,
            dtype,
        }),
        Command::TestCase {
            file,
            case,
            ckpt_dir,
            seed,
            bless,
            device,
            dtype,
            result,
        } => regress::run_case(
            &file,
            &case,
            &ckpt_dir,
            seed,
            bless,
            (&device, &dtype),
            &result,
        ),
        Command::Plot { metrics, out } => match plot::plot(&metrics, &out) {
            Ok(msg) => {
                eprintln!("wick: {msg}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Data {
            what:
                DataCommand::Prepare {
                    tokenizer,
                    out,
                    sources,
                },
        } => {
            let tok = if tokenizer == "bytes" {
                Ok(data::Tokenizer::Bytes)
            } else {
                data::Tokenizer::load(std::path::Path::new(&tokenizer))
            };
            match tok.and_then(|t| data::shards::prepare(&t, &out, &sources)) {
                Ok(msg) => {
                    eprintln!("wick: {msg}");
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Command::Tokenizer {
            what:
                TokenizerCommand::Train {
                    vocab,
                    out,
                    max_mb,
                    sources,
                },
        } => match data::train_tokenizer::train(vocab, &out, &sources, max_mb << 20) {
            Ok(msg) => {
                eprintln!("wick: {msg}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Bench { what } => {
            let results: Vec<Result<serde_json::Value, String>> = match what {
                BenchCommand::Train {
                    configs,
                    steps,
                    warmup,
                    batch,
                    device,
                    dtype,
                } => {
                    let o = bench::TrainBench {
                        steps,
                        warmup,
                        batch,
                        device,
                        dtype,
                    };
                    let list: Vec<&str> = configs.split(',').map(str::trim).collect();
                    if list.len() == 1 {
                        vec![bench::train(list[0], &o)]
                    } else {
                        // One process per config: peak RSS is per process.
                        list.iter().map(|c| bench::train_in_child(c, &o)).collect()
                    }
                }
                BenchCommand::Gemm { rows, reps } => bench::gemm(
                    rows,
                    &[(288, 288), (288, 768), (768, 288), (288, 256)],
                    reps,
                )
                .into_iter()
                .map(Ok)
                .collect(),
                BenchCommand::Ckpt { dir, mb, reps } => vec![bench::ckpt(&dir, mb, reps)],
                BenchCommand::Data { sources, tokenizer } => {
                    vec![bench::data(&sources, tokenizer.as_deref())]
                }
            };
            let mut code = 0;
            for r in results {
                match r {
                    Ok(v) => println!("{v}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        code = 2;
                    }
                }
            }
            code
        }
        Command::Export { ckpt, hf } => match export::export_hf(&ckpt, &hf) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
