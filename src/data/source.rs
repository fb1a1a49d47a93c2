//! Sources: lists of local files (plain text, `.jsonl`; either also zstd- or gzip-compressed) read as a stream of
//! records. A record is one JSON row, or a block of lines of a text file. Every position is a
//! plain cursor (file, byte offset, line, tokens already taken) so a checkpoint can save it and a
//! resume can continue from the same token.

use super::record::{Payload, Record, Records};
use super::DataStats;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How a data file's bytes are compressed (by its name's last suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
}

/// What a data file holds, by its name: JSON rows or plain text, compressed or not
/// (`a.jsonl`, `a.jsonl.zst`, `a.json.gz`, `notes.txt`, `notes.txt.gz`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub jsonl: bool,
    pub compression: Compression,
}

/// Compressions wick does not read, with what to do instead: such a file would otherwise be
/// read as text and train the model on compressed bytes.
const UNSUPPORTED_COMPRESSION: &[&str] = &[
    ".bz2", ".xz", ".lzma", ".lz4", ".br", ".zip", ".7z", ".tar", ".tgz",
];

impl Format {
    pub fn of(path: &Path) -> Result<Format, String> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if let Some(ext) = UNSUPPORTED_COMPRESSION.iter().find(|e| name.ends_with(*e)) {
            return Err(format!(
                "data file {}: {ext} files are not read; decompress it, or recompress it as .zst or .gz",
                path.display()
            ));
        }
        let (inner, compression) = if let Some(i) = name
            .strip_suffix(".zst")
            .or_else(|| name.strip_suffix(".zstd"))
        {
            (i, Compression::Zstd)
        } else if let Some(i) = name.strip_suffix(".gz") {
            (i, Compression::Gzip)
        } else {
            (name.as_str(), Compression::None)
        };
        // A bare `x.zst` was always read as JSON rows (SlimPajama's chunks are `.jsonl.zst`).
        let jsonl = [".jsonl", ".json", ".ndjson"]
            .iter()
            .any(|e| inner.ends_with(e))
            || (compression != Compression::None && !inner.contains('.'));
        Ok(Format { jsonl, compression })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnBad {
    Skip,
    Error,
}

/// What a source reads and how. Plain data: it is compared on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    pub files: Vec<FileEntry>,
    /// JSON field that holds the text.
    pub field: String,
    /// Shuffle the file order each epoch (seeded; the order is a function of seed and epoch).
    pub shuffle: bool,
    pub seed: u64,
    pub on_bad_row: OnBad,
    pub on_bad_file: OnBad,
    /// Keep only rows whose `meta.redpajama_set_name` is in this list (None: all rows).
    pub subsets: Option<Vec<String>>,
    /// For token shards: the identity of the tokenizer they were prepared with.
    #[serde(default)]
    pub shard_tokenizer: Option<String>,
    /// Per-document Lua `filter`/`map` (run on the data thread).
    #[serde(skip)]
    pub transforms: Option<Arc<super::transform::Transforms>>,
}

impl SourceSpec {
    /// Files read in order with the defaults: field `text`, bad rows skipped, bad files an error.
    pub fn plain(files: Vec<FileEntry>) -> SourceSpec {
        SourceSpec {
            files,
            field: "text".into(),
            shuffle: false,
            seed: 0,
            on_bad_row: OnBad::Skip,
            on_bad_file: OnBad::Error,
            subsets: None,
            shard_tokenizer: None,
            transforms: None,
        }
    }
}

/// Where a stream stands. `offset`/`line` locate the record being consumed (in the decompressed
/// bytes), `token` counts the tokens of that record already handed out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    pub file: usize,
    pub offset: u64,
    pub line: u64,
    pub token: usize,
    /// For a source written in Lua: its `state()` before the document at the cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lua_state: Option<serde_json::Value>,
}

/// Prefix of a reader error that must stop the run even when bad files are skipped.
pub const FATAL: &str = "\u{0}fatal:";

