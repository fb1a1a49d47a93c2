//! `wick.data.*` and `wick.tokenizer.*`: sources, mixtures, loaders, batches, tokenizers.

use super::opts::{table_arg, Opts};
use super::{check_stop, context, lock};
use crate::data::source::{discover, is_data_file};
use crate::data::{Loader, LoaderCursor, LoaderSpec, NextError, OnBad, SourceSpec, Tokenizer};
use crate::host::signals::{self, Interrupted};
use crate::train::Windows;
use mlua::{Lua, MetaMethod, Table, UserData, UserDataMethods, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct TokenizerHandle(pub Arc<Tokenizer>);

impl UserData for TokenizerHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("vocab", |_, this| Ok(this.0.vocab_size()));
        fields.add_field_method_get("eod", |_, this| Ok(this.0.eod()));
    }
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("encode", |_, this, text: String| {
            this.0.encode(&text).map_err(mlua::Error::runtime)
        });
        methods.add_method("decode", |_, this, ids: Vec<u32>| Ok(this.0.decode(&ids)));
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!("wick.tokenizer({})", this.0.describe()))
        });
    }
}

pub fn tokenizer_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "bytes",
        lua.create_function(|_, ()| Ok(TokenizerHandle(Arc::new(Tokenizer::Bytes))))?,
    )?;
    t.set(
        "load",
        lua.create_function(|lua, path: String| {
            check_stop()?;
            Tokenizer::load(Path::new(&path))
                .map(|t| TokenizerHandle(Arc::new(t)))
                .map_err(|e| {
                    mlua::Error::runtime(format!(
                        "{e}{}",
                        beside_the_recipe(lua, std::slice::from_ref(&path))
                    ))
                })
        })?,
    )?;
    Ok(t)
}

/// A source: one or more files read as one stream.
#[derive(Clone)]
pub struct SourceHandle {
    pub name: String,
    pub spec: Arc<SourceSpec>,
}

impl UserData for SourceHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("files", |_, this| {
            Ok(this
                .spec
                .files
                .iter()
                .map(|f| f.path.clone())
                .collect::<Vec<_>>())
        });
        fields.add_field_method_get("name", |_, this| Ok(this.name.clone()));
    }
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let bytes: u64 = this.spec.files.iter().map(|f| f.size).sum();
            Ok(format!(
                "wick.data.source({}: {} files, {} bytes)",
                this.name,
                this.spec.files.len(),
                bytes
            ))
        });
    }
}

/// A weighted mixture of sources.
#[derive(Clone)]
pub struct MixHandle(pub Vec<(String, Arc<SourceSpec>, f64)>);
impl UserData for MixHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let parts: Vec<String> = this.0.iter().map(|(n, _, w)| format!("{n}={w}")).collect();
            Ok(format!("wick.data.mix({})", parts.join(", ")))
        });
    }
}

#[derive(Clone)]
pub struct LoaderHandle(pub Arc<Mutex<Loader>>);

impl UserData for LoaderHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("name", |_, this| {
            Ok(this
                .0
                .lock()
                .map(|l| l.spec.name.clone())
                .unwrap_or_default())
        });
        fields.add_field_method_get("batch", |_, this| {
            Ok(this.0.lock().map(|l| l.spec.batch).unwrap_or(0))
        });
        fields.add_field_method_get("seq_len", |_, this| {
            Ok(this.0.lock().map(|l| l.spec.seq_len).unwrap_or(0))
        });
        fields.add_field_method_get("bad_rows", |_, this| {
            Ok(this
                .0
                .lock()
                .map(|l| l.stats_snapshot().bad_rows)
                .unwrap_or(0))
        });
        fields.add_field_method_get("filtered", |_, this| {
            Ok(this
                .0
                .lock()
                .map(|l| l.stats_snapshot().filtered)
                .unwrap_or(0))
        });
        fields.add_field_method_get("rows", |_, this| {
            Ok(this.0.lock().map(|l| l.stats_snapshot().rows).unwrap_or(0))
        });
    }
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("next", |_, this, ()| next_batch(this));
        methods.add_method("set", |_, this, options: Value| {
            check_stop()?;
            let o = Opts::new(
                "loader:set",
                table_arg("loader:set", options)?,
                &["batch", "seq_len", "mix"],
                false,
            )?;
            let mut weights = Vec::new();
            if let Value::Table(t) = o.value("mix")? {
                for pair in t.pairs::<String, f64>() {
                    let (name, w) = pair.map_err(|_| {
                        mlua::Error::runtime(
                            "option 'mix' of loader:set must map source names to weights",
                        )
                    })?;
                    let name = crate::data::slimpajama::canonical_subset(&name)
                        .map(str::to_string)
                        .unwrap_or(name);
                    weights.push((name, w));
                }
                weights.sort_by(|a, b| a.0.cmp(&b.0));
            }
            let mut l = this
                .0
                .lock()
                .map_err(|_| mlua::Error::runtime("loader is unusable after a crash"))?;
            l.reconfigure(o.usize("batch")?, o.usize("seq_len")?, &weights)
                .map_err(mlua::Error::runtime)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let l = this
                .0
                .lock()
                .map_err(|_| mlua::Error::runtime("loader is unusable"))?;
            Ok(format!(
                "wick.data.loader({}: batch {}, seq_len {}, {} batches taken)",
                l.spec.name, l.spec.batch, l.spec.seq_len, l.fetched.batches
            ))
        });
    }
}

