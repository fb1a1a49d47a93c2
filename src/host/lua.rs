//! Building the Lua state a recipe runs in: the embedded stdlib, the recipe's module path, the
//! prelude that keeps a stop from being swallowed, and the count hook that notices a stop in
//! pure Lua. The `wick` API itself is installed by whoever calls (see `setup`): the host does
//! not know the bindings.

use super::signals::{self, Interrupted};
use mlua::{HookTriggers, IntoLuaMulti, Lua, VmState};
use std::path::Path;

/// The embedded stdlib: `require("wick.schedule")` works with no files next to the recipe.
pub const STDLIB: &[(&str, &str)] = &[
    (
        "wick.schedule",
        include_str!("../../stdlib/wick/schedule.lua"),
    ),
    ("wick.expect", include_str!("../../stdlib/wick/expect.lua")),
];

const PRELUDE: &str = r#"
-- A stop (Ctrl+C, SIGTERM, os.exit) must reach the host: a user's xpcall handler does not run
-- for it.
do
  local raw_xpcall, stopping = xpcall, wick.__stopping
  xpcall = function(f, handler, ...)
    return raw_xpcall(f, function(e)
      if stopping() then return e end
      return handler(e)
    end, ...)
  end
end

-- error(t) with a plain table shows its fields instead of "table: 0x...": the table gets a
-- __tostring (only if it has no metatable), which the host's message uses.
do
  local raw_error, rawtostring = error, tostring
  local function show(v)
    if type(v) == "string" then return string.format("%q", v) end
    return rawtostring(v)
  end
  local function fields(t)
    local parts = {}
    for k, v in pairs(t) do
      local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or ("[" .. show(k) .. "]")
      parts[#parts + 1] = key .. " = " .. show(v)
    end
    table.sort(parts)
    return "{ " .. table.concat(parts, ", ") .. " }"
  end
  error = function(e, level)
    if type(e) == "table" and getmetatable(e) == nil then
      setmetatable(e, { __tostring = fields })
    end
    -- One frame deeper than the caller meant (this wrapper); the host hides the wrapper's
    -- frames from tracebacks.
    level = level or 1
    raw_error(e, level > 0 and level + 1 or level)
  end
end
"#;

/// Instructions between stop checks in pure Lua: cheap, and well under 100 ms.
const HOOK_EVERY: u32 = 1000;

/// A fresh Lua state: `install` puts the API in (it must define `wick.__stopping`, which the
/// prelude uses), then the stdlib, the module path next to `recipe` and the stop hook.
pub fn new_state(
    recipe: Option<&Path>,
    install: impl FnOnce(&Lua) -> mlua::Result<()>,
) -> mlua::Result<Lua> {
    let lua = Lua::new();
    install(&lua)?;
    for (name, src) in STDLIB {
        let chunk = lua
            .load(*src)
            .set_name(format!("@stdlib/{}.lua", name.replace('.', "/")))
            .into_function()?;
        lua.preload_module(name, chunk)?;
    }
    if let Some(dir) = recipe.and_then(|r| r.parent()) {
        // The recipe's own modules (and a stdlib/ beside it) are require-able.
        let d = if dir.as_os_str().is_empty() {
            ".".to_string()
        } else {
            dir.display().to_string()
        };
        let package: mlua::Table = lua.globals().get("package")?;
        let path: String = package.get("path")?;
        package.set(
            "path",
            format!("{d}/?.lua;{d}/?/init.lua;{d}/stdlib/?.lua;{path}"),
        )?;
    }
    lua.load(PRELUDE).set_name("@wick/prelude.lua").exec()?;
    install_os_exit(&lua)?;
    install_os_execute(&lua)?;
    install_stop_hook(&lua)?;
    Ok(lua)
}

/// `os.exit(code)` would end the process from C (`exit()`), past the host and its checkpoint.
/// Here it ends the script at this boundary like a stop, and the host exits with `code` after
/// saving (`true` → 0, `false` → 1, no argument → 0).
fn install_os_exit(lua: &Lua) -> mlua::Result<()> {
    let os: mlua::Table = lua.globals().get("os")?;
    os.set(
        "exit",
        lua.create_function(|_, code: mlua::Value| -> mlua::Result<()> {
            let code = match code {
                mlua::Value::Nil | mlua::Value::Boolean(true) => 0,
                mlua::Value::Boolean(false) => 1,
                mlua::Value::Integer(n) => n as i32,
                mlua::Value::Number(n) => n as i32,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "os.exit expects a number or a boolean, got {}",
                        other.type_name()
                    )))
                }
            };
            signals::request_exit(code);
            Err(mlua::Error::external(Interrupted))
        })?,
    )
}

