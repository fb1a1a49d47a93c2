//! A token stream over one source: records → tokens (+ end-of-document), taken in windows.
//! Its cursor names the exact next token, so a copy built from a saved cursor continues
//! bit-identically.

use super::record::{Payload, Record, Records};
use super::shards::ShardReader;
use super::source::{FileEntry, OnBad, RecordReader, SourceSpec, StreamCursor, FATAL};
use super::subsets::{GroupReader, SubsetGroup};
use super::tokenizer::Tokenizer;
use super::transform::{Outcome, Worker};
use super::DataStats;
use crate::util::rng::Rng;
use std::sync::{Arc, Mutex};

pub struct TokenStream {
    spec: Arc<SourceSpec>,
    /// For one subset of a mixture over shared files: the shared parse, and the subset.
    group: Option<(Arc<Mutex<SubsetGroup>>, String)>,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<Mutex<DataStats>>,
    pub cursor: StreamCursor,
    order: Vec<usize>,
    reader: Option<Box<dyn Records>>,
    /// Tokens of the record at the cursor; cursor.token of them are taken.
    pending: Vec<u32>,
    /// The cursor's record has not been re-read yet (fresh stream or resumed one).
    reload: bool,
    tokens_since_wrap: u64,
    wrapped: bool,
    /// The Lua state running the source's filter/map (made on first use, on the data thread).
    worker: Option<Worker>,
    /// This stream's number (seeds its Lua state).
    index: usize,
}

impl TokenStream {
    pub fn new(
        spec: Arc<SourceSpec>,
        tokenizer: Arc<Tokenizer>,
        cursor: StreamCursor,
        stats: Arc<Mutex<DataStats>>,
    ) -> Self {
        let order = file_order(&spec, cursor.epoch);
        TokenStream {
            spec,
            group: None,
            tokenizer,
            stats,
            cursor,
            order,
            reader: None,
            pending: Vec::new(),
            reload: true,
            tokens_since_wrap: 0,
            wrapped: false,
            worker: None,
            index: 0,
        }
    }

    /// The stream's number among its loader's (seeds the Lua state of filters and maps).
    pub fn numbered(mut self, index: usize) -> Self {
        self.index = index;
        self
    }

    /// Run a record's text through the source's Lua filter/map: Some(text) to keep.
    fn transformed(
        &mut self,
        text: String,
        rec: &Record,
        entry: usize,
    ) -> Result<Option<String>, String> {
        let Some(t) = self.spec.transforms.clone() else {
            return Ok(Some(text));
        };
        if self.worker.is_none() {
            self.worker = Some(Worker::new(&t, self.index)?);
        }
        let source = format!("{}:{}", self.spec.files[entry].path, rec.line + 1);
        let worker = self.worker.as_ref().ok_or("data function state missing")?;
        match worker.apply(text, &rec.subset, rec.meta.as_ref(), &source)? {
            Outcome::Keep(t) => Ok(Some(t)),
            Outcome::Drop => {
                self.stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .filtered += 1;
                Ok(None)
            }
        }
    }

    /// Read this subset's rows through `group`'s shared parse of the files.
    pub fn with_group(mut self, group: Arc<Mutex<SubsetGroup>>, subset: String) -> Self {
        self.group = Some((group, subset));
        self
    }