fn next_batch(loader: &LoaderHandle) -> mlua::Result<BatchHandle> {
    check_stop()?;
    let mut l = loader
        .0
        .lock()
        .map_err(|_| mlua::Error::runtime("loader is unusable after a crash"))?;
    match l.next(&signals::should_unwind) {
        Ok((w, cursor)) => Ok(BatchHandle {
            // Data-parallel: every rank reads the global batch (one cursor for all) and
            // keeps its own rows.
            windows: Arc::new(w.my_share().map_err(mlua::Error::runtime)?),
            source: Some((loader.0.clone(), cursor)),
        }),
        Err(NextError::Interrupted) => Err(mlua::Error::external(Interrupted)),
        Err(NextError::Data(m)) => Err(mlua::Error::runtime(m)),
    }
}

/// A batch of token windows (batch, seq_len+1); Lua sees its shape, not its tokens. It keeps
/// its loader and the cursor after it, committed when a step trains on it.
#[derive(Clone)]
pub struct BatchHandle {
    pub windows: Arc<Windows>,
    pub source: Option<(Arc<Mutex<Loader>>, LoaderCursor)>,
}

impl BatchHandle {
    /// The step trained on this batch: its loader's checkpointed position moves past it.
    pub fn commit(&self) {
        if let Some((loader, cursor)) = &self.source {
            if let Ok(mut l) = loader.lock() {
                l.committed = cursor.clone();
            }
        }
    }
}

impl UserData for BatchHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("size", |_, this| Ok(this.windows.batch));
        fields.add_field_method_get("seq_len", |_, this| Ok(this.windows.width - 1));
    }
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("tokens", |_, this, row: Option<usize>| {
            let w = &this.windows;
            let r = row.unwrap_or(1);
            if r == 0 || r > w.batch {
                return Err(mlua::Error::runtime(format!(
                    "batch:tokens(row): row must be 1..{}",
                    w.batch
                )));
            }
            Ok(w.tokens[(r - 1) * w.width..r * w.width].to_vec())
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!(
                "wick.batch({} x {} tokens)",
                this.windows.batch,
                this.windows.width - 1
            ))
        });
    }
}

const SOURCE_KEYS: &[&str] = &[
    "field",
    "shuffle",
    "seed",
    "on_bad_row",
    "on_bad_file",
    "subsets",
    "name",
    "files",
    "filter",
    "map",
];

/// `f("path")` means `f{ "path" }`.
fn string_as_list(lua: &Lua, options: Value) -> mlua::Result<Value> {
    Ok(match options {
        Value::String(s) => {
            let t = lua.create_table()?;
            t.raw_set(1, s)?;
            Value::Table(t)
        }
        other => other,
    })
}

/// `on_bad_row` defaults to skip (counted, reported); `on_bad_file` to error.
fn on_bad(o: &Opts, key: &str) -> mlua::Result<OnBad> {
    match o.string(key)?.as_deref() {
        None if key == "on_bad_file" => Ok(OnBad::Error),
        None | Some("skip") => Ok(OnBad::Skip),
        Some("error") => Ok(OnBad::Error),
        Some(other) => Err(mlua::Error::runtime(format!(
            "option '{key}' of {} must be \"skip\" or \"error\", got \"{other}\"",
            o.func()
        ))),
    }
}

