//! Data: sources of local files, tokenizers, token streams with saveable cursors, and the
//! background loader that packs batches. Lua never sees per-token work.

pub mod loader;
pub mod lua_source;
pub mod record;
pub mod shards;
pub mod slimpajama;
pub mod source;
pub mod stream;
pub mod subsets;
pub mod tokenizer;
pub mod train_tokenizer;
pub mod transform;

pub use loader::{Loader, LoaderCursor, LoaderSpec, NextError};
pub use source::{FileEntry, OnBad, SourceSpec};
pub use tokenizer::Tokenizer;

use serde::Serialize;

/// Counts of what the readers saw, shared with the progress line and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataStats {
    pub rows: u64,
    pub bad_rows: u64,
    pub empty_rows: u64,
    pub bad_files: u64,
    /// Documents a Lua filter or map dropped.
    pub filtered: u64,
    /// The first few bad rows, as file:line: reason.
    pub examples: Vec<String>,
}
