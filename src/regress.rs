//! `wick test`: scripted regression runs. Finds `*_test.lua` files, lists their
//! `test("name", fn)` cases, and runs each case in its own process (a fresh Lua state and
//! session, its own checkpoint directory, a fixed seed), up to `--jobs` at a time. Each case goes
//! through the same guard as `wick run`, so a failed case leaves its checkpoint for inspection.

use crate::host::context::{RunContext, RunOptions};
use crate::host::{exit, guard, lua, signals};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct TestArgs {
    pub paths: Vec<PathBuf>,
    pub filter: Option<String>,
    pub jobs: usize,
    pub timeout: f64,
    pub seed: u64,
    pub bless: bool,
    pub junit: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
}

struct Case {
    file: PathBuf,
    name: String,
    skip: Option<String>,
}

struct Outcome {
    case: usize,
    passed: bool,
    skipped: bool,
    seconds: f64,
    reason: String,
    checkpoint: Option<PathBuf>,
}

fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("_test.lua"))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut files).map_err(|e| format!("cannot list {}: {e}", p.display()))?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(format!("no such test file or directory: {}", p.display()));
        }
    }
    files.sort();
    if files.is_empty() {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(format!("no *_test.lua files under {}", shown.join(", ")));
    }
    Ok(files)
}

