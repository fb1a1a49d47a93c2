//! Resuming: what a checkpoint must share with the run that continues it, checked in one
//! place, and loading its state into a fresh session.
//!
//! | what                         | checked when                  | if it differs             |
//! |------------------------------|-------------------------------|---------------------------|
//! | model config                 | the session is created        | refused (exit 2)          |
//! | parameter names and shapes   | the session is created        | refused (exit 2)          |
//! | a loader's tokenizer         | the loader of that name is made | refused (exit 2)        |
//! | a loader's sources and files | the loader of that name is made | refused (exit 2)        |
//! |   (count, paths, sizes)      |                               |                           |
//! | the recipe file (its hash)   | the run starts                | warning; `--strict`: refused |
//!
//! Everything else (learning rate, batch schedule, `wick.state`) is the recipe's to change.

use crate::ckpt::meta::SavedLoader;
use crate::ckpt::{Checkpoint, CkptMeta};
use crate::data::FileEntry;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::train::Session;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The model the recipe builds must be the checkpoint's.
pub fn check_model(saved: &ModelConfig, now: &ModelConfig) -> Result<()> {
    let diffs = now.differences(saved);
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::usage(format!(
        "cannot resume: the model config differs from the checkpoint's: {}",
        diffs.join("; ")
    )))
}

