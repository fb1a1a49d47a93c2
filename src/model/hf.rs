//! Hugging Face Llama directories, both ways: the parameter names, `config.json`, weights in
//! `model.safetensors` or shards with `model.safetensors.index.json`, and a `tokenizer.json`
//! for wick's byte-level tokenizer. wick's rotary embedding uses the half-split layout
//! transformers uses, so q/k weights need no permutation either way.

use super::ModelConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// wick parameter name → Hugging Face Llama name.
pub fn hf_name(name: &str) -> Option<String> {
    let direct = match name {
        "tok_embeddings.weight" => Some("model.embed_tokens.weight"),
        "norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = name.strip_prefix("layers.")?;
    let (i, part) = rest.split_once('.')?;
    let hf = LAYER_NAMES.iter().find(|(w, _)| *w == part)?.1;
    Some(format!("model.layers.{i}.{hf}"))
}

/// Hugging Face Llama name → wick parameter name.
pub fn wick_name(hf: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("tok_embeddings.weight"),
        "model.norm.weight" => Some("norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, part) = rest.split_once('.')?;
    let w = LAYER_NAMES.iter().find(|(_, h)| *h == part)?.0;
    Some(format!("layers.{i}.{w}"))
}

const LAYER_NAMES: [(&str, &str); 9] = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// The model config of a Hugging Face directory's `config.json`. What wick's Llama cannot be
/// (another architecture, rope scaling, biases, another activation) is refused by name.
pub fn read_config(dir: &Path) -> Result<ModelConfig, String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let at = path.display();
    let model_type = c["model_type"].as_str().unwrap_or("");
    if model_type != "llama" {
        return Err(format!(
            "{at}: model_type \"{model_type}\" is not supported; wick imports Llama models (model_type \"llama\")"
        ));
    }
    // transformers 5 keeps rotary settings in `rope_parameters`; older files in `rope_theta`
    // and `rope_scaling`.
    let rope = &c["rope_parameters"];
    let rope_type = rope["rope_type"].as_str().unwrap_or("default");
    for (key, ok) in [
        ("rope_scaling", c["rope_scaling"].is_null()),
        ("rope_parameters.rope_type", rope_type == "default"),
        (
            "attention_bias",
            !c["attention_bias"].as_bool().unwrap_or(false),
        ),
        ("mlp_bias", !c["mlp_bias"].as_bool().unwrap_or(false)),
        (
            "hidden_act",
            c["hidden_act"].as_str().is_none_or(|a| a == "silu"),
        ),
        (
            "pretraining_tp",
            c["pretraining_tp"].as_u64().is_none_or(|t| t <= 1),
        ),
    ] {
        if !ok {
            let value = match key {
                "rope_parameters.rope_type" => serde_json::json!(rope_type),
                k => c[k].clone(),
            };
            return Err(format!(
                "{at}: {key} = {value} is not supported by wick's Llama (plain rotary embeddings, no biases, SwiGLU)"
            ));
        }
    }
    let int = |key: &str| -> Result<usize, String> {
        c[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("{at}: {key} is missing or not a number"))
    };
    let dim = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    let config = ModelConfig {
        dim,
        n_layers: int("num_hidden_layers")?,
        n_heads,
        n_kv_heads: c["num_key_value_heads"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(n_heads),
        hidden_dim: int("intermediate_size")?,
        vocab: int("vocab_size")?,
        seq_len: int("max_position_embeddings")?,
        tie_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
        norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_theta: rope["rope_theta"]
            .as_f64()
            .or(c["rope_theta"].as_f64())
            .unwrap_or(10000.0),
    };
    if let Some(hd) = c["head_dim"].as_u64() {
        if hd as usize * n_heads != dim {
            return Err(format!(
                "{at}: head_dim = {hd} with {n_heads} heads is not hidden_size {dim}; wick needs head_dim = hidden_size / num_attention_heads"
            ));
        }
    }
    config.validate().map_err(|e| format!("{at}: {e}"))?;
    Ok(config)
}

/// Every weight of a Hugging Face directory, by wick name, in f32 on the CPU (any of f32,
/// bf16, f16 on disk). Reads `model.safetensors`, or the shards `model.safetensors.index.json`
/// lists.
pub fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>, String> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| format!("cannot read {}: {e}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{} has no weight_map", index.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.iter().map(|s| dir.join(s)).collect()
    } else {
        return Err(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json (pytorch_model.bin is not read: convert it to safetensors)",
            dir.display()
        ));
    };
    let mut out = BTreeMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        for (name, t) in tensors {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // older exports keep the rotary table; wick computes it
            }
            let w = wick_name(&name).ok_or_else(|| {
                format!(
                    "{}: tensor {name} is not part of a Llama model wick knows",
                    f.display()
                )
            })?;
            let t = t
                .to_dtype(DType::F32)
                .map_err(|e| format!("{}: {name}: {e}", f.display()))?;
            out.insert(w, t);
        }
    }
    Ok(out)
}

/// A Hugging Face `tokenizer.json` equivalent to wick's byte-level tokenizer: byte b is id b,
/// the end-of-document token is id 256 (`<|endoftext|>`). A BPE with the 256 byte symbols of
/// the ByteLevel alphabet and no merges encodes text to exactly wick's ids.
pub fn byte_level_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (b, ch) in byte_alphabet().iter().enumerate() {
        vocab.insert(ch.to_string(), b.into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

/// GPT-2's byte → printable character table (the ByteLevel pre-tokenizer's alphabet).
fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).unwrap_or('\0');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;

    #[test]
    fn names_map_both_ways_and_are_distinct() {
        for tie in [false, true] {
            let mut c = ModelConfig::preset("tiny").unwrap();
            c.tie_embeddings = tie;
            let names: Vec<String> = Llama::param_shapes(&c)
                .iter()
                .map(|(n, _)| hf_name(n).unwrap())
                .collect();
            let mut dedup = names.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), names.len());
            assert_eq!(names.contains(&"lm_head.weight".to_string()), !tie);
            for (n, _) in Llama::param_shapes(&c) {
                assert_eq!(wick_name(&hf_name(&n).unwrap()).unwrap(), n);
            }
        }
        assert_eq!(
            hf_name("layers.3.feed_forward.w3.weight").unwrap(),
            "model.layers.3.mlp.up_proj.weight"
        );
    }

    /// The exported tokenizer.json, read by the `tokenizers` crate (what transformers' fast
    /// tokenizers are), encodes text to wick's byte ids.
    #[test]
    fn byte_level_tokenizer_json_encodes_to_byte_ids() {
        let json = byte_level_tokenizer_json().to_string();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        for text in [
            "Hello, world!",
            "  two  spaces\nand a newline\t",
            "héllo — ünïcode ✓",
            "<|endoftext|>",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let want: Vec<u32> = if text == "<|endoftext|>" {
                vec![256]
            } else {
                text.bytes().map(u32::from).collect()
            };
            assert_eq!(ids, want, "{text:?}");
            if text != "<|endoftext|>" {
                assert_eq!(tok.decode(&ids, false).unwrap(), text);
            }
        }
        assert_eq!(tok.get_vocab_size(true), 257);
    }
}