    /// Append exactly `n` tokens to `out`, crossing records, files and epochs as needed.
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) -> Result<(), String> {
        let mut need = n;
        while need > 0 {
            if self.reload || self.cursor.token >= self.pending.len() {
                self.advance()?;
                continue;
            }
            let k = need.min(self.pending.len() - self.cursor.token);
            out.extend_from_slice(&self.pending[self.cursor.token..self.cursor.token + k]);
            self.cursor.token += k;
            self.tokens_since_wrap += k as u64;
            need -= k;
        }
        Ok(())
    }

    /// Move to the next record (or re-read the cursor's record after a resume).
    fn advance(&mut self) -> Result<(), String> {
        let resuming = self.reload;
        loop {
            if self.reader.is_none() {
                if self.cursor.file >= self.order.len() {
                    self.wrap_epoch()?;
                }
                let index = self.order[self.cursor.file];
                let entry: &FileEntry = &self.spec.files[index];
                let at = (self.cursor.offset, self.cursor.line);
                let opened = match &self.group {
                    Some((group, subset)) => GroupReader::open(group.clone(), index, subset, at)
                        .map(|r| Box::new(r) as Box<dyn Records>),
                    None => open_records(&self.spec, entry, at.0, at.1, self.stats.clone()),
                };
                match opened {
                    Ok(r) => self.reader = Some(r),
                    Err(e) => {
                        self.bad_file(e)?;
                        continue;
                    }
                }
            }
            let next = match self.reader.as_mut().map(|r| r.next_record()) {
                Some(Ok(rec)) => rec,
                Some(Err(e)) => {
                    self.bad_file(e)?;
                    continue;
                }
                None => None,
            };
            match next {
                Some(mut rec) => {
                    if self.spec.transforms.is_some() {
                        if let Payload::Text(text) = &mut rec.payload {
                            let text = std::mem::take(text);
                            let entry = self.order[self.cursor.file];
                            match self.transformed(text, &rec, entry)? {
                                Some(t) => rec.payload = Payload::Text(t),
                                None => continue, // dropped: the next record
                            }
                        }
                    }
                    let keep = if resuming && rec.offset == self.cursor.offset {
                        self.cursor.token
                    } else {
                        0
                    };
                    self.pending.clear();
                    match rec.payload {
                        Payload::Text(text) => {
                            self.tokenizer.encode_into(&text, &mut self.pending)?;
                            if rec.end_of_doc {
                                self.pending.push(self.tokenizer.eod());
                            }
                        }
                        Payload::Tokens(tokens) => self.pending = tokens,
                    }
                    self.cursor.offset = rec.offset;
                    self.cursor.line = rec.line;
                    self.cursor.token = keep.min(self.pending.len());
                    self.reload = false;
                    return Ok(());
                }
                None => {
                    self.reader = None;
                    self.cursor.file += 1;
                    self.cursor.offset = 0;
                    self.cursor.line = 0;
                    self.cursor.token = 0;
                }
            }
        }
    }

    fn wrap_epoch(&mut self) -> Result<(), String> {
        if self.wrapped && self.tokens_since_wrap == 0 {
            return Err(format!(
                "data source has no usable text{}: {} file(s) read, every row was empty, filtered out or bad{}",
                self.spec.subsets.as_ref().map(|s| format!(" for subset {}", s.join(", "))).unwrap_or_default(),
                self.spec.files.len(),
                self.spec.files.first().map(|f| format!(" (first file {})", f.path)).unwrap_or_default()
            ));
        }
        self.wrapped = true;
        self.tokens_since_wrap = 0;
        self.cursor.epoch += 1;
        self.cursor.file = 0;
        self.cursor.offset = 0;
        self.cursor.line = 0;
        self.order = file_order(&self.spec, self.cursor.epoch);
        Ok(())
    }

    /// An unreadable or corrupt file: an error, or skipped and reported with on_bad_file = "skip".
    fn bad_file(&mut self, err: String) -> Result<(), String> {
        if let Some(fatal) = err.strip_prefix(FATAL) {
            return Err(fatal.to_string());
        }
        if self.spec.on_bad_file == OnBad::Error {
            return Err(format!(
                "{err} (set on_bad_file = \"skip\" to skip such files)"
            ));
        }
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.bad_files += 1;
        }
        crate::host::progress::warn(&format!("skipping file: {err}"));
        self.reader = None;
        self.cursor.file += 1;
        self.cursor.offset = 0;
        self.cursor.line = 0;
        self.cursor.token = 0;
        Ok(())
    }
}

/// File order of an epoch: sorted, or a seeded shuffle that depends only on (seed, epoch).
pub fn file_order(spec: &SourceSpec, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..spec.files.len()).collect();
    if spec.shuffle {
        Rng::derive(spec.seed, &format!("file-order/{epoch}")).shuffle(&mut order);
    }
    order
}

