//! SlimPajama layout, subset mixtures, phases with exact resume, and bad data.
mod common;
use common::*;
use std::process::Command;

fn row(text: &str, meta: Option<serde_json::Value>) -> String {
    let mut v = serde_json::json!({ "text": text });
    if let Some(m) = meta {
        v["meta"] = m;
    }
    v.to_string() + "\n"
}

fn sub(name: &str) -> Option<serde_json::Value> {
    Some(serde_json::json!({ "redpajama_set_name": name }))
}

/// A SlimPajama tree: Book rows are 'a's, Github 'b's, StackExchange (meta as a JSON string)
/// 'c's, rows without meta 'd's.
fn tree(d: &Dir) {
    for (chunk, files) in [(1, 3), (2, 2)] {
        for i in 0..files {
            let mut s = String::new();
            for k in 0..30 {
                s += &row(&"a".repeat(20 + k), sub("RedPajamaBook"));
                if k % 3 == 0 {
                    s += &row(&"b".repeat(25), sub("RedPajamaGithub"));
                    s += &row(
                        &"c".repeat(15),
                        Some(serde_json::Value::String(
                            r#"{"redpajama_set_name": "RedPajamaStackExchange"}"#.into(),
                        )),
                    );
                    s += &row(&"d".repeat(10), None);
                }
            }
            d.write_bytes(
                &format!("sp/train/chunk{chunk}/example_train_{i}.jsonl.zst"),
                &zstd_compress(s.as_bytes()),
            );
        }
    }
    d.write_bytes(
        "sp/validation/chunk1/example_holdout_0.jsonl.zst",
        &zstd_compress(row("validation text", sub("RedPajamaBook")).as_bytes()),
    );
}

/// Lua that prints the share of each letter over `n` batches of `loader`.
const COUNT: &str = r#"
local function count(loader, n)
  local c = {}
  for _ = 1, n do
    local b = loader:next()
    for r = 1, b.size do
      for _, t in ipairs(b:tokens(r)) do
        if t < 256 then local ch = string.char(t) c[ch] = (c[ch] or 0) + 1 end
      end
    end
  end
  local total = (c.a or 0) + (c.b or 0) + (c.c or 0) + (c.d or 0)
  return string.format("a=%.3f b=%.3f c=%.3f d=%.3f", (c.a or 0) / total, (c.b or 0) / total, (c.c or 0) / total, (c.d or 0) / total)
end
"#;

fn shares(out: &str) -> Vec<f64> {
    out.split_whitespace()
        .filter_map(|kv| kv.split('=').nth(1)?.parse().ok())
        .collect()
}

#[test]
fn subset_mixture_follows_weights_and_meta_forms() {
    let d = Dir::new();
    tree(&d);
    let r = format!(
        "{COUNT}\nlocal l = wick.data.loader{{ source = wick.data.slimpajama{{ root = 'sp', mix = {{ Book = 1, Github = 1, StackExchange = 2, unknown = 0 }} }}, batch = 4, seq_len = 32 }}\nprint(count(l, 300))\n"
    );
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = shares(&stdout(&o));
    // Rows are drawn per sequence: 1/4 Book, 1/4 Github, 1/2 StackExchange (meta as a string), no unknown.
    assert!((s[0] - 0.25).abs() < 0.06, "{s:?}");
    assert!((s[1] - 0.25).abs() < 0.06, "{s:?}");
    assert!((s[2] - 0.5).abs() < 0.06, "{s:?}");
    assert_eq!(s[3], 0.0, "weight 0 drops the subset");
    // A subset filter without a mixture; rows with no meta are `unknown`.
    let r = format!("{COUNT}\nlocal l = wick.data.loader{{ source = wick.data.slimpajama{{ root = 'sp', subsets = {{ 'unknown' }} }}, batch = 2, seq_len = 16 }}\nprint(count(l, 20))\n");
    d.write("u.lua", &r);
    let o = d.run("u.lua", &[]);
    assert_eq!(
        shares(&stdout(&o)),
        vec![0.0, 0.0, 0.0, 1.0],
        "{}",
        stderr(&o)
    );
}

