//! `wick repl`: a Lua prompt on the same host and session API the recipes use. Line editing,
//! history, completion (globals, fields, userdata methods), multi-line input, results printed
//! without `print`, `:help` from the LuaLS annotations, and the checkpoint guarantee on exit.

use crate::host::checkpointing::{self, SaveResult};
use crate::host::context::{RunContext, RunOptions, SharedContext};
use crate::host::guard::{self, Ending};
use crate::host::{exit, lua as host_lua, signals};
use mlua::{Lua, ObjectLike, Value};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::{Context, Editor, Helper, Highlighter, Hinter, Validator};
use std::collections::HashSet;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const COMMANDS: &[&str] = &[":help", ":load", ":save", ":time", ":reset", ":quit"];
const KEYWORDS: &[&str] = &[
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

#[derive(Helper, Highlighter, Hinter, Validator)]
struct LuaHelper {
    lua: Arc<Mutex<Lua>>,
}

impl Completer for LuaHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        if before.starts_with(':') && !before.contains(' ') {
            let c = COMMANDS
                .iter()
                .filter(|c| c.starts_with(before))
                .map(|c| pair(c))
                .collect();
            return Ok((0, c));
        }
        let start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '.' || *c == ':'))
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let expr = &before[start..];
        let Ok(lua) = self.lua.lock() else {
            return Ok((pos, vec![]));
        };
        let (base, sep, partial) = match expr.rfind(['.', ':']) {
            Some(i) => (&expr[..i], &expr[i..i + 1], &expr[i + 1..]),
            None => ("", "", expr),
        };
        let names = if base.is_empty() {
            let mut n: Vec<String> = table_keys(&Value::Table(lua.globals()), false);
            n.extend(KEYWORDS.iter().map(|s| s.to_string()));
            n
        } else {
            match resolve(&lua, base) {
                Some(v) => members(&v, sep == ":"),
                None => vec![],
            }
        };
        let mut seen = HashSet::new();
        let mut c: Vec<Pair> = names
            .into_iter()
            .filter(|n| n.starts_with(partial) && !n.starts_with("__") && seen.insert(n.clone()))
            .map(|n| Pair {
                display: n.clone(),
                replacement: format!("{base}{sep}{n}"),
            })
            .collect();
        c.sort_by(|a, b| a.display.cmp(&b.display));
        Ok((start, c))
    }
}

fn pair(s: &str) -> Pair {
    Pair {
        display: s.to_string(),
        replacement: s.to_string(),
    }
}

/// Walk `a.b.c` from the globals through tables (and userdata fields).
fn resolve(lua: &Lua, path: &str) -> Option<Value> {
    let mut v = Value::Table(lua.globals());
    for part in path.split(['.', ':']) {
        v = match &v {
            Value::Table(t) => t.raw_get::<Value>(part).ok()?,
            Value::UserData(ud) => ud.get::<Value>(part).ok()?,
            _ => return None,
        };
        if v.is_nil() {
            return None;
        }
    }
    Some(v)
}

fn table_keys(v: &Value, functions_only: bool) -> Vec<String> {
    let Value::Table(t) = v else { return vec![] };
    t.pairs::<Value, Value>()
        .flatten()
        .filter(|(_, val)| !functions_only || matches!(val, Value::Function(_)))
        .filter_map(|(k, _)| {
            k.as_string()
                .and_then(|s| s.to_str().ok().map(|s| s.to_string()))
        })
        .collect()
}

/// The documented class of a wick object, from its printed form (`wick.session(...)`).
fn class_of(v: &Value) -> Option<&'static str> {
    let Value::UserData(ud) = v else { return None };
    let mt = ud.metatable().ok()?;
    let f: mlua::Function = mt.get("__tostring").ok()?;
    let s: String = f.call(ud.clone()).ok()?;
    let prefix = s.split('(').next().unwrap_or("");
    Some(match prefix {
        "wick.model" => "wick.Model",
        "wick.session" => "wick.Session",
        "wick.data.loader" => "wick.Loader",
        "wick.batch" => "wick.Batch",
        "wick.tokenizer" => "wick.Tokenizer",
        "wick.data.source" => "wick.Source",
        "wick.tensor" => "wick.Tensor",
        _ => return None,
    })
}

