//! `wick generate CKPT --prompt TEXT`: sample a continuation from a checkpoint's model, with the
//! key/value cache on the CPU. Prints the continuation on stdout.

use crate::data::Tokenizer;
use crate::error::{exit, Error, Result};
use crate::model::generate::{generate, SampleOptions};
use crate::model::Llama;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GenerateArgs {
    pub ckpt: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// The tokenizer.json the model was trained with (default: byte-level).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Keep going past the end-of-document token (always max-tokens tokens).
    #[arg(long)]
    pub ignore_eod: bool,
    /// Recompute the whole window for every token instead of keeping a key/value cache.
    #[arg(long)]
    pub no_cache: bool,
}

/// A checkpoint's model on `device`, ready to sample from.
pub fn load_model(path: &Path, device: &candle_core::Device) -> Result<Llama> {
    let ckpt = crate::ckpt::load(path).map_err(Error::failed)?;
    let model =
        Llama::new(ckpt.meta.model.clone(), 0, device).map_err(|e| Error::failed(e.to_string()))?;
    model
        .load_params(&ckpt.group("model."))
        .map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
    Ok(model)
}

pub fn run(a: GenerateArgs) -> Result<i32> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(Error::usage(format!(
            "--temperature {}: must be a number ≥ 0 (0 = greedy)",
            a.temperature
        )));
    }
    let compute = crate::device::open(&a.device, "f32").map_err(Error::usage)?;
    crate::host::signals::install()?;
    let tokenizer = match &a.tokenizer {
        Some(p) => Tokenizer::load(p).map_err(Error::usage)?,
        None => Tokenizer::Bytes,
    };
    let model = load_model(&a.ckpt, &compute.device)?;
    if model.config.vocab != tokenizer.vocab_size() {
        return Err(Error::usage(format!(
            "{}: the model's vocab is {} but the tokenizer ({}) has {} tokens; pass --tokenizer tok.json",
            a.ckpt.display(),
            model.config.vocab,
            tokenizer.describe(),
            tokenizer.vocab_size()
        )));
    }
    let prompt = tokenizer.encode(&a.prompt).map_err(Error::failed)?;
    let opts = SampleOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
        stop_token: (!a.ignore_eod).then(|| tokenizer.eod()),
        cache: !a.no_cache,
    };
    let started = std::time::Instant::now();
    let out = generate(
        &model,
        &prompt,
        &opts,
        &crate::host::signals::stop_requested,
    )
    .map_err(|e| Error::failed(format!("generate: {e}")))?;
    crate::outln!("{}", tokenizer.decode(&out));
    let s = started.elapsed().as_secs_f64();
    crate::host::progress::warn(&format!(
        "{} tokens in {s:.2} s ({:.0} tokens/s)",
        out.len(),
        out.len() as f64 / s.max(1e-9)
    ));
    Ok(exit::OK)
}