#[test]
fn layout_errors_are_clear() {
    let d = Dir::new();
    tree(&d);
    std::fs::create_dir_all(d.join("sp/test")).unwrap();
    for (src, needle) in [
        (
            "wick.data.slimpajama{ root = 'sp', chunks = {7} }",
            "no directory chunk7 (found: chunk1, chunk2)",
        ),
        (
            "wick.data.slimpajama{ root = 'sp', split = 'test' }",
            "split 'test' under sp has no example_",
        ),
        (
            "wick.data.slimpajama{ root = 'nowhere' }",
            "nowhere is not a directory",
        ),
        (
            "wick.data.slimpajama{ root = 'sp', mix = { Githb = 1 } }",
            "did you mean 'RedPajamaGithub'",
        ),
        (
            "wick.data.slimpajama{ root = 'sp', split = 'dev' }",
            "must be train, validation or test",
        ),
    ] {
        d.write("r.lua", &format!("local s = {src}\n"));
        let o = d.run("r.lua", &[]);
        assert_eq!(code(&o), 1, "{src}");
        assert!(stderr(&o).contains(needle), "{src}: {}", stderr(&o));
    }
    // A subset with no rows at all is an error naming it, not a hang.
    d.write("r.lua", "local l = wick.data.loader{ source = wick.data.slimpajama{ root = 'sp', mix = { ArXiv = 1 } }, batch = 1, seq_len = 8 }\nl:next()\n");
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no usable text for subset RedPajamaArXiv"),
        "{}",
        stderr(&o)
    );
}

const PHASES: &str = r#"
local schedule = require("wick.schedule")
local stop_at = tonumber(wick.args[1] or "-1")
local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 32 }
local session = wick.session{ model = model }
local train = wick.data.loader{ source = wick.data.slimpajama{ root = 'sp', mix = { Book = 1, Github = 1 }, shuffle = true }, batch = 2, seq_len = 16, name = 'train' }
local phases = schedule.phases{
  { steps = 5, lr = schedule.cosine{ lr = 1e-2, warmup = 2, steps = 12 }, mix = { Book = 3, Github = 1 } },
  { steps = 7, lr = 1e-3, mix = { Book = 0, Github = 1 }, batch = 3, seq_len = 32 },
}
for step in session:steps(phases.total) do
  if step == stop_at then os.execute("(sleep 0.05; kill -INT $PPID) &") while true do end end
  phases:apply(step, session, train)
  session:step(train:next())
end
"#;

#[test]
fn phases_change_mix_and_shape_and_resume_bit_identically() {
    phases_resume(PHASES, false);
    // The same over prepared token shards (cursors are document indices there).
    phases_resume(
        &PHASES.replace(
            "wick.data.slimpajama{ root = 'sp',",
            "wick.data.shards{ 'shards',",
        ),
        true,
    );
}

