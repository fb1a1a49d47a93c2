//! Per-document `filter` and `map` functions written in Lua, run on the data thread in a Lua
//! state of the stream's own (never the recipe's: the training thread is not held up, and what
//! a function can see is explicit). A function comes either as a module path (`"mymod.keep"`:
//! `require("mymod").keep`, found next to the recipe) or as a Lua function that captures
//! nothing (its bytecode is carried over). Each stream's state is seeded from the source's
//! seed, so a function that draws random numbers is deterministic too.
//!
//! A document is a table: `text`, `subset`, `meta` (the row's `meta` as a table, or nil) and
//! `source` ("file:line"). `filter(doc)` keeps the document when it returns a true value;
//! `map(doc)` returns the new text (a string, or a table with `text`), or nil to drop it.

use mlua::{Function, Lua, LuaSerdeExt, Value};
use std::path::PathBuf;

/// Where a function's code comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum LuaCode {
    /// `module.function`, loaded with `require` in the worker state.
    Module { module: String, function: String },
    /// A function that captures nothing, as bytecode (debug info kept for tracebacks).
    Bytecode { name: String, code: Vec<u8> },
}

/// The Lua side of a source: functions, and how to set up the state that runs them.
#[derive(Clone, Debug, PartialEq)]
pub struct Transforms {
    pub filter: Option<LuaCode>,
    pub map: Option<LuaCode>,
    /// Directories searched by `require` (the recipe's).
    pub module_dirs: Vec<PathBuf>,
    pub seed: u64,
}

/// What a document became.
pub enum Outcome {
    Keep(String),
    Drop,
}

/// A stream's Lua state with its functions loaded.
pub struct Worker {
    lua: Lua,
    filter: Option<Function>,
    map: Option<Function>,
}

fn load(lua: &Lua, code: &LuaCode, what: &str) -> mlua::Result<Function> {
    match code {
        LuaCode::Module { module, function } => {
            let m: mlua::Table = lua
                .globals()
                .get::<Function>("require")?
                .call(module.as_str())?;
            m.get::<Function>(function.as_str()).map_err(|_| {
                mlua::Error::runtime(format!(
                    "{what} = \"{module}.{function}\": module {module} has no function {function}"
                ))
            })
        }
        LuaCode::Bytecode { name, code } => lua
            .load(code.as_slice())
            .set_name(name.as_str())
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .into_function(),
    }
}

impl Worker {
    pub fn new(t: &Transforms, stream: usize) -> Result<Worker, String> {
        let setup = || -> mlua::Result<Worker> {
            let lua = Lua::new();
            let package: mlua::Table = lua.globals().get("package")?;
            let path: String = package.get("path")?;
            let mut dirs: Vec<String> = t
                .module_dirs
                .iter()
                .map(|d| {
                    let d = d.display().to_string();
                    let d = if d.is_empty() { ".".into() } else { d };
                    format!("{d}/?.lua;{d}/?/init.lua")
                })
                .collect();
            dirs.push(path);
            package.set("path", dirs.join(";"))?;
            lua.load(format!("math.randomseed({}, {stream})", t.seed as i64))
                .exec()?;
            crate::host::lua::install_stop_hook(&lua)?;
            let filter = t
                .filter
                .as_ref()
                .map(|c| load(&lua, c, "filter"))
                .transpose()?;
            let map = t.map.as_ref().map(|c| load(&lua, c, "map")).transpose()?;
            Ok(Worker { lua, filter, map })
        };
        setup().map_err(|e| {
            format!(
                "cannot set up the data source's Lua functions: {}",
                crate::host::lua::clean_message(&e)
            )
        })
    }

    /// Run the document through `filter`, then `map`.
    pub fn apply(
        &self,
        text: String,
        subset: &str,
        meta: Option<&serde_json::Value>,
        source: &str,
    ) -> Result<Outcome, String> {
        let run = || -> mlua::Result<Outcome> {
            let doc = self.lua.create_table()?;
            doc.set("text", text.as_str())?;
            doc.set("subset", subset)?;
            doc.set("source", source)?;
            if let Some(m) = meta {
                doc.set("meta", self.lua.to_value(m)?)?;
            }
            if let Some(f) = &self.filter {
                let keep: Value = f.call(&doc)?;
                if matches!(keep, Value::Nil | Value::Boolean(false)) {
                    return Ok(Outcome::Drop);
                }
            }
            let Some(m) = &self.map else {
                return Ok(Outcome::Keep(text.clone()));
            };
            Ok(match m.call::<Value>(&doc)? {
                Value::String(s) => Outcome::Keep(s.to_str()?.to_string()),
                Value::Table(t) => match t.get::<Value>("text")? {
                    Value::String(s) => Outcome::Keep(s.to_str()?.to_string()),
                    _ => {
                        return Err(mlua::Error::runtime(
                            "map must return a string, a table with a string `text`, or nil",
                        ))
                    }
                },
                Value::Nil | Value::Boolean(false) => Outcome::Drop,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "map must return a string, a table with `text`, or nil; it returned a {}",
                        other.type_name()
                    )))
                }
            })
        };
        run().map_err(|e| {
            if crate::host::lua::is_interrupt(&e) {
                return "interrupted while a data function ran".to_string();
            }
            format!(
                "a data function failed on {source}: {}",
                crate::host::lua::clean_message(&e)
            )
        })
    }
}
