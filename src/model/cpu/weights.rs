//! The model's parameters as f32 slices, resolved by name once per pass, and the per-layer
//! gradients in the same shape. Parameter names follow llama2.c (`Llama::param_shapes`);
//! `LayerWeights::NAMES` is the one place this step maps its fields to them.

use super::super::Llama;
use candle_core::{bail, CpuStorage, Result, Storage};
use std::collections::BTreeMap;
use std::ops::Deref;

/// A read guard on one parameter's storage and the range of its elements.
type Guard<'a> = (Box<dyn Deref<Target = Storage> + 'a>, (usize, usize));

/// Read guards on every parameter's storage: the slices below borrow from them.
pub struct ParamStorage<'a> {
    guards: BTreeMap<&'a str, Guard<'a>>,
}

impl<'a> ParamStorage<'a> {
    pub fn lock(model: &'a Llama) -> Result<Self> {
        let mut guards = BTreeMap::new();
        for (name, var) in model.params() {
            let (storage, layout) = var.storage_and_layout();
            let Some(range) = layout.contiguous_offsets() else {
                bail!("parameter {name} is not contiguous");
            };
            let storage: Box<dyn Deref<Target = Storage> + 'a> = Box::new(storage);
            guards.insert(name.as_str(), (storage, range));
        }
        Ok(ParamStorage { guards })
    }

    fn get(&self, name: &str) -> Result<&[f32]> {
        let Some((storage, (a, b))) = self.guards.get(name) else {
            bail!("model has no parameter {name}")
        };
        match &***storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[*a..*b]),
            _ => bail!("parameter {name} is not an f32 CPU tensor"),
        }
    }
}

/// One transformer block's parameters.
pub struct LayerWeights<'a> {
    pub attn_norm: &'a [f32], // (C)
    pub wq: &'a [f32],        // (C, C)
    pub wk: &'a [f32],        // (KV·D, C)
    pub wv: &'a [f32],        // (KV·D, C)
    pub wo: &'a [f32],        // (C, C)
    pub ffn_norm: &'a [f32],  // (C)
    pub w1: &'a [f32],        // (F, C) gate
    pub w2: &'a [f32],        // (C, F) down
    pub w3: &'a [f32],        // (F, C) up
}

/// One block's gradients, field for field as `LayerWeights`.
pub struct LayerGrads {
    pub attn_norm: Vec<f32>,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub w3: Vec<f32>,
}

impl LayerWeights<'_> {
    /// Parameter names of layer l's fields, in the order of the struct.
    pub const NAMES: [&'static str; 9] = [
        "attention_norm",
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "ffn_norm",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ];

    pub fn param_name(layer: usize, field: &str) -> String {
        format!("layers.{layer}.{field}.weight")
    }
}

impl LayerGrads {
    /// (parameter name, gradient) pairs, named as `LayerWeights::NAMES`.
    pub fn named(self, layer: usize) -> impl Iterator<Item = (String, Vec<f32>)> {
        let fields = [
            self.attn_norm,
            self.wq,
            self.wk,
            self.wv,
            self.wo,
            self.ffn_norm,
            self.w1,
            self.w2,
            self.w3,
        ];
        LayerWeights::NAMES
            .into_iter()
            .zip(fields)
            .map(move |(n, g)| (LayerWeights::param_name(layer, n), g))
    }
}

/// The whole model's parameters.
pub struct ModelWeights<'a> {
    pub embedding: &'a [f32], // (V, C)
    pub layers: Vec<LayerWeights<'a>>,
    pub norm: &'a [f32], // (C)
    /// The output head (V, C): the embedding itself when tied.
    pub head: &'a [f32],
    pub tied: bool,
}

impl<'a> ModelWeights<'a> {
    pub fn resolve(p: &'a ParamStorage<'a>, n_layers: usize, tied: bool) -> Result<Self> {
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let f = |field: &str| p.get(&LayerWeights::param_name(l, field));
            let [an, wq, wk, wv, wo, fnn, w1, w2, w3] = LayerWeights::NAMES;
            layers.push(LayerWeights {
                attn_norm: f(an)?,
                wq: f(wq)?,
                wk: f(wk)?,
                wv: f(wv)?,
                wo: f(wo)?,
                ffn_norm: f(fnn)?,
                w1: f(w1)?,
                w2: f(w2)?,
                w3: f(w3)?,
            });
        }
        let embedding = p.get("tok_embeddings.weight")?;
        Ok(ModelWeights {
            embedding,
            layers,
            norm: p.get("norm.weight")?,
            head: if tied {
                embedding
            } else {
                p.get("output.weight")?
            },
            tied,
        })
    }
}
