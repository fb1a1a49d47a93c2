//! `wick tokenizer train`: a byte-level BPE (GPT-2 style) trained on local data with the
//! `tokenizers` crate, saved as a Hugging Face tokenizer.json with `<|endoftext|>` as the
//! end-of-document token.

use super::source::{discover, is_data_file, RecordReader, SourceSpec};
use super::DataStats;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

pub const EOD_TOKEN: &str = "<|endoftext|>";

pub fn train(
    vocab: usize,
    out: &Path,
    sources: &[String],
    max_bytes: u64,
) -> Result<String, String> {
    if vocab < 258 {
        return Err(format!("--vocab {vocab} is too small: a byte-level BPE needs at least 258 (256 bytes, end-of-document, one merge)"));
    }
    let files = discover(sources, &is_data_file)?;
    let spec = SourceSpec::plain(files.clone());
    let stats = Arc::new(Mutex::new(DataStats::default()));
    let mut texts = Vec::new();
    let mut bytes = 0u64;
    'files: for f in &files {
        let mut r = RecordReader::open(&spec, f, 0, 0, stats.clone())?;
        while let Some(rec) = r.next_record()? {
            let super::record::Payload::Text(text) = rec.payload else {
                continue;
            };
            bytes += text.len() as u64;
            texts.push(text);
            if bytes >= max_bytes {
                break 'files;
            }
        }
    }
    if texts.is_empty() {
        return Err("no text found in the given sources".into());
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOD_TOKEN.to_string(), true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .build()
            .map_err(|e| format!("cannot build the tokenizer: {e}"))?;
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| format!("tokenizer training failed: {e}"))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    tokenizer
        .save(out, false)
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(format!(
        "trained a byte-level BPE with {} tokens on {} documents ({:.1} MB) from {} file(s); saved {}",
        tokenizer.get_vocab_size(true),
        texts.len(),
        bytes as f64 / 1e6,
        files.len(),
        out.display()
    ))
}