fn phases_resume(recipe: &str, shards: bool) {
    let prepare = |d: &Dir| {
        if shards {
            let o = Command::new(wick_bin())
                .current_dir(d.path())
                .args(["data", "prepare", "--out", "shards", "sp/train"])
                .output()
                .unwrap();
            assert_eq!(code(&o), 0);
        }
    };
    let straight = Dir::new();
    tree(&straight);
    prepare(&straight);
    straight.write("p.lua", recipe);
    let o = straight.run("p.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&straight.ckpt())["step"], 12);
    let reference = ckpt_tensors(&straight.ckpt());
    for k in [4, 6, 9] {
        let d = Dir::new();
        tree(&d);
        prepare(&d);
        d.write("p.lua", recipe);
        let o = d.run("p.lua", &["--", &k.to_string()]);
        assert_eq!(code(&o), 130, "{}", stderr(&o));
        assert_eq!(ckpt_meta(&d.ckpt())["step"], k - 1);
        let o = d.run("p.lua", &["--resume"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let got = ckpt_tensors(&d.ckpt());
        for (name, bytes) in &reference {
            assert!(got[name] == *bytes, "stop at {k}: {name} differs");
        }
    }
}

/// The first window of a loader over `file`, EOD shown as '|'.
fn first_window(d: &Dir, file: &str, seq_len: usize, extra: &str) -> std::process::Output {
    d.write(
        "w.lua",
        &format!(
            "local l = wick.data.loader{{ source = wick.data.jsonl{{ '{file}'{extra} }}, batch = 1, seq_len = {seq_len} }}\nlocal out = {{}}\nfor _, t in ipairs(l:next():tokens(1)) do out[#out + 1] = t == 256 and '|' or string.char(t) end\nio.write(table.concat(out))\nio.stderr:write('bad_rows=' .. l.bad_rows .. '\\n')\n"
        ),
    );
    d.run("w.lua", &[])
}

#[test]
fn bad_and_odd_rows_are_handled_and_counted() {
    let d = Dir::new();
    // BOM, CRLF, invalid UTF-8 inside a string, an empty text, a text that is not a string,
    // malformed JSON, and a final line without a newline.
    let mut bytes = b"\xEF\xBB\xBF{\"text\": \"one\"}\r\n".to_vec();
    bytes.extend_from_slice(b"{\"text\": \"bad \xff utf8\"}\n");
    bytes.extend_from_slice(b"{\"text\": \"\"}\n");
    bytes.extend_from_slice(b"{\"text\": [1]}\n");
    bytes.extend_from_slice(b"{oops\n");
    bytes.extend_from_slice(b"{\"text\": \"two\"}\r\n");
    bytes.extend_from_slice(b"{\"text\": \"three\"}");
    d.write_bytes("odd.jsonl", &bytes);
    let o = first_window(&d, "odd.jsonl", 15, "");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "one|two|three|on", "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("odd.jsonl:2: malformed JSON"),
        "invalid UTF-8 is a bad row: {err}"
    );
    assert!(
        err.contains("odd.jsonl:4: field 'text' is not a string"),
        "{err}"
    );
    assert!(err.contains("odd.jsonl:5: malformed JSON"), "{err}");

    // Multi-frame zst: both frames are read.
    let mut z = zstd_compress(b"{\"text\": \"frame1\"}\n");
    z.extend(zstd_compress(b"{\"text\": \"frame2\"}\n"));
    d.write_bytes("multi.jsonl.zst", &z);
    let o = first_window(&d, "multi.jsonl.zst", 14, "");
    assert_eq!(stdout(&o), "frame1|frame2|f", "{}", stderr(&o));

    // A 10 MB line goes through.
    let big = format!(
        "{{\"text\": \"{}\"}}\n{{\"text\": \"after\"}}\n",
        "x".repeat(10 << 20)
    );
    d.write("big.jsonl", &big);
    d.write("big.lua", "local l = wick.data.loader{ source = wick.data.jsonl{ 'big.jsonl' }, batch = 4, seq_len = 1024 }\nfor i = 1, 2557 do l:next() end\nlocal s = '' for _, t in ipairs(l:next():tokens(3)) do s = s .. (t == 256 and '|' or string.char(t)) end print(s:sub(1, 40))\n");
    let o = d.run("big.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("|after|"), "{}", stdout(&o));

    // A truncated .zst among good files: an error naming it, or skipped with on_bad_file = "skip".
    std::fs::create_dir_all(d.join("mixed")).unwrap();
    d.write_bytes(
        "mixed/a.jsonl.zst",
        &zstd_compress(b"{\"text\": \"good-a\"}\n"),
    );
    let z = zstd_compress(&"{\"text\": \"lost\"}\n".repeat(2000).into_bytes());
    d.write_bytes("mixed/b.jsonl.zst", &z[..z.len() / 2]);
    d.write_bytes(
        "mixed/c.jsonl.zst",
        &zstd_compress(b"{\"text\": \"good-c\"}\n"),
    );
    let o = first_window(&d, "mixed", 13, ", on_bad_file = 'skip'");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("good-a|"), "{}", stdout(&o));
    assert!(stdout(&o).contains("good-c|"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("skipping file") && stderr(&o).contains("b.jsonl.zst"),
        "{}",
        stderr(&o)
    );
    d.write("all.lua", "local l = wick.data.loader{ source = wick.data.jsonl{ 'mixed' }, batch = 4, seq_len = 256 }\nfor i = 1, 500 do l:next() end\n");
    let o = d.run("all.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("b.jsonl.zst") && stderr(&o).contains("on_bad_file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn slimpajama_recipe_quick_mode_trains_and_logs() {
    let d = Dir::new();
    tree(&d);
    let recipe = repo_root().join("scripts/slimpajama.lua");
    let o = d.run(
        recipe.to_str().unwrap(),
        &[
            "--",
            "--test",
            "--data",
            "sp",
            "--steps",
            "30",
            "--eval-every",
            "10",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let metrics = std::fs::read_to_string(d.join("ckpt/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "log")
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["val_loss"].is_number() && r["train_loss"].is_number()));
    assert_eq!(rows[2]["phase"], "cool-down");
    assert!(rows[2]["val_loss"].as_f64().unwrap() < rows[0]["val_loss"].as_f64().unwrap() + 0.5);
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "completed");
    // The curves as a picture.
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .args(["plot", "ckpt/metrics.jsonl", "-o", "loss.png"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let png = std::fs::read(d.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000);
    assert!(stderr(&o).contains("3 validation"), "{}", stderr(&o));
    d.write("empty.jsonl", "{\"note\": 1}\n");
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .args(["plot", "empty.jsonl"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no rows with a step and a loss"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bpe_tokenizer_trains_deterministically_and_drives_a_model() {
    let d = Dir::new();
    d.corpus("corpus/a.jsonl", 300);
    let train = |out: &str| {
        Command::new(wick_bin())
            .current_dir(d.path())
            .args([
                "tokenizer",
                "train",
                "--vocab",
                "300",
                "--out",
                out,
                "corpus",
            ])
            .output()
            .unwrap()
    };
    let o = train("tok.json");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&train("tok2.json")), 0);
    assert_eq!(
        std::fs::read(d.join("tok.json")).unwrap(),
        std::fs::read(d.join("tok2.json")).unwrap(),
        "same data, same bytes"
    );
    let r = "local tok = wick.tokenizer.load('tok.json')\nprint(tok.vocab, tok.eod, tok:decode(tok:encode('the quick brown fox')))\n\
local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16, tokenizer = tok }\n\
local session = wick.session{ model = model }\n\
local l = wick.data.loader{ source = wick.data.jsonl{ 'corpus' }, batch = 2, seq_len = 16, tokenizer = tok }\n\
for step in session:steps(3) do session:step(l:next()) end\nprint(model.vocab)\n";
    d.write("r.lua", r);
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("300\t0\tthe quick brown fox\n"), "{out}");
    assert!(out.ends_with("300\n"), "{out}");
    // A byte-level model fed BPE tokens: a clear error, not a crash.
    d.write("bad.lua", "local tok = wick.tokenizer.load('tok.json')\nlocal model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }\nlocal s = wick.session{ model = model }\nlocal l = wick.data.loader{ source = wick.data.jsonl{ 'corpus' }, batch = 2, seq_len = 16, tokenizer = tok }\nfor i = 1, 20 do s:step(l:next()) end\n");
    let o = d.run("bad.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("outside the model's vocabulary")
            || stderr(&o).contains("must match the tokenizer"),
        "{}",
        stderr(&o)
    );
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .args([
            "tokenizer",
            "train",
            "--vocab",
            "10",
            "--out",
            "x.json",
            "corpus",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("too small"));
}

#[test]
fn prepared_shards_are_deterministic_and_stream_the_same_tokens() {
    let d = Dir::new();
    tree(&d);
    let prep = |out: &str| {
        Command::new(wick_bin())
            .current_dir(d.path())
            .args(["data", "prepare", "--out", out, "sp/train"])
            .output()
            .unwrap()
    };
    let o = prep("shards");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("(u16)"), "{}", stderr(&o));
    assert_eq!(code(&prep("shards2")), 0);
    for f in [
        "index.json",
        "shard_00000.bin",
        "shard_00000.idx",
        "shard_00004.bin",
    ] {
        assert_eq!(
            std::fs::read(d.join("shards").join(f)).unwrap(),
            std::fs::read(d.join("shards2").join(f)).unwrap(),
            "{f}"
        );
    }
    // The shards stream exactly the tokens the jsonl files do.
    let dump = "local function dump(l, n) local out = {} for i = 1, n do local b = l:next() for r = 1, b.size do out[#out + 1] = table.concat(b:tokens(r), ',') end end return table.concat(out, ';') end\n";
    d.write(
        "same.lua",
        &format!("{dump}local a = wick.data.loader{{ source = wick.data.slimpajama{{ root = 'sp' }}, batch = 3, seq_len = 40 }}\nlocal b = wick.data.loader{{ source = wick.data.shards{{ 'shards' }}, batch = 3, seq_len = 40 }}\nprint(dump(a, 200) == dump(b, 200))\n"),
    );
    let o = d.run("same.lua", &[]);
    assert_eq!(stdout(&o).trim(), "true", "{}", stderr(&o));
    // Subsets survive in shards: a Github-only mixture sees only 'b' rows.
    d.write("mix.lua", &format!("{COUNT}\nlocal l = wick.data.loader{{ source = wick.data.shards{{ 'shards', mix = {{ Github = 1, Book = 0 }} }}, batch = 2, seq_len = 16 }}\nprint(count(l, 30))\n"));
    let o = d.run("mix.lua", &[]);
    assert_eq!(
        shares(&stdout(&o)),
        vec![0.0, 1.0, 0.0, 0.0],
        "{}",
        stderr(&o)
    );
    // A loader with another tokenizer than the shards' is refused.
    d.corpus("c.jsonl", 200);
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .args([
            "tokenizer",
            "train",
            "--vocab",
            "280",
            "--out",
            "tok.json",
            "c.jsonl",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0);
    d.write("tok.lua", "local l = wick.data.loader{ source = wick.data.shards{ 'shards' }, tokenizer = wick.tokenizer.load('tok.json') }\n");
    let o = d.run("tok.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("were prepared with tokenizer bytes"),
        "{}",
        stderr(&o)
    );
    let o = d.run("nope.lua", &[]);
    assert_eq!(code(&o), 2);
    d.write("missing.lua", "local s = wick.data.shards{ 'sp' }\n");
    let o = d.run("missing.lua", &[]);
    assert!(stderr(&o).contains("wick data prepare"), "{}", stderr(&o));
}

#[test]
fn text_files_stream_their_bytes_across_record_boundaries() {
    let d = Dir::new();
    // 200 kB of lines: several 64 kB records, one document (EOD only at the end of the file).
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 200_000 {
        text += &format!("line {i}: ünïcödé and plain ascii text\n");
        i += 1;
    }
    d.write("books/a.txt", &text);
    d.write("books/b.txt", "second file\n");
    let bytes = text.len() + 1 + "second file\n".len() + 1;
    d.write(
        "t.lua",
        &format!(
            "local l = wick.data.loader{{ source = wick.data.text{{ 'books' }}, batch = 1, seq_len = {} }}\nlocal t = l:next():tokens(1)\nlocal out = {{}}\nfor i, x in ipairs(t) do out[i] = x == 256 and '|' or string.char(x) end\nio.write(table.concat(out))\n",
            bytes - 1
        ),
    );
    let o = d.run("t.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let expected = format!("{text}|second file\n|");
    assert!(
        o.stdout == expected.as_bytes(),
        "the token stream is the files' bytes with EOD after each file"
    );
}
