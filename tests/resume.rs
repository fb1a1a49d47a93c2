//! Exact resume: interrupted-and-resumed runs end bit-identical to a straight run; resuming a
//! checkpoint that does not fit the recipe is refused and leaves it untouched.
mod common;
use common::*;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

const N: u64 = 12;

/// Two sources in a seeded mixture, one shuffled; the recipe can stop itself at a step with a
/// real SIGINT (`--sigint-at k`), a Lua error (`--fail-at k`), or a signal during a step.
fn recipe() -> String {
    format!(
        r#"
local schedule = require("wick.schedule")
local stop_at, fail_at, during = -1, -1, -1
for i, a in ipairs(wick.args) do
  if a == "--sigint-at" then stop_at = tonumber(wick.args[i + 1]) end
  if a == "--fail-at" then fail_at = tonumber(wick.args[i + 1]) end
  if a == "--sigint-during" then during = tonumber(wick.args[i + 1]) end
end
local model = wick.model{{ dim = 16, n_layers = 2, n_heads = 2, seq_len = 16 }}
local session = wick.session{{ model = model, optim = wick.optim.adamw{{ lr = 3e-3 }} }}
local mix = wick.data.mix{{
  {{ source = wick.data.jsonl{{ "a", shuffle = true }}, weight = 3 }},
  {{ source = wick.data.jsonl{{ "b.jsonl" }}, weight = 1 }},
}}
local train = wick.data.loader{{ source = mix, batch = 3, seq_len = 16 }}
local lr = schedule.cosine{{ lr = 3e-3, warmup = 3, steps = {N} }}
wick.state.seen = wick.state.seen or 0
for step in session:steps({N}) do
  -- A real SIGINT from outside; Lua spins until the host has seen it, so the stop lands
  -- exactly before step k (os.execute's system() would ignore a SIGINT sent while it waits).
  if step == stop_at then os.execute("(sleep 0.05; kill -INT $PPID) &") while true do end end
  if step == during then os.execute("(sleep 0.002; kill -INT $PPID) &") end
  if step == fail_at then error("failing on purpose at step " .. step) end
  session.lr = lr(step)
  local loss = session:step(train:next())
  -- Whether the signal landed inside the step or just after it, wait until the host saw it.
  if step == during then while not wick.stopping() do end end
  wick.state.seen = wick.state.seen + 1
  wick.log{{ train_loss = loss }}
end
print("seen " .. wick.state.seen)
"#
    )
}

fn setup() -> Dir {
    let d = Dir::new();
    d.corpus("a/one.jsonl", 60);
    d.corpus("a/two.jsonl", 45);
    d.corpus("a/three.jsonl", 30);
    d.corpus("b.jsonl", 80);
    d.write("r.lua", &recipe());
    d
}

/// Losses by step from the host's per-step rows in metrics.jsonl (a resumed run first drops
/// the rows past its checkpoint, so each step appears once).
fn losses(d: &Dir) -> BTreeMap<u64, u64> {
    let text = std::fs::read_to_string(d.join("ckpt/metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "step" {
            continue;
        }
        let step = v["step"].as_u64().unwrap();
        let loss = v["loss"].as_f64().unwrap().to_bits();
        assert!(
            out.insert(step, loss).is_none(),
            "step {step} twice:\n{text}"
        );
    }
    out
}

fn straight() -> (BTreeMap<String, Vec<u8>>, BTreeMap<u64, u64>) {
    let d = setup();
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("seen {N}")));
    (ckpt_tensors(&d.ckpt()), losses(&d))
}

fn assert_same(d: &Dir, reference: &(BTreeMap<String, Vec<u8>>, BTreeMap<u64, u64>), what: &str) {
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["step"], N, "{what}");
    // A stop that lands after the last step leaves nothing for the resume to do.
    assert!(
        m["reason"] == "completed" || m["reason"] == "interrupted",
        "{what}: {}",
        m["reason"]
    );
    let t = ckpt_tensors(&d.ckpt());
    assert_eq!(t.len(), reference.0.len(), "{what}");
    for (name, bytes) in &reference.0 {
        assert!(
            t[name] == *bytes,
            "{what}: tensor {name} differs from the straight run"
        );
    }
    // Every step's loss (before or after the resume) equals the straight run's, once each.
    let got = losses(d);
    for (step, bits) in &got {
        assert_eq!(
            reference.1.get(step),
            Some(bits),
            "{what}: loss at step {step} differs"
        );
    }
    assert_eq!(
        got.len(),
        reference.1.len(),
        "{what}: losses missing: {got:?}"
    );
}