/// Data paths are read from the working directory; a recipe started from elsewhere
/// (`wick run ~/proj/scripts/train.lua` from home) misses them. When a missing relative path
/// exists beside the recipe or a little above it (the project's root), say where.
pub(crate) fn beside_the_recipe(lua: &Lua, paths: &[String]) -> String {
    let Some(recipe) = context(lua)
        .ok()
        .and_then(|c| lock(&c).opts.recipe.clone())
        .and_then(|r| std::fs::canonicalize(r).ok())
    else {
        return String::new();
    };
    for dir in recipe.ancestors().skip(1).take(3) {
        let found = paths
            .iter()
            .map(Path::new)
            .find(|p| p.is_relative() && !p.exists() && dir.join(p).exists());
        if let Some(p) = found {
            return format!(
                "; {} exists: run wick from {}, or give the path from the working directory",
                dir.join(p).display(),
                dir.display()
            );
        }
    }
    String::new()
}

fn make_source(lua: &Lua, func: &'static str, options: Value) -> mlua::Result<SourceHandle> {
    check_stop()?;
    let options = string_as_list(lua, options)?;
    let o = Opts::new(func, table_arg(func, options)?, SOURCE_KEYS, true)?;
    let mut paths = o.positional_strings()?;
    paths.extend(o.strings("files")?.unwrap_or_default());
    if paths.is_empty() {
        return Err(mlua::Error::runtime(format!(
            "{func} needs at least one file or directory: {func}{{ \"data/sample/train\" }}"
        )));
    }
    let files = discover(&paths, &is_data_file).map_err(|e| {
        mlua::Error::runtime(format!("{func}: {e}{}", beside_the_recipe(lua, &paths)))
    })?;
    let seed = match o.usize("seed")? {
        Some(s) => s as u64,
        None => lock(&context(lua)?).opts.seed,
    };
    let on_bad_row = on_bad(&o, "on_bad_row")?;
    let spec = SourceSpec {
        files,
        field: o.string("field")?.unwrap_or_else(|| "text".into()),
        shuffle: o.bool("shuffle")?.unwrap_or(false),
        seed,
        on_bad_row,
        on_bad_file: on_bad(&o, "on_bad_file")?,
        subsets: o.strings("subsets")?,
        shard_tokenizer: None,
        transforms: super::lua_data::transforms(lua, func, &o, seed)?,
    };
    let name = o.string("name")?.unwrap_or_else(|| paths.join(","));
    Ok(SourceHandle {
        name,
        spec: Arc::new(spec),
    })
}

const MIX_KEYS: &[&str] = &[];
const LOADER_KEYS: &[&str] = &[
    "source",
    "batch",
    "seq_len",
    "tokenizer",
    "name",
    "prefetch",
    "seed",
    "resume",
];

pub fn table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("batch", lua.create_function(super::lua_data::batch)?)?;
    t.set("lua", lua.create_function(super::lua_data::lua_source)?)?;
    t.set(
        "files",
        lua.create_function(|lua, o: Value| make_source(lua, "wick.data.files", o))?,
    )?;
    t.set(
        "jsonl",
        lua.create_function(|lua, o: Value| make_source(lua, "wick.data.jsonl", o))?,
    )?;
    t.set(
        "text",
        lua.create_function(|lua, o: Value| make_source(lua, "wick.data.text", o))?,
    )?;
    t.set("mix", lua.create_function(mix)?)?;
    t.set("slimpajama", lua.create_function(slimpajama)?)?;
    t.set("shards", lua.create_function(shards)?)?;
    t.set("loader", lua.create_function(loader)?)?;
    Ok(t)
}

