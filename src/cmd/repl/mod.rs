//! `wick repl`: a Lua prompt on the same host and session API the recipes use. Line editing,
//! history, completion (globals, fields, userdata methods), multi-line input, results printed
//! without `print`, `:help` from the LuaLS annotations, and the checkpoint guarantee on exit.

mod complete;
mod pretty;

use crate::error::{exit, Result};
use crate::host::{lua as host_lua, signals};
use crate::run::checkpointing::{self, SaveResult};
use crate::run::context::{lock, RunOptions, SharedContext};
use crate::run::guard::{self, Ending};
use crate::setup::{self, Resume, RunSpec};
use complete::LuaHelper;
use mlua::{Lua, Value};
use pretty::pretty;
use rustyline::error::ReadlineError;
use rustyline::Editor;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Inside the REPL, `Err(code)` means: the REPL ends with this exit code.
type Flow<T> = std::result::Result<T, i32>;

pub const COMMANDS: &[&str] = &[":help", ":load", ":save", ":time", ":reset", ":quit"];
pub const KEYWORDS: &[&str] = &[
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

pub struct Repl {
    lua: Arc<Mutex<Lua>>,
    ctx: SharedContext,
    opts: RunOptions,
    tty: bool,
    /// Names declared `local` on earlier lines: at the prompt each line is its own chunk, so
    /// they are gone on the next one, and an error naming one as a global gets a hint.
    line_locals: Mutex<std::collections::BTreeSet<String>>,
}

/// `:help`'s topic list, one line per owner in first-seen order: `  wick.data: jsonl text ...`,
/// `  Session: step eval steps` (methods), `  wick.Session: lr global_step ...` (fields).
fn topic_lines(topics: &[String]) -> Vec<String> {
    let mut owners: Vec<(String, Vec<String>)> = Vec::new();
    for t in topics {
        let Some(cut) = t.rfind([':', '.']) else {
            continue;
        };
        let (owner, name) = (&t[..cut], &t[cut + 1..]);
        match owners.iter_mut().find(|(o, _)| o == owner) {
            Some((_, names)) => names.push(name.to_string()),
            None => owners.push((owner.to_string(), vec![name.to_string()])),
        }
    }
    owners
        .into_iter()
        .map(|(owner, names)| format!("  {owner}: {}", names.join(" ")))
        .collect()
}

/// The names a chunk declares with `local NAME, ...` or `local function NAME` at the start of
/// one of its lines.
fn declared_locals(input: &str) -> Vec<String> {
    let ident = |s: &str| {
        let s = s.split('<').next().unwrap_or("").trim();
        (!s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit()))
        .then(|| s.to_string())
    };
    let mut out = Vec::new();
    for line in input.lines() {
        let Some(rest) = line.trim_start().strip_prefix("local ") else {
            continue;
        };
        if let Some(f) = rest.trim_start().strip_prefix("function ") {
            out.extend(ident(f.split('(').next().unwrap_or("")));
        } else {
            let names = rest.split('=').next().unwrap_or("");
            out.extend(names.split(',').filter_map(ident));
        }
    }
    out
}

enum Input {
    Done,
    Incomplete,
}

impl Repl {
    fn lua(&self) -> Lua {
        self.lua
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn out(&self, s: &str) {
        crate::outln!("{s}");
    }

    fn err(&self, s: &str) {
        if self.tty {
            crate::errln!("\x1b[31m{s}\x1b[0m");
        } else {
            crate::errln!("{s}");
        }
    }

    /// Evaluate a chunk: as an expression first (so results print themselves), else as statements.
    fn eval(&self, input: &str) -> Flow<Input> {
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
        if let Ok(mut l) = self.line_locals.lock() {
            l.extend(declared_locals(input));
        }
        Ok(Input::Done)
    }

    /// Print results or the error; a SIGTERM/SIGHUP ends the REPL like `wick run`.
    fn report(&self, ending: Ending, values: Vec<Value>) -> Flow<()> {
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
                let step = lock(&self.ctx)
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
            ending @ (Ending::Stopped(_) | Ending::Exit(_) | Ending::PeerLost(_)) => {
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
                if let Some(name) = self.lost_local(&m) {
                    self.err(&format!(
                        "hint: `local {name}` on an earlier line lived only in that line (each line at the prompt is its own chunk); write `{name} = ...` without `local` to keep it"
                    ));
                }
            }
            Ending::Panicked(m) => self.err(&format!("internal error (a host call panicked): {m}")),
            Ending::ReplExit => {}
        }
        Ok(())
    }

    /// The name in "(global 'NAME')" of an error, when an earlier line declared it `local`.
    fn lost_local(&self, message: &str) -> Option<String> {
        let start = message.find("global '")? + "global '".len();
        let name = &message[start..start + message[start..].find('\'')?];
        let known = self.line_locals.lock().ok()?.contains(name);
        known.then(|| name.to_string())
    }

