//! A record: what any reader yields from a position — one JSON row, a block of lines of a
//! text file, or one pre-tokenized document of a shard.

#[derive(Clone)]
pub struct Record {
    pub offset: u64,
    pub line: u64,
    pub payload: Payload,
    /// The record ends a document (every JSON row; the last block of a text file).
    pub end_of_doc: bool,
    /// The subset the row belongs to (SlimPajama's `meta.redpajama_set_name`; `unknown` when it
    /// has none).
    pub subset: String,
    /// The row's `meta` (kept only when a Lua filter or map may read it).
    pub meta: Option<serde_json::Value>,
}

#[derive(Clone)]
pub enum Payload {
    Text(String),
    /// Pre-tokenized (from shards), end-of-document token included.
    Tokens(Vec<u32>),
}

/// Anything that yields records from a position: text/JSON files, or token shards.
pub trait Records: Send {
    fn next_record(&mut self) -> Result<Option<Record>, String>;
}
