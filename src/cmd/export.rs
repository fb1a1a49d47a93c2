//! `wick export CKPT --hf DIR`: a Hugging Face Llama directory that transformers and friends
//! load as they are: `config.json`, `generation_config.json`, `tokenizer.json` (wick's byte-level
//! tokenizer as an equivalent Hugging Face one, or the run's own), and the weights in
//! `model.safetensors` — or in shards with `model.safetensors.index.json` past
//! `--max-shard-size` — in f32 or `--dtype bf16`. Files honour the user's umask.

use crate::ckpt;
use crate::model::hf::{byte_level_tokenizer_json, hf_name};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How to export.
pub struct ExportOptions {
    pub dtype: DType,
    pub max_shard_bytes: usize,
    pub tokenizer: Option<PathBuf>,
}

pub fn run(ckpt: &Path, out: &Path, opts: &ExportOptions) -> crate::Result<i32> {
    refuse_foreign_files(out).map_err(crate::Error::usage)?;
    export_hf(ckpt, out, opts)?;
    Ok(crate::error::exit::OK)
}

/// An export writes config.json, tokenizer.json, model*.safetensors, ... into `out`: into a
/// directory that holds other files (a project's root, another model), that would overwrite
/// someone's config.json or mix two models' shards. Such a directory is refused; an empty one,
/// a new one, or an earlier export's is fine.
fn refuse_foreign_files(out: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(()); // not there yet (or not a directory: creating it says why)
    };
    let ours = |name: &str| {
        matches!(
            name,
            "config.json"
                | "generation_config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "model.safetensors.index.json"
        ) || (name.starts_with("model") && name.ends_with(".safetensors"))
    };
    let foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !ours(n))
        .collect();
    match foreign.first() {
        None => Ok(()),
        Some(f) => Err(format!(
            "{} already holds files that are not an export's ({f}{}): export into a new or empty directory",
            out.display(),
            if foreign.len() > 1 { ", ..." } else { "" }
        )),
    }
}

/// Write a file with the process's umask (as any tool would), never 0600.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut f =
        std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn json_file(path: &Path, v: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())? + "\n";
    write_file(path, text.as_bytes())
}

pub fn export_hf(ckpt_path: &Path, out: &Path, opts: &ExportOptions) -> Result<(), String> {
    let c = ckpt::load(ckpt_path)?;
    let m = &c.meta.model;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in c.group("model.") {
        let hf = hf_name(&name)
            .ok_or_else(|| format!("checkpoint tensor {name} has no Hugging Face name"))?;
        let t = t.to_dtype(opts.dtype).map_err(|e| e.to_string())?;
        tensors.push((hf, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (dtype_name, width) = match opts.dtype {
        DType::BF16 => ("bfloat16", 2),
        _ => ("float32", 4),
    };
    // The tokenizer: the one given, else wick's byte-level one when the vocab says so.
    let eod = match (&opts.tokenizer, m.vocab) {
        (Some(p), _) => {
            let tok = crate::data::Tokenizer::load(p)?;
            if tok.vocab_size() != m.vocab {
                return Err(format!(
                    "--tokenizer {} has {} tokens but the model's vocab is {}",
                    p.display(),
                    tok.vocab_size(),
                    m.vocab
                ));
            }
            let bytes =
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            write_file(&out.join("tokenizer.json"), &bytes)?;
            Some(tok.eod())
        }
        (None, 257) => {
            json_file(&out.join("tokenizer.json"), &byte_level_tokenizer_json())?;
            json_file(
                &out.join("tokenizer_config.json"),
                &serde_json::json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": "<|endoftext|>",
                    "bos_token": "<|endoftext|>",
                    "model_max_length": m.seq_len,
                    "clean_up_tokenization_spaces": false,
                }),
            )?;
            Some(256)
        }
        (None, _) => {
            crate::host::progress::warn(
                "no tokenizer.json written: the model's vocab is not byte-level; pass --tokenizer tok.json",
            );
            None
        }
    };
    let eod = eod.unwrap_or(m.vocab.saturating_sub(1) as u32);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.dim / m.n_heads,
        "vocab_size": m.vocab,
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": eod,
        "eos_token_id": eod,
        "torch_dtype": dtype_name,
    });
    json_file(&out.join("config.json"), &config)?;
    json_file(
        &out.join("generation_config.json"),
        &serde_json::json!({ "bos_token_id": eod, "eos_token_id": eod, "do_sample": true,
                             "temperature": 0.8, "top_k": 40 }),
    )?;
    // Shards: consecutive tensors up to the size limit (a tensor is never split).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let b = t.elem_count() * width;
        if size + b > opts.max_shard_bytes && !shards.last().is_some_and(|s| s.is_empty()) {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        total += b;
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let part: Vec<(&str, &Tensor)> = shard
            .iter()
            .map(|&i| (tensors[i].0.as_str(), &tensors[i].1))
            .collect();
        let bytes = safetensors::serialize(part.iter().map(|(n, t)| (*n, *t)), Some(meta.clone()))
            .map_err(|e| format!("cannot encode {file}: {e}"))?;
        write_file(&out.join(&file), &bytes)?;
        for (name, _) in &part {
            weight_map.insert(name.to_string(), file.clone().into());
        }
    }
    if n > 1 {
        json_file(
            &out.join("model.safetensors.index.json"),
            &serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map }),
        )?;
    }
    crate::errln!(
        "wick: exported {} (step {}) to {} ({} weights in {n} file(s), {dtype_name}{})",
        ckpt_path.display(),
        c.meta.step,
        out.display(),
        tensors.len(),
        if out.join("tokenizer.json").exists() {
            ", tokenizer.json"
        } else {
            ""
        }
    );
    Ok(())
}