/// `os.execute(cmd)` through C's `system()` ignores SIGINT in wick while the command runs, so
/// a Ctrl+C sent to wick alone was lost. Here the command runs as a child that wick waits for
/// with its handlers in place; a stop that arrives meanwhile is passed on to the command (as a
/// terminal would) and honoured at the next boundary after it returns. Same results as Lua's:
/// `true|nil, "exit"|"signal", code`.
fn install_os_execute(lua: &Lua) -> mlua::Result<()> {
    let os: mlua::Table = lua.globals().get("os")?;
    os.set(
        "execute",
        lua.create_function(|lua, cmd: Option<String>| {
            let Some(cmd) = cmd else {
                // Lua's answer to "is there a shell?": one boolean.
                let shell = std::path::Path::new("/bin/sh").exists();
                return (shell,).into_lua_multi(lua);
            };
            // What Lua printed so far goes out before the command's own output.
            // SAFETY: fflush(NULL) flushes every C stdio stream.
            unsafe { libc::fflush(std::ptr::null_mut()) };
            let mut child = match std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .spawn()
            {
                Ok(c) => c,
                Err(_) => return (None::<bool>, "exit", 127).into_lua_multi(lua),
            };
            let status = wait_passing_stops(&mut child)?;
            use std::os::unix::process::ExitStatusExt;
            let (ok, how, code) = match (status.code(), status.signal()) {
                (Some(0), _) => (Some(true), "exit", 0),
                (Some(c), _) => (None, "exit", c),
                (None, Some(sig)) => (None, "signal", sig),
                _ => (None, "exit", 1),
            };
            (ok, how, code).into_lua_multi(lua)
        })?,
    )
}

