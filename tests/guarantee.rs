//! The checkpoint guarantee (DESIGN.md §3) on real processes with real signals and real files.
mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

const LOOP: &str = "for step in session:steps(1000000) do session:step(train:next()); print('step ' .. step) end\n";

fn setup(d: &Dir) -> String {
    d.corpus("data.jsonl", 300);
    tiny_setup("data.jsonl", 1e-3)
}

/// "saved ... at step K" from the final line.
fn saved_step(err: &str) -> Option<u64> {
    let i = err.rfind(" at step ")?;
    err[i + 9..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn last_printed_step(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("step ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn completed_run_saves_reason_completed() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(5) do session:step(train:next()) end\nprint(wick.args[2], arg[2], arg[0])\n");
    d.write("r.lua", &r);
    let o = d.run("r.lua", &["--", "--flag", "value"]);
    assert_eq!(
        stdout(&o).trim(),
        "value\tvalue\tr.lua",
        "recipe arguments as wick.args and arg"
    );
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "completed");
    assert_eq!(m["step"], 5);
    assert!(
        err.contains("saved") && err.contains("at step 5 (reason completed"),
        "{err}"
    );
    assert!(
        err.contains("written in"),
        "save line gives the time: {err}"
    );
    let i = inspect(&d.ckpt());
    assert_eq!(code(&i), 0, "{}", stderr(&i));
    assert!(stdout(&i).contains("checksum"));
    // Readable by a plain safetensors reader: weights and moments are there.
    let t = ckpt_tensors(&d.ckpt());
    assert!(t.contains_key("model.tok_embeddings.weight"));
    assert!(t.contains_key("optim.m.tok_embeddings.weight"));
    assert!(t.contains_key("optim.v.layers.0.attention.wq.weight"));
}

#[test]
fn lua_error_saves_reason_error_with_traceback() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(3) do session:step(train:next()) end\nlocal function f() error('boom from the recipe') end\nf()\n");
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("boom from the recipe"), "{err}");
    assert!(err.contains("stack traceback"), "{err}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "error");
    assert_eq!(m["step"], 3);
}

#[test]
fn failing_host_call_saves_reason_error() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(2) do session:step(train:next()) end\nlocal s = wick.data.jsonl{ 'missing/file.jsonl' }\n");
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("missing/file.jsonl"), "{err}");
    assert!(err.contains("r.lua:"), "names the recipe line: {err}");
    assert_eq!(ckpt_meta(&d.ckpt())["reason"], "error");
    // A batch that does not fit the model (seq_len larger than the model's) is an error too.
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let mut r = tiny_setup("data.jsonl", 1e-3);
    r.push_str("session:step(train:next())\nlocal big = wick.data.loader{ source = wick.data.jsonl{'data.jsonl'}, batch = 1, seq_len = 64, name = 'big' }\nsession:step(big:next())\n");
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("seq_len"), "{}", stderr(&o));
    assert_eq!(ckpt_meta(&d.ckpt())["step"], 1);
}

fn signal_run(sig: i32, expect_code: i32) {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str(LOOP);
    d.write("r.lua", &r);
    let log = d.join("err.log");
    let out = d.join("out.log");
    let mut cmd = d.run_cmd("r.lua", &[]);
    cmd.stdout(std::fs::File::create(&out).unwrap());
    let f = std::fs::File::create(&log).unwrap();
    cmd.stderr(f);
    let mut child = cmd.spawn().unwrap();
    assert!(
        wait_for_line(&mut child, &out, "step 3\n", Duration::from_secs(60)),
        "never reached step 3"
    );
    send(&child, sig);
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("exits after the signal");
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(expect_code), "{err}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "interrupted");
    let step = m["step"].as_u64().unwrap();
    assert_eq!(saved_step(&err), Some(step), "{err}");
    let printed = last_printed_step(&std::fs::read_to_string(&out).unwrap());
    assert!(
        step == printed || step == printed + 1,
        "ckpt step {step}, last printed {printed}"
    );
    assert_eq!(code(&inspect(&d.ckpt())), 0);
}

#[test]
fn sigint_saves_interrupted_exit_130() {
    signal_run(libc::SIGINT, 130);
}

#[test]
fn sigterm_saves_interrupted_exit_143() {
    signal_run(libc::SIGTERM, 143);
}

#[test]
fn sighup_saves_interrupted_exit_129() {
    signal_run(libc::SIGHUP, 129);
}

