//! Helpers for tests that drive the real `wick` binary: temp dirs, recipes, data, signals, and
//! reading checkpoints back with the plain `safetensors` crate.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn wick_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wick")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }
    pub fn write_bytes(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }
    pub fn ckpt(&self) -> PathBuf {
        self.join("ckpt/full_model.ckpt")
    }
    /// A command running `wick run RECIPE --ckpt-dir <dir>/ckpt` inside the temp dir.
    pub fn run_cmd(&self, recipe: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(wick_bin());
        c.current_dir(self.path())
            .arg("run")
            .arg(recipe)
            .arg("--ckpt-dir")
            .arg(self.join("ckpt"))
            .args(extra)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null());
        // If the test thread dies (a failed assertion), its wick dies with it instead of
        // spinning on after the test run.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c
    }
    pub fn run(&self, recipe: &str, extra: &[&str]) -> Output {
        self.run_cmd(recipe, extra).output().expect("run wick")
    }
    /// A small text corpus in a jsonl file (enough for a few hundred tiny batches).
    pub fn corpus(&self, name: &str, docs: usize) -> PathBuf {
        let mut s = String::new();
        for i in 0..docs {
            let text = format!(
                "Document {i}. The quick brown fox jumps over the lazy dog; all work and no play makes jack a dull boy. {}\n",
                "abcdefghij".repeat(i % 7 + 1)
            );
            s.push_str(
                &serde_json::json!({"text": text, "meta": {"redpajama_set_name": "RedPajamaBook"}})
                    .to_string(),
            );
            s.push('\n');
        }
        self.write(name, &s)
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A recipe header that builds a very small model, session and loader on `data`.
pub fn tiny_setup(data: &str, lr: f64) -> String {
    format!(
        r#"
local model = wick.model{{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }}
local session = wick.session{{ model = model, optim = wick.optim.adamw{{ lr = {lr} }} }}
local train = wick.data.loader{{ source = wick.data.jsonl{{ "{data}" }}, batch = 2, seq_len = 16 }}
"#
    )
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Checkpoint metadata, via the plain safetensors crate (as any reader would see it).
pub fn ckpt_meta(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let m = md.metadata().as_ref().expect("metadata");
    serde_json::from_str(m.get("wick").expect("wick metadata")).unwrap()
}

/// All tensors of a checkpoint as raw bytes, by name.
pub fn ckpt_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

pub fn wait_for_line(child: &mut Child, path: &Path, needle: &str, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.contains(needle) {
                return true;
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

pub fn send(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    None
}

/// Run `cmd` with `input` on its stdin (then closed), collecting stdout and stderr.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wick");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("wait for wick")
}

/// Spawn with stderr to a file (readable while the process runs).
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    cmd.stderr(Stdio::from(f));
    cmd.spawn().expect("spawn wick")
}

pub fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

pub fn append(path: &Path, s: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

/// `wick inspect` exit code and output.
pub fn inspect(path: &Path) -> Output {
    Command::new(wick_bin())
        .arg("inspect")
        .arg(path)
        .output()
        .unwrap()
}

/// Start `cmd` on a fresh pseudo-terminal that becomes its controlling terminal (stdin,
/// stdout and stderr on it), as a terminal window, sshd or tmux would. Returns the child and
/// the terminal's controlling side: dropping that hangs the terminal up (the kernel sends
/// SIGHUP and later writes fail with EIO), as closing the window or losing the connection does.
pub fn spawn_on_pty(mut cmd: Command) -> (Child, std::fs::File) {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: plain libc calls on fds this function owns.
    unsafe {
        let r = libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(r, 0, "openpty");
        // The child must not hold the controlling side open, or closing ours hangs nothing up.
        libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
        cmd.stdin(Stdio::from(OwnedFd::from_raw_fd(libc::dup(slave))))
            .stdout(Stdio::from(OwnedFd::from_raw_fd(libc::dup(slave))))
            .stderr(Stdio::from(OwnedFd::from_raw_fd(libc::dup(slave))));
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn on a pty");
    drop(cmd); // closes the parent's copies of the terminal side
               // SAFETY: `slave` and `master` are ours; the child has its own copies of the terminal side.
    unsafe { libc::close(slave) };
    (child, unsafe { std::fs::File::from_raw_fd(master) })
}

/// Read what the terminal shows until `needle` appears (true) or `timeout` passes.
pub fn read_pty_until(master: &mut std::fs::File, needle: &str, timeout: Duration) -> bool {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < timeout {
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match master.read(&mut buf) {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
        if String::from_utf8_lossy(&seen).contains(needle) {
            return true;
        }
    }
    false
}

/// A random schedule's seed: `WICK_STRESS_SEED` replays a failure; otherwise the clock.
/// Printed, so a failing run says how to replay it.
pub fn stress_seed() -> u64 {
    let seed = std::env::var("WICK_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random schedule seed {seed} (replay with WICK_STRESS_SEED={seed})");
    seed
}

/// Root ignores permissions: under root, run `cmd` as nobody so a read-only directory is
/// really read-only to it.
pub fn as_nobody_if_root(cmd: &mut Command) {
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
