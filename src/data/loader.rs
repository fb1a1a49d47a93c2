//! The loader: packs token windows of (batch, seq_len+1) from a weighted mixture of streams on a
//! background thread, a few batches ahead. Each batch travels with the cursor *after* it. When a
//! training step uses a batch, its cursor is committed: that — not how far the thread has read
//! ahead, nor a batch fetched but never trained on — is what a checkpoint saves.

use super::lua_source::{FeedError, LuaFeed, LuaSource};
use super::source::{SourceSpec, StreamCursor};
use super::stream::{pick_weighted, TokenStream};
use super::subsets::SubsetGroup;
use super::tokenizer::Tokenizer;
use super::DataStats;
use crate::train::Windows;
use crate::util::rng::Rng;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LoaderSpec {
    pub name: String,
    pub sources: Vec<(String, Arc<SourceSpec>, f64)>,
    pub batch: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub prefetch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderCursor {
    pub streams: Vec<StreamCursor>,
    pub mix_rng: Rng,
    pub batches: u64,
}

impl LoaderCursor {
    pub fn start(spec: &LoaderSpec) -> Self {
        LoaderCursor {
            streams: vec![StreamCursor::default(); spec.sources.len()],
            mix_rng: Rng::derive(spec.seed, &format!("mix/{}", spec.name)),
            batches: 0,
        }
    }
}

type Produced = Result<(Windows, LoaderCursor), String>;

pub struct Loader {
    pub spec: LoaderSpec,
    pub tokenizer: Arc<Tokenizer>,
    pub stats: Arc<Mutex<DataStats>>,
    /// Cursor after the last batch handed out (where a restarted thread continues).
    pub fetched: LoaderCursor,
    /// Cursor after the last batch a training step used (what a checkpoint saves).
    pub committed: LoaderCursor,
    rx: Option<Receiver<Produced>>,
    failed: Option<String>,
    /// A source written in Lua: batches are made on the calling thread (see lua_source.rs).
    lua_feed: Option<LuaFeed>,
    /// Where a Lua source starts (for evaluation from its beginning).
    start_state: Option<StreamCursor>,
    /// Shared parses of subset mixtures, kept across restarts (a new phase's mixture reads
    /// the same files: nothing is parsed or reported twice).
    groups: Vec<Group>,
    /// The first batches from the start, kept for repeatable evaluation.
    eval_cache: Vec<Windows>,
    pub wait_ms_total: f64,
}

pub enum NextError {
    Interrupted,
    Data(String),
}

struct Producer {
    streams: Vec<TokenStream>,
    weights: Vec<f64>,
    cursor: LoaderCursor,
    batch: usize,
    width: usize,
}

impl Producer {
    fn new(
        spec: &LoaderSpec,
        tokenizer: &Arc<Tokenizer>,
        cursor: LoaderCursor,
        stats: &Arc<Mutex<DataStats>>,
        groups: &[Group],
    ) -> Self {
        let streams = spec
            .sources
            .iter()
            .zip(cursor.streams.iter())
            .zip(groups.iter().cloned())
            .map(|(((_, s, _), c), group)| {
                let stream =
                    TokenStream::new(s.clone(), tokenizer.clone(), c.clone(), stats.clone());
                match group {
                    Some((g, subset)) => stream.with_group(g, subset),
                    None => stream,
                }
            })
            .collect();
        Producer {
            streams,
            weights: spec.sources.iter().map(|(_, _, w)| *w).collect(),
            cursor,
            batch: spec.batch,
            width: spec.seq_len + 1,
        }
    }

    fn next_batch(&mut self) -> Produced {
        let mut tokens = Vec::with_capacity(self.batch * self.width);
        for _ in 0..self.batch {
            let i = pick_weighted(&self.weights, &mut self.cursor.mix_rng);
            self.streams[i].take(self.width, &mut tokens)?;
        }
        for (c, s) in self.cursor.streams.iter_mut().zip(&self.streams) {
            *c = s.cursor.clone();
        }
        self.cursor.batches += 1;
        Ok((
            Windows {
                tokens,
                batch: self.batch,
                width: self.width,
                share_of: None,
            },
            self.cursor.clone(),
        ))
    }
}

type Group = Option<(Arc<Mutex<SubsetGroup>>, String)>;

/// Whether subset mixtures share one parse of their files (always, but for `wick bench data`,
/// which measures both ways).
static SHARE_SUBSET_PARSES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

pub fn share_subset_parses(on: bool) {
    SHARE_SUBSET_PARSES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Sources that read the same text files filtered to one subset each (a subset mixture) share
/// one parse of the files; every other source reads on its own.
fn subset_groups(
    sources: &[(String, Arc<SourceSpec>, f64)],
    stats: &Arc<Mutex<DataStats>>,
) -> Vec<Group> {
    let unfiltered = |s: &SourceSpec| {
        let mut s = s.clone();
        s.subsets = None;
        s
    };
    let groupable = |s: &SourceSpec| {
        s.subsets.as_ref().is_some_and(|l| l.len() == 1)
            && !s.files.iter().any(|f| f.path.ends_with(".bin"))
    };
    let mut made: Vec<(SourceSpec, Arc<Mutex<SubsetGroup>>)> = Vec::new();
    if !SHARE_SUBSET_PARSES.load(std::sync::atomic::Ordering::Relaxed) {
        return vec![None; sources.len()];
    }
    sources
        .iter()
        .map(|(_, s, _)| {
            if !groupable(s) {
                return None;
            }
            let base = unfiltered(s);
            let members: Vec<String> = sources
                .iter()
                .filter(|(_, o, _)| groupable(o) && unfiltered(o) == base)
                .filter_map(|(_, o, _)| o.subsets.as_ref().and_then(|l| l.first().cloned()))
                .collect();
            if members.len() < 2 {
                return None;
            }
            let subset = s.subsets.as_ref()?.first()?.clone();
            let group = match made.iter().find(|(b, _)| *b == base) {
                Some((_, g)) => g.clone(),
                None => {
                    let g = Arc::new(Mutex::new(SubsetGroup::new(
                        base.clone(),
                        members,
                        stats.clone(),
                    )));
                    made.push((base, g.clone()));
                    g
                }
            };
            Some((group, subset))
        })
        .collect()
}

impl Loader {
    pub fn new(
        spec: LoaderSpec,
        tokenizer: Arc<Tokenizer>,
        cursor: Option<LoaderCursor>,
    ) -> Loader {
        let start = cursor.unwrap_or_else(|| LoaderCursor::start(&spec));
        let mut loader = Loader::idle(spec, tokenizer, start);
        loader.groups = subset_groups(&loader.spec.sources, &loader.stats);
        loader.restart();
        loader
    }

    /// A loader at `start` with nothing running yet.
    fn idle(spec: LoaderSpec, tokenizer: Arc<Tokenizer>, start: LoaderCursor) -> Loader {
        Loader {
            lua_feed: None,
            start_state: None,
            groups: Vec::new(),
            spec,
            tokenizer,
            stats: Arc::new(Mutex::new(DataStats::default())),
            fetched: start.clone(),
            committed: start,
            rx: None,
            failed: None,
            eval_cache: Vec::new(),
            wait_ms_total: 0.0,
        }
    }

    /// A loader over a source written in Lua (its only source).
    pub fn from_lua(
        spec: LoaderSpec,
        source: LuaSource,
        tokenizer: Arc<Tokenizer>,
        cursor: Option<LoaderCursor>,
    ) -> Loader {
        let start = cursor.unwrap_or_else(|| LoaderCursor::start(&spec));
        let stream = start.streams.first().cloned().unwrap_or_default();
        // The source as the recipe made it, before any restore: its beginning.
        let start_state = source.initial_cursor();
        let feed = LuaFeed::new(source, tokenizer.clone(), stream);
        let mut loader = Loader::idle(spec, tokenizer, start);
        loader.start_state = start_state;
        loader.lua_feed = Some(feed);
        loader
    }

    /// The next batch from a Lua source, made here and now.
    fn next_from_lua(&mut self) -> Result<(Windows, LoaderCursor), NextError> {
        let (batch, width) = (self.spec.batch, self.spec.seq_len + 1);
        let feed = self
            .lua_feed
            .as_mut()
            .ok_or_else(|| NextError::Data("no Lua source".into()))?;
        let mut tokens = Vec::with_capacity(batch * width);
        for _ in 0..batch {
            feed.take(width, &mut tokens).map_err(|e| match e {
                FeedError::Interrupted => NextError::Interrupted,
                FeedError::Failed(m) => NextError::Data(m),
            })?;
        }
        let mut cursor = self.fetched.clone();
        cursor.streams = vec![feed.cursor.clone()];
        cursor.batches += 1;
        self.fetched = cursor.clone();
        Ok((
            Windows {
                tokens,
                batch,
                width,
                share_of: None,
            },
            cursor,
        ))
    }

    /// (Re)start the background thread from the fetched cursor.
    fn restart(&mut self) {
        if self.lua_feed.is_some() {
            return; // no thread: batches are made on demand
        }
        let (tx, rx) = sync_channel::<Produced>(self.spec.prefetch.max(1));
        let mut producer = Producer::new(
            &self.spec,
            &self.tokenizer,
            self.fetched.clone(),
            &self.stats,
            &self.groups,
        );
        let name = format!("wick-data-{}", self.spec.name);
        let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
            let item = producer.next_batch();
            let stop = item.is_err();
            // A closed channel means the loader was dropped or restarted: stop reading.
            if tx.send(item).is_err() || stop {
                break;
            }
        });
        match spawned {
            Ok(_) => self.rx = Some(rx),
            Err(e) => self.failed = Some(format!("cannot start the data thread: {e}")),
        }
    }

    /// The next batch. Waits for the background thread, polling `should_stop` so a Ctrl+C
    /// is not held up by slow data.
    pub fn next(
        &mut self,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<(Windows, LoaderCursor), NextError> {
        if let Some(e) = &self.failed {
            return Err(NextError::Data(e.clone()));
        }
        if self.lua_feed.is_some() {
            return self.next_from_lua();
        }
        let t0 = Instant::now();
        let rx = match &self.rx {
            Some(rx) => rx,
            None => return Err(NextError::Data("data thread is not running".into())),
        };
        loop {
            if should_stop() {
                return Err(NextError::Interrupted);
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok((w, cursor))) => {
                    self.fetched = cursor.clone();
                    self.wait_ms_total += t0.elapsed().as_secs_f64() * 1e3;
                    return Ok((w, cursor));
                }
                Ok(Err(e)) => {
                    self.failed = Some(e.clone());
                    return Err(NextError::Data(e));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let e = "data thread stopped unexpectedly".to_string();
                    self.failed = Some(e.clone());
                    return Err(NextError::Data(e));
                }
            }
        }
    }

    /// The first `n` batches from the very start of the data, the same every time
    /// (evaluation must compare like with like). Read synchronously once, then cached.
    pub fn eval_batches(
        &mut self,
        n: usize,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Windows>, NextError> {
        if self.eval_cache.len() < n && self.lua_feed.is_some() {
            self.eval_cache = self.eval_from_lua(n)?;
        }
        if self.eval_cache.len() < n {
            // Its own counters: rows read for evaluation are not rows of training data.
            let stats = Arc::new(Mutex::new(DataStats::default()));
            let mut producer = Producer::new(
                &self.spec,
                &self.tokenizer,
                LoaderCursor::start(&self.spec),
                &stats,
                &self.groups,
            );
            let mut batches = Vec::with_capacity(n);
            for _ in 0..n {
                if should_stop() {
                    return Err(NextError::Interrupted);
                }
                let (w, _) = producer.next_batch().map_err(NextError::Data)?;
                batches.push(w);
            }
            self.eval_cache = batches;
        }
        Ok(self.eval_cache[..n].to_vec())
    }
}

impl Loader {
    /// The first `n` batches of a Lua source from its start: the source is restored to its
    /// first state, read, and put back where training left it.
    fn eval_from_lua(&mut self, n: usize) -> Result<Vec<Windows>, NextError> {
        let failed = |e| match e {
            FeedError::Interrupted => NextError::Interrupted,
            FeedError::Failed(m) => NextError::Data(m),
        };
        let feed = self
            .lua_feed
            .as_mut()
            .ok_or_else(|| NextError::Data("no Lua source".into()))?;
        if !feed.source.resumable() {
            return Err(NextError::Data(format!(
                "evaluating on Lua source {} needs its state() and restore(s) functions (to read it from the start without losing the training position)",
                feed.source.name
            )));
        }
        let here = feed.cursor.clone();
        let start = self.start_state.clone().ok_or_else(|| {
            NextError::Data("the Lua source's first state was not recorded".into())
        })?;
        let (batch, width) = (self.spec.batch, self.spec.seq_len + 1);
        feed.reposition(start).map_err(failed)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut tokens = Vec::with_capacity(batch * width);
            for _ in 0..batch {
                feed.take(width, &mut tokens).map_err(failed)?;
            }
            out.push(Windows {
                tokens,
                batch,
                width,
                share_of: None,
            });
        }
        feed.reposition(here).map_err(failed)?;
        Ok(out)
    }

    pub fn stats_snapshot(&self) -> DataStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Loader {
    /// Change batch size, window length or mixture weights from the next batch on. The thread
    /// restarts from the cursor of the last batch handed out, so nothing is skipped or repeated.
    pub fn reconfigure(
        &mut self,
        batch: Option<usize>,
        seq_len: Option<usize>,
        weights: &[(String, f64)],
    ) -> Result<(), String> {
        for (name, w) in weights {
            let Some(entry) = self.spec.sources.iter_mut().find(|(n, _, _)| n == name) else {
                let names: Vec<&str> = self
                    .spec
                    .sources
                    .iter()
                    .map(|(n, _, _)| n.as_str())
                    .collect();
                return Err(format!(
                    "loader '{}' has no source '{name}' (it has: {})",
                    self.spec.name,
                    names.join(", ")
                ));
            };
            if !(w.is_finite() && *w >= 0.0) {
                return Err(format!(
                    "mixture weight of '{name}' must be a non-negative number, got {w}"
                ));
            }
            entry.2 = *w;
        }
        if self.spec.sources.iter().all(|(_, _, w)| *w == 0.0) {
            return Err(format!(
                "loader '{}': every mixture weight is 0",
                self.spec.name
            ));
        }
        if let Some(b) = batch.filter(|&b| b > 0) {
            self.spec.batch = b;
        }
        if let Some(s) = seq_len.filter(|&s| s > 0) {
            self.spec.seq_len = s;
        }
        self.rx = None;
        self.failed = None;
        self.eval_cache.clear();
        self.restart();
        Ok(())
    }
}
