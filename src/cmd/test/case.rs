//! One regression case, in its own process (`wick test-case`, started by the runner): a fresh
//! run set up like `wick run`, the test file loaded, the named case called under the guard,
//! and a result file written for the runner.

use crate::error::{exit, Error, Result};
use crate::run::guard::{self, Ending};
use crate::run::SharedContext;
use crate::setup::{self, RunSpec};
use std::path::{Path, PathBuf};

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

/// How the runner asks a case to run.
pub struct CaseRun {
    pub ckpt_dir: PathBuf,
    pub seed: u64,
    pub bless: bool,
    pub device: String,
    pub dtype: String,
}

fn spec(file: &Path, src: String, run: &CaseRun, owns_dir: bool) -> RunSpec {
    RunSpec {
        device: run.device.clone(),
        dtype: run.dtype.clone(),
        seed: run.seed,
        recipe: Some((file.to_path_buf(), src)),
        quiet: true,
        golden_dir: Some(file.parent().unwrap_or(Path::new(".")).join("golden")),
        bless: run.bless,
        owns_dir,
        ..RunSpec::new(&run.ckpt_dir)
    }
}

/// Load a test file into a fresh run; its cases are in `__wick_cases`.
fn load_file(file: &Path, run: &CaseRun, owns_dir: bool) -> Result<setup::Run> {
    let src = std::fs::read_to_string(file)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", file.display())))?;
    let r = setup::open(&spec(file, src.clone(), run, owns_dir))?;
    r.lua
        .load(TEST_PRELUDE)
        .set_name("@wick/test-prelude.lua")
        .exec()
        .map_err(|e| Error::failed(e.to_string()))?;
    match guard::run_chunk(&r.lua, &format!("@{}", file.display()), &src).0 {
        Ending::Completed => Ok(r),
        Ending::Failed(m) => Err(Error::failed(m)),
        other => Err(Error::failed(format!("{other:?}"))),
    }
}

/// The cases of a test file: (name, reason to skip).
pub fn list_cases(file: &Path) -> Result<Vec<(String, Option<String>)>> {
    let run = CaseRun {
        ckpt_dir: std::env::temp_dir(),
        seed: 0,
        bless: false,
        device: "cpu".into(),
        dtype: "f32".into(),
    };
    let r = load_file(file, &run, false)?;
    let read = || -> mlua::Result<Vec<(String, Option<String>)>> {
        let cases: mlua::Table = r.lua.globals().get("__wick_cases")?;
        cases
            .sequence_values::<mlua::Table>()
            .map(|c| {
                let c = c?;
                Ok((c.get("name")?, c.get("skip")?))
            })
            .collect()
    };
    read().map_err(|e| Error::failed(e.to_string()))
}

fn find_case(lua: &mlua::Lua, file: &Path, name: &str) -> mlua::Result<mlua::Function> {
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
}

/// The child side: run one case under the guard and write its result file.
pub fn run_case(file: &Path, name: &str, run: CaseRun, result: &Path) -> Result<i32> {
    crate::host::progress::set_quiet(true);
    let write = |status: &str, message: &str, ctx: Option<&SharedContext>| {
        let blessed = ctx
            .map(|c| c.lock().map(|c| c.blessed.clone()).unwrap_or_default())
            .unwrap_or_default();
        let ckpt = setup::ckpt_path(&run.ckpt_dir);
        let v = serde_json::json!({
            "status": status,
            "message": message,
            "checkpoint": if ckpt.exists() { Some(ckpt.display().to_string()) } else { None },
            "blessed": blessed,
        });
        let _ = std::fs::write(result, v.to_string());
    };
    let r = match load_file(file, &run, true) {
        Ok(r) => r,
        Err(e) => {
            write("fail", &e.message, None);
            return Err(e);
        }
    };
    let f = match find_case(&r.lua, file, name) {
        Ok(f) => f,
        Err(e) => {
            write("fail", &e.to_string(), None);
            return Err(Error::usage(e.to_string()));
        }
    };
    let (ending, _) = guard::run_with(|| f.call::<mlua::MultiValue>(()));
    let message = match &ending {
        Ending::Completed | Ending::ReplExit => String::new(),
        Ending::Failed(m) | Ending::Diverged(m) | Ending::Refused(m) | Ending::PeerLost(m) => {
            m.clone()
        }
        Ending::Stopped(sig) => {
            format!("interrupted by {}", crate::host::signals::signal_name(*sig))
        }
        Ending::Panicked(m) => format!("wick panicked: {m}"),
        Ending::Exit(code) => format!("the case called os.exit({code})"),
    };
    let code = guard::finalize(&r.lua, &r.ctx, &ending);
    let status = if code == exit::OK { "pass" } else { "fail" };
    write(status, &message, Some(&r.ctx));
    Ok(code)
}