/// `wick.data.mix{ {source = a, weight = 3}, {source = b, weight = 1} }`
fn mix(_: &Lua, options: Value) -> mlua::Result<MixHandle> {
    let table = table_arg("wick.data.mix", options)?;
    Opts::new("wick.data.mix", table.clone(), MIX_KEYS, true)?;
    let mut parts = Vec::new();
    for (i, entry) in table.sequence_values::<Table>().enumerate() {
        let entry = entry.map_err(|_| {
            mlua::Error::runtime("wick.data.mix takes entries like { source = src, weight = 1.0 }")
        })?;
        let e = Opts::new("wick.data.mix entry", entry, &["source", "weight"], false)?;
        let src = match e.value("source")? {
            Value::UserData(ud) => {
                ud.borrow::<SourceHandle>()
                    .map(|s| s.clone())
                    .map_err(|_| {
                        mlua::Error::runtime(format!(
                            "wick.data.mix entry {}: 'source' must be a data source",
                            i + 1
                        ))
                    })?
            }
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "wick.data.mix entry {}: 'source' must be a data source",
                    i + 1
                )))
            }
        };
        let w = e.f64("weight")?.unwrap_or(1.0);
        if !(w.is_finite() && w >= 0.0) {
            return Err(mlua::Error::runtime(format!(
                "wick.data.mix entry {}: weight must be a non-negative number, got {w}",
                i + 1
            )));
        }
        parts.push((src.name, src.spec, w));
    }
    if parts.is_empty() || parts.iter().all(|(_, _, w)| *w == 0.0) {
        return Err(mlua::Error::runtime(
            "wick.data.mix needs at least one source with a positive weight",
        ));
    }
    Ok(MixHandle(parts))
}

fn loader(lua: &Lua, options: Value) -> mlua::Result<LoaderHandle> {
    check_stop()?;
    let o = Opts::new(
        "wick.data.loader",
        table_arg("wick.data.loader", options)?,
        LOADER_KEYS,
        false,
    )?;
    let mut lua_source = None;
    let sources = match o.value("source")? {
        Value::UserData(ud) => {
            if let Ok(l) = ud.borrow::<super::lua_data::LuaSourceHandle>() {
                lua_source = Some(l.0.clone());
                vec![(
                    l.0.name.clone(),
                    Arc::new(SourceSpec::plain(Vec::new())),
                    1.0,
                )]
            } else if let Ok(s) = ud.borrow::<SourceHandle>() {
                vec![(s.name.clone(), s.spec.clone(), 1.0)]
            } else if let Ok(m) = ud.borrow::<MixHandle>() {
                m.0.clone()
            } else {
                return Err(mlua::Error::runtime("option 'source' of wick.data.loader must be a source or a mix"));
            }
        }
        Value::Nil => return Err(mlua::Error::runtime("wick.data.loader needs a source: wick.data.loader{ source = wick.data.jsonl{ \"dir\" }, batch = 16, seq_len = 128 }")),
        _ => return Err(mlua::Error::runtime("option 'source' of wick.data.loader must be a source or a mix")),
    };
    let tokenizer = match o.value("tokenizer")? {
        Value::Nil => Arc::new(Tokenizer::Bytes),
        Value::UserData(ud) => ud
            .borrow::<TokenizerHandle>()
            .map(|t| t.0.clone())
            .map_err(|_| {
                mlua::Error::runtime("option 'tokenizer' of wick.data.loader must be a tokenizer")
            })?,
        _ => {
            return Err(mlua::Error::runtime(
                "option 'tokenizer' of wick.data.loader must be a tokenizer",
            ))
        }
    };
    for (n, spec, _) in &sources {
        if let Some(id) = &spec.shard_tokenizer {
            if *id != tokenizer.identity() {
                return Err(mlua::Error::runtime(format!(
                    "wick.data.loader: shards {n} were prepared with tokenizer {id}, but this loader uses {}; pass the same tokenizer (tokenizer = wick.tokenizer.load(...))",
                    tokenizer.identity()
                )));
            }
        }
    }
    let batch = o.usize("batch")?.unwrap_or(16);
    let seq_len = o.usize("seq_len")?.unwrap_or(128);
    if batch == 0 || seq_len == 0 {
        return Err(mlua::Error::runtime(
            "wick.data.loader: batch and seq_len must be at least 1",
        ));
    }
    let ctx = context(lua)?;
    let mut c = lock(&ctx);
    let name = o
        .string("name")?
        .unwrap_or_else(|| format!("loader{}", c.loaders.len() + 1));
    let seed = o.usize("seed")?.map(|s| s as u64).unwrap_or(c.opts.seed);
    let spec = LoaderSpec {
        name: name.clone(),
        sources,
        batch,
        seq_len,
        seed,
        prefetch: o.usize("prefetch")?.unwrap_or(4),
    };
    // `resume = path` restores this loader's position from a checkpoint file explicitly.
    let explicit = match o.string("resume")? {
        Some(path) => {
            let p = Path::new(&path);
            let bytes = std::fs::read(p).map_err(|e| {
                mlua::Error::runtime(format!("wick.data.loader: cannot read {path}: {e}"))
            })?;
            Some(crate::ckpt::read_meta(p, &bytes).map_err(mlua::Error::runtime)?)
        }
        None => None,
    };
    let saved_meta = explicit.as_ref().or(c.resume.as_ref().map(|r| &r.meta));
    let cursor = match saved_meta.and_then(|m| m.loaders.get(&name)) {
        Some(saved) => {
            let now: Vec<_> = spec
                .sources
                .iter()
                .map(|(n, s, _)| (n.clone(), s.files.clone()))
                .collect();
            crate::run::resume::check_loader(&name, saved, &tokenizer.identity(), &now)?;
            Some(saved.cursor.clone())
        }
        None => None,
    };
    let loader = match lua_source {
        Some(src) => {
            if cursor.is_some() && !src.resumable() {
                return Err(crate::Error::usage(format!(
                    "cannot resume: loader '{name}' reads Lua source {} without state() and restore(s) functions, so it cannot continue where the checkpoint stopped; give the source both functions, or run without --resume",
                    src.name
                ))
                .into());
            }
            Loader::from_lua(spec, src, tokenizer, cursor)
        }
        None => Loader::new(spec, tokenizer, cursor),
    };
    let loader = Arc::new(Mutex::new(loader));
    // A new loader under an earlier one's name takes its place in checkpoints.
    c.loaders.retain(|(n, _)| *n != name);
    c.loaders.push((name, loader.clone()));
    Ok(LoaderHandle(loader))
}