/// Records of text files are blocks of whole lines of about this many bytes.
const TEXT_RECORD_BYTES: usize = 64 * 1024;

/// Sort paths so that `_10` comes after `_9`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match out.last_mut() {
                Some((kind, buf)) if *kind == d => buf.push(c),
                _ => out.push((d, c.to_string())),
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = if x.0 && y.0 {
            let (tx, ty) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
            tx.len().cmp(&ty.len()).then(tx.cmp(ty))
        } else {
            x.1.cmp(&y.1)
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Expand files and directories (recursively) into a sorted file list.
/// `accept` decides which files found inside directories are kept.
pub fn discover(
    paths: &[String],
    accept: &dyn Fn(&Path) -> bool,
) -> Result<Vec<FileEntry>, String> {
    let mut out = Vec::new();
    for p in paths {
        let path = Path::new(p);
        let meta = std::fs::metadata(path).map_err(|e| {
            format!(
                "data path {p}: {e} (check the path; it is read relative to the working directory)"
            )
        })?;
        if meta.is_dir() {
            let (mut found, mut unread) = (Vec::new(), Vec::new());
            walk(path, accept, &mut found, &mut unread)?;
            let unread_note = unread.first().map(|u: &PathBuf| {
                format!(
                    "{} file(s) in a compression wick does not read (e.g. {}): decompress them, or recompress them as .zst or .gz",
                    unread.len(),
                    u.display()
                )
            });
            if found.is_empty() {
                return Err(format!(
                    "data directory {p} holds no data files (.jsonl, .ndjson, .txt or .md, plain or compressed as .zst or .gz){}",
                    unread_note.map(|n| format!("; it holds {n}")).unwrap_or_default()
                ));
            }
            if let Some(note) = unread_note {
                crate::host::progress::warn(&format!("data directory {p}: skipped {note}"));
            }
            found.sort_by(|a: &PathBuf, b: &PathBuf| {
                natural_cmp(&a.to_string_lossy(), &b.to_string_lossy())
            });
            for f in found {
                let size = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                out.push(FileEntry {
                    path: f.to_string_lossy().into_owned(),
                    size,
                });
            }
        } else {
            // A named file in a compression wick cannot read is refused here, at the call that
            // named it, rather than read as text.
            Format::of(path)?;
            out.push(FileEntry {
                path: p.clone(),
                size: meta.len(),
            });
        }
    }
    Ok(out)
}

/// Collect the files under `dir` that `accept` takes into `out`, and data files in a
/// compression wick does not read into `unread`.
fn walk(
    dir: &Path,
    accept: &dyn Fn(&Path) -> bool,
    out: &mut Vec<PathBuf>,
    unread: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let path = entry.path();
        if path.is_dir() {
            walk(&path, accept, out, unread)?;
        } else if accept(&path) {
            out.push(path);
        } else if is_unread_data_file(&path) {
            unread.push(path);
        }
    }
    unread.sort();
    Ok(())
}

pub fn is_data_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.starts_with('.') {
        return false;
    }
    let inner = [".zst", ".zstd", ".gz"]
        .iter()
        .find_map(|c| name.strip_suffix(c))
        .unwrap_or(&name);
    [".txt", ".jsonl", ".json", ".ndjson", ".md"]
        .iter()
        .any(|ext| inner.ends_with(ext))
        // A plain `.json` file is usually not data (a config, a tokenizer): only compressed
        // ones are, as SlimPajama-style chunks. Name a `.json` file to read it.
        && !name.ends_with(".json")
}

/// Files a directory walk passed over whose names say they hold data in a compression wick
/// does not read (`a.jsonl.xz`): worth a warning, since the user probably meant them.
pub fn is_unread_data_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    UNSUPPORTED_COMPRESSION.iter().any(|c| {
        name.strip_suffix(c).is_some_and(|inner| {
            [".txt", ".jsonl", ".json", ".ndjson", ".md"]
                .iter()
                .any(|e| inner.ends_with(e))
        })
    })
}

