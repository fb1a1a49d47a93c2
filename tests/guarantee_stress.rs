//! Randomised stops and kill -9 during large writes: the guarantee holds at every instant.
mod common;
use common::*;
use std::time::Duration;

/// A tiny xorshift so the schedule of signals is random but reproducible from the printed seed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MODES: &[(&str, &str)] = &[
    ("steps", "for step in session:steps(1000000) do session:step(train:next()) end\n"),
    ("pure-lua", "for step in session:steps(3) do session:step(train:next()) end\nlocal x = 0 while true do x = x + 1 end\n"),
    ("pcall", "while true do pcall(function() session:step(train:next()) end) end\n"),
    ("xpcall", "while true do xpcall(function() session:step(train:next()) local y = 0 for i = 1, 5000 do y = y + i end end, function(e) return e end) end\n"),
    ("coroutine", "local co = coroutine.wrap(function() while true do session:step(train:next()) coroutine.yield() end end)\nwhile true do co() end\n"),
    ("eval", "for step in session:steps(2) do session:step(train:next()) end\nwhile true do session:eval(val, 20) end\n"),
    ("loading", "while true do local l = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl' }, batch = 4, seq_len = 16, name = 'l' .. math.random(1e9) } l:next() session:step(l:next()) end\n"),
];

/// How a run in the random mix is ended.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Signal(i32),
    /// Its terminal is closed (SIGHUP, then every write to it fails).
    TerminalClosed,
    /// stderr's reader exits, then a SIGTERM stops the run.
    StderrReaderExits,
    /// stdout's reader exits while the recipe prints, then a SIGTERM stops the run.
    StdoutReaderExits,
}

const ENDINGS: &[Ending] = &[
    Ending::Signal(libc::SIGINT),
    Ending::Signal(libc::SIGTERM),
    Ending::TerminalClosed,
    Ending::StderrReaderExits,
    Ending::StdoutReaderExits,
];

/// Start the run for `ending`; returns the child, what to drop to end the output (the
/// terminal or a pipe's reader), and where stderr can be read afterwards.
fn start(
    d: &Dir,
    ending: Ending,
) -> (
    std::process::Child,
    Option<Box<dyn std::any::Any>>,
    std::path::PathBuf,
) {
    use std::process::Stdio;
    let out = d.join("out.log");
    let log = d.join("err.log");
    let mut cmd = d.run_cmd("r.lua", &[]);
    let ready_timeout = Duration::from_secs(30);
    match ending {
        Ending::Signal(_) => {
            cmd.stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::fs::File::create(&log).unwrap());
            let mut child = cmd.spawn().unwrap();
            assert!(wait_for_line(&mut child, &out, "ready", ready_timeout));
            (child, None, log)
        }
        Ending::TerminalClosed => {
            let (child, mut terminal) = spawn_on_pty(cmd);
            assert!(read_pty_until(&mut terminal, "ready", ready_timeout));
            (child, Some(Box::new(terminal)), d.join("ckpt/wick.log"))
        }
        Ending::StderrReaderExits | Ending::StdoutReaderExits => {
            let to_stderr = matches!(ending, Ending::StderrReaderExits);
            if to_stderr {
                cmd.stdout(std::fs::File::create(&out).unwrap())
                    .stderr(Stdio::piped());
            } else {
                cmd.stdout(Stdio::piped()).stderr(Stdio::null());
            }
            let mut child = cmd.spawn().unwrap();
            let reader: Box<dyn std::any::Any> = if to_stderr {
                assert!(wait_for_line(&mut child, &out, "ready", ready_timeout));
                Box::new(child.stderr.take().unwrap())
            } else {
                let mut o = child.stdout.take().unwrap();
                let mut first = [0u8; 5];
                std::io::Read::read_exact(&mut o, &mut first).unwrap();
                Box::new(o)
            };
            (child, Some(reader), d.join("ckpt/wick.log"))
        }
    }
}

