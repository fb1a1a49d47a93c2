//! `wick.model{...}` and the model object: config, parameter count, generation.

use super::opts::{did_you_mean, table_arg, Opts};
use super::{check_stop, context, lock, to_lua_table};
use crate::data::Tokenizer;
use crate::host::signals;
use crate::model::generate::{generate, SampleOptions};
use crate::model::{default_hidden_dim, Llama, ModelConfig, PRESET_NAMES};
use mlua::{Lua, MetaMethod, UserData, UserDataMethods, Value};
use std::sync::Arc;

#[derive(Clone)]
pub struct ModelHandle {
    pub model: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
}

const MODEL_KEYS: &[&str] = &[
    "preset",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "hidden_dim",
    "vocab",
    "seq_len",
    "tie_embeddings",
    "seed",
    "tokenizer",
    "norm_eps",
    "rope_theta",
    "from_hf",
];

/// `wick.model{ from_hf = "DIR" [, seq_len = N] [, tokenizer = tok] }`: a Hugging Face Llama
/// directory's config and weights (f32, bf16 or f16; one file or shards), and its
/// tokenizer.json when there is one, ready to train.
fn from_hf(lua: &Lua, dir: &str, o: &Opts) -> mlua::Result<ModelHandle> {
    for key in MODEL_KEYS {
        if !matches!(*key, "from_hf" | "seq_len" | "tokenizer") && !o.value(key)?.is_nil() {
            return Err(mlua::Error::runtime(format!(
                "wick.model: option '{key}' cannot be combined with from_hf (the shape comes from {dir}/config.json; only seq_len and tokenizer may be given)"
            )));
        }
    }
    let path = std::path::Path::new(dir);
    let mut config = crate::model::hf::read_config(path).map_err(|e| {
        crate::Error::usage(format!(
            "{e}{}",
            super::data::beside_the_recipe(lua, &[dir.to_string()])
        ))
    })?;
    if let Some(n) = o.usize("seq_len")? {
        config.seq_len = n;
    }
    let tokenizer = match o.value("tokenizer")? {
        Value::UserData(ud) => ud
            .borrow::<super::data::TokenizerHandle>()
            .map(|t| t.0.clone())
            .map_err(|_| {
                mlua::Error::runtime("option 'tokenizer' of wick.model must be a tokenizer")
            })?,
        _ if path.join("tokenizer.json").exists() => {
            Arc::new(Tokenizer::load(&path.join("tokenizer.json")).map_err(mlua::Error::runtime)?)
        }
        _ => Arc::new(Tokenizer::Bytes),
    };
    if tokenizer.vocab_size() > config.vocab {
        return Err(mlua::Error::runtime(format!(
            "wick.model: the tokenizer ({}) has {} tokens, more than the model's vocab_size {}",
            tokenizer.describe(),
            tokenizer.vocab_size(),
            config.vocab
        )));
    }
    let weights = crate::model::hf::read_weights(path)
        .map_err(|e| mlua::Error::runtime(format!("wick.model: {e}")))?;
    let (_, compute) = seed_and_device(lua, o, &config)?;
    let model = Llama::new(config, 0, &compute.device)
        .and_then(|m| {
            m.load_params(&weights)?;
            Ok(m)
        })
        .map_err(|e| mlua::Error::runtime(format!("wick.model: {dir}: {e}")))?
        .with_compute_dtype(compute.dtype);
    Ok(ModelHandle {
        model: Arc::new(model),
        tokenizer,
    })
}

/// The model's seed and the run's device; a model made while resuming must be the checkpoint's.
fn seed_and_device(
    lua: &Lua,
    o: &Opts,
    config: &ModelConfig,
) -> mlua::Result<(u64, crate::device::Compute)> {
    let ctx = context(lua)?;
    let c = lock(&ctx);
    if let Some(r) = c.resume.as_ref().filter(|_| c.session.is_none()) {
        crate::run::resume::check_model(&r.meta.model, config)?;
    }
    let seed = o.usize("seed")?.map(|s| s as u64).unwrap_or(c.opts.seed);
    Ok((seed, c.opts.compute.clone()))
}

