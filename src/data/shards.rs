//! Pre-tokenized shards: `wick data prepare` tokenizes sources in parallel, one shard per input
//! file: `shard_NNNNN.bin` (tokens, u16 where the vocab fits, else u32, little-endian) and
//! `shard_NNNNN.idx` (16 bytes per document: start u64, length u32, subset id u16, 0u16), plus
//! `index.json`. Documents keep their subset so mixtures still work: a subset id indexes the
//! shard's own `subsets` table in the index (any dataset's names; shards written before that
//! table existed use the index-wide one). The loader reads shards by mmap. The same inputs
//! give the same bytes.

use super::record::{Payload, Record, Records};
use super::source::{discover, is_data_file, FileEntry, RecordReader, SourceSpec};
use super::tokenizer::Tokenizer;
use super::DataStats;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const DOC_BYTES: usize = 16;

#[derive(Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub tokenizer: String,
    pub vocab: usize,
    pub eod: u32,
    /// "u16" or "u32"
    pub dtype: String,
    /// Every subset name in the shards (sorted). Shards of format 1 without their own table
    /// used this list as their table.
    pub subsets: Vec<String>,
    pub shards: Vec<ShardInfo>,
}

#[derive(Serialize, Deserialize)]
pub struct ShardInfo {
    pub bin: String,
    pub source: String,
    pub docs: u64,
    pub tokens: u64,
    /// Subset names of this shard's documents, in order of first appearance: a document's
    /// subset id is a position in this list.
    #[serde(default)]
    pub subsets: Vec<String>,
}

impl ShardIndex {
    /// The subset table of the shard stored as `bin`.
    pub fn subset_table(&self, bin: &str) -> &[String] {
        match self.shards.iter().find(|s| s.bin == bin) {
            Some(s) if !s.subsets.is_empty() => &s.subsets,
            _ => &self.subsets,
        }
    }
}

/// The id of `name` in `table`, added at the end when new.
fn subset_id(table: &mut Vec<String>, name: &str) -> Result<u16, String> {
    let i = match table.iter().position(|s| s == name) {
        Some(i) => i,
        None => {
            table.push(name.to_string());
            table.len() - 1
        }
    };
    u16::try_from(i).map_err(|_| "more than 65536 subsets in one shard".to_string())
}

/// The shard files of a prepared directory, in order, for a source spec.
pub fn shard_files(dir: &Path) -> Result<(ShardIndex, Vec<FileEntry>), String> {
    let index = read_index(dir)?;
    let mut files = Vec::new();
    for s in &index.shards {
        let p = dir.join(&s.bin);
        let size = std::fs::metadata(&p)
            .map_err(|e| format!("shard {}: {e}", p.display()))?
            .len();
        files.push(FileEntry {
            path: p.to_string_lossy().into_owned(),
            size,
        });
    }
    if files.is_empty() {
        return Err(format!("{} holds no shards", dir.display()));
    }
    Ok((index, files))
}