fn members(v: &Value, methods_only: bool) -> Vec<String> {
    if let Some(class) = class_of(v) {
        return crate::docs::members(class)
            .into_iter()
            .filter(|(_, m)| *m || !methods_only)
            .map(|(n, _)| n)
            .collect();
    }
    // A table: its keys, and those of its metatable's __index table (objects made in Lua).
    let mut keys = table_keys(v, methods_only);
    if let Value::Table(t) = v {
        if let Some(mt) = t.metatable() {
            if let Ok(idx @ Value::Table(_)) = mt.raw_get::<Value>("__index") {
                keys.extend(table_keys(&idx, methods_only));
            }
        }
    }
    keys
}

/// Pretty-print a value: sorted keys, cycles marked, depth-limited; wick objects by __tostring.
pub fn pretty(
    v: &Value,
    depth: usize,
    seen: &mut Vec<*const std::ffi::c_void>,
    top: bool,
) -> String {
    match v {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 1e15 {
                format!("{n:.1}")
            } else {
                format!("{n}")
            }
        }
        Value::String(s) => {
            let s = s.to_string_lossy();
            if top {
                s
            } else {
                format!("{s:?}")
            }
        }
        Value::Table(t) => {
            let ptr = t.to_pointer();
            if seen.contains(&ptr) {
                return "<cycle>".into();
            }
            if depth >= 4 {
                return "{...}".into();
            }
            seen.push(ptr);
            let mut entries: Vec<(Value, Value)> = t.pairs::<Value, Value>().flatten().collect();
            let n = t.raw_len();
            let is_array = entries.len() == n && n > 0;
            let out = if entries.is_empty() {
                "{}".to_string()
            } else if is_array {
                let items: Vec<String> = (1..=n)
                    .map(|i| pretty(&t.raw_get(i).unwrap_or(Value::Nil), depth + 1, seen, false))
                    .collect();
                let one = format!("{{ {} }}", items.join(", "));
                if one.len() <= 100 || n > 200 {
                    if n > 200 {
                        format!("{{ {}, ... ({n} items) }}", items[..20].join(", "))
                    } else {
                        one
                    }
                } else {
                    let pad = "  ".repeat(depth + 1);
                    format!(
                        "{{\n{pad}{}\n{}}}",
                        items.join(&format!(",\n{pad}")),
                        "  ".repeat(depth)
                    )
                }
            } else {
                entries.sort_by_key(|a| key_string(&a.0));
                let pad = "  ".repeat(depth + 1);
                let items: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{pad}{} = {}",
                            key_string(k),
                            pretty(v, depth + 1, seen, false)
                        )
                    })
                    .collect();
                format!("{{\n{}\n{}}}", items.join(",\n"), "  ".repeat(depth))
            };
            seen.pop();
            out
        }
        Value::UserData(ud) => ud
            .metatable()
            .ok()
            .and_then(|mt| mt.get::<mlua::Function>("__tostring").ok())
            .and_then(|f| f.call::<String>(ud.clone()).ok())
            .unwrap_or_else(|| "<userdata>".into()),
        Value::Function(_) => "<function>".into(),
        Value::Error(e) => format!("<error: {e}>"),
        other => format!("<{}>", other.type_name()),
    }
}

fn key_string(k: &Value) -> String {
    match k {
        Value::String(s) => {
            let s = s.to_string_lossy();
            if s.chars().all(|c| c.is_alphanumeric() || c == '_')
                && !s.starts_with(|c: char| c.is_ascii_digit())
            {
                s
            } else {
                format!("[{s:?}]")
            }
        }
        Value::Integer(i) => format!("[{i}]"),
        other => format!("[{}]", pretty(other, 9, &mut vec![], false)),
    }
}

