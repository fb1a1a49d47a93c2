//! Data the recipe writes: batches from Lua values, a source written in Lua (with exact
//! resume), per-document filters and maps on file sources, and their failures.
mod common;
use common::*;
use std::time::Duration;

const MODEL: &str = "local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }\nlocal session = wick.session{ model = model, optim = wick.optim.adamw{ lr = 3e-3 } }\n";

#[test]
fn batches_from_lua_train_and_bad_rows_are_named() {
    let d = Dir::new();
    d.write(
        "ok.lua",
        &format!("{MODEL}local b = wick.data.batch{{ {{1, 2, 3, 4, 5}}, {{6, 7, 8, 9, 10}} }}\nprint(b.size, b.seq_len)\nlocal first = session:step(b)\nfor i = 1, 30 do session:step(b) end\nprint(first > session:step(b))\n"),
    );
    let o = d.run("ok.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "2\t4\ntrue\n", "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 32);
    for (body, needle) in [
        (
            "wick.data.batch{ {1, 2, 3}, {4, 5} }",
            "row 2 has 2 tokens, row 1 has 3",
        ),
        (
            "wick.data.batch{ {1, 2, 3}, {4, 'x', 6} }",
            "row 2, column 2 is string",
        ),
        ("wick.data.batch{ {1, 2, -3} }", "row 1, column 3 is -3"),
        (
            "session:step(wick.data.batch{ {1, 2, 3}, {4, 5, 999} })",
            "token id 999 at row 2, column 3",
        ),
    ] {
        d.write("bad.lua", &format!("{MODEL}{body}\n"));
        let o = d.run("bad.lua", &[]);
        assert_eq!(code(&o), 1, "{body}");
        assert!(
            stderr(&o).contains(needle) && stderr(&o).contains("bad.lua:3"),
            "{body}: {}",
            stderr(&o)
        );
    }
}

/// A seeded generator whose position is plain data.
const LUA_SOURCE: &str = r#"
local gen = { n = 0, x = 7 }
local function rand(k) gen.x = gen.x * 48271 % 2147483647 return gen.x % k end
local resumable = wick.args[2] ~= "plain"
local src = wick.data.lua{
  name = "copy",
  next = function()
    gen.n = gen.n + 1
    if gen.n % 40 == 0 then return nil end                      -- epochs end, too
    if wick.args[3] == "fail" and gen.n == 25 then error("generator broke at document " .. gen.n) end
    if gen.n % 3 == 0 then return { 1, 2, 3, rand(200) } end   -- token ids work as well
    local w = {} for i = 1, 3 + rand(6) do w[i] = string.char(97 + rand(26)) end
    return table.concat(w) .. "|" .. table.concat(w)
  end,
  state = resumable and function() return { n = gen.n, x = gen.x } end or nil,
  restore = resumable and function(s) gen.n, gen.x = s.n, s.x end or nil,
}
local train = wick.data.loader{ source = src, batch = 3, seq_len = 16 }
for step in session:steps(tonumber(wick.args[1])) do
  session:step(train:next())
  if resumable and step % 10 == 0 then wick.log{ val = session:eval(train, 2) } end
end
"#;