/// Pick an index with probability proportional to its weight.
pub fn pick_weighted(weights: &[f64], rng: &mut Rng) -> usize {
    if weights.len() == 1 {
        return 0;
    }
    let total: f64 = weights.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i;
        }
        r -= w;
    }
    weights.len() - 1
}

/// Open the reader that fits the file: token shards (`.bin`) or text/JSON files.
pub fn open_records(
    spec: &SourceSpec,
    file: &FileEntry,
    offset: u64,
    line: u64,
    stats: Arc<Mutex<DataStats>>,
) -> Result<Box<dyn Records>, String> {
    if file.path.ends_with(".bin") {
        Ok(Box::new(ShardReader::open(spec, file, line, stats)?))
    } else {
        Ok(Box::new(RecordReader::open(
            spec, file, offset, line, stats,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{FileEntry, SourceSpec};

    /// Two files of JSON rows; returns the spec and the byte-level tokens of the whole corpus
    /// in order (each document followed by the end-of-document token).
    fn corpus(dir: &std::path::Path) -> (Arc<SourceSpec>, Vec<u32>) {
        let mut files = Vec::new();
        let mut all = Vec::new();
        let tok = Tokenizer::Bytes;
        for (f, docs) in [
            ("a.jsonl", ["alpha", "beta gamma"]),
            ("b.jsonl", ["delta", "eps"]),
        ] {
            let p = dir.join(f);
            let body: String = docs
                .iter()
                .map(|d| format!("{{\"text\":\"{d}\"}}\n"))
                .collect();
            std::fs::write(&p, &body).unwrap();
            for d in docs {
                tok.encode_into(d, &mut all).unwrap();
                all.push(tok.eod());
            }
            files.push(FileEntry {
                path: p.to_string_lossy().into_owned(),
                size: body.len() as u64,
            });
        }
        (Arc::new(SourceSpec::plain(files)), all)
    }

    fn stream(spec: &Arc<SourceSpec>, cursor: StreamCursor) -> TokenStream {
        TokenStream::new(
            spec.clone(),
            Arc::new(Tokenizer::Bytes),
            cursor,
            Arc::new(Mutex::new(DataStats::default())),
        )
    }

    /// Taking tokens in any chunking crosses records, files and epochs in corpus order, and a
    /// stream reopened from a saved cursor continues with exactly the next token.
    #[test]
    fn cursor_continues_at_the_next_token_across_records_files_and_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, all) = corpus(dir.path());
        let n = all.len();
        let mut s = stream(&spec, StreamCursor::default());
        let mut got = Vec::new();
        s.take(3, &mut got).unwrap();
        s.take(n - 3 + 4, &mut got).unwrap(); // wraps into the second epoch
        let want: Vec<u32> = all.iter().chain(&all[..4]).copied().collect();
        assert_eq!(got, want);
        assert_eq!(s.cursor.epoch, 1);

        for cut in [1, 5, 6, n - 1, n, n + 2] {
            let mut a = stream(&spec, StreamCursor::default());
            let mut first = Vec::new();
            a.take(cut, &mut first).unwrap();
            let mut b = stream(&spec, a.cursor.clone());
            let (mut rest_a, mut rest_b) = (Vec::new(), Vec::new());
            a.take(7, &mut rest_a).unwrap();
            b.take(7, &mut rest_b).unwrap();
            assert_eq!(rest_a, rest_b, "resumed after {cut} tokens");
            assert_eq!(rest_a[0], all[cut % n], "next token after {cut}");
        }
    }

    #[test]
    fn shuffled_file_order_depends_only_on_seed_and_epoch() {
        let files = (0..8)
            .map(|i| FileEntry {
                path: format!("f{i}"),
                size: 1,
            })
            .collect();
        let mut spec = SourceSpec::plain(files);
        assert_eq!(file_order(&spec, 3), (0..8).collect::<Vec<_>>());
        spec.shuffle = true;
        spec.seed = 7;
        assert_eq!(file_order(&spec, 1), file_order(&spec, 1));
        assert_ne!(file_order(&spec, 1), file_order(&spec, 2));
        let mut sorted = file_order(&spec, 1);
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    }
}