pub struct Repl {
    lua: Arc<Mutex<Lua>>,
    ctx: SharedContext,
    opts: RunOptions,
    tty: bool,
}

enum Input {
    Done,
    Incomplete,
}

impl Repl {
    fn new_state(
        opts: &RunOptions,
        resume: Option<Arc<crate::ckpt::Checkpoint>>,
    ) -> Result<(Lua, SharedContext), String> {
        let ctx = Arc::new(Mutex::new(RunContext::new(opts.clone(), resume)));
        let lua = host_lua::new_state(ctx.clone(), None).map_err(|e| e.to_string())?;
        Ok((lua, ctx))
    }

    fn lua(&self) -> Lua {
        self.lua
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn out(&self, s: &str) {
        println!("{s}");
    }

    fn err(&self, s: &str) {
        if self.tty {
            eprintln!("\x1b[31m{s}\x1b[0m");
        } else {
            eprintln!("{s}");
        }
    }

    /// Evaluate a chunk: as an expression first (so results print themselves), else as statements.
    fn eval(&self, input: &str) -> Result<Input, i32> {
        let lua = self.lua();
        let func = match lua
            .load(format!("return {input}"))
            .set_name("=repl")
            .into_function()
        {
            Ok(f) => f,
            Err(_) => match lua.load(input).set_name("=repl").into_function() {
                Ok(f) => f,
                Err(mlua::Error::SyntaxError {
                    incomplete_input: true,
                    ..
                }) => return Ok(Input::Incomplete),
                Err(e) => {
                    self.err(&guard::clean_message(&e));
                    return Ok(Input::Done);
                }
            },
        };
        let (ending, values) = guard::run_with(|| func.call::<mlua::MultiValue>(()));
        self.report(ending, values)?;
        Ok(Input::Done)
    }

    /// Print results or the error; a SIGTERM/SIGHUP ends the REPL like `wick run`.
    fn report(&self, ending: Ending, values: Vec<Value>) -> Result<(), i32> {
        match ending {
            Ending::Completed => {
                if !values.is_empty() {
                    let shown: Vec<String> = values
                        .iter()
                        .map(|v| pretty(v, 0, &mut vec![], true))
                        .collect();
                    self.out(&shown.join("\t"));
                }
            }
            Ending::Stopped(sig) if sig == libc::SIGINT => {
                let step = crate::api::lock(&self.ctx)
                    .session
                    .as_ref()
                    .and_then(|s| s.lock().ok().map(|s| s.step));
                let at = step.map(|s| format!(" at step {s}")).unwrap_or_default();
                self.err(&format!(
                    "interrupted{at}; the session is intact and nothing was saved"
                ));
                signals::clear();
                let _ = host_lua::install_stop_hook(&self.lua());
            }
            ending @ Ending::Stopped(_) => {
                return Err(guard::finalize(&self.lua(), &self.ctx, &ending))
            }
            Ending::Failed(m) | Ending::Diverged(m) | Ending::Refused(m) => {
                // A short traceback: the message and the first few frames.
                let short: Vec<&str> = m
                    .lines()
                    .filter(|l| l.trim() != "[C]: in ?")
                    .take(6)
                    .collect();
                self.err(&format!("error: {}", short.join("\n")));
            }
            Ending::Panicked(m) => self.err(&format!("internal error (a host call panicked): {m}")),
            Ending::ReplExit => {}
        }
        Ok(())
    }

    fn command(&mut self, line: &str) -> Result<bool, i32> {
        let (cmd, arg) = line
            .split_once(' ')
            .map(|(a, b)| (a, b.trim()))
            .unwrap_or((line, ""));
        match cmd {
            ":quit" | ":q" => return Ok(false),
            ":help" | ":h" => {
                if arg.is_empty() {
                    self.out("commands: :help [name]  :load FILE  :save [PATH]  :time EXPR  :reset  :quit");
                    self.out(&format!(
                        "API (:help NAME for details): {}",
                        crate::docs::topics().join(", ")
                    ));
                } else {
                    match crate::docs::help(arg) {
                        Some(t) => self.out(&t),
                        None => self.err(&format!("no help for '{arg}'; :help lists the topics")),
                    }
                }
            }
            ":load" => match std::fs::read_to_string(arg) {
                Ok(src) => {
                    let (ending, values) = guard::run_chunk(&self.lua(), &format!("@{arg}"), &src);
                    self.report(ending, values)?;
                }
                Err(e) => self.err(&format!("cannot read {arg}: {e}")),
            },
            ":save" => {
                let state = guard::read_state(&self.lua());
                let mut c = crate::api::lock(&self.ctx);
                let path = if arg.is_empty() {
                    None
                } else {
                    Some(PathBuf::from(arg))
                };
                let force = path.is_some();
                match checkpointing::save(&mut c, state, "manual", path, force) {
                    Ok(r) => self.out(&checkpointing::describe(&r, "manual")),
                    Err(e) => self.err(&e.to_string()),
                }
            }
            ":time" => {
                let t0 = Instant::now();
                self.eval(arg)?;
                self.out(&format!("({:.3} s)", t0.elapsed().as_secs_f64()));
            }
            ":reset" => match Self::new_state(&self.opts, None) {
                Ok((lua, ctx)) => {
                    if let Ok(mut l) = self.lua.lock() {
                        *l = lua;
                    }
                    self.ctx = ctx;
                    self.out("fresh Lua state and session");
                }
                Err(e) => self.err(&e),
            },
            other => self.err(&format!(
                "unknown command {other}{}",
                crate::api::opts::did_you_mean(other, COMMANDS)
            )),
        }
        Ok(true)
    }

    /// One complete input (a command or a Lua chunk). Ok(false) ends the REPL.
    fn handle(&mut self, input: &str) -> Result<Option<bool>, i32> {
        let t = input.trim();
        if t.is_empty() {
            return Ok(Some(true));
        }
        if t.starts_with(':') {
            return self.command(t).map(Some);
        }
        match self.eval(input)? {
            Input::Done => Ok(Some(true)),
            Input::Incomplete => Ok(None),
        }
    }

    fn exit(&self) -> i32 {
        guard::finalize(&self.lua(), &self.ctx, &Ending::ReplExit)
    }
}

fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let dir = base.join("wick");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("history"))
}

