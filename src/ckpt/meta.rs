//! The JSON metadata stored inside every checkpoint: enough to resume exactly and to tell a
//! human what the file is.

use crate::data::{FileEntry, LoaderCursor};
use crate::model::ModelConfig;
use crate::train::AdamWConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CkptMeta {
    pub format_version: u32,
    pub wick_version: String,
    /// completed | error | interrupted | panic | manual | periodic | diverged | repl-exit
    pub reason: String,
    pub step: u64,
    pub tokens_seen: u64,
    pub loss: Option<f64>,
    pub lr: f64,
    pub model: ModelConfig,
    pub optim: AdamWConfig,
    pub optim_step: u64,
    pub seed: u64,
    /// Identifies one run across its resumes; a different id means another run's file.
    pub run_id: String,
    pub started_unix: f64,
    pub saved_unix: f64,
    pub device: String,
    /// Compute dtype of the run ("f32", "bf16"). Informational: weights and moments are
    /// stored in f32 whatever it was, and a run may resume on another device or dtype.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Ranks of the data-parallel run that wrote it (1 alone). Informational: the data cursor
    /// is the one global cursor, so a run resumes with any number of ranks.
    #[serde(default = "one")]
    pub world_size: usize,
    #[serde(default)]
    pub loaders: BTreeMap<String, SavedLoader>,
    /// The recipe's own `wick.state` table.
    #[serde(default)]
    pub state: serde_json::Value,
    #[serde(default)]
    pub recipe: Option<String>,
    #[serde(default)]
    pub recipe_hash: Option<String>,
    /// xxh3 of all tensor bytes, in file order.
    #[serde(default)]
    pub checksum: String,
}

/// A loader's position and identity, checked on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedLoader {
    pub cursor: LoaderCursor,
    pub tokenizer: String,
    pub batch: usize,
    pub seq_len: usize,
    /// Per source: its name and files (path + size).
    pub sources: Vec<(String, Vec<FileEntry>)>,
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// UTC time as `YYYY-MM-DD HH:MM:SS` (no timezone database needed).
pub fn format_unix(t: f64) -> String {
    let secs = t.max(0.0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn default_dtype() -> String {
    "f32".into()
}

fn one() -> usize {
    1
}