fn resume_ok(d: &Dir, what: &str) -> std::process::Output {
    let o = d.run("r.lua", &["--resume"]);
    assert_eq!(code(&o), 0, "{what}: {}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    o
}

#[test]
fn interrupted_then_resumed_is_bit_identical_to_a_straight_run() {
    let reference = straight();
    for k in [2, 7, N] {
        let d = setup();
        let o = d.run("r.lua", &["--", "--sigint-at", &k.to_string()]);
        assert_eq!(code(&o), 130, "k={k}: {}", stderr(&o));
        let stopped = ckpt_meta(&d.ckpt())["step"].as_u64().unwrap();
        assert_eq!(stopped, k - 1, "k={k}");
        let o = resume_ok(&d, &format!("k={k}"));
        // wick.state carried over: the recipe counted every step exactly once.
        assert!(stdout(&o).contains(&format!("seen {N}")), "{}", stdout(&o));
        assert_same(&d, &reference, &format!("sigint at {k}"));
    }
}

/// bf16 on the CPU (AMX tile products where the CPU has them) resumes exactly too, and the
/// thread count changes no bit: the resumed half runs on 2 threads, the straight run on 1.
#[test]
fn bf16_interrupted_then_resumed_on_more_threads_is_bit_identical() {
    let d = setup();
    let o = d.run("r.lua", &["--dtype", "bf16"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["dtype"], "bf16");
    let reference = (ckpt_tensors(&d.ckpt()), losses(&d));
    let f32_run = straight();
    assert!(
        f32_run.0 != reference.0,
        "--dtype bf16 trained exactly like f32: the flag did nothing"
    );

    let d = setup();
    let o = d.run("r.lua", &["--dtype", "bf16", "--", "--sigint-at", "7"]);
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    let o = d
        .run_cmd("r.lua", &["--dtype", "bf16", "--resume"])
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_same(&d, &reference, "bf16, resumed on 2 threads");
}

#[test]
fn interrupted_during_the_first_step_then_resumed_is_bit_identical() {
    let reference = straight();
    let d = setup();
    let o = d.run("r.lua", &["--", "--sigint-during", "1"]);
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    if d.ckpt().exists() {
        resume_ok(&d, "during step 1");
    } else {
        // The signal landed before the first step finished its batch fetch: nothing to resume.
        assert_eq!(code(&d.run("r.lua", &[])), 0);
    }
    assert_same(&d, &reference, "sigint during the first step");
}

#[test]
fn error_then_resume_and_twice_interrupted_are_bit_identical() {
    let reference = straight();
    let d = setup();
    let o = d.run("r.lua", &["--", "--fail-at", "5"]);
    assert_eq!(code(&o), 1);
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 4);
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "error");
    resume_ok(&d, "after error");
    assert_same(&d, &reference, "error at 5");

    let d = setup();
    assert_eq!(code(&d.run("r.lua", &["--", "--sigint-at", "4"])), 130);
    let o = d.run("r.lua", &["--resume", "--", "--sigint-at", "9"]);
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    resume_ok(&d, "twice");
    assert_same(&d, &reference, "interrupted twice");
}