impl Records for RecordReader {
    fn next_record(&mut self) -> Result<Option<Record>, String> {
        RecordReader::next_record(self)
    }
}

/// Reads the records of one file from a given position.
pub struct RecordReader {
    reader: Box<dyn BufRead + Send>,
    format: Format,
    path: String,
    offset: u64,
    line: u64,
    spec_field: String,
    subsets: Option<Vec<String>>,
    on_bad_row: OnBad,
    stats: Arc<Mutex<DataStats>>,
    buf: Vec<u8>,
    /// Print no warnings (a second parse of rows already reported).
    quiet: bool,
    /// Keep each row's `meta` with its record (for Lua filters and maps).
    keep_meta: bool,
}

impl RecordReader {
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    pub fn open(
        spec: &SourceSpec,
        file: &FileEntry,
        offset: u64,
        line: u64,
        stats: Arc<Mutex<DataStats>>,
    ) -> Result<RecordReader, String> {
        let path = Path::new(&file.path);
        let format = Format::of(path)?;
        let mut f =
            File::open(path).map_err(|e| format!("cannot open data file {}: {e}", file.path))?;
        let mut reader: Box<dyn BufRead + Send> = match format.compression {
            Compression::None => {
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| format!("cannot seek in {}: {e}", file.path))?;
                Box::new(BufReader::with_capacity(1 << 20, f))
            }
            c => {
                let dec: Box<dyn Read + Send> = if c == Compression::Zstd {
                    Box::new(
                        zstd::stream::read::Decoder::new(f)
                            .map_err(|e| format!("cannot read zstd file {}: {e}", file.path))?,
                    )
                } else {
                    // Multi-member: `cat a.gz b.gz` and pigz output are one stream.
                    Box::new(flate2::read::MultiGzDecoder::new(f))
                };
                let mut r = BufReader::with_capacity(1 << 20, dec);
                // Compressed streams cannot seek: decompress and discard up to the cursor.
                let skipped = std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
                    .map_err(|e| compressed_error(&file.path, c, &e))?;
                if skipped != offset {
                    return Err(format!("data file {} is shorter than the saved position {offset}; it changed since the checkpoint", file.path));
                }
                Box::new(r)
            }
        };
        if !format.jsonl && offset == 0 {
            refuse_binary(&mut reader, &file.path, format.compression)?;
        }
        if format.jsonl && offset == 0 {
            refuse_json_array(&mut reader, &file.path)?;
        }
        Ok(RecordReader {
            reader,
            format,
            path: file.path.clone(),
            offset,
            line,
            spec_field: spec.field.clone(),
            subsets: spec.subsets.clone(),
            on_bad_row: spec.on_bad_row,
            stats,
            buf: Vec::new(),
            quiet: false,
            keep_meta: spec.transforms.is_some(),
        })
    }

    /// The next usable record, None at the end of the file. Bad rows are counted and skipped
    /// (or are an error with `on_bad_row = "error"`).
    pub fn next_record(&mut self) -> Result<Option<Record>, String> {
        loop {
            let start = self.offset;
            let line_no = self.line;
            let text = match self.format.jsonl {
                false => {
                    self.buf.clear();
                    loop {
                        let n = self.read_line_into_buf()?;
                        if n == 0 || self.buf.len() >= TEXT_RECORD_BYTES {
                            break;
                        }
                    }
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let at_end = self.reader.fill_buf().map(|b| b.is_empty()).unwrap_or(true);
                    let mut bytes: &[u8] = &self.buf;
                    if start == 0 {
                        bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                    }
                    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
                    return Ok(Some(Record {
                        offset: start,
                        line: line_no,
                        payload: Payload::Text(text),
                        end_of_doc: at_end,
                        subset: "unknown".into(),
                        meta: None,
                    }));
                }
                true => {
                    self.buf.clear();
                    let n = self.read_line_into_buf()?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.parse_row(start, line_no)?
                }
            };
            if let Some((text, subset, meta)) = text {
                self.stats_mut().rows += 1;
                return Ok(Some(Record {
                    offset: start,
                    line: line_no,
                    payload: Payload::Text(text),
                    end_of_doc: true,
                    subset,
                    meta,
                }));
            }
        }
    }

    fn stats_mut(&self) -> std::sync::MutexGuard<'_, DataStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one line (with its newline) to buf; returns the bytes read.
    fn read_line_into_buf(&mut self) -> Result<usize, String> {
        let n = self.reader.read_until(b'\n', &mut self.buf).map_err(|e| {
            match self.format.compression {
                Compression::None => format!("cannot read data file {}: {e}", self.path),
                c => compressed_error(&self.path, c, &e),
            }
        })?;
        self.offset += n as u64;
        if n > 0 {
            self.line += 1;
        }
        Ok(n)
    }

    /// Text of a JSON row; None when the row is skipped (blank, bad, filtered out).
    #[allow(clippy::type_complexity)]
    fn parse_row(
        &mut self,
        start: u64,
        line_idx: u64,
    ) -> Result<Option<(String, String, Option<serde_json::Value>)>, String> {
        let mut bytes: &[u8] = &self.buf;
        if start == 0 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        while let Some((&last, rest)) = bytes.split_last() {
            if last == b'\n' || last == b'\r' || last == b' ' || last == b'\t' {
                bytes = rest;
            } else {
                break;
            }
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        let line_no = line_idx + 1;
        let row: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return self.bad_row(line_no, &format!("malformed JSON ({e})")),
        };
        let text = match row.get(&self.spec_field) {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => {
                return self.bad_row(
                    line_no,
                    &format!("field '{}' is not a string", self.spec_field),
                )
            }
            None => {
                // Name the row's string fields: the usual cause is a corpus whose text lives
                // under another name ("content", "raw_content", ...).
                let strings: Vec<&str> = row
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(_, v)| v.is_string())
                            .map(|(k, _)| k.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                let hint = match strings.first() {
                    Some(first) => format!(
                        " (its text fields: {}; use field = \"{first}\" to read one)",
                        strings.join(", ")
                    ),
                    None => String::new(),
                };
                return self.bad_row(line_no, &format!("no field '{}'{hint}", self.spec_field));
            }
        };
        let subset = subset_of(&row);
        if let Some(wanted) = &self.subsets {
            if !wanted.contains(&subset) {
                return Ok(None);
            }
        }
        if text.is_empty() {
            self.stats_mut().empty_rows += 1;
            return Ok(None);
        }
        let meta = if self.keep_meta {
            row.get("meta").cloned()
        } else {
            None
        };
        Ok(Some((text.clone(), subset, meta)))
    }

    #[allow(clippy::type_complexity)]
    fn bad_row(
        &mut self,
        line_no: u64,
        why: &str,
    ) -> Result<Option<(String, String, Option<serde_json::Value>)>, String> {
        let msg = format!("{}:{line_no}: {why}", self.path);
        if self.on_bad_row == OnBad::Error {
            return Err(format!(
                "{FATAL}bad row at {msg} (on_bad_row = \"error\"; use \"skip\" to skip such rows)"
            ));
        }
        let mut st = self.stats_mut();
        st.bad_rows += 1;
        // Each bad row is shown once, not again every epoch.
        if st.examples.len() < 5 && !self.quiet && !st.examples.contains(&msg) {
            st.examples.push(msg.clone());
            drop(st);
            crate::host::progress::warn(&format!("skipped bad row {msg}"));
        }
        Ok(None)
    }
}