const SLIMPAJAMA_KEYS: &[&str] = &[
    "root",
    "split",
    "chunks",
    "subsets",
    "mix",
    "shuffle",
    "seed",
    "on_bad_row",
    "on_bad_file",
    "filter",
    "map",
];

fn subset_name(name: &str) -> mlua::Result<String> {
    use crate::data::slimpajama::{canonical_subset, SUBSETS};
    canonical_subset(name).map(str::to_string).ok_or_else(|| {
        // Suggest against short names too: "Githb" is closer to "Github" than to "RedPajamaGithub".
        let short: Vec<&str> = SUBSETS
            .iter()
            .map(|s| s.strip_prefix("RedPajama").unwrap_or(s))
            .collect();
        let hint = match super::opts::closest(name, &short) {
            Some(s) => format!("; did you mean '{}'?", canonical_subset(s).unwrap_or(s)),
            None => format!("; the subsets are {}", SUBSETS.join(", ")),
        };
        mlua::Error::runtime(format!("unknown SlimPajama subset '{name}'{hint}"))
    })
}

/// `wick.data.slimpajama{ root = "data/sample", split = "train", chunks = {1, 2}, mix = {Book = 3, Github = 0} }`
fn slimpajama(lua: &Lua, options: Value) -> mlua::Result<Value> {
    check_stop()?;
    let o = Opts::new(
        "wick.data.slimpajama",
        table_arg("wick.data.slimpajama", options)?,
        SLIMPAJAMA_KEYS,
        false,
    )?;
    let root = o.string("root")?.unwrap_or_else(|| "data/sample".into());
    let split = o.string("split")?.unwrap_or_else(|| "train".into());
    if !["train", "validation", "test"].contains(&split.as_str()) {
        return Err(mlua::Error::runtime(format!(
            "option 'split' of wick.data.slimpajama must be train, validation or test, got '{split}'"
        )));
    }
    let chunks: Option<Vec<u64>> = match o.value("chunks")? {
        Value::Nil => None,
        Value::Table(t) => Some(
            t.sequence_values::<u64>()
                .collect::<mlua::Result<_>>()
                .map_err(|_| {
                    mlua::Error::runtime(
                        "option 'chunks' of wick.data.slimpajama must be a list of chunk numbers",
                    )
                })?,
        ),
        _ => {
            return Err(mlua::Error::runtime(
                "option 'chunks' of wick.data.slimpajama must be a list of chunk numbers",
            ))
        }
    };
    let files = crate::data::slimpajama::discover(Path::new(&root), &split, chunks.as_deref())
        .map_err(|e| {
            mlua::Error::runtime(format!(
                "wick.data.slimpajama: {e}{}",
                beside_the_recipe(lua, std::slice::from_ref(&root))
            ))
        })?;
    let (subsets, seed) = subsets_and_seed(lua, &o)?;
    let base = SourceSpec {
        files,
        field: "text".into(),
        shuffle: o.bool("shuffle")?.unwrap_or(false),
        seed,
        on_bad_row: on_bad(&o, "on_bad_row")?,
        on_bad_file: on_bad(&o, "on_bad_file")?,
        subsets,
        shard_tokenizer: None,
        transforms: super::lua_data::transforms(lua, "wick.data.slimpajama", &o, seed)?,
    };
    let name = format!("{root}/{split}");
    by_subset(lua, "wick.data.slimpajama", name, base, o.value("mix")?)
}