#[test]
fn a_lua_source_resumes_bit_identically_and_refuses_when_it_cannot() {
    let d = Dir::new();
    d.write("s.lua", &format!("{MODEL}{LUA_SOURCE}"));
    let straight = Dir::new();
    straight.write("s.lua", &format!("{MODEL}{LUA_SOURCE}"));
    assert_eq!(code(&straight.run("s.lua", &["--", "50"])), 0);
    let o = d.run("s.lua", &["--", "23"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = d.run("s.lua", &["--resume", "--", "50"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        ckpt_tensors(&d.ckpt()),
        ckpt_tensors(&straight.ckpt()),
        "weights after resume"
    );

    // Without state/restore: training works, but a resume is refused (no silent restart).
    let p = Dir::new();
    p.write("s.lua", &format!("{MODEL}{LUA_SOURCE}"));
    assert_eq!(code(&p.run("s.lua", &["--", "5", "plain"])), 0);
    let o = p.run("s.lua", &["--resume", "--", "10", "plain"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("without state() and restore(s)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        ckpt_meta(&p.ckpt())["step"],
        5,
        "the checkpoint is untouched"
    );
}

#[test]
fn a_failing_lua_source_or_filter_is_a_script_error_with_its_line_and_a_checkpoint() {
    let d = Dir::new();
    d.write("s.lua", &format!("{MODEL}{LUA_SOURCE}"));
    let o = d.run("s.lua", &["--", "50", "r", "fail"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("generator broke at document 25") && err.contains("s.lua:"),
        "{err}"
    );
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "error");
    assert!(m["step"].as_u64().unwrap() > 0);

    let f = Dir::new();
    f.corpus("c.jsonl", 100);
    f.write(
        "f.lua",
        &format!("{MODEL}local t = wick.data.loader{{ source = wick.data.jsonl{{ 'c.jsonl', map = function(doc)\n  if doc.source:match(':40$') then return doc.missing.field end\n  return doc.text\nend }}, batch = 2, seq_len = 16 }}\nfor step in session:steps(1000) do session:step(t:next()) end\n"),
    );
    let o = f.run("f.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("c.jsonl:40") && err.contains("f.lua:4"),
        "{err}"
    );
    assert_eq!(ckpt_meta(&f.ckpt())["reason"], "error");
}

#[test]
fn filters_and_maps_shape_documents_deterministically() {
    let d = Dir::new();
    d.corpus("c.jsonl", 200);
    d.write(
        "docs.lua",
        "local M = {}\nfunction M.keep_odd(doc) return tonumber(doc.text:match('^Document (%d+)')) % 2 == 1 end\nfunction M.tag(doc) return '[' .. doc.subset .. '] ' .. doc.text end\nreturn M\n",
    );
    // Prints the first tokens of each row of a few batches, and how many documents were dropped.
    let recipe = format!(
        "{MODEL}local t = wick.data.loader{{ source = wick.data.jsonl{{ 'c.jsonl', shuffle = true, filter = 'docs.keep_odd', map = 'docs.tag' }}, batch = 2, seq_len = 16 }}\nfor step in session:steps(30) do local b = t:next() session:step(b) if step <= 2 then print(table.concat(b:tokens(1), ',')) end end\nprint('filtered', t.filtered)\n"
    );
    d.write("f.lua", &recipe);
    let run = |threads: &str| {
        let o = d
            .run_cmd("f.lua", &[])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let one = run("1");
    assert_eq!(one, run("2"), "same batches with any thread count");
    let first: Vec<u32> = one
        .lines()
        .next()
        .unwrap()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    let text: String = first.iter().map(|&t| t as u8 as char).collect();
    assert!(
        text.contains("[RedPajamaBook]") || text.contains("Document"),
        "{text}"
    );
    let dropped: u64 = one
        .lines()
        .last()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 0, "{one}");

    // A filter that captures a local cannot travel to the data thread: said clearly.
    d.write("cap.lua", &format!("{MODEL}local n = 10\nlocal s = wick.data.jsonl{{ 'c.jsonl', filter = function(doc) return #doc.text > n end }}\n"));
    let o = d.run("cap.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("captures local variables (n)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn ctrl_c_while_a_data_function_spins_stops_at_a_step_boundary() {
    let d = Dir::new();
    d.corpus("c.jsonl", 100);
    d.write(
        "f.lua",
        &format!("{MODEL}print('ready')\nlocal t = wick.data.loader{{ source = wick.data.jsonl{{ 'c.jsonl', filter = function(doc)\n  if doc.source:match(':60$') then while true do end end\n  return true\nend }}, batch = 2, seq_len = 16 }}\nfor step in session:steps(100000) do session:step(t:next()) end\n"),
    );
    let out = d.join("out.log");
    let mut cmd = d.run_cmd("f.lua", &[]);
    cmd.stdout(std::fs::File::create(&out).unwrap());
    let mut child = spawn_logged(cmd, &d.join("err.log"));
    assert!(wait_for_line(
        &mut child,
        &out,
        "ready",
        Duration::from_secs(30)
    ));
    // The data thread spins inside the filter; training waits for data.
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(d.join("err.log"))
        .unwrap_or_default()
        .contains("step 1/")
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "never trained");
        std::thread::yield_now();
    }
    send(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("stops");
    assert_eq!(status.code(), Some(130));
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "interrupted");
}

#[test]
fn the_curriculum_recipe_runs() {
    let d = Dir::new();
    let o = std::process::Command::new(wick_bin())
        .current_dir(repo_root())
        .args(["run", "scripts/curriculum.lua", "--ckpt-dir"])
        .arg(d.join("ckpt"))
        .args(["--", "--steps", "12"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let m = ckpt_meta(&d.join("ckpt/full_model.ckpt"));
    assert_eq!(m["step"], 12);
    let loaders = m["loaders"].as_object().unwrap();
    assert!(
        loaders["copy"]["cursor"]["streams"][0]["lua_state"]["n"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(stderr(&o).contains("short_docs_dropped"), "{}", stderr(&o));
}