#[test]
fn nothing_trained_writes_nothing_and_keeps_existing_file() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(2) do session:step(train:next()) end\n");
    d.write("first.lua", &r);
    assert_eq!(code(&d.run("first.lua", &[])), 0);
    let before = std::fs::read(d.ckpt()).unwrap();
    let mut r = setup(&d);
    r.push_str("error('fails before any step')\n");
    d.write("second.lua", &r);
    let o = d.run("second.lua", &[]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no step was trained; nothing saved"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(d.ckpt()).unwrap(),
        before,
        "existing checkpoint untouched"
    );
    // Resuming and stopping before a new step: nothing written either.
    let o = d.run("second.lua", &["--resume"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no step since the checkpoint at step 2"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(d.ckpt()).unwrap(), before);
}

/// A recipe stuck in Lua stops promptly after a signal, whatever it does to catch errors.
fn stop_latency(body: &str) -> Duration {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(2) do session:step(train:next()) end\nprint('ready')\n");
    r.push_str(body);
    d.write("r.lua", &r);
    let out = d.join("out.log");
    let log = d.join("err.log");
    let mut cmd = d.run_cmd("r.lua", &[]);
    cmd.stdout(std::fs::File::create(&out).unwrap());
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    assert!(wait_for_line(
        &mut child,
        &out,
        "ready",
        Duration::from_secs(60)
    ));
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    send(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("did not stop: {body}"));
    let took = t0.elapsed();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{body}: {err}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "interrupted");
    assert!(m["step"].as_u64().unwrap() >= 2, "{body}");
    assert!(
        err.contains(&format!("at step {} (reason interrupted", m["step"])),
        "{body}: {err}"
    );
    took
}

#[test]
fn pure_lua_and_pcall_loops_cannot_swallow_the_stop() {
    let bodies = [
        "local x = 0 while true do x = x + 1 end\n",
        "while true do pcall(function() local y = 0 for i = 1, 1e12 do y = y + i end end) end\n",
        "while true do xpcall(function() while true do end end, function(e) return 'handled' end) end\n",
        "while true do local ok = pcall(function() session:step(train:next()) end) end\n",
        "local co = coroutine.wrap(function() while true do local x = 0 for i = 1, 1000 do x = x + i end coroutine.yield() end end)\nwhile true do co() end\n",
        "while true do coroutine.resume(coroutine.create(function() while true do end end)) end\n",
        "local t = {} for i = 1, 200 do t[i] = i end\nwhile true do pcall(table.sort, t, function(a, b) while true do end end) end\n",
    ];
    for body in bodies {
        let took = stop_latency(body);
        // The hook fires within ~1000 instructions; the rest is the save and process exit.
        assert!(took < Duration::from_secs(3), "{body}: took {took:?}");
        eprintln!("stopped in {took:?}: {}", body.trim());
    }
}

#[test]
fn panic_in_host_call_is_caught_and_saved() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str(
        "for step in session:steps(2) do session:step(train:next()) end\nwick.debug.panic()\n",
    );
    d.write("r.lua", &r);
    let o = d
        .run_cmd("r.lua", &[])
        .env("WICK_TEST_HOOKS", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 101, "{err}");
    assert!(err.contains("internal error"), "{err}");
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "panic");
    assert_eq!(m["step"], 2);
    // A panic while the session is locked leaves its state in doubt: nothing is written.
    let d2 = Dir::new();
    d2.corpus("data.jsonl", 300);
    d2.write("r.lua", &r);
    let o = d2
        .run_cmd("r.lua", &[])
        .env("WICK_TEST_HOOKS", "1")
        .env("WICK_TEST_PANIC_IN_STEP", "1")
        .output()
        .unwrap();
    assert_eq!(code(&o), 101);
    assert!(stderr(&o).contains("not saved"), "{}", stderr(&o));
    assert!(!d2.ckpt().exists());
}

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp."))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn save_failure_on_read_only_dir_exits_74_and_keeps_old_checkpoint() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(2) do session:step(train:next()) end\n");
    d.write("r.lua", &r);
    assert_eq!(code(&d.run("r.lua", &[])), 0);
    let before = std::fs::read(d.ckpt()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let ckdir = d.join("ckpt");
    std::fs::set_permissions(&ckdir, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = d.run_cmd("r.lua", &[]);
    as_nobody_if_root(&mut cmd);
    let o = cmd.output().unwrap();
    std::fs::set_permissions(&ckdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 74, "{err}");
    assert!(
        err.contains("cannot write checkpoint") && err.contains("full_model.ckpt"),
        "{err}"
    );
    assert!(
        err.contains("ermission denied"),
        "names the OS error: {err}"
    );
    assert_eq!(std::fs::read(d.ckpt()).unwrap(), before);
    assert!(temp_files(&ckdir).is_empty());
}

#[test]
fn save_failure_on_file_size_limit_exits_74_and_keeps_old_checkpoint() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(2) do session:step(train:next()) end\n");
    d.write("r.lua", &r);
    assert_eq!(code(&d.run("r.lua", &[])), 0);
    let before = std::fs::read(d.ckpt()).unwrap();
    let limit = (before.len() / 2) as u64;
    let mut cmd = d.run_cmd("r.lua", &[]);
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 74, "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(
        std::fs::read(d.ckpt()).unwrap(),
        before,
        "old checkpoint intact"
    );
    assert!(temp_files(&d.join("ckpt")).is_empty(), "temp file removed");
}

