//! A mixture of subsets over the same files (`slimpajama{ mix = ... }`) reads each file once,
//! not once per subset: the subsets' streams share one parse of the files. In real SlimPajama
//! every file mixes all seven subsets, so one filtering reader per subset decompressed and
//! parsed the corpus once per mixed subset — and a rare, upweighted subset (whose stream wraps
//! its epoch every few batches) re-read the whole corpus every few batches.
//!
//! Files are parsed in aligned segments: a segment holds the rows that start in one window of
//! `SEGMENT` bytes of the (decompressed) file, split by subset. Each stream still walks its own
//! subset's rows in its own order with its own cursor (file, offset, line, token), exactly as a
//! filtering reader would, so batches, determinism and exact resume are unchanged. Memory is
//! bounded: a subset's rows in a segment are kept for good when they are few (a rare subset then
//! never causes another parse; "none here" is kept too), the rest wait in a cache of
//! `CACHE_BYTES` for their stream; an evicted part is parsed again when its stream gets there.
//! Bad rows are counted and reported on a segment's first parse only.

use super::record::{Payload, Record, Records};
use super::source::{RecordReader, SourceSpec};
use super::DataStats;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

/// Bytes of file per segment (a row belongs to the window it starts in).
const SEGMENT: u64 = 8 << 20;
/// A subset's rows in one segment below this many bytes are kept for good...
const KEEP_BELOW: usize = 256 << 10;
/// ... up to this many bytes in all.
const KEEP_BYTES: usize = 64 << 20;
/// Other parsed rows, waiting for their subset's stream.
const CACHE_BYTES: usize = 256 << 20;
/// Readers kept open at a segment's end (a compressed file cannot seek).
const OPEN_READERS: usize = 4;

/// A row position: byte offset in the (decompressed) file and line index.
type Pos = (u64, u64);
type Rows = Arc<Vec<Record>>;

/// What is known of one parsed segment.
struct Known {
    /// Line index of its first row.
    start_line: u64,
    /// Where the next segment starts; None at the end of the file.
    end: Option<Pos>,
    /// Rows kept for good, by subset (every subset of the group that is not in `cache`).
    kept: HashMap<String, Rows>,
}

/// The shared parse of one mixture's files.
pub struct SubsetGroup {
    spec: SourceSpec,
    /// Bytes per segment (SEGMENT; smaller in tests, to cross many boundaries).
    segment: u64,
    /// The subsets the mixture's streams read.
    subsets: Vec<String>,
    stats: Arc<Mutex<DataStats>>,
    /// file → segment start → what is known of it.
    known: HashMap<usize, BTreeMap<u64, Known>>,
    kept_bytes: usize,
    /// ((file, segment start), subset) → rows, oldest first.
    cache: VecDeque<((usize, u64, String), Rows, usize)>,
    cache_bytes: usize,
    /// Segments parsed at least once (their bad rows are counted already).
    parsed: HashSet<(usize, u64)>,
    /// Readers stopped at a segment's first row (kept, so the next segment needs no
    /// decompression from the start of the file).
    readers: VecDeque<(usize, Pos, RecordReader, Record)>,
}

fn bytes_of(rows: &[Record]) -> usize {
    rows.iter()
        .map(|r| match &r.payload {
            Payload::Text(t) => t.len() + 64,
            Payload::Tokens(t) => 4 * t.len() + 64,
        })
        .sum()
}

impl SubsetGroup {
    /// The group for streams reading `spec`'s files filtered to each of `subsets`.
    pub fn new(
        mut spec: SourceSpec,
        subsets: Vec<String>,
        stats: Arc<Mutex<DataStats>>,
    ) -> SubsetGroup {
        spec.subsets = None;
        SubsetGroup {
            spec,
            segment: SEGMENT,
            subsets,
            stats,
            known: HashMap::new(),
            kept_bytes: 0,
            cache: VecDeque::new(),
            cache_bytes: 0,
            parsed: HashSet::new(),
            readers: VecDeque::new(),
        }
    }

    /// The rows of `subset` in the segment of `file` that holds the row at `at`, and where the
    /// next segment starts.
    fn rows(&mut self, file: usize, at: Pos, subset: &str) -> Result<(Rows, Option<Pos>), String> {
        let start = self.segment_start(file, at.0);
        let mut start_line = at.1;
        if let Some(k) = self.known.get(&file).and_then(|m| m.get(&start)) {
            if let Some(rows) = k.kept.get(subset) {
                return Ok((rows.clone(), k.end));
            }
            let end = k.end;
            let key = (file, start, subset.to_string());
            if let Some(i) = self.cache.iter().position(|(k, _, _)| *k == key) {
                let rows = self.cache[i].1.clone();
                return Ok((rows, end));
            }
            start_line = k.start_line;
        }
        let (end, mut rows) = self.parse(file, (start, start_line))?;
        let mine = rows.remove(subset).unwrap_or_default();
        self.store(file, (start, start_line), end, rows, subset, &mine);
        Ok((mine, end))
    }

