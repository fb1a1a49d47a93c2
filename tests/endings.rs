//! More ways a script ends: os.exit, a runaway Lua heap, an error with a table, two runs in
//! one directory, a checkpoint directory that cannot take the final save.
mod common;
use common::*;
use std::time::Duration;

fn recipe(d: &Dir, body: &str) {
    d.corpus("data.jsonl", 200);
    let mut r = tiny_setup("data.jsonl", 1e-3);
    r.push_str(body);
    d.write("r.lua", &r);
}

#[test]
fn os_exit_keeps_the_step_boundary_saves_reason_exit_and_exits_with_its_code() {
    for (arg, want) in [("3", 3), ("true", 0), ("false", 1), ("", 0)] {
        let d = Dir::new();
        recipe(
            &d,
            &format!(
                "for step in session:steps(100) do\n  session:step(train:next())\n  if step == 20 then os.exit({arg}) end\nend\n"
            ),
        );
        let o = d.run("r.lua", &[]);
        assert_eq!(code(&o), want, "os.exit({arg}): {}", stderr(&o));
        let m = ckpt_meta(&d.ckpt());
        assert_eq!(m["reason"], "exit", "os.exit({arg})");
        assert_eq!(m["step"], 20, "os.exit({arg})");
        assert!(
            stderr(&o).contains("at step 20 (reason exit"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn os_exit_inside_pcall_still_ends_the_run() {
    let d = Dir::new();
    recipe(
        &d,
        "for step in session:steps(100) do\n  session:step(train:next())\n  if step == 5 then print(pcall(os.exit, 4)) end\nend\n",
    );
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 5);
}

#[test]
fn a_runaway_lua_heap_is_a_script_error_that_saves() {
    let d = Dir::new();
    recipe(
        &d,
        "for step in session:steps(3) do session:step(train:next()) end\nlocal t = {}\nfor i = 1, 1e9 do t[i] = string.rep('x', 1 << 20) .. i end\n",
    );
    let o = d.run("r.lua", &["--lua-memory", "64M"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("not enough memory") && err.contains("--lua-memory"),
        "{err}"
    );
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(
        (m["reason"].as_str(), m["step"].as_u64()),
        (Some("error"), Some(3))
    );

    let help = std::process::Command::new(wick_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&help).contains("--lua-memory"), "{}", stdout(&help));
    let bad = d.run("r.lua", &["--lua-memory", "lots"]);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("--lua-memory"), "{}", stderr(&bad));
}

#[test]
fn an_error_with_a_table_shows_its_fields_or_its_tostring_and_the_traceback() {
    let d = Dir::new();
    recipe(
        &d,
        "for step in session:steps(2) do session:step(train:next()) end\nerror({ code = 1, why = 'bad batch' })\n",
    );
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains(r#"{ code = 1, why = "bad batch" }"#), "{err}");
    assert!(
        err.contains("stack traceback") && err.contains("r.lua:"),
        "{err}"
    );
    assert!(
        !err.contains("prelude"),
        "wick's own frames are hidden: {err}"
    );
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "error");

    d.write(
        "s.lua",
        "error(setmetatable({}, { __tostring = function() return 'custom failure' end }))\n",
    );
    let o = d.run("s.lua", &[]);
    assert!(
        stderr(&o).contains("error: custom failure"),
        "{}",
        stderr(&o)
    );
    // Error levels still point at the caller.
    d.write("l.lua", "local function f() error('from f', 2) end\nf()\n");
    assert!(stderr(&d.run("l.lua", &[])).contains("l.lua:2: from f"));
}

#[test]
fn a_second_run_on_the_same_directory_is_refused_and_a_killed_runs_lock_never_blocks() {
    let d = Dir::new();
    recipe(
        &d,
        "print('ready')\nfor step in session:steps(10000000) do session:step(train:next()) end\n",
    );
    let out = d.join("out.log");
    let mut cmd = d.run_cmd("r.lua", &[]);
    cmd.stdout(std::fs::File::create(&out).unwrap());
    let mut first = spawn_logged(cmd, &d.join("err.log"));
    assert!(wait_for_line(
        &mut first,
        &out,
        "ready",
        Duration::from_secs(30)
    ));
    let second = d.run("r.lua", &[]);
    let err = stderr(&second);
    assert_eq!(code(&second), 2, "{err}");
    assert!(
        err.contains("ckpt") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    let repl = std::process::Command::new(wick_bin())
        .args(["repl", "--ckpt-dir"])
        .arg(d.join("ckpt"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&repl), 2, "{}", stderr(&repl));
    // kill -9: the lock goes with the process.
    first.kill().unwrap();
    first.wait().unwrap();
    d.write(
        "short.lua",
        &format!(
            "{}for step in session:steps(2) do session:step(train:next()) end\n",
            tiny_setup("data.jsonl", 1e-3)
        ),
    );
    let o = d.run("short.lua", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_checkpoint_directory_that_cannot_take_the_save_sends_the_state_to_the_rescue_dir() {
    let d = Dir::new();
    recipe(
        &d,
        "for step in session:steps(6) do session:step(train:next()) end\n",
    );
    std::fs::create_dir_all(d.join("ckpt")).unwrap();
    let rescue = d.join("rescue");
    std::fs::create_dir_all(&rescue).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&rescue, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(d.join("ckpt"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut cmd = d.run_cmd("r.lua", &["--rescue-dir", rescue.to_str().unwrap()]);
    as_nobody_if_root(&mut cmd);
    let o = cmd.output().unwrap();
    std::fs::set_permissions(d.join("ckpt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 74, "{err}");
    assert!(!d.ckpt().exists());
    let saved: Vec<_> = walk(&rescue);
    assert_eq!(saved.len(), 1, "one rescued checkpoint: {saved:?}\n{err}");
    let path = &saved[0];
    assert!(
        err.contains(&path.display().to_string()),
        "names where the state went: {err}"
    );
    assert!(err.contains("--resume"), "{err}");
    let m = ckpt_meta(path);
    assert_eq!(m["step"], 6);
    assert_eq!(code(&inspect(path)), 0);
    // Continue from it once there is room.
    d.write(
        "more.lua",
        &format!(
            "{}for step in session:steps(8) do session:step(train:next()) end\n",
            tiny_setup("data.jsonl", 1e-3)
        ),
    );
    let o = d.run("more.lua", &["--resume", path.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 8);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "ckpt") {
            out.push(p);
        }
    }
    out
}

/// A stop that arrives while `os.execute` or `io.popen` runs a command is honoured at the next
/// boundary (C's `system()` would have ignored a SIGINT sent to wick meanwhile).
#[test]
fn a_stop_during_os_execute_or_io_popen_is_honoured() {
    let cases = [
        ("os.execute('kill -INT $PPID; sleep 0.3')", libc::SIGINT),
        ("os.execute('kill -TERM $PPID; sleep 0.3')", libc::SIGTERM),
        (
            "io.popen('kill -HUP $PPID; sleep 0.3; echo hi'):read('a')",
            libc::SIGHUP,
        ),
        (
            "io.popen('kill -INT $PPID; sleep 0.3; echo hi'):close()",
            libc::SIGINT,
        ),
    ];
    for (call, sig) in cases {
        let d = Dir::new();
        recipe(
            &d,
            &format!(
                "for step in session:steps(40) do\n  session:step(train:next())\n  if step == 3 then {call} end\nend\n"
            ),
        );
        let o = d.run("r.lua", &[]);
        let err = stderr(&o);
        assert_eq!(code(&o), 128 + sig, "{call}: {err}");
        let m = ckpt_meta(&d.ckpt());
        assert_eq!(m["reason"], "interrupted", "{call}");
        assert_eq!(
            m["step"], 3,
            "{call}: stops at the boundary after the command"
        );
    }
    // Lua's own results are kept.
    let d = Dir::new();
    d.write(
        "x.lua",
        "print(os.execute('exit 3'))\nprint(os.execute('kill -KILL $$'))\nprint(os.execute())\nprint(os.execute('true'))\n",
    );
    let o = d.run("x.lua", &[]);
    assert_eq!(
        stdout(&o),
        "nil\texit\t3\nnil\tsignal\t9\ntrue\ntrue\texit\t0\n"
    );
}

/// The row `wick.log` writes for the step the checkpoint holds is never lost to a stop that
/// arrived just before it.
#[test]
fn the_last_logged_row_is_written_when_a_stop_is_pending() {
    let d = Dir::new();
    recipe(
        &d,
        "for step in session:steps(40) do\n  local loss = session:step(train:next())\n  wick.log{ train_loss = loss, stop = step == 5 and os.execute('kill -INT $PPID; sleep 0.2') or nil }\nend\n",
    );
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 5);
    let metrics = std::fs::read_to_string(d.join("ckpt/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 5, "{metrics}");
    assert!(last["train_loss"].as_f64().is_some(), "{metrics}");
}
