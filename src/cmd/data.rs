//! `wick data prepare`: tokenize sources into token shards read by mmap.

use crate::data::{shards, Tokenizer};
use crate::error::{exit, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DataCommand {
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

pub fn run(what: DataCommand) -> Result<i32> {
    let DataCommand::Prepare {
        tokenizer,
        out,
        sources,
    } = what;
    let tok = if tokenizer == "bytes" {
        Tokenizer::Bytes
    } else {
        Tokenizer::load(Path::new(&tokenizer))?
    };
    let msg = shards::prepare(&tok, &out, &sources)?;
    crate::host::progress::warn(&msg);
    Ok(exit::OK)
}