/// Wait for `child`; a stop requested meanwhile is sent on to it once.
fn wait_passing_stops(child: &mut std::process::Child) -> mlua::Result<std::process::ExitStatus> {
    let mut passed_on = false;
    loop {
        if let Some(status) = child.try_wait().map_err(mlua::Error::external)? {
            return Ok(status);
        }
        if signals::stop_requested() && !passed_on {
            passed_on = true;
            let sig = signals::received().unwrap_or(libc::SIGINT);
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        // A child's exit has no fd to wait on here; 5 ms between looks costs nothing.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The Lua heap limit in bytes (0: none), for messages.
static HEAP_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Cap the Lua heap: past it, allocations fail with Lua's "not enough memory" error instead of
/// growing until the kernel kills the process (and the checkpoint with it).
pub fn set_heap_limit(lua: &Lua, bytes: usize) -> mlua::Result<()> {
    HEAP_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
    lua.set_memory_limit(bytes).map(|_| ())
}

/// Lift the cap (the guard, to read `wick.state` after the heap ran full).
pub fn lift_heap_limit(lua: &Lua) {
    let _ = lua.set_memory_limit(0);
}

pub fn heap_limit() -> usize {
    HEAP_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Every HOOK_EVERY instructions, check the stop flag. Once stopping, check at every
/// instruction so a `pcall` loop cannot catch the error and carry on.
pub fn install_stop_hook(lua: &Lua) -> mlua::Result<()> {
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        |lua, _| {
            if signals::should_unwind() {
                let _ =
                    lua.set_global_hook(HookTriggers::new().every_nth_instruction(1), |_, _| {
                        if signals::should_unwind() {
                            Err(mlua::Error::external(Interrupted))
                        } else {
                            Ok(VmState::Continue)
                        }
                    });
                return Err(mlua::Error::external(Interrupted));
            }
            Ok(VmState::Continue)
        },
    )
}

/// Is this error (or anything it wraps) a stop?
pub fn is_interrupt(err: &mlua::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<Interrupted>().is_some())
}

/// The user-facing text of a Lua error: the message and its Lua traceback, without mlua's
/// wrapper noise or Rust backtraces.
pub fn clean_message(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { traceback, cause } => {
            let mut inner = clean_message(cause);
            // A plain function's bad argument has no name in mlua's error: take the called
            // field's name from the traceback ("[C]: in field 'load'").
            if let (Some(rest), Some(name)) =
                (inner.strip_prefix("bad argument #"), called_name(traceback))
            {
                if let Some((pos, what)) = rest.split_once(": ") {
                    if !pos.contains(" to ") {
                        inner = format!("bad argument #{pos} to {name}: {what}");
                    }
                }
            }
            if inner.contains("stack traceback:") {
                inner
            } else {
                // A host call failed: name the recipe line that made it, as Lua errors do.
                match lua_location(traceback) {
                    Some(at) if !inner.starts_with(&at) => format!("{at}: {inner}\n{traceback}"),
                    _ => format!("{inner}\n{traceback}"),
                }
            }
        }
        mlua::Error::SyntaxError { message, .. } => format!("syntax error: {message}"),
        mlua::Error::MemoryError(m) => {
            let limit = heap_limit();
            if limit > 0 {
                format!(
                    "{m}: the recipe's Lua heap reached its limit of {} MiB; free what the recipe keeps (large tables or strings) or raise --lua-memory",
                    limit >> 20
                )
            } else {
                m.clone()
            }
        }
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::BadArgument { to, pos, cause, .. } => bad_argument(to.as_deref(), *pos, cause),
        mlua::Error::FromLuaConversionError { from, to, .. } => {
            format!("expected {}, got {}", lua_type_of_rust(to), article(from))
        }
        mlua::Error::ExternalError(x) => x.to_string(),
        mlua::Error::WithContext { context, cause } => {
            format!("{context}: {}", clean_message(cause))
        }
        other => other.to_string(),
    };
    // candle errors may carry a Rust backtrace; users need the message, not our internals.
    let text = match text.find("\n   0: ") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    // The prelude's `error` wrapper is wick's, not the recipe's: keep it out of tracebacks.
    text.lines()
        .filter(|l| {
            !l.contains("wick/prelude.lua:")
                && !l.contains("upvalue 'raw_error'")
                // mlua's glue for fields: not the recipe's, and a name that explains nothing.
                && !l.contains("__mlua_")
                && !l.contains("in local 'field_setter'")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// mlua's "bad argument #2 to `ModelHandle.weight`: error converting Lua nil to String" in the
/// recipe's terms: "bad argument #1 to model:weight: expected a string, got nil".
fn bad_argument(to: Option<&str>, pos: usize, cause: &mlua::Error) -> String {
    // mlua names a method `TypeHandle.method` and counts `self` as argument #1.
    let (call, pos) = match to.and_then(|t| t.split_once('.')) {
        Some((ty, method)) if ty.ends_with("Handle") => {
            let object = match ty.trim_end_matches("Handle") {
                "Session" => "session".to_string(),
                "Loader" => "loader".to_string(),
                other => other.to_lowercase(),
            };
            (Some(format!("{object}:{method}")), pos.saturating_sub(1))
        }
        _ => (to.map(str::to_string), pos),
    };
    let what = clean_message(cause);
    match call {
        Some(call) => format!("bad argument #{pos} to {call}: {what}"),
        None => format!("bad argument #{pos}: {what}"),
    }
}

/// What a recipe must pass for a Rust parameter type, in Lua's words.
fn lua_type_of_rust(rust: &str) -> &str {
    match rust {
        "String" | "&str" | "BString" => "a string",
        "bool" => "a boolean",
        "Table" => "a table",
        "Function" => "a function",
        t if t.starts_with("Vec<") || t.starts_with("HashMap<") || t.starts_with("BTreeMap<") => {
            "a table"
        }
        t if [
            "u8", "u16", "u32", "u64", "usize", "i32", "i64", "isize", "f32", "f64",
        ]
        .contains(&t) =>
        {
            "a number"
        }
        t => t,
    }
}

/// A Lua type name with its article ("a string", "nil").
fn article(lua_type: &str) -> String {
    match lua_type {
        "nil" => "nil".into(),
        "integer" | "number" => "a number".into(),
        "userdata" => "a wick object".into(),
        t => format!("a {t}"),
    }
}

/// The name of the Rust function a traceback starts in (`[C]: in field 'load'`).
fn called_name(traceback: &str) -> Option<String> {
    let first = traceback.lines().nth(1)?.trim();
    let rest = first.strip_prefix("[C]: in ")?;
    let name = rest.split('\'').nth(1)?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The first Lua `file:line` in a traceback (skipping frames of Rust functions).
fn lua_location(traceback: &str) -> Option<String> {
    traceback.lines().skip(1).find_map(|l| {
        let l = l.trim();
        // Rust functions, and the Lua glue mlua generates for fields (`__mlua_newindex`).
        if l.starts_with("[C]") || l.starts_with("__mlua") {
            return None;
        }
        let mut parts = l.splitn(3, ':');
        let file = parts.next()?;
        let line = parts.next()?;
        line.parse::<u64>().ok().map(|n| format!("{file}:{n}"))
    })
}