/// A Lua prelude for test files: `test(name, fn)` and `test.skip(name, fn, why)` record cases;
/// `expect` is the stdlib module.
const TEST_PRELUDE: &str = r#"
__wick_cases = {}
test = setmetatable({
  skip = function(name, fn, why) __wick_cases[#__wick_cases + 1] = { name = name, fn = fn, skip = why or "skipped" } end,
}, { __call = function(_, name, fn)
  if type(name) ~= "string" or type(fn) ~= "function" then error("test(name, function() ... end)", 2) end
  __wick_cases[#__wick_cases + 1] = { name = name, fn = fn }
end })
expect = require("wick.expect")
"#;

fn test_options(
    file: &Path,
    ckpt_dir: &Path,
    seed: u64,
    bless: bool,
    (device, dtype): (&str, &str),
) -> Result<RunOptions, String> {
    Ok(RunOptions {
        ckpt_path: ckpt_dir.join("full_model.ckpt"),
        seed,
        compute: crate::device::open(device, dtype)?,
        save_every: None,
        recipe: Some(file.to_path_buf()),
        recipe_hash: None,
        args: Vec::new(),
        quiet: true,
        golden_dir: Some(file.parent().unwrap_or(Path::new(".")).join("golden")),
        bless,
    })
}

/// Load a test file and return the Lua state with its recorded cases.
fn load_file(file: &Path, opts: RunOptions) -> Result<(mlua::Lua, Arc<Mutex<RunContext>>), String> {
    let src = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let ctx = Arc::new(Mutex::new(RunContext::new(opts, None)));
    let lua = lua::new_state(ctx.clone(), Some(file)).map_err(|e| e.to_string())?;
    lua.load(TEST_PRELUDE)
        .set_name("@wick/test-prelude.lua")
        .exec()
        .map_err(|e| e.to_string())?;
    let (ending, _) = guard::run_chunk(&lua, &format!("@{}", file.display()), &src);
    match ending {
        guard::Ending::Completed => Ok((lua, ctx)),
        guard::Ending::Failed(m) => Err(m),
        other => Err(format!("{other:?}")),
    }
}

fn list_cases(file: &Path) -> Result<Vec<(String, Option<String>)>, String> {
    let dir = std::env::temp_dir();
    let (lua, _) = load_file(file, test_options(file, &dir, 0, false, ("cpu", "f32"))?)?;
    let cases: mlua::Table = lua
        .globals()
        .get("__wick_cases")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for c in cases.sequence_values::<mlua::Table>() {
        let c = c.map_err(|e| e.to_string())?;
        out.push((
            c.get::<String>("name").map_err(|e| e.to_string())?,
            c.get::<Option<String>>("skip").map_err(|e| e.to_string())?,
        ));
    }
    Ok(out)
}

/// The child side: run one case under the guard and write its result file.
pub fn run_case(
    file: &Path,
    name: &str,
    ckpt_dir: &Path,
    seed: u64,
    bless: bool,
    device: (&str, &str),
    result: &Path,
) -> i32 {
    crate::progress::set_quiet(true);
    if let Err(e) = signals::install() {
        eprintln!("error: {e}");
        return exit::ERROR;
    }
    let write = |status: &str, message: &str, ctx: Option<&Arc<Mutex<RunContext>>>| {
        let blessed = ctx
            .map(|c| c.lock().map(|c| c.blessed.clone()).unwrap_or_default())
            .unwrap_or_default();
        let ckpt = ckpt_dir.join("full_model.ckpt");
        let v = serde_json::json!({
            "status": status,
            "message": message,
            "checkpoint": if ckpt.exists() { Some(ckpt.display().to_string()) } else { None },
            "blessed": blessed,
        });
        let _ = std::fs::write(result, v.to_string());
    };
    let opts = match test_options(file, ckpt_dir, seed, bless, device) {
        Ok(o) => o,
        Err(e) => {
            write("fail", &e, None);
            return exit::USAGE;
        }
    };
    let (lua, ctx) = match load_file(file, opts) {
        Ok(x) => x,
        Err(e) => {
            write("fail", &e, None);
            return exit::ERROR;
        }
    };
    let f = (|| -> mlua::Result<mlua::Function> {
        let cases: mlua::Table = lua.globals().get("__wick_cases")?;
        for c in cases.sequence_values::<mlua::Table>() {
            let c = c?;
            if c.get::<String>("name")? == name {
                return c.get("fn");
            }
        }
        Err(mlua::Error::runtime(format!(
            "no case named '{name}' in {}",
            file.display()
        )))
    })();
    let f = match f {
        Ok(f) => f,
        Err(e) => {
            write("fail", &e.to_string(), None);
            return exit::USAGE;
        }
    };
    let (ending, _) = guard::run_with(|| f.call::<mlua::MultiValue>(()));
    let message = match &ending {
        guard::Ending::Completed | guard::Ending::ReplExit => String::new(),
        guard::Ending::Failed(m) | guard::Ending::Diverged(m) | guard::Ending::Refused(m) => {
            m.clone()
        }
        guard::Ending::Stopped(sig) => format!("interrupted by {}", signals::signal_name(*sig)),
        guard::Ending::Panicked(m) => format!("wick panicked: {m}"),
    };
    let code = guard::finalize(&lua, &ctx, &ending);
    let status = if code == 0 { "pass" } else { "fail" };
    write(status, &message, Some(&ctx));
    code
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn run(args: TestArgs) -> i32 {
    if let Err(e) = crate::device::open(&args.device, &args.dtype) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let files = match discover(&args.paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = signals::install() {
        eprintln!("error: {e}");
        return exit::ERROR;
    }
    signals::set_repl_mode(true); // a Ctrl+C stops the run cleanly; no save messages here
    let mut cases: Vec<Case> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for file in &files {
        match list_cases(file) {
            Ok(list) => {
                for (name, skip) in list {
                    let full = format!("{}::{name}", file.display());
                    if args
                        .filter
                        .as_ref()
                        .is_some_and(|f| !full.contains(f.as_str()))
                    {
                        continue;
                    }
                    cases.push(Case {
                        file: file.clone(),
                        name,
                        skip,
                    });
                }
            }
            Err(e) => {
                // A file that does not load is one failing case.
                cases.push(Case {
                    file: file.clone(),
                    name: "(file)".into(),
                    skip: None,
                });
                let i = cases.len() - 1;
                println!(
                    "FAIL {}::(file) (0.00 s): {}",
                    file.display(),
                    first_line(&e)
                );
                outcomes.push(Outcome {
                    case: i,
                    passed: false,
                    skipped: false,
                    seconds: 0.0,
                    reason: first_line(&e),
                    checkpoint: None,
                });
            }
        }
    }
    let work_root = std::env::temp_dir().join(format!("wick-test-{}", std::process::id()));
    let mut queue: Vec<usize> = (0..cases.len())
        .filter(|i| !outcomes.iter().any(|o| o.case == *i))
        .rev()
        .collect();
    let mut running: Vec<(usize, Child, Instant, PathBuf, bool)> = Vec::new();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wick"));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.1));
    let mut interrupted = false;
    let mut blessed: Vec<(String, String)> = Vec::new();
    loop {
        if signals::stop_requested() && !interrupted {
            interrupted = true;
            queue.clear();
            for (_, child, _, _, _) in &running {
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            }
        }
        while running.len() < args.jobs.max(1) && !interrupted {
            let Some(i) = queue.pop() else { break };
            let case = &cases[i];
            if let Some(why) = &case.skip {
                println!("skip {}::{} ({why})", case.file.display(), case.name);
                outcomes.push(Outcome {
                    case: i,
                    passed: false,
                    skipped: true,
                    seconds: 0.0,
                    reason: why.clone(),
                    checkpoint: None,
                });
                continue;
            }
            let dir = work_root.join(format!("case{i}"));
            let _ = std::fs::create_dir_all(&dir);
            let log = std::fs::File::create(dir.join("log.txt")).ok();
            let mut cmd = Command::new(&exe);
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
                .stdin(Stdio::null());
            if args.bless {
                cmd.arg("--bless");
            }
            match log {
                Some(f) => {
                    let f2 = f.try_clone().ok();
                    cmd.stderr(f);
                    if let Some(f2) = f2 {
                        cmd.stdout(f2);
                    }
                }
                None => {
                    cmd.stderr(Stdio::null()).stdout(Stdio::null());
                }
            }
            match cmd.spawn() {
                Ok(child) => running.push((i, child, Instant::now(), dir, false)),
                Err(e) => outcomes.push(Outcome {
                    case: i,
                    passed: false,
                    skipped: false,
                    seconds: 0.0,
                    reason: format!("cannot start: {e}"),
                    checkpoint: None,
                }),
            }
        }
        if running.is_empty() && (queue.is_empty() || interrupted) {
            break;
        }
        let mut k = 0;
        while k < running.len() {
            let (i, child, started, dir, timed_out) = &mut running[k];
            if started.elapsed() > timeout && !*timed_out {
                *timed_out = true;
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            if *timed_out && started.elapsed() > timeout + Duration::from_secs(20) {
                let _ = child.kill();
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    let seconds = started.elapsed().as_secs_f64();
                    let result: serde_json::Value =
                        std::fs::read_to_string(dir.join("result.json"))
                            .ok()
                            .and_then(|s| serde_json::from_str(&s).ok())
                            .unwrap_or(serde_json::Value::Null);
                    let passed = status.success() && result["status"] == "pass" && !*timed_out;
                    let mut reason = if *timed_out {
                        format!("timed out after {:.0} s", args.timeout)
                    } else {
                        first_line(result["message"].as_str().unwrap_or(""))
                    };
                    if !passed && reason.is_empty() {
                        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap_or_default();
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
                    let checkpoint = result["checkpoint"].as_str().map(PathBuf::from);
                    let case = &cases[*i];
                    if passed {
                        println!(
                            "ok   {}::{} ({seconds:.2} s)",
                            case.file.display(),
                            case.name
                        );
                        let _ = std::fs::remove_dir_all(&*dir);
                    } else {
                        let at = checkpoint
                            .as_ref()
                            .map(|p| format!(" [checkpoint: {}]", p.display()))
                            .unwrap_or_default();
                        println!(
                            "FAIL {}::{} ({seconds:.2} s): {reason}{at}",
                            case.file.display(),
                            case.name
                        );
                    }
                    outcomes.push(Outcome {
                        case: *i,
                        passed,
                        skipped: false,
                        seconds,
                        reason,
                        checkpoint,
                    });
                    running.remove(k);
                }
                _ => k += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for (name, status) in &blessed {
        if status != "unchanged" {
            println!("golden {name}: {status}");
        }
    }
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let skipped = outcomes.iter().filter(|o| o.skipped).count();
    let failed = outcomes.len() - passed - skipped;
    let _ = std::fs::remove_dir(&work_root);
    if interrupted {
        println!(
            "interrupted: {} of {} cases ran",
            outcomes.len(),
            cases.len()
        );
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if let Some(path) = &args.junit {
        let total: f64 = outcomes.iter().map(|o| o.seconds).sum();
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"wick\" tests=\"{}\" failures=\"{failed}\" skipped=\"{skipped}\" time=\"{total:.3}\">\n",
            outcomes.len()
        );
        for o in &outcomes {
            let c = &cases[o.case];
            xml += &format!(
                "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(&c.file.display().to_string()),
                xml_escape(&c.name),
                o.seconds
            );
            if o.passed {
                xml += "/>\n";
            } else if o.skipped {
                xml += &format!(
                    "><skipped message=\"{}\"/></testcase>\n",
                    xml_escape(&o.reason)
                );
            } else {
                let at = o
                    .checkpoint
                    .as_ref()
                    .map(|p| format!("\ncheckpoint: {}", p.display()))
                    .unwrap_or_default();
                xml += &format!(
                    "><failure message=\"{}\">{}{}</failure></testcase>\n",
                    xml_escape(&o.reason),
                    xml_escape(&o.reason),
                    xml_escape(&at)
                );
            }
        }
        xml += "</testsuite>\n</testsuites>\n";
        if let Err(e) = std::fs::write(path, xml) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return exit::USAGE;
        }
    }
    if interrupted {
        return signals::exit_code(signals::received().unwrap_or(libc::SIGINT));
    }
    if failed > 0 {
        1
    } else {
        0
    }
}