/// SlimPajama's subset of a row: `meta.redpajama_set_name`, where `meta` may also be a JSON
/// string holding that object (as in parquet exports); `unknown` when missing.
pub fn subset_of(row: &serde_json::Value) -> String {
    let meta = match row.get("meta") {
        Some(serde_json::Value::String(s)) => serde_json::from_str::<serde_json::Value>(s).ok(),
        Some(v) => Some(v.clone()),
        None => None,
    };
    meta.as_ref()
        .and_then(|m| m.get("redpajama_set_name"))
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string()
}

/// A "text" file whose first bytes hold NUL bytes is not text (a parquet or arrow file, a
/// binary, a compressed file under a text name): training on its bytes would teach the model
/// noise, so it is an error naming the file.
fn refuse_binary(
    reader: &mut Box<dyn BufRead + Send>,
    path: &str,
    c: Compression,
) -> Result<(), String> {
    let head = reader.fill_buf().map_err(|e| match c {
        Compression::None => format!("cannot read data file {path}: {e}"),
        c => compressed_error(path, c, &e),
    })?;
    let head = &head[..head.len().min(8192)];
    if !head.contains(&0) {
        return Ok(());
    }
    let lower = path.to_lowercase();
    let hint = if head.starts_with(b"\xff\xfe") || head.starts_with(b"\xfe\xff") {
        "it looks like UTF-16 text; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"
    } else if lower.ends_with(".parquet") || lower.ends_with(".arrow") {
        "convert it to JSON lines first (pandas: pd.read_parquet(f).to_json(out, orient=\"records\", lines=True))"
    } else {
        "wick reads text and JSON lines (.txt, .md, .jsonl; plain or .zst/.gz)"
    };
    Err(format!(
        "data file {path} is not text (it holds NUL bytes near its start): {hint}"
    ))
}

