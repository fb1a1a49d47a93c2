//! `wick inspect CKPT [--json]`: a checkpoint's step, reason, loss, model and data cursors,
//! after verifying its checksum.

use crate::ckpt;
use crate::error::{exit, Error, Result};
use std::path::Path;

pub fn inspect(path: &Path, json: bool) -> Result<i32> {
    let c = ckpt::load(path).map_err(Error::failed)?;
    if json {
        let mut v = serde_json::to_value(&c.meta).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("file_size".into(), c.file_size.into());
            o.insert("checksum_ok".into(), true.into());
            o.insert("params".into(), c.meta.model.param_count().into());
        }
        crate::outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(exit::OK);
    }
    let m = &c.meta;
    let mc = &m.model;
    crate::outln!("checkpoint   {}", path.display());
    crate::outln!(
        "file size    {}",
        crate::run::checkpointing::human_bytes(c.file_size)
    );
    crate::outln!("checksum     {} (OK)", m.checksum);
    crate::outln!("step         {} (reason {})", m.step, m.reason);
    crate::outln!("saved        {}", ckpt::meta::format_unix(m.saved_unix));
    crate::outln!("tokens seen  {}", m.tokens_seen);
    crate::outln!(
        "loss         {}",
        m.loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into())
    );
    crate::outln!("lr           {:.3e}", m.lr);
    crate::outln!(
        "model        dim {} layers {} heads {} kv_heads {} hidden {} vocab {} seq_len {} tied {}",
        mc.dim,
        mc.n_layers,
        mc.n_heads,
        mc.n_kv_heads,
        mc.hidden_dim,
        mc.vocab,
        mc.seq_len,
        mc.tie_embeddings
    );
    crate::outln!("parameters   {}", mc.param_count());
    crate::outln!(
        "optimizer    adamw lr {:.3e} betas ({}, {}) wd {} clip {:?}, {} updates",
        m.optim.lr,
        m.optim.beta1,
        m.optim.beta2,
        m.optim.weight_decay,
        m.optim.clip,
        m.optim_step
    );
    crate::outln!(
        "seed         {}   run {}   device {}   dtype {} (weights stored f32)",
        m.seed,
        m.run_id,
        m.device,
        m.dtype
    );
    if m.world_size > 1 {
        crate::outln!(
            "ranks        {} (data-parallel; the data cursor is global)",
            m.world_size
        );
    }
    if let Some(r) = &m.recipe {
        crate::outln!("recipe       {r}");
    }
    for (name, l) in &m.loaders {
        let pos: Vec<String> = l
            .cursor
            .streams
            .iter()
            .zip(&l.sources)
            .map(|(s, (src, files))| {
                let file = files.get(s.file).map(|f| f.path.as_str()).unwrap_or("-");
                format!(
                    "{src}: epoch {} file {} line {} token {}",
                    s.epoch, file, s.line, s.token
                )
            })
            .collect();
        crate::outln!(
            "data         {name} ({} batches): {}",
            l.cursor.batches,
            pos.join("; ")
        );
    }
    Ok(exit::OK)
}
