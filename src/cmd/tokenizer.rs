//! `wick tokenizer train`: a byte-level BPE trained on local data.

use crate::error::{exit, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
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

pub fn run(what: TokenizerCommand) -> Result<i32> {
    let TokenizerCommand::Train {
        vocab,
        out,
        max_mb,
        sources,
    } = what;
    let msg = crate::data::train_tokenizer::train(vocab, &out, &sources, max_mb << 20)?;
    crate::host::progress::warn(&msg);
    Ok(exit::OK)
}
