//! The run survives losing its terminal or its output pipes: output failures never decide
//! whether the checkpoint is written, and the run's messages stay readable in wick.log.
mod common;
use common::*;
use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

fn recipe(d: &Dir, steps: u64) {
    d.corpus("data.jsonl", 300);
    let mut r = tiny_setup("data.jsonl", 1e-3);
    r.push_str(&format!(
        "for step in session:steps({steps}) do\n  session:step(train:next())\n  print('stdout line for step ' .. step)\n  io.write('more output\\n')\nend\n"
    ));
    d.write("r.lua", &r);
}

fn log(d: &Dir) -> String {
    std::fs::read_to_string(d.join("ckpt/wick.log")).unwrap_or_default()
}

/// The terminal window closes (or ssh drops) mid-run: SIGHUP arrives and every later write to
/// the terminal fails. The step in flight finishes, the checkpoint is written, exit 129.
#[test]
fn terminal_hangup_saves_at_a_step_boundary_and_exits_129() {
    let d = Dir::new();
    recipe(&d, 1_000_000);
    let (mut child, mut terminal) = spawn_on_pty(d.run_cmd("r.lua", &[]));
    assert!(
        read_pty_until(
            &mut terminal,
            "stdout line for step 3",
            Duration::from_secs(60)
        ),
        "the run never showed progress on its terminal"
    );
    drop(terminal); // the terminal goes away
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("run stopped");
    let log = log(&d);
    assert_eq!(status.code(), Some(129), "{log}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "interrupted", "{log}");
    assert!(log.contains("stopped by SIGHUP"), "{log}");
    let line = format!("at step {} (reason interrupted", m["step"]);
    assert!(log.contains(&line), "wick.log names the save: {log}");
    assert_eq!(code(&inspect(&d.ckpt())), 0);
}

/// `wick run ... 2>&1 >/dev/null | head -c 100`: stderr's reader leaves early. The run goes on
/// to its end and saves as if nothing happened.
#[test]
fn stderr_reader_exiting_changes_nothing() {
    let d = Dir::new();
    recipe(&d, 40);
    let mut child = d
        .run_cmd("r.lua", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut first = [0u8; 10];
    err.read_exact(&mut first).unwrap();
    drop(err);
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("run ended");
    let log = log(&d);
    assert_eq!(status.code(), Some(0), "{log}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(
        (m["reason"].as_str(), m["step"].as_u64()),
        (Some("completed"), Some(40))
    );
    assert!(log.contains("stderr is gone"), "{log}");
    assert!(log.contains("at step 40 (reason completed"), "{log}");
}

/// stdout's reader leaves early (`wick run r.lua | head -1`) while the recipe keeps printing.
#[test]
fn stdout_reader_exiting_changes_nothing() {
    let d = Dir::new();
    recipe(&d, 40);
    let mut child = d
        .run_cmd("r.lua", &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("run ended");
    assert_eq!(status.code(), Some(0), "{}", log(&d));
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(
        (m["reason"].as_str(), m["step"].as_u64()),
        (Some("completed"), Some(40))
    );
}

/// A panic outside the session's own state (here: drawing progress, through a test-only hook)
/// still ends with the checkpoint of the last completed step, reason `panic`, exit 101.
#[test]
fn a_panic_while_printing_progress_saves_the_last_completed_step() {
    let d = Dir::new();
    recipe(&d, 40);
    let o = d
        .run_cmd("r.lua", &[])
        .env("WICK_TEST_HOOKS", "1")
        .env("WICK_TEST_PANIC_IN_PROGRESS_AT", "7")
        .output()
        .unwrap();
    assert_eq!(code(&o), 101, "{}", stderr(&o));
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "panic", "{}", stderr(&o));
    assert_eq!(m["step"], 7, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("at step 7 (reason panic"),
        "{}",
        stderr(&o)
    );
}