pub fn create(lua: &Lua, options: Value) -> mlua::Result<ModelHandle> {
    check_stop()?;
    let o = Opts::new(
        "wick.model",
        table_arg("wick.model", options)?,
        MODEL_KEYS,
        false,
    )?;
    if let Some(dir) = o.string("from_hf")? {
        return from_hf(lua, &dir, &o);
    }
    let tokenizer = match o.value("tokenizer")? {
        Value::Nil => Arc::new(Tokenizer::Bytes),
        Value::UserData(ud) => ud
            .borrow::<super::data::TokenizerHandle>()
            .map(|t| t.0.clone())
            .map_err(|_| mlua::Error::runtime("option 'tokenizer' of wick.model must be a tokenizer (wick.tokenizer.bytes() or wick.tokenizer.load(path))"))?,
        _ => return Err(mlua::Error::runtime("option 'tokenizer' of wick.model must be a tokenizer (wick.tokenizer.bytes() or wick.tokenizer.load(path))")),
    };
    let mut config = match o.string("preset")? {
        Some(name) => ModelConfig::preset(&name).ok_or_else(|| {
            mlua::Error::runtime(format!(
                "unknown model preset '{name}'{}",
                did_you_mean(&name, PRESET_NAMES)
            ))
        })?,
        None => {
            ModelConfig::preset("tiny").ok_or_else(|| mlua::Error::runtime("missing preset"))?
        }
    };
    // A preset's vocab is for its own tokenizer; without an explicit vocab, follow ours.
    config.vocab = tokenizer.vocab_size();
    if let Some(v) = o.usize("dim")? {
        config.dim = v;
        config.hidden_dim = default_hidden_dim(v);
    }
    if let Some(v) = o.usize("n_layers")? {
        config.n_layers = v;
    }
    if let Some(v) = o.usize("n_heads")? {
        config.n_heads = v;
        config.n_kv_heads = v;
    }
    if let Some(v) = o.usize("n_kv_heads")? {
        config.n_kv_heads = v;
    }
    if let Some(v) = o.usize("hidden_dim")? {
        config.hidden_dim = v;
    }
    if let Some(v) = o.usize("vocab")? {
        if v != tokenizer.vocab_size() {
            return Err(mlua::Error::runtime(format!(
                "wick.model: vocab = {v} does not match the tokenizer ({}, {} tokens); leave vocab out to use the tokenizer's",
                tokenizer.describe(),
                tokenizer.vocab_size()
            )));
        }
        config.vocab = v;
    }
    if let Some(v) = o.usize("seq_len")? {
        config.seq_len = v;
    }
    if let Some(v) = o.bool("tie_embeddings")? {
        config.tie_embeddings = v;
    }
    if let Some(v) = o.f64("norm_eps")? {
        config.norm_eps = v;
    }
    if let Some(v) = o.f64("rope_theta")? {
        config.rope_theta = v;
    }
    config
        .validate()
        .map_err(|e| mlua::Error::runtime(format!("wick.model: {e}")))?;

    let (seed, compute) = seed_and_device(lua, &o, &config)?;
    let model = Llama::new(config, seed, &compute.device)
        .map_err(|e| mlua::Error::runtime(format!("wick.model: {e}")))?
        .with_compute_dtype(compute.dtype);
    Ok(ModelHandle {
        model: Arc::new(model),
        tokenizer,
    })
}

