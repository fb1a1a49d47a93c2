//! The REPL through a real pseudo-terminal (rexpect), and piped stdin as a plain process.
mod common;
use common::*;
use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};
use std::process::Command;

fn repl(d: &Dir, extra: &[&str]) -> PtySession {
    let mut c = Command::new(wick_bin());
    c.current_dir(d.path())
        .arg("repl")
        .arg("--ckpt-dir")
        .arg(d.join("ckpt"))
        .args(extra)
        .env("XDG_STATE_HOME", d.join("state"))
        .env("RAYON_NUM_THREADS", "1")
        .env("TERM", "xterm");
    let opts = Options::new()
        .timeout_ms(Some(60_000))
        .strip_ansi_escape_codes(true);
    let mut p = spawn_with_options(c, opts).expect("spawn repl in a pty");
    prompt(&mut p);
    p
}

fn prompt(p: &mut PtySession) {
    p.exp_string("wick> ").unwrap();
}

fn line(p: &mut PtySession, s: &str) {
    p.send_line(s).unwrap();
}

/// `wick repl --ckpt-dir <d>/CKPT EXTRA...` with `input` piped in (no terminal).
fn repl_piped(
    d: &Dir,
    ckpt: &str,
    extra: &[&std::ffi::OsStr],
    input: &[u8],
) -> std::process::Output {
    output_with_stdin(
        Command::new(wick_bin())
            .current_dir(d.path())
            .args(["repl", "--ckpt-dir"])
            .arg(d.join(ckpt))
            .args(extra),
        input,
    )
}

const SETUP: &str = "model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }; session = wick.session{ model = model }; train = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl' }, batch = 2, seq_len = 16 }";

#[test]
fn prints_results_continues_multiline_completes_and_recovers_from_errors() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let mut p = repl(&d, &[]);
    line(&mut p, "1 + 2");
    p.exp_string("3").unwrap();
    prompt(&mut p);
    line(&mut p, "for i = 1, 2 do");
    p.exp_string(".. ").unwrap();
    line(&mut p, "print('row' .. i * 10) end");
    p.exp_string("row10").unwrap();
    p.exp_string("row20").unwrap();
    prompt(&mut p);
    line(&mut p, "{ b = { 1, 2 }, a = 'x' }");
    p.exp_regex(r#"a = "x",\s+b = \{ 1, 2 \}"#).unwrap();
    prompt(&mut p);
    line(&mut p, "error('bad thing')");
    p.exp_string("bad thing").unwrap();
    prompt(&mut p);
    line(&mut p, "40 + 2");
    p.exp_string("42").unwrap();
    prompt(&mut p);
    // Completion of nested fields and of userdata methods.
    p.send("wick.da\t").unwrap();
    p.flush().unwrap();
    p.exp_string("wick.data").unwrap();
    p.send(".loa\t").unwrap();
    p.flush().unwrap();
    p.exp_string("wick.data.loader").unwrap();
    line(&mut p, "");
    p.exp_string("<function>").unwrap();
    prompt(&mut p);
    line(&mut p, SETUP);
    prompt(&mut p);
    p.send("session:ev\t").unwrap();
    p.flush().unwrap();
    p.exp_string("session:eval").unwrap();
    line(&mut p, "(train, 1) < 10");
    p.exp_string("true").unwrap();
    prompt(&mut p);
    line(&mut p, "session");
    p.exp_string("wick.session(step=0").unwrap();
    prompt(&mut p);
    line(&mut p, "model:weight('norm.weight')");
    p.exp_string("wick.tensor(shape=[16], dtype=F32, device=cpu, values=[1.0000")
        .unwrap();
    prompt(&mut p);
    line(&mut p, ":help step");
    p.exp_string("One indivisible optimizer step").unwrap();
    prompt(&mut p);
    p.send_control('d').unwrap();
    p.exp_string("no step was trained").unwrap();
    p.exp_eof().unwrap();
    assert!(!d.ckpt().exists(), "Ctrl+D without training writes nothing");
}

/// Keys that arrive together (a paste, tmux send-keys, typing during a long evaluation) are
/// never lost: every line is evaluated, in order, with no pause between them.
#[test]
fn typed_ahead_and_pasted_lines_all_arrive() {
    let d = Dir::new();
    let mut p = repl(&d, &[]);
    // Three lines of one multi-line chunk in a single write.
    p.send("for i = 1, 2 do\rprint('row' .. i)\rend\r").unwrap();
    p.flush().unwrap();
    p.exp_string("row1").unwrap();
    p.exp_string("row2").unwrap();
    prompt(&mut p);
    // Typed while a command still runs: the next lines wait in the terminal.
    p.send("x = 0 for i = 1, 3e7 do x = x + 1 end\r").unwrap();
    p.send("print('after', x)\r").unwrap();
    p.send("print('and then')\r").unwrap();
    p.flush().unwrap();
    p.exp_string("after\t30000000").unwrap();
    p.exp_string("and then").unwrap();
    prompt(&mut p);
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn history_is_kept_across_sessions() {
    let d = Dir::new();
    let mut p = repl(&d, &[]);
    line(&mut p, "marker_value = 4242");
    prompt(&mut p);
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let mut p = repl(&d, &[]);
    p.send("\x1b[A").unwrap();
    p.flush().unwrap(); // Up: the previous session's line
    p.send("\r").unwrap();
    p.flush().unwrap();
    prompt(&mut p);
    line(&mut p, "marker_value + 1");
    p.exp_string("4243").unwrap();
    prompt(&mut p);
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let hist = std::fs::read_to_string(d.join("state/wick/history")).unwrap();
    assert!(hist.contains("marker_value = 4242"));
}

#[test]
fn ctrl_c_stops_a_training_loop_and_ctrl_d_saves_repl_exit() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let mut p = repl(&d, &[]);
    line(&mut p, SETUP);
    prompt(&mut p);
    line(
        &mut p,
        "for i = 1, 1000000 do session:step(train:next()) if i == 3 then print('three steps') end end",
    );
    p.exp_string("three steps").unwrap();
    p.send_control('c').unwrap();
    let (_, at) = p.exp_regex(r"interrupted at step \d+").unwrap();
    let step: u64 = at.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(step >= 3);
    prompt(&mut p);
    line(&mut p, "session.global_step");
    p.exp_string(&step.to_string()).unwrap();
    prompt(&mut p);
    assert!(!d.ckpt().exists(), "Ctrl+C in the REPL saves nothing");
    // Ctrl+C at the prompt clears the line; the session still works.
    p.send("this is not lua").unwrap();
    p.flush().unwrap();
    p.send_control('c').unwrap();
    prompt(&mut p);
    line(&mut p, "session:step(train:next()) > 0");
    p.exp_string("true").unwrap();
    prompt(&mut p);
    p.send_control('d').unwrap();
    p.exp_string("reason repl-exit").unwrap();
    p.exp_eof().unwrap();
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "repl-exit");
    assert_eq!(m["step"], step + 1);
}

