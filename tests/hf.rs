//! Models in and out: a Hugging Face Llama directory imports (config, weights in any float
//! dtype, shards, tokenizer.json) and trains; wick's export imports back to the same logits;
//! unsupported configs are refused by name.
mod common;
use common::*;
use std::process::Command;

/// A recipe printing the logits of token sequences as JSON: `-- DIR ids,ids;ids,...`.
const LOGITS: &str = r#"
local m
if wick.args[1]:match("%.ckpt$") then m = wick.load(wick.args[1]) else m = wick.model{ from_hf = wick.args[1] } end
local out = {}
for seq in wick.args[2]:gmatch("[^;]+") do
  local ids = {}
  for t in seq:gmatch("%d+") do ids[#ids + 1] = tonumber(t) end
  local rows = {}
  for i, r in ipairs(m:logits(ids)) do rows[i] = "[" .. table.concat(r, ",") .. "]" end
  out[#out + 1] = "[" .. table.concat(rows, ",") .. "]"
end
print("[" .. table.concat(out, ",") .. "]")
"#;

fn logits(d: &Dir, model: &str, seqs: &[Vec<u64>]) -> Vec<Vec<Vec<f64>>> {
    d.write("logits.lua", LOGITS);
    let arg: Vec<String> = seqs
        .iter()
        .map(|s| {
            s.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let o = d.run("logits.lua", &["--", model, &arg.join(";")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn a_model_saved_by_transformers_imports_with_its_logits() {
    let d = Dir::new();
    let fixture = repo_root().join("tests/fixtures/hf_tiny_llama");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("expected_logits.json")).unwrap(),
    )
    .unwrap();
    let seqs: Vec<Vec<u64>> = serde_json::from_value(expected["ids"].clone()).unwrap();
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let got = logits(&d, fixture.to_str().unwrap(), &seqs);
    let mut worst = 0f64;
    for (g, w) in got
        .iter()
        .flatten()
        .flatten()
        .zip(want.iter().flatten().flatten())
    {
        worst = worst.max((g - w).abs());
    }
    assert_eq!(got.iter().flatten().count(), want.iter().flatten().count());
    assert!(worst < 1e-4, "max abs logit difference {worst}");

    // It trains: a session over the imported model, on byte data (vocab 300 ≥ 257).
    d.corpus("c.jsonl", 50);
    d.write(
        "t.lua",
        &format!(
            "local m = wick.model{{ from_hf = '{}', seq_len = 32 }}\nlocal s = wick.session{{ model = m }}\nlocal t = wick.data.loader{{ source = wick.data.jsonl{{ 'c.jsonl' }}, batch = 2, seq_len = 32 }}\nfor step in s:steps(3) do s:step(t:next()) end\n",
            fixture.display()
        ),
    );
    let o = d.run("t.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["model"]["rope_theta"], 500000.0);
}

#[test]
fn export_then_import_gives_identical_logits_in_shards_and_bf16() {
    let d = Dir::new();
    d.corpus("c.jsonl", 100);
    d.write(
        "train.lua",
        "local m = wick.model{ dim = 32, n_layers = 2, n_heads = 4, n_kv_heads = 2, seq_len = 32 }\nlocal s = wick.session{ model = m }\nlocal t = wick.data.loader{ source = wick.data.jsonl{ 'c.jsonl' }, batch = 2, seq_len = 32 }\nfor step in s:steps(5) do s:step(t:next()) end\n",
    );
    assert_eq!(code(&d.run("train.lua", &[])), 0);
    let ckpt = d.ckpt();
    let export = |out: &str, extra: &[&str]| {
        let o = Command::new(wick_bin())
            .current_dir(d.path())
            .args(["export", ckpt.to_str().unwrap(), "--hf", out])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    };
    export("hf", &["--max-shard-size", "64K"]);
    export("hf16", &["--dtype", "bf16"]);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("hf/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "sharded: {shards:?}");
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        assert!(d.join("hf").join(f).exists(), "{f}");
    }
    let seqs = vec![
        vec![72, 101, 108, 108, 111, 32, 256, 10],
        (40..70).collect(),
    ];
    let reference = logits(&d, ckpt.to_str().unwrap(), &seqs);
    assert_eq!(
        logits(&d, d.join("hf").to_str().unwrap(), &seqs),
        reference,
        "f32 round trip"
    );
    let half = logits(&d, d.join("hf16").to_str().unwrap(), &seqs);
    let worst = half
        .iter()
        .flatten()
        .flatten()
        .zip(reference.iter().flatten().flatten())
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst > 0.0 && worst < 0.05,
        "bf16 weights: close, not equal ({worst})"
    );
}

#[test]
fn exported_files_honour_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = Dir::new();
    d.corpus("c.jsonl", 50);
    d.write(
        "train.lua",
        &format!(
            "{}session:step(train:next())\n",
            tiny_setup("c.jsonl", 1e-3)
        ),
    );
    assert_eq!(code(&d.run("train.lua", &[])), 0);
    let mut cmd = Command::new(wick_bin());
    cmd.args(["export", d.ckpt().to_str().unwrap(), "--hf"])
        .arg(d.join("hf"));
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    assert_eq!(code(&cmd.output().unwrap()), 0);
    for e in std::fs::read_dir(d.join("hf")).unwrap().flatten() {
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{}", e.path().display());
    }
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let d = Dir::new();
    let fixture = repo_root().join("tests/fixtures/hf_tiny_llama");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    for (key, value, needle) in [
        (
            "model_type",
            serde_json::json!("mistral"),
            "model_type \"mistral\"",
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
    ] {
        let dir = d.join(key);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = base.clone();
        c[key] = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        std::fs::copy(
            fixture.join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        d.write(
            "m.lua",
            &format!("wick.model{{ from_hf = '{}' }}\n", dir.display()),
        );
        let o = d.run("m.lua", &[]);
        assert_eq!(code(&o), 2, "{key}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{key}: {}", stderr(&o));
    }
    d.write("m.lua", "wick.model{ from_hf = 'nowhere' }\n");
    let o = d.run("m.lua", &[]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("nowhere/config.json"), "{}", stderr(&o));
}

/// `wick generate`: a checkpoint's continuation with the key/value cache — the same text for a
/// seed, greedy decoding equal to the window-recomputing reference path, and generation past
/// seq_len (the cache shifts).
#[test]
fn generate_samples_with_the_cache_like_the_reference() {
    let d = Dir::new();
    d.corpus("c.jsonl", 100);
    d.write(
        "train.lua",
        "local m = wick.model{ dim = 32, n_layers = 2, n_heads = 4, seq_len = 48 }\nlocal s = wick.session{ model = m, optim = wick.optim.adamw{ lr = 3e-3 } }\nlocal t = wick.data.loader{ source = wick.data.jsonl{ 'c.jsonl' }, batch = 4, seq_len = 48 }\nfor step in s:steps(40) do s:step(t:next()) end\n",
    );
    assert_eq!(code(&d.run("train.lua", &[])), 0);
    let gen = |args: &[&str], composed: bool| {
        let mut c = Command::new(wick_bin());
        c.args([
            "generate",
            d.ckpt().to_str().unwrap(),
            "--prompt",
            "Document 1",
        ])
        .args(args);
        if composed {
            c.env("WICK_ATTENTION", "composed");
        }
        let o = c.output().unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let a = gen(
        &["--seed", "3", "--max-tokens", "40", "--top-k", "20"],
        false,
    );
    assert_eq!(
        a,
        gen(
            &["--seed", "3", "--max-tokens", "40", "--top-k", "20"],
            false
        )
    );
    assert_ne!(
        a,
        gen(
            &["--seed", "4", "--max-tokens", "40", "--top-k", "20"],
            false
        )
    );
    // Greedy within the window: the CPU cache and the composed model's cache of tensors (the
    // GPU's way) give the window-recomputing reference's tokens.
    let greedy = ["--temperature", "0", "--max-tokens", "30"];
    let reference = gen(
        &["--temperature", "0", "--max-tokens", "30", "--no-cache"],
        false,
    );
    assert_eq!(gen(&greedy, false), reference);
    assert_eq!(gen(&greedy, true), reference);
    // Sampled text too: the same seed gives the same text with and without the cache.
    let sampled = ["--seed", "9", "--max-tokens", "30", "--top-k", "10"];
    let mut no_cache = sampled.to_vec();
    no_cache.push("--no-cache");
    assert_eq!(gen(&sampled, false), gen(&no_cache, false));
    assert_eq!(gen(&sampled, true), gen(&no_cache, false));
    // Past seq_len (48): it goes on.
    let long = gen(
        &["--max-tokens", "150", "--seed", "1", "--ignore-eod"],
        false,
    );
    assert!(long.chars().count() >= 100, "{long:?}");
    let bad = Command::new(wick_bin())
        .args(["generate", d.ckpt().to_str().unwrap(), "--temperature=-1"])
        .output()
        .unwrap();
    assert_eq!(code(&bad), 2);
    assert!(
        stderr(&bad).contains("--temperature -1"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bench_generate_reports_tokens_per_second() {
    let o = Command::new(wick_bin())
        .args([
            "bench",
            "generate",
            "--seq-len",
            "64",
            "--tokens",
            "20",
            "--compare",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["new_tokens"], 20);
    assert!(v["kv_cache_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["recompute_window_tokens_per_s"].as_f64().unwrap() > 0.0);
}
