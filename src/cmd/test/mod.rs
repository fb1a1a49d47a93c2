//! `wick test`: scripted regression runs. Finds `*_test.lua` files, lists their
//! `test("name", fn)` cases, and runs each case in its own process (a fresh Lua state and
//! session, its own checkpoint directory, a fixed seed), up to `--jobs` at a time. Each case goes
//! through the same setup and guard as `wick run`, so a failed case leaves its checkpoint for
//! inspection.

pub mod case;
mod report;
mod schedule;

use crate::error::{exit, Error, Result};
use crate::host::signals;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Test files or directories (default: tests/regress, else tests, else the current
    /// directory).
    pub paths: Vec<PathBuf>,
    /// Only cases whose "file::name" contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Cases run at once (default: the number of cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Seconds a case may run before it is stopped and failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Write or update golden files instead of comparing with them.
    #[arg(long)]
    pub bless: bool,
    /// Also write a JUnit XML report.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Compute device for every case: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype for every case: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl TestArgs {
    /// Cases run at once: `--jobs`, else the number of cores.
    pub fn jobs(&self) -> usize {
        self.jobs
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1)
    }
}

pub struct Case {
    pub file: PathBuf,
    pub name: String,
    pub skip: Option<String>,
}

pub struct Outcome {
    pub case: usize,
    pub passed: bool,
    pub skipped: bool,
    pub seconds: f64,
    pub reason: String,
    pub checkpoint: Option<PathBuf>,
}

impl Outcome {
    fn failed(case: usize, reason: String) -> Outcome {
        Outcome {
            case,
            passed: false,
            skipped: false,
            seconds: 0.0,
            reason,
            checkpoint: None,
        }
    }
}

/// Where `wick test` looks when given no paths: the project's regression suite if there is
/// one, else its tests, else everything under the current directory.
fn default_paths() -> Vec<PathBuf> {
    let dir = ["tests/regress", "tests"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("."));
    vec![dir]
}

fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            // Build outputs, checkpoints and hidden folders hold no test files of the user's.
            let skipped = name
                .as_deref()
                .is_some_and(|n| n.starts_with('.') || n == "target" || n == "node_modules");
            if p.is_dir() && !skipped {
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
            walk(p, &mut files)
                .map_err(|e| Error::usage(format!("cannot list {}: {e}", p.display())))?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::usage(format!(
                "no such test file or directory: {}",
                p.display()
            )));
        }
    }
    // `wick test` in a project: show `t/a_test.lua`, not `./t/a_test.lua`.
    let mut files: Vec<PathBuf> = files
        .into_iter()
        .map(|f| f.strip_prefix(".").map(Path::to_path_buf).unwrap_or(f))
        .collect();
    files.sort();
    if files.is_empty() {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::usage(format!(
            "no *_test.lua files under {}",
            shown.join(", ")
        )));
    }
    Ok(files)
}

pub fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The cases of every file that pass the filter; a file that does not load is one failing case.
fn collect_cases(files: &[PathBuf], filter: Option<&str>) -> (Vec<Case>, Vec<Outcome>) {
    let mut cases: Vec<Case> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for file in files {
        match case::list_cases(file) {
            Ok(list) => {
                for (name, skip) in list {
                    let full = format!("{}::{name}", file.display());
                    if filter.is_some_and(|f| !full.contains(f)) {
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
                cases.push(Case {
                    file: file.clone(),
                    name: "(file)".into(),
                    skip: None,
                });
                let reason = first_line(&e.message);
                crate::outln!("FAIL {}::(file) (0.00 s): {reason}", file.display());
                outcomes.push(Outcome::failed(cases.len() - 1, reason));
            }
        }
    }
    (cases, outcomes)
}

pub fn run(args: TestArgs) -> Result<i32> {
    crate::device::open(&args.device, &args.dtype).map_err(Error::usage)?;
    let paths = if args.paths.is_empty() {
        default_paths()
    } else {
        args.paths.clone()
    };
    let files = discover(&paths)?;
    signals::install()?;
    signals::set_repl_mode(true); // a Ctrl+C stops the run cleanly; no save messages here
    let (cases, mut outcomes) = collect_cases(&files, args.filter.as_deref());
    let ran = schedule::run_all(&cases, &mut outcomes, &args);
    let counts = report::summary(&cases, &outcomes, &ran);
    if let Some(path) = &args.junit {
        report::write_junit(path, &cases, &outcomes)?;
    }
    if ran.interrupted {
        return Ok(signals::exit_code(
            signals::received().unwrap_or(libc::SIGINT),
        ));
    }
    Ok(if counts.failed > 0 {
        exit::ERROR
    } else {
        exit::OK
    })
}