#[test]
fn fifty_random_endings_each_end_with_the_right_code_and_a_loadable_checkpoint() {
    let mut rng = Lcg(stress_seed() | 1);
    let d = Dir::new();
    d.corpus("data.jsonl", 300);
    for run in 0..50 {
        let ending = ENDINGS[rng.below(ENDINGS.len() as u64) as usize];
        let (mode, body) = match ending {
            // The recipe keeps printing, so writes hit the broken pipe.
            Ending::StdoutReaderExits => ("printing", "for step in session:steps(1000000) do session:step(train:next()) print('step', step) io.write('more\\n') end\n"),
            _ => MODES[rng.below(MODES.len() as u64) as usize],
        };
        let delay = rng.below(400);
        let mut r = String::from("print('ready')\n");
        r.push_str(&tiny_setup("data.jsonl", 1e-3));
        r.push_str("local val = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl' }, batch = 2, seq_len = 16, name = 'val' }\n");
        r.push_str(body);
        d.write("r.lua", &r);
        let _ = std::fs::remove_dir_all(d.join("ckpt"));
        let (mut child, output, log) = start(&d, ending);
        std::thread::sleep(Duration::from_millis(delay));
        let sig = match ending {
            Ending::Signal(sig) => {
                send(&child, sig);
                sig
            }
            Ending::TerminalClosed => {
                drop(output);
                libc::SIGHUP
            }
            Ending::StderrReaderExits | Ending::StdoutReaderExits => {
                drop(output);
                std::thread::sleep(Duration::from_millis(rng.below(200)));
                send(&child, libc::SIGTERM);
                libc::SIGTERM
            }
        };
        let status = wait_timeout(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("run {run} ({mode}, {ending:?}) did not stop"));
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        let ctx = format!("run {run} mode {mode} ending {ending:?} delay {delay}ms:\n{err}");
        assert_eq!(status.code(), Some(128 + sig), "{ctx}");
        assert!(!err.contains("panicked"), "{ctx}");
        if d.ckpt().exists() {
            let m = ckpt_meta(&d.ckpt());
            assert_eq!(m["reason"], "interrupted", "{ctx}");
            let line = format!("at step {} (reason interrupted", m["step"]);
            assert!(err.contains(&line), "printed step matches the file: {ctx}");
            assert_eq!(code(&inspect(&d.ckpt())), 0, "{ctx}");
        } else {
            // Stopped before a step (or before the session existed): nothing to save.
            assert!(
                err.contains("no step was trained") || err.contains("nothing to save"),
                "{ctx}"
            );
        }
    }
}

/// A model whose checkpoint is a few hundred MB, so a write takes a while.
const BIG: &str = r#"
local model = wick.model{ dim = 768, n_layers = 3, n_heads = 12, seq_len = 8 }
local session = wick.session{ model = model }
local train = wick.data.loader{ source = wick.data.jsonl{ 'data.jsonl' }, batch = 1, seq_len = 8 }
session:step(train:next())
print('saving')
while true do session:step(train:next()) wick.save() print('saved') end
"#;

#[test]
fn kill_9_during_large_writes_never_leaves_a_torn_checkpoint() {
    let d = Dir::new();
    d.corpus("data.jsonl", 50);
    d.write("big.lua", BIG);
    let mut rng = Lcg(stress_seed() | 1);
    // A first good checkpoint.
    let out = d.join("out.log");
    let mut cmd = d.run_cmd("big.lua", &[]);
    cmd.stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    assert!(wait_for_line(
        &mut child,
        &out,
        "saved",
        Duration::from_secs(120)
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    let size = std::fs::metadata(d.ckpt()).unwrap().len();
    assert!(size > 200_000_000, "checkpoint is large: {size}");
    let mut torn_tmp_seen = 0;
    for i in 0..30 {
        let mut cmd = d.run_cmd("big.lua", &[]);
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        assert!(
            wait_for_line(&mut child, &out, "saving", Duration::from_secs(120)),
            "iteration {i}"
        );
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        child.kill().unwrap();
        child.wait().unwrap();
        if std::fs::read_dir(d.join("ckpt"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp."))
        {
            torn_tmp_seen += 1;
        }
        let o = inspect(&d.ckpt());
        assert_eq!(
            code(&o),
            0,
            "iteration {i}: checkpoint must load: {}",
            stderr(&o)
        );
    }
    eprintln!("{torn_tmp_seen} of 30 kills landed during a write (temp file left)");
    assert!(
        torn_tmp_seen > 0,
        "no kill landed inside a write; the test did not test anything"
    );
    // The next run sweeps temp files left by killed writers.
    let ckdir = d.join("ckpt");
    let has_tmp = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp."))
    };
    if !has_tmp(&ckdir) {
        d.write("ckpt/.full_model.ckpt.tmp.4194305", "torn");
    }
    d.write("hello.lua", "print('hello')\n");
    let o = d.run("hello.lua", &[]);
    assert_eq!(code(&o), 0);
    assert!(!has_tmp(&ckdir), "temp files swept");
}