/// A loader continues the checkpoint's cursor only over the same tokenizer and the same files.
pub fn check_loader(
    name: &str,
    saved: &SavedLoader,
    tokenizer: &str,
    sources: &[(String, Vec<FileEntry>)],
) -> Result<()> {
    let mut diffs = Vec::new();
    if saved.tokenizer != tokenizer {
        diffs.push(format!(
            "tokenizer: checkpoint has {}, recipe uses {tokenizer}",
            saved.tokenizer
        ));
    }
    if saved.sources.len() != sources.len() {
        diffs.push(format!(
            "number of sources: checkpoint has {}, recipe has {}",
            saved.sources.len(),
            sources.len()
        ));
    } else {
        for ((_, a), (n, b)) in saved.sources.iter().zip(sources) {
            if a != b {
                diffs.push(describe_file_diff(n, a, b));
            }
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::usage(format!(
        "cannot resume: data of loader '{name}' differs from the checkpoint's: {}",
        diffs.join("; ")
    )))
}

fn describe_file_diff(source: &str, saved: &[FileEntry], now: &[FileEntry]) -> String {
    if saved.len() != now.len() {
        return format!(
            "source {source}: checkpoint has {} files, now {}",
            saved.len(),
            now.len()
        );
    }
    for (a, b) in saved.iter().zip(now) {
        if a.path != b.path {
            return format!("source {source}: file {} is now {}", a.path, b.path);
        }
        if a.size != b.size {
            return format!(
                "source {source}: file {} was {} bytes, now {}",
                a.path, a.size, b.size
            );
        }
    }
    format!("source {source} differs")
}

/// A changed recipe is allowed (a fix, a new log line) but said; `strict` refuses it.
/// Returns the warning to print, if any.
pub fn check_recipe(
    saved: &CkptMeta,
    recipe: &Path,
    hash: &str,
    strict: bool,
) -> Result<Option<String>> {
    if saved.recipe_hash.as_deref().is_none_or(|h| h == hash) {
        return Ok(None);
    }
    let msg = format!(
        "the recipe {} changed since the checkpoint was written (it was {})",
        recipe.display(),
        saved.recipe.clone().unwrap_or_default()
    );
    if strict {
        return Err(Error::usage(format!(
            "cannot resume: {msg}; rerun without --strict to accept the change"
        )));
    }
    Ok(Some(format!("{msg}; continuing (use --strict to refuse)")))
}

/// Load a checkpoint's weights, optimizer state and counters into a fresh session.
/// Checkpoints are device- and dtype-independent: moments come back onto this run's device in
/// the master weights' dtype, wherever and in whatever layout they were written.
pub fn restore(session: &mut Session, ckpt: &Checkpoint) -> Result<()> {
    let model = session.model.clone();
    check_model(&ckpt.meta.model, &model.config)?;
    model.load_params(&ckpt.group("model.")).map_err(|e| {
        Error::usage(format!(
            "cannot resume: checkpoint {}: {e}",
            ckpt.path.display()
        ))
    })?;
    let device = model.device().clone();
    let master = model
        .params()
        .values()
        .next()
        .map(|v| v.dtype())
        .unwrap_or(DType::F32);
    let to_device = |m: BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>> {
        m.into_iter()
            .map(|(k, t)| {
                // A copy: AdamW updates moments in place, and these tensors are shared with
                // the loaded checkpoint.
                let t = t
                    .to_device(&device)
                    .and_then(|t| t.to_dtype(master))
                    .and_then(|t| t.copy())
                    .map_err(|e| Error::failed(e.to_string()))?;
                Ok((k, t))
            })
            .collect()
    };
    session.optim.m = to_device(ckpt.group("optim.m."))?;
    session.optim.v = to_device(ckpt.group("optim.v."))?;
    session.optim.step = ckpt.meta.optim_step;
    session.step = ckpt.meta.step;
    session.tokens_seen = ckpt.meta.tokens_seen;
    session.lr = ckpt.meta.lr;
    session.last_loss = ckpt.meta.loss;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[u64]) -> Vec<FileEntry> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| FileEntry {
                path: format!("data/f{i}.jsonl"),
                size,
            })
            .collect()
    }

    fn saved(tokenizer: &str, sources: Vec<(String, Vec<FileEntry>)>) -> SavedLoader {
        SavedLoader {
            cursor: crate::data::LoaderCursor {
                streams: Vec::new(),
                mix_rng: crate::util::rng::Rng::new(1),
                batches: 0,
            },
            tokenizer: tokenizer.into(),
            batch: 4,
            seq_len: 16,
            sources,
        }
    }

    #[test]
    fn same_model_config_resumes_and_any_field_change_is_refused_by_name() {
        let c = ModelConfig::preset("tiny").unwrap();
        assert!(check_model(&c, &c).is_ok());
        let mut wider = c.clone();
        wider.dim *= 2;
        let e = check_model(&c, &wider).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.contains("dim"), "{}", e.message);
    }

    #[test]
    fn loaders_must_keep_tokenizer_and_files() {
        let src = vec![("train".to_string(), files(&[10, 20]))];
        let s = saved("bytes", src.clone());
        assert!(check_loader("train", &s, "bytes", &src).is_ok());

        let e = check_loader("train", &s, "bpe:abc", &src).unwrap_err();
        assert!(e.message.contains("tokenizer"), "{}", e.message);
        assert_eq!(e.exit_code(), 2);

        let grown = vec![("train".to_string(), files(&[10, 21]))];
        let e = check_loader("train", &s, "bytes", &grown).unwrap_err();
        assert!(e.message.contains("was 20 bytes, now 21"), "{}", e.message);

        let more = vec![("train".to_string(), files(&[10, 20, 30]))];
        let e = check_loader("train", &s, "bytes", &more).unwrap_err();
        assert!(e.message.contains("2 files, now 3"), "{}", e.message);

        let two = vec![src[0].clone(), ("val".to_string(), files(&[5]))];
        let e = check_loader("train", &s, "bytes", &two).unwrap_err();
        assert!(e.message.contains("number of sources"), "{}", e.message);
    }

    #[test]
    fn a_changed_recipe_warns_and_strict_refuses() {
        let c = ModelConfig::preset("tiny").unwrap();
        let mut meta: CkptMeta = serde_json::from_value(serde_json::json!({
            "format_version": 1, "wick_version": "0", "reason": "completed", "step": 3,
            "tokens_seen": 0, "loss": null, "lr": 0.001, "model": c,
            "optim": crate::train::AdamWConfig::default(), "optim_step": 3, "seed": 1,
            "run_id": "r", "started_unix": 0.0, "saved_unix": 0.0, "device": "cpu",
            "loaders": {}, "state": null, "recipe": "a.lua", "recipe_hash": "xxh3:1",
            "checksum": ""
        }))
        .unwrap();
        let p = Path::new("a.lua");
        assert_eq!(check_recipe(&meta, p, "xxh3:1", true).unwrap(), None);
        let warn = check_recipe(&meta, p, "xxh3:2", false).unwrap().unwrap();
        assert!(warn.contains("changed"), "{warn}");
        assert_eq!(
            check_recipe(&meta, p, "xxh3:2", true)
                .unwrap_err()
                .exit_code(),
            2
        );
        meta.recipe_hash = None; // written by the REPL: nothing to compare
        assert_eq!(check_recipe(&meta, p, "xxh3:2", true).unwrap(), None);
    }
}
