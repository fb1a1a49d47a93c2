//! `wick export CKPT --hf DIR`: a Hugging Face Llama directory (config.json + model.safetensors)
//! that `transformers.LlamaForCausalLM.from_pretrained(DIR)` loads. wick's rotary embedding
//! already uses the half-split layout transformers uses, so q/k weights need no permutation.

use crate::ckpt;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub fn run(ckpt: &Path, out: &Path) -> crate::Result<i32> {
    export_hf(ckpt, out)?;
    Ok(crate::error::exit::OK)
}

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
    let hf = match part {
        "attention.wq.weight" => "self_attn.q_proj.weight",
        "attention.wk.weight" => "self_attn.k_proj.weight",
        "attention.wv.weight" => "self_attn.v_proj.weight",
        "attention.wo.weight" => "self_attn.o_proj.weight",
        "feed_forward.w1.weight" => "mlp.gate_proj.weight",
        "feed_forward.w3.weight" => "mlp.up_proj.weight",
        "feed_forward.w2.weight" => "mlp.down_proj.weight",
        "attention_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{hf}"))
}

pub fn export_hf(ckpt_path: &Path, out: &Path) -> Result<(), String> {
    let c = ckpt::load(ckpt_path)?;
    let m = &c.meta.model;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in c.group("model.") {
        let hf = hf_name(&name)
            .ok_or_else(|| format!("checkpoint tensor {name} has no Hugging Face name"))?;
        tensors.push((hf, t));
    }
    let eod = m.vocab.saturating_sub(1);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.dim / m.n_heads,
        "vocab_size": m.vocab,
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": eod,
        "eos_token_id": eod,
        "torch_dtype": "float32",
    });
    let config_path = out.join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let weights = out.join("model.safetensors");
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &weights,
    )
    .map_err(|e| format!("cannot write {}: {e}", weights.display()))?;
    crate::errln!(
        "wick: exported {} (step {}) to {} (config.json, model.safetensors)",
        ckpt_path.display(),
        c.meta.step,
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::hf_name;
    use crate::model::{Llama, ModelConfig};

    #[test]
    fn every_parameter_has_a_distinct_hf_name() {
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
        }
        assert_eq!(
            hf_name("layers.3.feed_forward.w3.weight").unwrap(),
            "model.layers.3.mlp.up_proj.weight"
        );
    }
}