#[test]
fn resume_refusals_exit_2_and_leave_the_checkpoint_untouched() {
    let d = setup();
    assert_eq!(code(&d.run("r.lua", &["--", "--sigint-at", "4"])), 130);
    let before = std::fs::read(d.ckpt()).unwrap();

    // Model config differs.
    d.write("dim.lua", &recipe().replace("dim = 16", "dim = 32"));
    let o = d.run("dim.lua", &["--resume", d.ckpt().to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("dim: checkpoint has 16, recipe asks for 32"),
        "{}",
        stderr(&o)
    );

    // Data differs: a file grew.
    d.write("grown.lua", &recipe());
    append(&d.join("b.jsonl"), "{\"text\": \"one more row\"}\n");
    let o = d.run("grown.lua", &["--resume", d.ckpt().to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("b.jsonl was") && stderr(&o).contains("bytes, now"),
        "{}",
        stderr(&o)
    );

    // Tokenizer differs.
    let d2 = setup();
    assert_eq!(code(&d2.run("r.lua", &["--", "--sigint-at", "4"])), 130);
    let before2 = std::fs::read(d2.ckpt()).unwrap();
    d2.write("tok.json", WORD_TOKENIZER);
    let with_tok = recipe().replace(
        "local train = wick.data.loader{ source = mix, batch = 3, seq_len = 16 }",
        "local train = wick.data.loader{ source = mix, batch = 3, seq_len = 16, tokenizer = wick.tokenizer.load('tok.json') }",
    );
    // The loader comes before the model here so the tokenizer check is the one that speaks.
    let with_tok = with_tok.replace(
        "local model = wick.model",
        "local mix0 = 1\nlocal model = wick.model",
    );
    let moved = move_loader_first(&with_tok);
    d2.write("tok.lua", &moved);
    let o = d2.run("tok.lua", &["--resume", d2.ckpt().to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tokenizer: checkpoint has bytes"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(d2.ckpt()).unwrap(), before2);

    // The recipe changed: a warning, or a refusal with --strict.
    d.write(
        "b.jsonl",
        &std::fs::read_to_string(d.join("b.jsonl"))
            .unwrap()
            .lines()
            .take(80)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    d.write("r.lua", &(recipe() + "\n-- an edit\n"));
    let o = d.run("r.lua", &["--resume", "--strict"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed since the checkpoint"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(d.ckpt()).unwrap(),
        before,
        "refusals leave the checkpoint untouched"
    );
    let o = d.run("r.lua", &["--resume"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: the recipe r.lua changed"),
        "{}",
        stderr(&o)
    );
}

fn move_loader_first(src: &str) -> String {
    let lines: Vec<&str> = src.lines().collect();
    let model_at = lines
        .iter()
        .position(|l| l.starts_with("local model"))
        .unwrap();
    let loader_at = lines
        .iter()
        .position(|l| l.starts_with("local train"))
        .unwrap();
    let mix_start = lines
        .iter()
        .position(|l| l.starts_with("local mix ="))
        .unwrap();
    let mut out: Vec<&str> = lines[..model_at].to_vec();
    out.extend(&lines[mix_start..=loader_at]);
    out.extend(&lines[model_at..mix_start]);
    out.extend(&lines[loader_at + 1..]);
    out.join("\n")
}

/// A minimal Hugging Face tokenizer.json (word level, whitespace split).
const WORD_TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "the": 1, "quick": 2, "fox": 3, "</s>": 4}, "unk_token": "[UNK]"}
}"#;

#[test]
fn inspect_reports_good_files_and_rejects_bad_ones_clearly() {
    let d = setup();
    assert_eq!(code(&d.run("r.lua", &["--", "--sigint-at", "6"])), 130);
    let o = inspect(&d.ckpt());
    assert_eq!(code(&o), 0);
    let s = stdout(&o);
    for needle in [
        "step         5",
        "reason interrupted",
        "checksum",
        "(OK)",
        "parameters",
        "dim 16",
        "loader1",
        "tokens seen",
    ] {
        assert!(s.contains(needle), "missing {needle:?} in:\n{s}");
    }
    let o = std::process::Command::new(wick_bin())
        .args(["inspect", "--json"])
        .arg(d.ckpt())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["step"], 5);
    assert_eq!(v["checksum_ok"], true);

    let bytes = std::fs::read(d.ckpt()).unwrap();
    let truncated = d.write_bytes("truncated.ckpt", &bytes[..bytes.len() / 2]);
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 100] ^= 0x01;
    let flipped = d.write_bytes("flipped.ckpt", &flipped);
    let other = d.write("other.ckpt", "this is not a checkpoint at all");
    let tiny = d.write_bytes("tiny.ckpt", b"abc");
    for (path, needle) in [
        (&truncated, "not a valid safetensors file"),
        (&flipped, "checksum"),
        (&other, "not a wick checkpoint"),
        (&tiny, "not a wick checkpoint"),
    ] {
        let o = inspect(path);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{}: {}",
            path.display(),
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"));
    }
    // A flipped checkpoint is refused for resume too (exit 2), and stays as it was.
    let o = d.run("r.lua", &["--resume", flipped.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
}

#[test]
fn stops_at_random_instants_then_resume_are_bit_identical() {
    let reference = straight();
    let seed = stress_seed();
    for i in 0..15u64 {
        let d = setup();
        let mut child = d
            .run_cmd("r.lua", &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = (seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(i * 1442695040888963407)
            >> 33)
            % 250;
        std::thread::sleep(std::time::Duration::from_millis(delay));
        send(&child, libc::SIGINT);
        let status = child.wait().unwrap();
        if status.code() == Some(0) {
            // Finished before the signal: nothing to resume.
            assert_same(&d, &reference, &format!("run {i} finished"));
            continue;
        }
        assert!(
            status.code() == Some(130) || status.signal().is_some(),
            "run {i}: {status:?}"
        );
        if d.ckpt().exists() {
            resume_ok(&d, &format!("run {i} delay {delay}"));
        } else {
            assert_eq!(code(&d.run("r.lua", &[])), 0);
        }
        assert_same(&d, &reference, &format!("run {i} delay {delay}ms"));
    }
}

#[test]
fn export_hf_writes_llama_names_and_config() {
    let d = setup();
    assert_eq!(code(&d.run("r.lua", &["--", "--sigint-at", "3"])), 130);
    let out = d.join("hf");
    let o = std::process::Command::new(wick_bin())
        .arg("export")
        .arg(d.ckpt())
        .arg("--hf")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 16);
    assert_eq!(cfg["num_hidden_layers"], 2);
    let t = ckpt_tensors(&out.join("model.safetensors"));
    let src = ckpt_tensors(&d.ckpt());
    assert_eq!(
        t["model.layers.1.self_attn.q_proj.weight"],
        src["model.layers.1.attention.wq.weight"]
    );
    assert_eq!(t["lm_head.weight"], src["model.output.weight"]);
    assert_eq!(
        t.len(),
        src.keys().filter(|k| k.starts_with("model.")).count()
    );
    // wick.load reads the weights back: logits are finite and shaped (positions, vocab).
    d.write(
        "l.lua",
        &format!(
            "local m = wick.load('{}')\nlocal r = m:logits('abc')\nprint(#r, #r[1])\n",
            d.ckpt().display()
        ),
    );
    let o = d.run("l.lua", &[]);
    assert_eq!(stdout(&o).trim(), "3\t257", "{}", stderr(&o));
}

/// A job command that always says `--resume` (a preemptible job, a restart loop) starts fresh
/// the first time: no checkpoint in `--ckpt-dir` yet is a note, not an error, and the run is
/// the straight run. A checkpoint named explicitly must exist (exit 2), and one that exists
/// but is damaged is refused rather than trained over.
#[test]
fn resume_with_no_checkpoint_yet_starts_fresh_but_a_named_one_must_exist() {
    let reference = straight();
    let d = setup();
    let o = d.run("r.lua", &["--resume"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no checkpoint at") && stderr(&o).contains("starting a new run"),
        "{}",
        stderr(&o)
    );
    assert_same(&d, &reference, "fresh start under --resume");

    let missing = d.join("elsewhere/full_model.ckpt");
    let o = d.run("r.lua", &["--resume", missing.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot resume"), "{}", stderr(&o));
    assert!(stderr(&o).contains("elsewhere"), "{}", stderr(&o));

    let mut bytes = std::fs::read(d.ckpt()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(d.ckpt(), &bytes).unwrap();
    let o = d.run("r.lua", &["--resume"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(d.ckpt()).unwrap(),
        bytes,
        "the damaged file was touched"
    );
}