/// `wick.load(path [, {tokenizer = tok}])`: a model with the weights of a checkpoint.
pub fn load(lua: &Lua, (path, options): (String, Option<Value>)) -> mlua::Result<ModelHandle> {
    check_stop()?;
    let mut tokenizer = Arc::new(Tokenizer::Bytes);
    if let Some(options) = options.filter(|v| !v.is_nil()) {
        let o = Opts::new(
            "wick.load",
            table_arg("wick.load", options)?,
            &["tokenizer"],
            false,
        )?;
        if let Value::UserData(ud) = o.value("tokenizer")? {
            tokenizer = ud
                .borrow::<super::data::TokenizerHandle>()
                .map(|t| t.0.clone())
                .map_err(|_| {
                    mlua::Error::runtime("option 'tokenizer' of wick.load must be a tokenizer")
                })?;
        }
    }
    let ckpt = crate::ckpt::load(std::path::Path::new(&path)).map_err(mlua::Error::runtime)?;
    let compute = lock(&context(lua)?).opts.compute.clone();
    let model = Llama::new(ckpt.meta.model.clone(), 0, &compute.device)
        .map_err(|e| mlua::Error::runtime(e.to_string()))?
        .with_compute_dtype(compute.dtype);
    model
        .load_params(&ckpt.group("model."))
        .map_err(|e| mlua::Error::runtime(format!("{path}: {e}")))?;
    if model.config.vocab != tokenizer.vocab_size() {
        return Err(mlua::Error::runtime(format!(
            "wick.load: the checkpoint's vocab is {} but the tokenizer has {} tokens; pass {{tokenizer = wick.tokenizer.load(...)}}",
            model.config.vocab,
            tokenizer.vocab_size()
        )));
    }
    Ok(ModelHandle {
        model: Arc::new(model),
        tokenizer,
    })
}

const GENERATE_KEYS: &[&str] = &["max_tokens", "temperature", "top_k", "seed"];

impl UserData for ModelHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("config", |lua, this| to_lua_table(lua, &this.model.config));
        fields.add_field_method_get("params", |_, this| Ok(this.model.param_count()));
        fields.add_field_method_get("vocab", |_, this| Ok(this.model.config.vocab));
        fields.add_field_method_get("seq_len", |_, this| Ok(this.model.config.seq_len));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("param_count", |_, this, ()| Ok(this.model.param_count()));
        methods.add_method("weights", |_, this, ()| {
            Ok(this.model.params().keys().cloned().collect::<Vec<_>>())
        });
        methods.add_method("weight", |_, this, name: String| {
            match this.model.params().get(&name) {
                Some(v) => Ok(TensorHandle(v.as_tensor().detach())),
                None => {
                    let names: Vec<&str> = this.model.params().keys().map(|s| s.as_str()).collect();
                    Err(mlua::Error::runtime(format!(
                        "model has no weight '{name}'{}",
                        super::opts::did_you_mean(&name, &names)
                    )))
                }
            }
        });
        // Logits for a sequence: a string (tokenized) or a list of token ids; rows per position.
        methods.add_method("logits", |_, this, input: Value| {
            check_stop()?;
            let ids: Vec<u32> = match input {
                Value::String(s) => this
                    .tokenizer
                    .encode(&s.to_str()?)
                    .map_err(mlua::Error::runtime)?,
                Value::Table(t) => t.sequence_values::<u32>().collect::<mlua::Result<_>>()?,
                _ => {
                    return Err(mlua::Error::runtime(
                        "model:logits expects a string or a list of token ids",
                    ))
                }
            };
            if ids.is_empty() || ids.len() > this.model.config.seq_len {
                return Err(mlua::Error::runtime(format!(
                    "model:logits needs 1..{} tokens",
                    this.model.config.seq_len
                )));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= this.model.config.vocab) {
                return Err(mlua::Error::runtime(format!(
                    "token {bad} is outside the model's vocabulary"
                )));
            }
            let vocab = this.model.config.vocab;
            let flat = this
                .model
                .logits(&ids, ids.len())
                .map_err(|e| mlua::Error::runtime(format!("model:logits: {e}")))?;
            Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect::<Vec<_>>())
        });
        methods.add_method(
            "generate",
            |lua, this, (prompt, options): (Option<String>, Option<Value>)| {
                check_stop()?;
                let prompt = prompt.unwrap_or_default();
                let seed_default = lock(&context(lua)?).opts.seed;
                let mut opts = SampleOptions {
                    max_tokens: 200,
                    temperature: 0.8,
                    top_k: None,
                    seed: seed_default,
                    stop_token: Some(this.tokenizer.eod()),
                    cache: true,
                };
                if let Some(options) = options.filter(|v| !v.is_nil()) {
                    let o = Opts::new(
                        "model:generate",
                        table_arg("model:generate", options)?,
                        GENERATE_KEYS,
                        false,
                    )?;
                    opts.max_tokens = o.usize("max_tokens")?.unwrap_or(opts.max_tokens);
                    opts.temperature = o.f64("temperature")?.unwrap_or(opts.temperature);
                    opts.top_k = o.usize("top_k")?;
                    opts.seed = o.usize("seed")?.map(|s| s as u64).unwrap_or(opts.seed);
                }
                let ids = this
                    .tokenizer
                    .encode(&prompt)
                    .map_err(mlua::Error::runtime)?;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= this.model.config.vocab) {
                    return Err(mlua::Error::runtime(format!(
                        "prompt token {bad} is outside the model's vocabulary"
                    )));
                }
                let out = this
                    .model
                    .no_grad(|| generate(&this.model, &ids, &opts, &signals::stop_requested));
                match out {
                    Ok(ids) => Ok(this.tokenizer.decode(&ids)),
                    Err(_) if signals::stop_requested() => {
                        Err(mlua::Error::external(signals::Interrupted))
                    }
                    Err(e) => Err(mlua::Error::runtime(format!("model:generate: {e}"))),
                }
            },
        );
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let c = &this.model.config;
            Ok(format!(
                "wick.model(dim={}, n_layers={}, n_heads={}, n_kv_heads={}, hidden_dim={}, vocab={}, seq_len={}, tied={}, params={})",
                c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab, c.seq_len, c.tie_embeddings,
                this.model.param_count()
            ))
        });
    }
}

