//! `wick test` itself: pass, fail, crash, timeout, golden + --bless, JUnit, exit codes, Ctrl+C.
mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn wick_test(d: &Dir, args: &[&str]) -> std::process::Output {
    Command::new(wick_bin())
        .current_dir(d.path())
        .arg("test")
        .args(args)
        .output()
        .unwrap()
}

const SETUP: &str = r#"
local function tiny()
  local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }
  local session = wick.session{ model = model }
  local train = wick.data.loader{ source = wick.data.jsonl{ "data.jsonl" }, batch = 2, seq_len = 16 }
  return session, train
end
"#;

fn suite(d: &Dir) {
    d.corpus("data.jsonl", 100);
    d.write(
        "t/a_test.lua",
        &format!(
            "{SETUP}
test('passes', function()
  local s, t = tiny()
  local l = {{}}
  for i = 1, 4 do l[i] = s:step(t:next()) end
  expect(l[4]):below(l[1] + 1)
end)
test('fails an expectation', function()
  local s, t = tiny()
  s:step(t:next())
  expect(2 + 2):to_be(5)
end)
test('crashes', function()
  local s, t = tiny()
  s:step(t:next())
  local x = nil
  return x.field
end)
test.skip('not yet', function() end, 'waiting for a feature')
"
        ),
    );
    d.write(
        "t/b_test.lua",
        "test('sleeps too long', function() while true do end end)\n",
    );
}

#[test]
fn outcomes_lines_summary_exit_codes_and_junit() {
    let d = Dir::new();
    suite(&d);
    let o = wick_test(
        &d,
        &[
            "t",
            "--timeout",
            "2",
            "--junit",
            "report.xml",
            "--jobs",
            "2",
        ],
    );
    let out = stdout(&o);
    assert_eq!(code(&o), 1, "{out}\n{}", stderr(&o));
    assert!(out.contains("ok   t/a_test.lua::passes"), "{out}");
    let fail = out
        .lines()
        .find(|l| l.contains("fails an expectation"))
        .unwrap();
    assert!(
        fail.starts_with("FAIL")
            && fail.contains("expected 5, got 4")
            && fail.contains("a_test.lua:18"),
        "{fail}"
    );
    assert!(
        fail.contains("[checkpoint: ") && fail.contains("full_model.ckpt"),
        "a failed case leaves its checkpoint: {fail}"
    );
    let ck = fail
        .split("[checkpoint: ")
        .nth(1)
        .unwrap()
        .trim_end_matches(']');
    assert_eq!(ckpt_meta(std::path::Path::new(ck))["reason"], "error");
    let crash = out.lines().find(|l| l.contains("crashes")).unwrap();
    assert!(
        crash.starts_with("FAIL") && crash.contains("attempt to index a nil value"),
        "{crash}"
    );
    let slow = out.lines().find(|l| l.contains("sleeps too long")).unwrap();
    assert!(
        slow.starts_with("FAIL") && slow.contains("timed out after 2 s"),
        "{slow}"
    );
    assert!(
        out.contains("skip t/a_test.lua::not yet (waiting for a feature)"),
        "{out}"
    );
    let last: Vec<&str> = out.lines().filter(|l| l.contains(" passed, ")).collect();
    assert_eq!(
        last,
        vec!["1 passed, 3 failed, 1 skipped"],
        "exactly one closing line: {out}"
    );
    assert_eq!(out.lines().last().unwrap(), "1 passed, 3 failed, 1 skipped");

    let xml = std::fs::read_to_string(d.join("report.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("JUnit is well-formed XML");
    let suite = doc
        .descendants()
        .find(|n| n.has_tag_name("testsuite"))
        .unwrap();
    assert_eq!(suite.attribute("tests"), Some("5"));
    assert_eq!(suite.attribute("failures"), Some("3"));
    assert_eq!(suite.attribute("skipped"), Some("1"));
    assert_eq!(
        doc.descendants()
            .filter(|n| n.has_tag_name("testcase"))
            .count(),
        5
    );
    assert_eq!(
        doc.descendants()
            .filter(|n| n.has_tag_name("failure"))
            .count(),
        3
    );

    // --filter, and an all-passing run exits 0.
    let o = wick_test(&d, &["t", "--filter", "passes"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().last().unwrap(), "1 passed, 0 failed");
    // Usage errors exit 2.
    let o = wick_test(&d, &["nowhere"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("nowhere"));
    let o = wick_test(&d, &["t", "--jobs", "x"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn golden_mismatch_and_bless() {
    let d = Dir::new();
    d.write("g_test.lua", "test('curve', function() expect.golden('curve', { 1.0, 2.0, tonumber(os.getenv('THIRD') or '3') }, { rtol = 1e-6 }) end)\n");
    let o = wick_test(&d, &["g_test.lua"]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("golden file") && stdout(&o).contains("--bless"),
        "{}",
        stdout(&o)
    );
    let o = wick_test(&d, &["g_test.lua", "--bless"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("golden curve: new"), "{}", stdout(&o));
    assert!(d.join("golden/curve.json").exists());
    assert_eq!(code(&wick_test(&d, &["g_test.lua"])), 0);
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .env("THIRD", "3.5")
        .args(["test", "g_test.lua"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("differs at index 3") && stdout(&o).contains("expected 3, got 3.5"),
        "{}",
        stdout(&o)
    );
    let o = Command::new(wick_bin())
        .current_dir(d.path())
        .env("THIRD", "3.5")
        .args(["test", "g_test.lua", "--bless"])
        .output()
        .unwrap();
    assert!(
        stdout(&o).contains("golden curve: changed"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn ctrl_c_stops_the_whole_run_with_a_summary() {
    let d = Dir::new();
    let mut s = String::new();
    for i in 0..6 {
        s += &format!("test('spin {i}', function() io.open('started_{i}', 'w'):close() local x = 0 while true do x = x + 1 end end)\n");
    }
    d.write("s_test.lua", &s);
    let log = d.join("out.log");
    let mut cmd = Command::new(wick_bin());
    cmd.current_dir(d.path())
        .args(["test", "s_test.lua", "--jobs", "2"])
        .stdout(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    // Both workers' cases are running (each marks its start); the cases never finish.
    let t0 = std::time::Instant::now();
    while !(d.join("started_0").exists() && d.join("started_1").exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cases never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "runner ended early");
        std::thread::yield_now();
    }
    send(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("stops");
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("interrupted: 2 of 6 cases ran"), "{out}");
    assert_eq!(out.lines().last().unwrap(), "0 passed, 2 failed", "{out}");
}

#[test]
fn the_projects_own_regression_suite_passes() {
    let o = Command::new(wick_bin())
        .current_dir(repo_root())
        .args(["test", "tests/regress"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(" passed, 0 failed"));
}

/// `wick test` with no paths in a project without `tests/`: the `*_test.lua` files under the
/// current directory (not under `target/` or hidden folders), shown by their relative paths.
#[test]
fn with_no_paths_it_finds_the_test_files_under_the_current_directory() {
    let d = Dir::new();
    d.write(
        "checks/math_test.lua",
        "test('adds', function() expect(1 + 1):to_be(2) end)\n",
    );
    d.write(
        "target/junk_test.lua",
        "test('never run', function() error('target/ is not searched') end)\n",
    );
    let o = wick_test(&d, &[]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(out.contains("checks/math_test.lua::adds"), "{out}");
    assert!(
        !out.contains("./checks") && !out.contains("junk_test"),
        "{out}"
    );
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}