/// A `.json` file that is one JSON array (`[{"text": ...}, ...]`) is not JSON lines: every
/// line would be a bad row. Say what it is and how to convert it.
fn refuse_json_array(reader: &mut Box<dyn BufRead + Send>, path: &str) -> Result<(), String> {
    let Ok(head) = reader.fill_buf() else {
        return Ok(()); // the first read reports it, with the file's name
    };
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(format!(
            "data file {path} is one JSON array, not JSON lines (one object per line): convert it, e.g. jq -c '.[]' {path} > out.jsonl"
        ));
    }
    Ok(())
}

fn compressed_error(path: &str, c: Compression, e: &std::io::Error) -> String {
    let what = if c == Compression::Gzip {
        "gzip"
    } else {
        "zstd"
    };
    format!("data file {path} is not a valid {what} stream (truncated or corrupt?): {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_name_says_what_it_holds_and_how_it_is_compressed() {
        let f = |n: &str| Format::of(Path::new(n)).map(|f| (f.jsonl, f.compression));
        assert_eq!(f("a.jsonl"), Ok((true, Compression::None)));
        assert_eq!(f("A.JSONL.ZST"), Ok((true, Compression::Zstd)));
        assert_eq!(f("a.json.gz"), Ok((true, Compression::Gzip)));
        assert_eq!(f("chunk_0.zst"), Ok((true, Compression::Zstd)));
        assert_eq!(f("notes.txt.gz"), Ok((false, Compression::Gzip)));
        assert_eq!(f("notes.txt.zstd"), Ok((false, Compression::Zstd)));
        assert_eq!(f("README"), Ok((false, Compression::None)));
        for bad in ["a.jsonl.xz", "a.txt.bz2", "corpus.zip", "x.tar"] {
            let e = f(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("not read"), "{e}");
        }
        let data = |n: &str| is_data_file(Path::new(n));
        assert!(data("a.jsonl.gz") && data("b.txt.zst") && data("c.json.zst") && data("d.md"));
        assert!(!data("config.json") && !data(".hidden.jsonl") && !data("a.jsonl.xz"));
        assert!(is_unread_data_file(Path::new("a.jsonl.xz")));
        assert!(!is_unread_data_file(Path::new("photo.zip")));
    }
}