#[test]
fn piped_stdin_evaluates_without_prompts() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let input = format!("1 + 1\nfor i = 1, 2 do\nprint('p' .. i)\nend\n{SETUP}\nsession:step(train:next()) > 0\nnot_defined.x\n'still here'\n");
    let o = repl_piped(&d, "ckpt", &[], input.as_bytes());
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(out, "2\np1\np2\ntrue\nstill here\n", "{}", stderr(&o));
    assert!(!out.contains("wick>") && !stderr(&o).contains("wick>"));
    assert!(
        stderr(&o).contains("attempt to index a nil value"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("\x1b["), "no colours when piped");
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "repl-exit");
    // --resume gives `model` and `session` back.
    let o = repl_piped(
        &d,
        "ckpt2",
        &["--resume".as_ref(), d.ckpt().as_ref()],
        b"session.global_step\nmodel.params\n",
    );
    assert_eq!(stdout(&o), "1\n12368\n", "{}", stderr(&o));
}

#[test]
fn sigterm_in_the_repl_saves_and_exits_143() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let mut p = repl(&d, &[]);
    line(&mut p, SETUP);
    prompt(&mut p);
    line(&mut p, "print('stepped', session:step(train:next()) > 0)");
    p.exp_string("stepped\ttrue").unwrap();
    prompt(&mut p);
    let pid = p.process().child_pid.as_raw();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    p.exp_string("reason interrupted").unwrap();
    p.exp_eof().unwrap();
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "interrupted");
    assert_eq!(m["step"], 1);
}

#[test]
fn commands_load_save_time_reset_quit() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    d.write(
        "setup.lua",
        &format!("{SETUP}\nsession:step(train:next())\n"),
    );
    let input = ":load setup.lua\nsession.global_step\n:time 1 + 1\n:save saved.ckpt\n:reset\nsession\n:bogus\n:quit\nprint('not reached')\n";
    let o = repl_piped(&d, "ckpt", &[], input.as_bytes());
    let out = stdout(&o);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1", "{out}");
    assert_eq!(lines[1], "2", "{out}");
    assert!(
        lines[2].starts_with('(') && lines[2].ends_with(" s)"),
        ":time prints the elapsed time: {out}"
    );
    assert!(lines[3].contains("saved saved.ckpt at step 1"), "{out}");
    assert_eq!(ckpt_meta(&d.join("saved.ckpt"))["reason"], "manual");
    assert!(lines[4].contains("fresh Lua state"), "{out}");
    assert_eq!(lines[5], "nil", ":reset forgets globals: {out}");
    assert!(err.contains("unknown command :bogus"), "{err}");
    assert!(!out.contains("not reached"), ":quit ends the session");
    // After :reset nothing was trained in the new session: nothing written on exit.
    assert!(!d.ckpt().exists());
}

/// Each line at the prompt is its own chunk, so a `local` is gone on the next line: the error
/// that follows says why and what to write instead, only for names declared that way.
#[test]
fn a_local_from_an_earlier_line_gets_a_hint() {
    let d = Dir::new();
    let input =
        "local m, n = 1, 2\nlocal function f() return 1 end\nprint(m + 1)\nf()\nprint(other.x)\n";
    let o = repl_piped(&d, "ckpt", &[], input.as_bytes());
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("hint: `local m` on an earlier line"), "{err}");
    assert!(err.contains("hint: `local f` on an earlier line"), "{err}");
    assert_eq!(err.matches("hint:").count(), 2, "none for 'other': {err}");
}

/// `:help` lists the API by owner, one line each, and `:help NAME` shows one entry.
#[test]
fn help_lists_the_api_by_owner() {
    let d = Dir::new();
    let o = repl_piped(&d, "ckpt", &[], b":help\n:help wick.data.loader\n");
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(out.contains("\n  wick.data: jsonl text files"), "{out}");
    assert!(out.contains("\n  Session: step eval steps\n"), "{out}");
    assert!(out.lines().all(|l| l.len() < 300), "{out}");
    assert!(out.contains("wick.data.loader(opts)"), "{out}");
}
