//! Bad input never panics: each case gets a clear message naming what is wrong and a non-zero exit.
mod common;
use common::*;

fn assert_clean_failure(o: &std::process::Output, needles: &[&str]) {
    let err = stderr(o);
    assert_ne!(code(o), 0, "should fail: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should contain {n:?}:\n{err}");
    }
}

#[test]
fn syntax_error_names_file_and_line() {
    let d = Dir::new();
    d.write("r.lua", "local x = 1\nlocal y = = 2\n");
    let o = d.run("r.lua", &[]);
    assert_clean_failure(&o, &["r.lua:2", "syntax error"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn unknown_option_suggests_the_closest_key() {
    let d = Dir::new();
    d.write("r.lua", "local o = wick.optim.adamw{ lr_max = 1e-3 }\n");
    let o = d.run("r.lua", &[]);
    assert_clean_failure(
        &o,
        &[
            "unknown option 'lr_max' for wick.optim.adamw",
            "did you mean 'lr'",
            "r.lua:1",
        ],
    );
    d.write("m.lua", "local m = wick.model{ dims = 16 }\n");
    let o = d.run("m.lua", &[]);
    assert_clean_failure(
        &o,
        &["unknown option 'dims' for wick.model", "did you mean 'dim'"],
    );
}

#[test]
fn wrong_type_names_option_and_expected_type() {
    let d = Dir::new();
    d.write("r.lua", "local m = wick.model{ dim = 'big' }\n");
    let o = d.run("r.lua", &[]);
    assert_clean_failure(
        &o,
        &["option 'dim' of wick.model must be a non-negative whole number, got the string \"big\""],
    );
    d.write("r.lua", "local m = wick.model{ dim = -8 }\n");
    assert_clean_failure(
        &d.run("r.lua", &[]),
        &["option 'dim' of wick.model must be a non-negative whole number, got -8"],
    );
    d.write("r.lua", "local m = wick.model{ dim = {} }\n");
    assert_clean_failure(&d.run("r.lua", &[]), &["got a table"]);
}

#[test]
fn missing_data_file_is_named() {
    let d = Dir::new();
    d.write(
        "r.lua",
        "local s = wick.data.jsonl{ 'nope/missing.jsonl' }\n",
    );
    let o = d.run("r.lua", &[]);
    assert_clean_failure(&o, &["nope/missing.jsonl", "No such file"]);
}

#[test]
fn missing_recipe_is_a_usage_error() {
    let d = Dir::new();
    let o = d.run("does_not_exist.lua", &[]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("cannot read recipe does_not_exist.lua"));
}

#[test]
fn malformed_json_lines_are_skipped_and_counted_with_file_and_line() {
    let d = Dir::new();
    let p = d.corpus("data.jsonl", 40);
    // Line 41 malformed, line 42 without text, line 43 with a non-string text.
    append(
        &p,
        "{not json\n{\"meta\": {}, \"content\": \"x\"}\n{\"text\": 5}\n",
    );
    let mut recipe = tiny_setup("data.jsonl", 1e-3);
    recipe.push_str("for i = 1, 400 do train:next() end\nsession:step(train:next())\nwick.log{ x = 1 }\nprint('bad_rows', train.bad_rows)\n");
    d.write("r.lua", &recipe);
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("data.jsonl:41: malformed JSON"), "{err}");
    assert!(
        err.contains(
            "data.jsonl:42: no field 'text' (its text fields: content; use field = \"content\""
        ),
        "{err}"
    );
    // Each bad row is shown once, though the loader passes over the file many times.
    assert_eq!(err.matches("data.jsonl:41:").count(), 1, "{err}");
    assert!(
        err.contains("data.jsonl:43: field 'text' is not a string"),
        "{err}"
    );
    // Counted (at least once per pass over the file; the loader may have read ahead).
    let n: u64 = stdout(&o)
        .trim()
        .rsplit('\t')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 3 && n.is_multiple_of(3), "{}", stdout(&o));
}

#[test]
fn bad_row_can_be_an_error() {
    let d = Dir::new();
    let p = d.corpus("data.jsonl", 3);
    append(&p, "{broken\n");
    d.write(
        "r.lua",
        "local l = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl', on_bad_row = 'error' }, batch = 1, seq_len = 8 }\nfor i = 1, 200 do l:next() end\n",
    );
    let o = d.run("r.lua", &[]);
    assert_clean_failure(&o, &["data.jsonl:4", "on_bad_row"]);
}

#[test]
fn corrupt_zst_is_an_error_naming_the_file() {
    let d = Dir::new();
    let raw = std::fs::read(d.corpus("plain.jsonl", 200)).unwrap();
    let mut z = zstd_compress(&raw);
    let n = z.len();
    z.truncate(n / 2);
    d.write_bytes("bad.jsonl.zst", &z);
    let mut flipped = zstd_compress(&raw);
    for b in flipped.iter_mut().skip(20).take(40) {
        *b ^= 0x5a;
    }
    d.write_bytes("flipped.jsonl.zst", &flipped);
    for f in ["bad.jsonl.zst", "flipped.jsonl.zst"] {
        d.write(
            "r.lua",
            &format!("local l = wick.data.loader{{ source = wick.data.jsonl{{ '{f}' }}, batch = 4, seq_len = 64 }}\nfor i = 1, 1000 do l:next() end\n"),
        );
        let o = d.run("r.lua", &[]);
        assert_clean_failure(&o, &[f, "zstd"]);
    }
}

#[test]
fn model_vocab_must_match_tokenizer() {
    let d = Dir::new();
    d.write(
        "r.lua",
        "local m = wick.model{ dim = 16, n_layers = 1, n_heads = 2, vocab = 100 }\n",
    );
    let o = d.run("r.lua", &[]);
    assert_clean_failure(&o, &["vocab = 100 does not match the tokenizer"]);
}

/// Started as several copies by an MPI launcher or srun, a build without data-parallel
/// training refuses (exit 2) instead of running N independent runs over one checkpoint.
#[test]
#[cfg(not(feature = "mpi"))]
fn a_parallel_launch_without_mpi_support_is_refused() {
    let d = Dir::new();
    d.write("r.lua", "print('should not run')\n");
    for (var, val) in [("OMPI_COMM_WORLD_SIZE", "4"), ("PMI_SIZE", "2")] {
        let o = d.run_cmd("r.lua", &[]).env(var, val).output().unwrap();
        assert_eq!(code(&o), 2, "{var}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(var) && !stdout(&o).contains("should not run"),
            "{}",
            stderr(&o)
        );
    }
    let o = d
        .run_cmd("r.lua", &[])
        .env("SLURM_NTASKS", "8")
        .env("SLURM_PROCID", "3")
        .env("SLURM_STEP_ID", "0")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // One process (size 1) runs.
    let o = d
        .run_cmd("r.lua", &[])
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `.gz` data is read like `.zst` (same tokens as the plain file, and a resume mid-file continues
/// bit-identically); a compression wick does not read is never trained on as text: named
/// explicitly it is refused at the call that names it, inside a directory it is skipped with a
/// warning that names it; a corrupt `.gz` is an error naming the file.
#[test]
fn gzip_data_is_read_and_other_compressions_are_refused_by_name() {
    let d = Dir::new();
    let raw = std::fs::read(d.corpus("plain/a.jsonl", 120)).unwrap();
    d.write_bytes("gz/a.jsonl.gz", &gzip(&raw));
    d.write_bytes("gz/b.jsonl.xz", b"\xfd7zXZ\x00 not really xz");
    let recipe = |data: &str| {
        format!(
            r#"local steps = tonumber(wick.args[1])
local model = wick.model{{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }}
local session = wick.session{{ model = model, optim = wick.optim.adamw{{ lr = 3e-3 }} }}
local train = wick.data.loader{{ source = wick.data.jsonl{{ "{data}" }}, batch = 2, seq_len = 16 }}
for step in session:steps(steps) do session:step(train:next()) end
"#
        )
    };
    let losses = |d: &Dir| -> Vec<u64> {
        std::fs::read_to_string(d.join("ckpt/metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["kind"] == "step").then(|| v["loss"].as_f64().unwrap().to_bits())
            })
            .collect()
    };
    d.write("plain.lua", &recipe("plain"));
    let o = d.run("plain.lua", &["--", "8"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (plain_losses, plain_tensors) = (losses(&d), ckpt_tensors(&d.ckpt()));
    assert_eq!(plain_losses.len(), 8);

    d.write("gz.lua", &recipe("gz"));
    let g = Dir::new();
    for f in ["gz.lua", "plain.lua"] {
        std::fs::copy(d.join(f), g.join(f)).unwrap();
    }
    std::fs::create_dir_all(g.join("gz")).unwrap();
    for f in ["gz/a.jsonl.gz", "gz/b.jsonl.xz"] {
        std::fs::copy(d.join(f), g.join(f)).unwrap();
    }
    let o = g.run("gz.lua", &["--", "8"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipped 1 file(s) in a compression wick does not read")
            && stderr(&o).contains("b.jsonl.xz"),
        "{}",
        stderr(&o)
    );
    assert_eq!(losses(&g), plain_losses, "gzip must read the same tokens");

    // Stopped after 3 steps (mid-file), resumed to 8: the straight run's bytes.
    let r = Dir::new();
    std::fs::copy(d.join("gz.lua"), r.join("gz.lua")).unwrap();
    std::fs::create_dir_all(r.join("gz")).unwrap();
    std::fs::copy(d.join("gz/a.jsonl.gz"), r.join("gz/a.jsonl.gz")).unwrap();
    assert_eq!(code(&r.run("gz.lua", &["--", "3"])), 0);
    let o = r.run("gz.lua", &["--resume", "--", "8"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let resumed = ckpt_tensors(&r.ckpt());
    for (name, bytes) in plain_tensors
        .iter()
        .filter(|(n, _)| n.starts_with("model."))
    {
        assert!(
            resumed[name] == *bytes,
            "{name} differs after a resume in a .gz file"
        );
    }

    d.write("xz.lua", &recipe("gz/b.jsonl.xz"));
    let o = d.run("xz.lua", &["--", "2"]);
    assert_clean_failure(&o, &["xz.lua:4", "b.jsonl.xz", ".xz files are not read"]);

    let mut bad = gzip(&raw);
    let n = bad.len();
    bad.truncate(n / 2);
    d.write_bytes("bad.jsonl.gz", &bad);
    d.write("bad.lua", &recipe("bad.jsonl.gz"));
    let o = d.run("bad.lua", &["--", "1000"]);
    assert_clean_failure(&o, &["bad.jsonl.gz", "gzip"]);
}

/// A text source whose file is not text (a parquet file, a binary, UTF-16), or a `.json` file
/// that is one array rather than JSON lines, is an error naming the file and what to do, never
/// trained on as bytes; `on_bad_file = "skip"` skips it.
#[test]
fn binary_files_are_not_trained_on_as_text() {
    let d = Dir::new();
    let mut parquet = b"PAR1\x15\x04\x15\x00\x00\x00".to_vec();
    parquet.extend(std::iter::repeat_n(0u8, 64));
    d.write_bytes("t.parquet", &parquet);
    let mut utf16 = vec![0xff, 0xfe];
    for c in "hello world".encode_utf16() {
        utf16.extend(c.to_le_bytes());
    }
    d.write_bytes("win.txt", &utf16);
    d.write("ok.txt", &"plain text that is fine. ".repeat(40));
    let recipe = |files: &str, extra: &str| {
        format!(
            "local model = wick.model{{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }}\nlocal session = wick.session{{ model = model }}\nlocal train = wick.data.loader{{ source = wick.data.text{{ {files}{extra} }}, batch = 2, seq_len = 16 }}\nfor s in session:steps(3) do session:step(train:next()) end\n"
        )
    };
    d.write("p.lua", &recipe("'t.parquet'", ""));
    assert_clean_failure(
        &d.run("p.lua", &[]),
        &["t.parquet", "not text", "read_parquet"],
    );
    d.write("u.lua", &recipe("'win.txt'", ""));
    assert_clean_failure(&d.run("u.lua", &[]), &["win.txt", "UTF-16"]);
    d.write(
        "docs.json",
        "[\n  {\"text\": \"one\"},\n  {\"text\": \"two\"}\n]\n",
    );
    d.write("a.lua", &recipe("'docs.json'", ""));
    assert_clean_failure(
        &d.run("a.lua", &[]),
        &["docs.json", "one JSON array", "jq -c"],
    );
    d.write(
        "s.lua",
        &recipe("'win.txt', 'ok.txt'", ", on_bad_file = 'skip'"),
    );
    let o = d.run("s.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 3);
}

/// Wrong values handed to the API's functions, methods and fields are named in the recipe's
/// terms at the recipe's line — which call, which argument, what was expected, what came —
/// never in the binding's Rust types.
#[test]
fn wrong_arguments_are_named_in_the_recipes_terms() {
    let d = Dir::new();
    d.write("small.txt", &"some text to train on. ".repeat(30));
    let cases: &[(&str, &[&str])] = &[
        (
            "session.lr = 'abc'",
            &["session.lr must be a non-negative number, got the string \"abc\""],
        ),
        (
            "session.global_step = 5",
            &["session.global_step is read-only"],
        ),
        (
            "for s in session:steps(-1) do end",
            &["session:steps(N)'s N must be a non-negative whole number, got -1"],
        ),
        (
            "session:step(nil)",
            &["session:step expects a batch", "got nil"],
        ),
        (
            "session:step(train)",
            &["session:step expects a batch", "got a wick object"],
        ),
        (
            "print(session:eval(train, 0))",
            &["number of batches must be at least 1"],
        ),
        (
            "model:weight(nil)",
            &["bad argument #1 to model:weight: expected a string, got nil"],
        ),
        (
            "wick.tokenizer.bytes():decode('x')",
            &["bad argument #1 to tokenizer:decode: expected a table, got a string"],
        ),
        (
            "wick.load(nil)",
            &["bad argument #1 to load: expected a string, got nil"],
        ),
    ];
    for (stmt, needles) in cases {
        d.write(
            "r.lua",
            &format!("local model = wick.model{{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }}\nlocal session = wick.session{{ model = model }}\nlocal train = wick.data.loader{{ source = wick.data.text{{ 'small.txt' }}, batch = 2, seq_len = 16 }}\n{stmt}\n"),
        );
        let o = d.run("r.lua", &[]);
        assert_eq!(code(&o), 1, "{stmt}: {}", stderr(&o));
        let mut want = vec!["r.lua:4:"];
        want.extend(needles.iter());
        assert_clean_failure(&o, &want);
        let err = stderr(&o);
        assert!(
            !err.contains("Handle") && !err.contains("__mlua") && !err.contains("error converting"),
            "{stmt}: {err}"
        );
    }
}

/// Data paths are read from the working directory: a recipe run from elsewhere whose data
/// lives beside it (or at its project's root) is told where the data is and what to do.
#[test]
fn a_data_path_that_exists_beside_the_recipe_is_pointed_out() {
    let d = Dir::new();
    d.corpus("proj/data/train.jsonl", 20);
    d.write(
        "proj/scripts/r.lua",
        "local train = wick.data.loader{ source = wick.data.jsonl{ 'data/train.jsonl' }, batch = 1, seq_len = 8 }\n",
    );
    let o = d.run("proj/scripts/r.lua", &[]);
    let root = std::fs::canonicalize(d.join("proj")).unwrap();
    // The same for a tokenizer file.
    d.write("proj/tok.json", "{}");
    d.write(
        "proj/scripts/t.lua",
        "local t = wick.tokenizer.load('tok.json')\n",
    );
    let t = d.run("proj/scripts/t.lua", &[]);
    assert_clean_failure(
        &t,
        &[
            "t.lua:1",
            &format!("{} exists", root.join("tok.json").display()),
        ],
    );
    assert_clean_failure(
        &o,
        &[
            "r.lua:1",
            "data/train.jsonl",
            &format!("{} exists", root.join("data/train.jsonl").display()),
            &format!("run wick from {}", root.display()),
        ],
    );
}

/// The tools that read a file named on the command line say a missing one is a usage error
/// (exit 2), naming it.
#[test]
fn tools_given_a_missing_file_exit_2_naming_it() {
    let d = Dir::new();
    for args in [
        vec!["inspect", "gone.ckpt"],
        vec!["generate", "gone.ckpt", "--prompt", "x"],
        vec!["export", "gone.ckpt", "--hf", "out"],
        vec!["plot", "gone.jsonl", "-o", "p.png"],
    ] {
        let o = std::process::Command::new(wick_bin())
            .current_dir(d.path())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no such") && stderr(&o).contains("gone."),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

/// `wick run -` reads the recipe from stdin; its errors name `stdin:LINE`.
#[test]
fn a_recipe_can_come_from_stdin() {
    let d = Dir::new();
    let run = |src: &str| output_with_stdin(&mut d.run_cmd("-", &[]), src.as_bytes());
    let o = run("print('from stdin', 1 + 1)\n");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "from stdin\t2\n");
    let o = run("local x = 1\nerror('boom')\n");
    assert_clean_failure(&o, &["stdin:2: boom"]);
}

/// `wick export` never writes into a directory that holds someone else's files (a project
/// root, another model): exit 2, nothing touched. A new directory, or an earlier export's, is
/// fine.
#[test]
fn export_refuses_a_directory_with_other_files() {
    let d = Dir::new();
    d.write(
        "r.lua",
        "local m = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }\nlocal s = wick.session{ model = m }\ns:step(wick.data.batch{ {1, 2, 3, 4, 5, 6, 7, 8, 9} })\n",
    );
    assert_eq!(code(&d.run("r.lua", &[])), 0);
    let export = |dir: &str| {
        std::process::Command::new(wick_bin())
            .current_dir(d.path())
            .args(["export", "ckpt/full_model.ckpt", "--hf", dir])
            .output()
            .unwrap()
    };
    assert_eq!(code(&export("hf")), 0);
    assert_eq!(code(&export("hf")), 0, "an earlier export's directory");
    d.write("proj/config.json", "{\"mine\": true}");
    d.write("proj/README.md", "my project");
    let o = export("proj");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("README.md"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(d.join("proj/config.json")).unwrap(),
        "{\"mine\": true}"
    );
}