pub fn run(common: &crate::RunArgs, resume: Option<PathBuf>) -> i32 {
    let compute = match crate::device::open(&common.device, &common.dtype) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = signals::install() {
        eprintln!("error: {e}");
        return exit::ERROR;
    }
    signals::set_repl_mode(true);
    let ckpt_path = common.ckpt_dir.join("full_model.ckpt");
    crate::ckpt::sweep_stale(&ckpt_path);
    let resume_ckpt = match &resume {
        Some(p) => match crate::ckpt::load(p) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                eprintln!("error: cannot resume: {e}");
                return exit::USAGE;
            }
        },
        None => None,
    };
    let opts = RunOptions {
        ckpt_path,
        seed: common.seed,
        compute,
        save_every: common.save_every,
        recipe: None,
        recipe_hash: None,
        args: Vec::new(),
        quiet: false,
        golden_dir: None,
        bless: false,
    };
    let (lua, ctx) = match Repl::new_state(&opts, resume_ckpt.clone()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::ERROR;
        }
    };
    let tty = std::io::stdin().is_terminal();
    let mut repl = Repl {
        lua: Arc::new(Mutex::new(lua)),
        ctx,
        opts,
        tty,
    };
    if let (Some(p), Some(_)) = (&resume, &resume_ckpt) {
        let src = format!(
            "model = wick.load({:?})\nsession = wick.session{{ model = model }}",
            p.display().to_string()
        );
        let (ending, _) = guard::run_chunk(&repl.lua(), "=resume", &src);
        if let Ending::Failed(m) | Ending::Refused(m) = &ending {
            eprintln!("error: {m}");
            return exit::USAGE;
        }
        if tty {
            eprintln!("resumed {}: `model` and `session` are ready", p.display());
        }
    }
    // A SIGTERM/SIGHUP while waiting for input: save (if anything is new) and exit.
    {
        let ctx = repl.ctx.clone();
        signals::set_prompt_exit(Box::new(move |sig| {
            if sig == libc::SIGINT && tty {
                return; // rustyline handles Ctrl+C at the prompt
            }
            let mut c = crate::api::lock(&ctx);
            let code = match checkpointing::save(
                &mut c,
                serde_json::Value::Null,
                "interrupted",
                None,
                false,
            ) {
                Ok(r @ SaveResult::Saved { .. }) | Ok(r @ SaveResult::NothingNew(_)) => {
                    eprintln!("wick: {}", checkpointing::describe(&r, "interrupted"));
                    signals::exit_code(sig)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::SAVE_FAILED
                }
            };
            std::process::exit(code);
        }));
    }
    if tty {
        interactive(&mut repl)
    } else {
        piped(&mut repl)
    }
}