    fn command(&mut self, line: &str) -> Flow<bool> {
        let (cmd, arg) = line
            .split_once(' ')
            .map(|(a, b)| (a, b.trim()))
            .unwrap_or((line, ""));
        match cmd {
            ":quit" | ":q" => return Ok(false),
            ":help" | ":h" => {
                if arg.is_empty() {
                    self.out("commands: :help [name]  :load FILE  :save [PATH]  :time EXPR  :reset  :quit");
                    self.out("API (:help NAME for details, e.g. :help wick.data.loader):");
                    for line in topic_lines(&crate::api::docs::topics()) {
                        self.out(&line);
                    }
                } else {
                    match crate::api::docs::help(arg) {
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
                let mut c = lock(&self.ctx);
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
            ":reset" => match setup::new_state(&self.opts, None) {
                Ok((lua, ctx)) => {
                    if let Ok(mut l) = self.lua.lock() {
                        *l = lua;
                    }
                    self.ctx = ctx;
                    self.out("fresh Lua state and session");
                }
                Err(e) => self.err(&e.message),
            },
            other => self.err(&format!(
                "unknown command {other}{}",
                crate::api::opts::did_you_mean(other, COMMANDS)
            )),
        }
        Ok(true)
    }

    /// One complete input (a command or a Lua chunk). Ok(false) ends the REPL.
    fn handle(&mut self, input: &str) -> Flow<Option<bool>> {
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

pub fn run(spec: RunSpec, resume: Option<PathBuf>) -> Result<i32> {
    let spec = RunSpec {
        resume: resume.clone().map(Resume::Path).unwrap_or_default(),
        ..spec
    };
    signals::set_repl_mode(true);
    let run = setup::open(&spec)?;
    let resumed = run.ctx.lock().map(|c| c.resume.is_some()).unwrap_or(false);
    let (lua, ctx, opts) = (run.lua, run.ctx, run.opts);
    let tty = std::io::stdin().is_terminal();
    let mut repl = Repl {
        lua: Arc::new(Mutex::new(lua)),
        ctx,
        opts,
        tty,
        line_locals: Mutex::new(Default::default()),
    };
    if let (Some(p), true) = (&resume, resumed) {
        let src = format!(
            "model = wick.load({:?})\nsession = wick.session{{ model = model }}",
            p.display().to_string()
        );
        let (ending, _) = guard::run_chunk(&repl.lua(), "=resume", &src);
        if let Ending::Failed(m) | Ending::Refused(m) = &ending {
            return Err(crate::Error::usage(m.clone()));
        }
        if tty {
            crate::errln!("resumed {}: `model` and `session` are ready", p.display());
        }
    }
    // A SIGTERM/SIGHUP while waiting for input: save (if anything is new) and exit.
    {
        let ctx = repl.ctx.clone();
        signals::set_prompt_exit(Box::new(move |sig| {
            if sig == libc::SIGINT && tty {
                return; // rustyline handles Ctrl+C at the prompt
            }
            let mut c = lock(&ctx);
            let code = match checkpointing::save(
                &mut c,
                serde_json::Value::Null,
                "interrupted",
                None,
                false,
            ) {
                Ok(r @ SaveResult::Saved { .. }) | Ok(r @ SaveResult::NothingNew(_)) => {
                    crate::errln!("wick: {}", checkpointing::describe(&r, "interrupted"));
                    signals::exit_code(sig)
                }
                Err(e) => {
                    crate::host::progress::error(&e.to_string());
                    exit::SAVE_FAILED
                }
            };
            std::process::exit(code);
        }));
    }
    if tty {
        interactive(&mut repl)
    } else {
        Ok(piped(&mut repl))
    }
}

fn interactive(repl: &mut Repl) -> Result<i32> {
    let mut rl: Editor<LuaHelper, rustyline::history::DefaultHistory> = Editor::new()
        .map_err(|e| crate::Error::failed(format!("cannot start the line editor: {e}")))?;
    rl.set_helper(Some(LuaHelper {
        lua: repl.lua.clone(),
    }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    crate::errln!(
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
                            return Ok(repl.exit());
                        }
                    }
                    Err(code) => return Ok(code),
                }
            }
            Err(ReadlineError::Interrupted) => {
                // Ctrl+C at the prompt clears the line (and any unfinished chunk).
                buffer.clear();
                signals::clear();
            }
            Err(ReadlineError::Eof) => return Ok(repl.exit()),
            Err(e) => {
                crate::host::progress::error(&e.to_string());
                return Ok(repl.exit());
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

#[cfg(test)]
mod local_tests {
    use super::declared_locals;

    #[test]
    fn declared_locals_reads_every_form() {
        assert_eq!(declared_locals("local a, b <const> = 1, 2"), ["a", "b"]);
        assert_eq!(declared_locals("  local function go(x) end"), ["go"]);
        assert_eq!(declared_locals("local t\nx = 1\nlocal 9bad = 1"), ["t"]);
        assert!(declared_locals("print('local x')").is_empty());
    }
}