pub fn read_index(dir: &Path) -> Result<ShardIndex, String> {
    let p = dir.join("index.json");
    let text = std::fs::read_to_string(&p).map_err(|e| {
        format!(
            "cannot read {}: {e} (prepare shards with `wick data prepare`)",
            p.display()
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a wick shard index: {e}", p.display()))
}

/// Tokenize `sources` into shards under `out`. Returns a summary line.
pub fn prepare(tokenizer: &Tokenizer, out: &Path, sources: &[String]) -> Result<String, String> {
    let files = discover(sources, &is_data_file)?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let wide = tokenizer.vocab_size() > 65536;
    let spec = SourceSpec::plain(files.clone());
    let stats = Arc::new(Mutex::new(DataStats::default()));
    let results: Vec<Result<ShardInfo, String>> = files
        .par_iter()
        .enumerate()
        .map(|(i, f)| write_shard(tokenizer, &spec, f, out, i, wide, stats.clone()))
        .collect();
    let shards = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut subsets: Vec<String> = shards.iter().flat_map(|s| s.subsets.clone()).collect();
    subsets.sort();
    subsets.dedup();
    let index = ShardIndex {
        format: "wick-shards-1".into(),
        tokenizer: tokenizer.identity(),
        vocab: tokenizer.vocab_size(),
        eod: tokenizer.eod(),
        dtype: if wide { "u32" } else { "u16" }.into(),
        subsets,
        shards,
    };
    let text = serde_json::to_string_pretty(&index).map_err(|e| e.to_string())?;
    std::fs::write(out.join("index.json"), text + "\n")
        .map_err(|e| format!("cannot write index.json: {e}"))?;
    let docs: u64 = index.shards.iter().map(|s| s.docs).sum();
    let tokens: u64 = index.shards.iter().map(|s| s.tokens).sum();
    let bad = stats.lock().map(|s| s.bad_rows).unwrap_or(0);
    Ok(format!(
        "prepared {} shard(s) in {}: {docs} documents, {tokens} tokens ({}), {bad} bad rows skipped",
        index.shards.len(),
        out.display(),
        index.dtype
    ))
}

fn write_shard(
    tokenizer: &Tokenizer,
    spec: &SourceSpec,
    file: &FileEntry,
    out: &Path,
    i: usize,
    wide: bool,
    stats: Arc<Mutex<DataStats>>,
) -> Result<ShardInfo, String> {
    let bin_name = format!("shard_{i:05}.bin");
    let bin_path = out.join(&bin_name);
    let idx_path = out.join(format!("shard_{i:05}.idx"));
    let mut bin = std::io::BufWriter::new(
        std::fs::File::create(&bin_path).map_err(|e| format!("{}: {e}", bin_path.display()))?,
    );
    let mut idx = std::io::BufWriter::new(
        std::fs::File::create(&idx_path).map_err(|e| format!("{}: {e}", idx_path.display()))?,
    );
    let mut reader = RecordReader::open(spec, file, 0, 0, stats)?;
    let (mut docs, mut start) = (0u64, 0u64);
    let mut doc: Vec<u32> = Vec::new();
    let mut subsets: Vec<String> = Vec::new();
    let write_err = |e: std::io::Error| format!("cannot write shard {}: {e}", bin_path.display());
    while let Some(Record {
        payload,
        end_of_doc,
        subset,
        ..
    }) = reader.next_record()?
    {
        if let Payload::Text(text) = payload {
            tokenizer.encode_into(&text, &mut doc)?;
        }
        if !end_of_doc {
            continue;
        }
        doc.push(tokenizer.eod());
        for &t in &doc {
            if wide {
                bin.write_all(&t.to_le_bytes()).map_err(write_err)?;
            } else {
                bin.write_all(&(t as u16).to_le_bytes())
                    .map_err(write_err)?;
            }
        }
        let mut rec = [0u8; DOC_BYTES];
        rec[..8].copy_from_slice(&start.to_le_bytes());
        rec[8..12].copy_from_slice(&(doc.len() as u32).to_le_bytes());
        rec[12..14].copy_from_slice(&subset_id(&mut subsets, &subset)?.to_le_bytes());
        idx.write_all(&rec).map_err(write_err)?;
        start += doc.len() as u64;
        docs += 1;
        doc.clear();
    }
    bin.flush().map_err(write_err)?;
    idx.flush().map_err(write_err)?;
    Ok(ShardInfo {
        bin: bin_name,
        source: file.path.clone(),
        docs,
        tokens: start,
        subsets,
    })
}

/// Reads documents of one shard by mmap, from document `next`.
pub struct ShardReader {
    tokens: memmap2::Mmap,
    docs: Vec<u8>,
    wide: bool,
    next: u64,
    /// The shard's subset names, by id.
    subsets: Vec<String>,
    wanted: Option<Vec<u16>>,
    path: PathBuf,
    stats: Arc<Mutex<DataStats>>,
}

impl ShardReader {
    pub fn open(
        spec: &SourceSpec,
        file: &FileEntry,
        next: u64,
        stats: Arc<Mutex<DataStats>>,
    ) -> Result<ShardReader, String> {
        let path = PathBuf::from(&file.path);
        let dir = path.parent().unwrap_or(Path::new("."));
        let index = read_index(dir)?;
        let f = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open shard {}: {e}", path.display()))?;
        // SAFETY: shards are written once by `wick data prepare` and only read afterwards.
        let tokens = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| format!("cannot map shard {}: {e}", path.display()))?;
        let docs = std::fs::read(path.with_extension("idx"))
            .map_err(|e| format!("cannot read the index of shard {}: {e}", path.display()))?;
        if docs.len() % DOC_BYTES != 0 {
            return Err(format!(
                "shard index {} is truncated",
                path.with_extension("idx").display()
            ));
        }
        let bin = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let subsets = index.subset_table(&bin).to_vec();
        let wanted = spec.subsets.as_ref().map(|list| {
            (0..subsets.len() as u16)
                .filter(|&id| list.contains(&subsets[id as usize]))
                .collect()
        });
        Ok(ShardReader {
            tokens,
            docs,
            wide: index.dtype == "u32",
            next,
            subsets,
            wanted,
            path,
            stats,
        })
    }
}

impl Records for ShardReader {
    fn next_record(&mut self) -> Result<Option<Record>, String> {
        loop {
            let i = self.next as usize;
            let Some(rec) = self.docs.get(i * DOC_BYTES..(i + 1) * DOC_BYTES) else {
                return Ok(None);
            };
            self.next += 1;
            let start = u64::from_le_bytes(rec[..8].try_into().unwrap_or([0; 8])) as usize;
            let len = u32::from_le_bytes(rec[8..12].try_into().unwrap_or([0; 4])) as usize;
            let subset = u16::from_le_bytes(rec[12..14].try_into().unwrap_or([0; 2]));
            if self.wanted.as_ref().is_some_and(|w| !w.contains(&subset)) {
                continue;
            }
            let width = if self.wide { 4 } else { 2 };
            let bytes = self
                .tokens
                .get(start * width..(start + len) * width)
                .ok_or_else(|| {
                    format!(
                        "shard {} is shorter than its index says (truncated?)",
                        self.path.display()
                    )
                })?;
            let tokens: Vec<u32> = if self.wide {
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                    .collect()
            };
            if let Ok(mut s) = self.stats.lock() {
                s.rows += 1;
            }
            return Ok(Some(Record {
                offset: i as u64,
                line: i as u64,
                payload: Payload::Tokens(tokens),
                end_of_doc: true,
                subset: self
                    .subsets
                    .get(subset as usize)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
                meta: None,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare_dir(rows: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.jsonl");
        let body: String = rows
            .iter()
            .map(|(t, s)| {
                format!("{{\"text\":\"{t}\",\"meta\":{{\"redpajama_set_name\":\"{s}\"}}}}\n")
            })
            .collect();
        std::fs::write(&src, body).unwrap();
        let out = dir.path().join("shards");
        prepare(
            &Tokenizer::Bytes,
            &out,
            &[src.to_string_lossy().into_owned()],
        )
        .unwrap();
        (dir, out)
    }

    fn read_all(out: &Path, subsets: Option<Vec<String>>) -> Vec<(String, usize)> {
        let (_, files) = shard_files(out).unwrap();
        let mut spec = SourceSpec::plain(files.clone());
        spec.subsets = subsets;
        let stats = Arc::new(Mutex::new(DataStats::default()));
        let mut r = ShardReader::open(&spec, &files[0], 0, stats).unwrap();
        let mut docs = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            let Payload::Tokens(t) = rec.payload else {
                panic!("shards hold tokens")
            };
            docs.push((rec.subset, t.len()));
        }
        docs
    }

    /// Any dataset's subset names survive a round trip through the shard index, and a subset
    /// filter keeps exactly those documents.
    #[test]
    fn subset_names_are_the_shards_own_table() {
        let (_d, out) = prepare_dir(&[("aa", "Poems"), ("bbb", "Code"), ("c", "Poems")]);
        let index = read_index(&out).unwrap();
        assert_eq!(index.shards[0].subsets, ["Poems", "Code"]);
        assert_eq!(index.subsets, ["Code", "Poems"]);
        let all = read_all(&out, None);
        assert_eq!(
            all,
            [("Poems".into(), 3), ("Code".into(), 4), ("Poems".into(), 2)]
        );
        let poems = read_all(&out, Some(vec!["Poems".into()]));
        assert_eq!(poems, [("Poems".into(), 3), ("Poems".into(), 2)]);
        assert!(read_all(&out, Some(vec!["Nothing".into()])).is_empty());
    }

    /// Shards written before per-shard tables existed keep reading with the index-wide list.
    #[test]
    fn older_indexes_use_the_index_wide_table() {
        let (_d, out) = prepare_dir(&[("aa", "Book"), ("bbb", "Github")]);
        let mut index = read_index(&out).unwrap();
        // The old layout: ids into a fixed list, no table per shard.
        index.subsets = vec!["RedPajamaGithub".into(), "RedPajamaBook".into()];
        index.shards[0].subsets.clear();
        let mut json: serde_json::Value = serde_json::to_value(&index).unwrap();
        json["shards"][0].as_object_mut().unwrap().remove("subsets");
        std::fs::write(out.join("index.json"), json.to_string()).unwrap();
        let all = read_all(&out, None);
        assert_eq!(all[0].0, "RedPajamaGithub");
        assert_eq!(all[1].0, "RedPajamaBook");
    }
}