#[test]
fn divergence_keeps_good_checkpoint_and_writes_diverged_beside_it() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str(
        "for step in session:steps(2) do session:step(train:next()) end\nwick.save()\nsession.lr = 1e30\nfor step in session:steps(50) do session:step(train:next()) end\n",
    );
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("diverged at step"), "{err}");
    let good = ckpt_meta(&d.ckpt());
    assert_eq!(good["step"], 2);
    assert_eq!(good["reason"], "manual");
    let div = d.join("ckpt/full_model.diverged.ckpt");
    assert_eq!(ckpt_meta(&div)["reason"], "diverged");
    assert!(
        err.contains("was not overwritten with the diverged state"),
        "{err}"
    );

    // Diverging before any save: no regular checkpoint, and the closing line says so.
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str(
        "session.lr = 1e30\nfor step in session:steps(50) do session:step(train:next()) end\n",
    );
    d.write("r.lua", &r);
    let o = d.run("r.lua", &[]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(!d.ckpt().exists());
    assert!(d.join("ckpt/full_model.diverged.ckpt").exists());
    assert!(err.contains("no regular checkpoint was written"), "{err}");
}

#[test]
fn fresh_run_keeps_earlier_runs_checkpoint_as_prev() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(3) do session:step(train:next()) end\n");
    d.write("r.lua", &r);
    assert_eq!(code(&d.run("r.lua", &[])), 0);
    let first = ckpt_meta(&d.ckpt());
    let o = d.run("r.lua", &["--seed", "5"]);
    assert_eq!(code(&o), 0);
    assert!(
        stderr(&o).contains("full_model.prev.ckpt"),
        "start of the run says so: {}",
        stderr(&o)
    );
    let prev = ckpt_meta(&d.join("ckpt/full_model.prev.ckpt"));
    assert_eq!(prev["run_id"], first["run_id"]);
    assert_ne!(ckpt_meta(&d.ckpt())["run_id"], first["run_id"]);
}

#[test]
fn stale_temp_files_are_swept_at_start() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(1) do session:step(train:next()) end\n");
    d.write("r.lua", &r);
    // pid 2^22+1 is above the kernel's pid_max default: no such process.
    let stale = d.write("ckpt/.full_model.ckpt.tmp.4194305", "half a checkpoint");
    let o = d.run("r.lua", &[]);
    assert_eq!(code(&o), 0);
    assert!(!stale.exists());
    assert!(stderr(&o).contains("removed a temp file"), "{}", stderr(&o));
}

#[test]
fn save_every_writes_periodic_checkpoints() {
    let d = Dir::new();
    let mut r = setup(&d);
    r.push_str("for step in session:steps(1000000) do session:step(train:next()); print('step ' .. step) end\n");
    d.write("r.lua", &r);
    let out = d.join("out.log");
    let mut cmd = d.run_cmd("r.lua", &["--save-every", "4"]);
    cmd.stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    assert!(wait_for_line(
        &mut child,
        &out,
        "step 9\n",
        Duration::from_secs(60)
    ));
    child.kill().unwrap(); // SIGKILL: no final save, the periodic one must be there
    child.wait().unwrap();
    let m = ckpt_meta(&d.ckpt());
    assert_eq!(m["reason"], "periodic");
    assert!(m["step"].as_u64().unwrap().is_multiple_of(4) && m["step"].as_u64().unwrap() >= 8);
}

#[test]
fn second_ctrl_c_is_acknowledged_third_aborts_and_keeps_previous_checkpoint() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    let r = r#"
local model = wick.model{ dim = 768, n_layers = 3, n_heads = 12, seq_len = 8 }
local session = wick.session{ model = model }
local train = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl' }, batch = 1, seq_len = 8 }
session:step(train:next())
print('ready')
while true do end
"#;
    d.write("r.lua", r);
    // A previous good checkpoint.
    let out = d.join("out.log");
    let log = d.join("err.log");
    let mut child = spawn_logged(
        {
            let mut c = d.run_cmd("r.lua", &[]);
            c.stdout(std::fs::File::create(&out).unwrap());
            c
        },
        &log,
    );
    assert!(wait_for_line(
        &mut child,
        &out,
        "ready",
        Duration::from_secs(120)
    ));
    send(&child, libc::SIGINT);
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(120))
            .unwrap()
            .code(),
        Some(130)
    );
    let before = std::fs::read(d.ckpt()).unwrap();

    let mut c = d.run_cmd("r.lua", &[]);
    c.stdout(std::fs::File::create(&out).unwrap());
    let mut child = spawn_logged(c, &log);
    assert!(wait_for_line(
        &mut child,
        &out,
        "ready",
        Duration::from_secs(120)
    ));
    send(&child, libc::SIGINT);
    assert!(wait_for_line(
        &mut child,
        &log,
        "stopped by SIGINT",
        Duration::from_secs(10)
    ));
    std::thread::sleep(Duration::from_millis(30));
    send(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(30));
    send(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, Duration::from_secs(60)).unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("saving checkpoint, please wait"),
        "second is acknowledged: {err}"
    );
    assert!(err.contains("aborted"), "third aborts: {err}");
    assert!(
        std::fs::read(d.ckpt()).unwrap() == before,
        "previous checkpoint intact"
    );
    assert!(
        temp_files(&d.join("ckpt")).is_empty(),
        "temp file removed on abort"
    );
}