/// The `subsets` (canonical names) and `seed` options shared by SlimPajama and shard sources.
fn subsets_and_seed(lua: &Lua, o: &Opts) -> mlua::Result<(Option<Vec<String>>, u64)> {
    let subsets = match o.strings("subsets")? {
        Some(list) => Some(
            list.iter()
                .map(|s| subset_name(s))
                .collect::<mlua::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let seed = match o.usize("seed")? {
        Some(s) => s as u64,
        None => lock(&context(lua)?).opts.seed,
    };
    Ok((subsets, seed))
}

/// A source, or with `mix` a mixture of one stream per subset (each reading the same files
/// filtered to its subset), weighted.
fn by_subset(
    lua: &Lua,
    func: &str,
    name: String,
    base: SourceSpec,
    mix: Value,
) -> mlua::Result<Value> {
    match mix {
        Value::Nil => Ok(Value::UserData(lua.create_userdata(SourceHandle {
            name,
            spec: Arc::new(base),
        })?)),
        Value::Table(t) => {
            let mut parts = Vec::new();
            for pair in t.pairs::<String, Value>() {
                let (k, v) = pair?;
                let subset = subset_name(&k)?;
                let w = match v {
                    Value::Integer(i) => i as f64,
                    Value::Number(n) => n,
                    _ => {
                        return Err(mlua::Error::runtime(format!(
                            "{func}: mix weight of '{k}' must be a number"
                        )))
                    }
                };
                if !(w.is_finite() && w >= 0.0) {
                    return Err(mlua::Error::runtime(format!(
                        "{func}: mix weight of '{k}' must be a non-negative number, got {w}"
                    )));
                }
                let mut spec = base.clone();
                spec.subsets = Some(vec![subset.clone()]);
                parts.push((subset, Arc::new(spec), w));
            }
            parts.sort_by(|a, b| a.0.cmp(&b.0));
            if parts.iter().all(|(_, _, w)| *w == 0.0) {
                return Err(mlua::Error::runtime(format!(
                    "{func}: mix needs at least one subset with a positive weight"
                )));
            }
            Ok(Value::UserData(lua.create_userdata(MixHandle(parts))?))
        }
        _ => Err(mlua::Error::runtime(format!(
            "option 'mix' of {func} must map subset names to weights"
        ))),
    }
}

const SHARDS_KEYS: &[&str] = &["subsets", "mix", "shuffle", "seed"];

/// `wick.data.shards{ "DIR", mix = {...} }`: token shards from `wick data prepare`, read by mmap.
fn shards(lua: &Lua, options: Value) -> mlua::Result<Value> {
    check_stop()?;
    let options = string_as_list(lua, options)?;
    let o = Opts::new(
        "wick.data.shards",
        table_arg("wick.data.shards", options)?,
        SHARDS_KEYS,
        true,
    )?;
    let dirs = o.positional_strings()?;
    let [dir] = dirs.as_slice() else {
        return Err(mlua::Error::runtime(
            "wick.data.shards takes one directory: wick.data.shards{ \"shards/train\" }",
        ));
    };
    let (index, files) = crate::data::shards::shard_files(Path::new(dir)).map_err(|e| {
        mlua::Error::runtime(format!(
            "wick.data.shards: {e}{}",
            beside_the_recipe(lua, std::slice::from_ref(dir))
        ))
    })?;
    let (subsets, seed) = subsets_and_seed(lua, &o)?;
    let base = SourceSpec {
        files,
        field: "text".into(),
        shuffle: o.bool("shuffle")?.unwrap_or(false),
        seed,
        on_bad_row: OnBad::Skip,
        on_bad_file: OnBad::Error,
        subsets,
        shard_tokenizer: Some(index.tokenizer),
        transforms: None,
    };
    by_subset(lua, "wick.data.shards", dir.clone(), base, o.value("mix")?)
}