/// A read-only view of a tensor (a model weight) for inspection in the REPL.
pub struct TensorHandle(pub candle_core::Tensor);

impl TensorHandle {
    fn values(&self, n: usize) -> mlua::Result<Vec<f32>> {
        let flat = self
            .0
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .map_err(|e| mlua::Error::runtime(e.to_string()))?;
        let n = n.min(flat.elem_count());
        flat.narrow(0, 0, n)
            .and_then(|t| t.to_vec1())
            .map_err(|e| mlua::Error::runtime(e.to_string()))
    }

    fn stat(
        &self,
        f: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
    ) -> mlua::Result<f64> {
        self.0
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| f(&t))
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(|e| mlua::Error::runtime(e.to_string()))
    }
}

impl UserData for TensorHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("shape", |_, this| Ok(this.0.dims().to_vec()));
        fields.add_field_method_get("dtype", |_, this| {
            Ok(format!("{:?}", this.0.dtype()).to_lowercase())
        });
        fields.add_field_method_get("numel", |_, this| Ok(this.0.elem_count()));
    }
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("values", |_, this, n: Option<usize>| {
            this.values(n.unwrap_or(usize::MAX))
        });
        methods.add_method("mean", |_, this, ()| this.stat(|t| t.mean_all()));
        methods.add_method("norm", |_, this, ()| {
            this.stat(|t| t.sqr()?.sum_all()?.sqrt())
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let vals: Vec<String> = this.values(6)?.iter().map(|v| format!("{v:.4}")).collect();
            let more = if this.0.elem_count() > 6 { ", ..." } else { "" };
            Ok(format!(
                "wick.tensor(shape={:?}, dtype={:?}, device={}, values=[{}{more}])",
                this.0.dims(),
                this.0.dtype(),
                if this.0.device().is_cpu() {
                    "cpu"
                } else {
                    "cuda"
                },
                vals.join(", ")
            ))
        });
    }
}