fn interactive(repl: &mut Repl) -> i32 {
    let mut rl: Editor<LuaHelper, rustyline::history::DefaultHistory> = match Editor::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return exit::ERROR;
        }
    };
    rl.set_helper(Some(LuaHelper {
        lua: repl.lua.clone(),
    }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    eprintln!(
        "wick {} REPL: Lua 5.4 with the wick API. :help for help, Ctrl+D to quit.",
        env!("CARGO_PKG_VERSION")
    );
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "wick> "
        } else {
            "   .. "
        };
        signals::set_at_prompt(true);
        let line = rl.readline(prompt);
        signals::set_at_prompt(false);
        match line {
            Ok(line) => {
                if buffer.is_empty() && line.trim().is_empty() {
                    continue;
                }
                if !buffer.is_empty() {
                    buffer.push('\n');
                }
                buffer.push_str(&line);
                // A stop that arrived at the prompt belongs to no command.
                signals::clear();
                match repl.handle(&buffer) {
                    Ok(None) => continue,
                    Ok(Some(go_on)) => {
                        let _ = rl.add_history_entry(buffer.as_str());
                        if let Some(h) = &history {
                            let _ = rl.save_history(h);
                        }
                        buffer.clear();
                        if !go_on {
                            return repl.exit();
                        }
                    }
                    Err(code) => return code,
                }
            }
            Err(ReadlineError::Interrupted) => {
                // Ctrl+C at the prompt clears the line (and any unfinished chunk).
                buffer.clear();
                signals::clear();
            }
            Err(ReadlineError::Eof) => return repl.exit(),
            Err(e) => {
                eprintln!("error: {e}");
                return repl.exit();
            }
        }
    }
}

fn piped(repl: &mut Repl) -> i32 {
    let stdin = std::io::stdin();
    let mut buffer = String::new();
    let mut lines = stdin.lock().lines();
    loop {
        signals::set_at_prompt(true);
        let next = lines.next();
        signals::set_at_prompt(false);
        let Some(Ok(line)) = next else { break };
        if !buffer.is_empty() {
            buffer.push('\n');
        }
        buffer.push_str(&line);
        match repl.handle(&buffer) {
            Ok(None) => continue,
            Ok(Some(true)) => buffer.clear(),
            Ok(Some(false)) => return repl.exit(),
            Err(code) => return code,
        }
    }
    if !buffer.trim().is_empty() {
        // An unfinished chunk at the end of input: show its syntax error.
        let lua = repl.lua();
        if let Err(e) = lua.load(buffer.as_str()).set_name("=repl").into_function() {
            repl.err(&guard::clean_message(&e));
        }
    }
    repl.exit()
}