    /// The known segment that covers `offset`, else `offset` itself: a parse from there ends at
    /// the next aligned boundary, so the segments after it line up with everyone else's.
    fn segment_start(&self, file: usize, offset: u64) -> u64 {
        self.known
            .get(&file)
            .and_then(|m| m.range(..=offset).next_back())
            .filter(|(_, k)| k.end.is_none_or(|(e, _)| offset < e))
            .map(|(s, _)| *s)
            .unwrap_or(offset)
    }

    /// Parse the rows of `file` from `at` up to the first row at or past the next multiple of
    /// SEGMENT: rows by subset, and that first row's position.
    #[allow(clippy::type_complexity)]
    fn parse(
        &mut self,
        file: usize,
        at: Pos,
    ) -> Result<(Option<Pos>, HashMap<String, Rows>), String> {
        let first_parse = self.parsed.insert((file, at.0));
        let open = self
            .readers
            .iter()
            .position(|(f, p, _, _)| *f == file && p.0 == at.0);
        let (mut reader, mut pending) = match open.and_then(|i| self.readers.remove(i)) {
            Some((_, _, r, first)) => (r, Some(first)),
            None => {
                // Counted once: a segment parsed again (after eviction) counts nothing.
                let stats = if first_parse {
                    self.stats.clone()
                } else {
                    Arc::new(Mutex::new(DataStats::default()))
                };
                let r = RecordReader::open(&self.spec, &self.spec.files[file], at.0, at.1, stats)?;
                (r, None)
            }
        };
        reader.set_quiet(!first_parse);
        let boundary = (at.0 / self.segment + 1) * self.segment;
        let mut rows: HashMap<String, Vec<Record>> = HashMap::new();
        let end = loop {
            let next = match pending.take() {
                Some(r) => Some(r),
                None => reader.next_record()?,
            };
            match next {
                None => break None,
                Some(rec) if rec.offset >= boundary => {
                    let pos = (rec.offset, rec.line);
                    self.readers.push_back((file, pos, reader, rec));
                    if self.readers.len() > OPEN_READERS {
                        self.readers.pop_front();
                    }
                    break Some(pos);
                }
                Some(rec) => rows.entry(rec.subset.clone()).or_default().push(rec),
            }
        };
        Ok((
            end,
            rows.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        ))
    }

    /// Record a parsed segment: small parts of the group's subsets for good, the rest in the
    /// cache (except `asked`, which its stream holds now).
    fn store(
        &mut self,
        file: usize,
        (start, start_line): Pos,
        end: Option<Pos>,
        mut rows: HashMap<String, Rows>,
        asked: &str,
        asked_rows: &Rows,
    ) {
        rows.insert(asked.to_string(), asked_rows.clone());
        let known = self
            .known
            .entry(file)
            .or_default()
            .entry(start)
            .or_insert_with(|| Known {
                start_line,
                end,
                kept: HashMap::new(),
            });
        for subset in &self.subsets {
            if known.kept.contains_key(subset) {
                continue;
            }
            let r = rows.remove(subset).unwrap_or_default();
            let b = bytes_of(&r);
            if b < KEEP_BELOW && self.kept_bytes + b <= KEEP_BYTES {
                self.kept_bytes += b;
                known.kept.insert(subset.clone(), r);
            } else if subset != asked {
                self.cache.push_back(((file, start, subset.clone()), r, b));
                self.cache_bytes += b;
            }
        }
        while self.cache_bytes > CACHE_BYTES {
            match self.cache.pop_front() {
                Some((_, _, b)) => self.cache_bytes -= b,
                None => break,
            }
        }
    }
}

/// One subset's rows of one file, from the group's shared parse.
pub struct GroupReader {
    group: Arc<Mutex<SubsetGroup>>,
    file: usize,
    subset: String,
    rows: Rows,
    next_row: usize,
    next_segment: Option<Pos>,
}

impl GroupReader {
    /// Rows of `subset` in `file` from the row at (offset, line) on.
    pub fn open(
        group: Arc<Mutex<SubsetGroup>>,
        file: usize,
        subset: &str,
        at: Pos,
    ) -> Result<GroupReader, String> {
        let (rows, next_segment) = lock(&group).rows(file, at, subset)?;
        let next_row = rows.partition_point(|r| r.offset < at.0);
        Ok(GroupReader {
            group,
            file,
            subset: subset.to_string(),
            rows,
            next_row,
            next_segment,
        })
    }
}

fn lock(g: &Mutex<SubsetGroup>) -> std::sync::MutexGuard<'_, SubsetGroup> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

