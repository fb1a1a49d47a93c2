//! Running cases as child processes, `--jobs` at a time: start each, enforce the timeout,
//! collect its result file, print its line; a Ctrl+C stops the queue and the running cases.

use super::{first_line, Case, Outcome, TestArgs};
use crate::host::signals;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the whole run saw besides the outcomes.
pub struct Ran {
    pub interrupted: bool,
    /// Golden files written under --bless: (name, "new" | "changed" | "unchanged").
    pub blessed: Vec<(String, String)>,
}

struct Running {
    case: usize,
    child: Child,
    started: Instant,
    dir: PathBuf,
    timed_out: bool,
}

fn spawn(exe: &Path, case: &Case, dir: &Path, args: &TestArgs) -> std::io::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("log.txt"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("test-case")
        .arg(&case.file)
        .arg("--case")
        .arg(&case.name)
        .arg("--ckpt-dir")
        .arg(dir.join("ckpt"))
        .arg("--seed")
        .arg(args.seed.to_string())
        .arg("--device")
        .arg(&args.device)
        .arg("--dtype")
        .arg(&args.dtype)
        .arg("--result")
        .arg(dir.join("result.json"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if args.bless {
        cmd.arg("--bless");
    }
    cmd.spawn()
}

/// The outcome of a finished child, from its exit status and result file.
fn finish(
    r: &Running,
    status: std::process::ExitStatus,
    args: &TestArgs,
    blessed: &mut Vec<(String, String)>,
) -> Outcome {
    let seconds = r.started.elapsed().as_secs_f64();
    let result: serde_json::Value = std::fs::read_to_string(r.dir.join("result.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let passed = status.success() && result["status"] == "pass" && !r.timed_out;
    let mut reason = if r.timed_out {
        format!("timed out after {:.0} s", args.timeout)
    } else {
        first_line(result["message"].as_str().unwrap_or(""))
    };
    if !passed && reason.is_empty() {
        let log = std::fs::read_to_string(r.dir.join("log.txt")).unwrap_or_default();
        reason = format!(
            "exit {:?}: {}",
            status.code(),
            log.lines().last().unwrap_or("")
        );
    }
    if let Some(list) = result["blessed"].as_array() {
        for b in list {
            if let (Some(n), Some(s)) = (b[0].as_str(), b[1].as_str()) {
                blessed.push((n.to_string(), s.to_string()));
            }
        }
    }
    Outcome {
        case: r.case,
        passed,
        skipped: false,
        seconds,
        reason,
        checkpoint: result["checkpoint"].as_str().map(PathBuf::from),
    }
}

fn print_outcome(case: &Case, o: &Outcome) {
    if o.passed {
        crate::outln!(
            "ok   {}::{} ({:.2} s)",
            case.file.display(),
            case.name,
            o.seconds
        );
    } else {
        let at = o
            .checkpoint
            .as_ref()
            .map(|p| format!(" [checkpoint: {}]", p.display()))
            .unwrap_or_default();
        crate::outln!(
            "FAIL {}::{} ({:.2} s): {}{at}",
            case.file.display(),
            case.name,
            o.seconds,
            o.reason
        );
    }
}

/// Run every case that has no outcome yet.
pub fn run_all(cases: &[Case], outcomes: &mut Vec<Outcome>, args: &TestArgs) -> Ran {
    let work_root = std::env::temp_dir().join(format!("wick-test-{}", std::process::id()));
    let mut queue: Vec<usize> = (0..cases.len())
        .filter(|i| !outcomes.iter().any(|o| o.case == *i))
        .rev()
        .collect();
    let mut running: Vec<Running> = Vec::new();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wick"));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.1));
    let mut ran = Ran {
        interrupted: false,
        blessed: Vec::new(),
    };
    loop {
        if signals::stop_requested() && !ran.interrupted {
            ran.interrupted = true;
            queue.clear();
            for r in &running {
                // SAFETY: a plain kill(2) on our own child.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGINT) };
            }
        }
        while running.len() < args.jobs() && !ran.interrupted {
            let Some(i) = queue.pop() else { break };
            let case = &cases[i];
            if let Some(why) = &case.skip {
                crate::outln!("skip {}::{} ({why})", case.file.display(), case.name);
                outcomes.push(Outcome {
                    skipped: true,
                    ..Outcome::failed(i, why.clone())
                });
                continue;
            }
            let dir = work_root.join(format!("case{i}"));
            match spawn(&exe, case, &dir, args) {
                Ok(child) => running.push(Running {
                    case: i,
                    child,
                    started: Instant::now(),
                    dir,
                    timed_out: false,
                }),
                Err(e) => outcomes.push(Outcome::failed(i, format!("cannot start: {e}"))),
            }
        }
        if running.is_empty() && (queue.is_empty() || ran.interrupted) {
            break;
        }
        let mut k = 0;
        while k < running.len() {
            let r = &mut running[k];
            if r.started.elapsed() > timeout && !r.timed_out {
                r.timed_out = true;
                // SAFETY: a plain kill(2) on our own child.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
            }
            if r.timed_out && r.started.elapsed() > timeout + Duration::from_secs(20) {
                let _ = r.child.kill();
            }
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    let o = finish(r, status, args, &mut ran.blessed);
                    print_outcome(&cases[r.case], &o);
                    if o.passed {
                        let _ = std::fs::remove_dir_all(&r.dir);
                    }
                    outcomes.push(o);
                    running.remove(k);
                }
                _ => k += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir(&work_root);
    ran
}
