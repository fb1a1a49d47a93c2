//! The command line: what each subcommand takes (clap) and where it goes. One file per
//! subcommand in this folder; each returns its exit code or an error that `main` prints.

pub mod bench;
pub mod data;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod plot;
pub mod repl;
pub mod run;
pub mod test;
pub mod tokenizer;

use crate::error::Result;
use crate::setup::RunSpec;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "wick",
    version,
    about = "Train language models from Lua recipes; the final checkpoint is guaranteed"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Directory for the checkpoint (full_model.ckpt) and metrics.jsonl.
    #[arg(long, default_value = "checkpoints")]
    pub ckpt_dir: PathBuf,
    /// Compute device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, or bf16 (bf16 matrix products with f32 master weights and AdamW
    /// moments; for GPUs: the CPU supports it, slowly, by widening to f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed for initialisation, data order and sampling.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Also save every N steps (off by default: no I/O in the training loop).
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Cap on the recipe's Lua heap (e.g. 512M, 4G; "none" for no cap). Past it, Lua raises
    /// "not enough memory", a script error that still saves. Default: a quarter of RAM.
    #[arg(long, value_name = "SIZE", value_parser = crate::setup::parse_lua_memory)]
    pub lua_memory: Option<usize>,
    /// A row in metrics.jsonl (and TensorBoard) every N training steps; 0: only the recipe's
    /// wick.log rows.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub metrics_every: u64,
    /// Directory for TensorBoard event files (default <ckpt-dir>/tb; "off" for none).
    #[arg(long, value_name = "DIR")]
    pub tensorboard: Option<String>,
    /// Where the state goes if the checkpoint directory cannot take the final save (disk
    /// full, no permission). Default: $XDG_STATE_HOME/wick/rescue (~/.local/state/wick/rescue).
    #[arg(long, value_name = "DIR")]
    pub rescue_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a recipe: wick run RECIPE.lua [-- ARGS...]
    Run {
        /// The recipe file (`-`: read it from stdin).
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
    Test(test::TestArgs),
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
    /// Plot training loss (with its moving average), validation points, lr and tokens/s from
    /// metrics.jsonl files; several files are overlaid.
    Plot {
        /// One or more metrics.jsonl files (several: overlaid, one colour each).
        #[arg(required = true)]
        metrics: Vec<PathBuf>,
        /// Output file: .png or .svg.
        #[arg(short, long, default_value = "loss.png")]
        out: PathBuf,
        /// Weight of the exponential moving average drawn over the training loss (0: none).
        #[arg(long, default_value_t = 0.9)]
        smooth: f64,
    },
    /// Data tools.
    Data {
        #[command(subcommand)]
        what: data::DataCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        what: tokenizer::TokenizerCommand,
    },
    /// Benchmarks that print numbers (one JSON line each).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Sample a continuation from a checkpoint's model (printed on stdout).
    Generate(generate::GenerateArgs),
    /// Export a checkpoint's model for other tools.
    Export {
        ckpt: PathBuf,
        /// Write a Hugging Face Llama directory (config.json, generation_config.json,
        /// tokenizer.json, safetensors weights).
        #[arg(long, value_name = "DIR")]
        hf: PathBuf,
        /// Weights dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Split the weights into shards (with model.safetensors.index.json) past this size.
        #[arg(long, value_name = "SIZE", default_value = "5G", value_parser = crate::setup::parse_size)]
        max_shard_size: usize,
        /// The run's tokenizer.json to ship with the model (default: wick's byte-level one, as
        /// an equivalent Hugging Face tokenizer, when the vocab is 257).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
    },
}

impl RunArgs {
    /// The run these options describe (recipe, resume and arguments are the caller's).
    pub fn spec(&self) -> RunSpec {
        RunSpec {
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            seed: self.seed,
            save_every: self.save_every,
            metrics_every: self.metrics_every,
            tensorboard: self.tensorboard.as_ref().map(|t| match t.as_str() {
                "off" | "none" => None,
                dir => Some(PathBuf::from(dir)),
            }),
            lua_memory: self
                .lua_memory
                .unwrap_or_else(crate::setup::default_lua_memory),
            rescue_dir: self.rescue_dir.clone(),
            ..RunSpec::new(&self.ckpt_dir)
        }
    }
}

/// Counts that must be positive (steps, batch, rows, repetitions): clap names the option.
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Run one parsed command line.
pub fn dispatch(command: Command) -> Result<i32> {
    match command {
        Command::Run {
            recipe,
            common,
            resume,
            strict,
            args,
        } => {
            let spec = RunSpec {
                resume: run::resume_arg(resume),
                strict,
                args,
                data_parallel: true,
                ..common.spec()
            };
            run::run(&recipe, spec)
        }
        Command::Inspect { ckpt, json } => {
            must_exist(&ckpt, "checkpoint")?;
            inspect::inspect(&ckpt, json)
        }
        Command::Repl { common, resume } => repl::run(common.spec(), resume),
        Command::Test(args) => test::run(args),
        Command::TestCase {
            file,
            case,
            ckpt_dir,
            seed,
            bless,
            device,
            dtype,
            result,
        } => test::case::run_case(
            &file,
            &case,
            test::case::CaseRun {
                ckpt_dir,
                seed,
                bless,
                device,
                dtype,
            },
            &result,
        ),
        Command::Plot {
            metrics,
            out,
            smooth,
        } => {
            for m in &metrics {
                must_exist(m, "metrics file")?;
            }
            plot::run(&metrics, &out, smooth)
        }
        Command::Data { what } => data::run(what),
        Command::Tokenizer { what } => tokenizer::run(what),
        Command::Bench { what } => bench::run(what),
        Command::Generate(args) => {
            must_exist(&args.ckpt, "checkpoint")?;
            generate::run(args)
        }
        Command::Export {
            ckpt,
            hf,
            dtype,
            max_shard_size,
            tokenizer,
        } => {
            must_exist(&ckpt, "checkpoint")?;
            let dtype = match dtype.as_str() {
                "f32" | "float32" => candle_core::DType::F32,
                "bf16" | "bfloat16" => candle_core::DType::BF16,
                other => {
                    return Err(crate::Error::usage(format!(
                        "--dtype {other}: export writes f32 or bf16"
                    )))
                }
            };
            let opts = export::ExportOptions {
                dtype,
                max_shard_bytes: if max_shard_size == 0 {
                    usize::MAX
                } else {
                    max_shard_size
                },
                tokenizer,
            };
            export::run(&ckpt, &hf, &opts)
        }
    }
}

/// A file named on the command line that is not there is a usage error (exit 2), said before
/// any work starts.
fn must_exist(path: &std::path::Path, what: &str) -> crate::error::Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(crate::Error::usage(format!(
            "no such {what}: {} (check the path; it is read from the working directory)",
            path.display()
        )))
    }
}