impl Records for GroupReader {
    fn next_record(&mut self) -> Result<Option<Record>, String> {
        loop {
            if let Some(r) = self.rows.get(self.next_row) {
                self.next_row += 1;
                return Ok(Some(r.clone()));
            }
            let Some(at) = self.next_segment else {
                return Ok(None);
            };
            let (rows, next) = lock(&self.group).rows(self.file, at, &self.subset)?;
            self.rows = rows;
            self.next_row = 0;
            self.next_segment = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::FileEntry;
    use crate::data::stream::TokenStream;
    use crate::data::Tokenizer;
    use crate::util::rng::Rng;

    /// Three files of rows from four subsets, one of them rare, with a bad row and an empty one.
    fn corpus(dir: &std::path::Path) -> SourceSpec {
        let mut files = Vec::new();
        let mut rng = Rng::new(3);
        for f in 0..3 {
            let mut body = String::new();
            for i in 0..400 {
                let subset = match (f, i) {
                    (1, 7) => "Rare",
                    _ => ["A", "B", "C"][(rng.next_f64() * 3.0) as usize],
                };
                if i == 50 {
                    body.push_str("{not json\n");
                }
                let text = "x".repeat(1 + (rng.next_f64() * 90.0) as usize);
                let text = if i == 60 {
                    String::new()
                } else {
                    format!("{subset}{f}.{i}:{text}")
                };
                body.push_str(&format!(
                    "{{\"text\":\"{text}\",\"meta\":{{\"redpajama_set_name\":\"{subset}\"}}}}\n"
                ));
            }
            let p = dir.join(format!("f{f}.jsonl"));
            std::fs::write(&p, &body).unwrap();
            files.push(FileEntry {
                path: p.to_string_lossy().into_owned(),
                size: body.len() as u64,
            });
        }
        let mut spec = SourceSpec::plain(files);
        spec.shuffle = true;
        spec.seed = 9;
        spec
    }

    fn stream(
        spec: &SourceSpec,
        subset: &str,
        cursor: crate::data::source::StreamCursor,
    ) -> TokenStream {
        let mut s = spec.clone();
        s.subsets = Some(vec![subset.to_string()]);
        TokenStream::new(
            Arc::new(s),
            Arc::new(Tokenizer::Bytes),
            cursor,
            Arc::new(Mutex::new(DataStats::default())),
        )
    }

    /// Through the shared parse (segments of 1 KiB, so rows cross many boundaries), every
    /// subset's stream yields exactly the tokens and cursors of a reader filtering the files on
    /// its own — across epochs, for a rare subset that wraps constantly, and after a resume from
    /// any cursor; each bad row is counted once.
    #[test]
    fn shared_parse_yields_what_filtering_readers_yield() {
        let dir = tempfile::tempdir().unwrap();
        let spec = corpus(dir.path());
        let subsets: Vec<String> = ["A", "B", "C", "Rare"].map(String::from).to_vec();
        let stats = Arc::new(Mutex::new(DataStats::default()));
        let mut group = SubsetGroup::new(spec.clone(), subsets.clone(), stats.clone());
        group.segment = 1024;
        let group = Arc::new(Mutex::new(group));
        let mut shared: Vec<TokenStream> = subsets
            .iter()
            .map(|s| stream(&spec, s, Default::default()).with_group(group.clone(), s.clone()))
            .collect();
        let mut alone: Vec<TokenStream> = subsets
            .iter()
            .map(|s| stream(&spec, s, Default::default()))
            .collect();
        let mut rng = Rng::new(11);
        for round in 0..3000 {
            let i = if rng.next_f64() < 0.4 {
                3
            } else {
                (rng.next_f64() * 3.0) as usize
            };
            let n = 1 + (rng.next_f64() * 300.0) as usize;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            shared[i].take(n, &mut a).unwrap();
            alone[i].take(n, &mut b).unwrap();
            assert_eq!(a, b, "round {round}, subset {}", subsets[i]);
            assert_eq!(shared[i].cursor, alone[i].cursor, "round {round}");
            if round % 500 == 499 {
                // Resume every stream from its cursor into a fresh group.
                let fresh = Arc::new(Mutex::new(SubsetGroup::new(
                    spec.clone(),
                    subsets.clone(),
                    Arc::new(Mutex::new(DataStats::default())),
                )));
                shared = subsets
                    .iter()
                    .zip(&shared)
                    .map(|(s, old)| {
                        stream(&spec, s, old.cursor.clone()).with_group(fresh.clone(), s.clone())
                    })
                    .collect();
            }
        }
        assert!(
            alone[3].cursor.epoch > 20,
            "the rare subset wrapped many epochs"
        );
        let st = stats.lock().unwrap();
        assert_eq!(st.bad_rows, 3, "one bad row per file, counted once");
    }
}
