//! Data the recipe writes: `wick.data.batch{ rows }` (a batch from Lua values), the `filter` and
//! `map` options of file sources (Lua functions run on the data thread), and
//! `wick.data.lua{ next = ... }` (a source written in Lua).

use super::data::BatchHandle;
use super::opts::Opts;
use super::{check_stop, context, lock};
use crate::data::lua_source::LuaSource;
use crate::data::transform::{LuaCode, Transforms};
use crate::train::Windows;
use mlua::{Function, Lua, Value};
use std::sync::Arc;

/// `wick.data.batch{ {1, 2, 3, ...}, {...} }`: rows of seq_len + 1 token ids.
pub fn batch(_: &Lua, rows: Value) -> mlua::Result<BatchHandle> {
    check_stop()?;
    let Value::Table(rows) = rows else {
        return Err(mlua::Error::runtime(
            "wick.data.batch takes a list of rows of token ids: wick.data.batch{ {1, 2, 3}, {4, 5, 6} }",
        ));
    };
    let mut tokens = Vec::new();
    let mut width = None;
    let n = rows.raw_len();
    if n == 0 {
        return Err(mlua::Error::runtime(
            "wick.data.batch needs at least one row",
        ));
    }
    for r in 1..=n {
        let Value::Table(row) = rows.raw_get::<Value>(r)? else {
            return Err(mlua::Error::runtime(format!(
                "wick.data.batch: row {r} is not a list of token ids"
            )));
        };
        let len = row.raw_len();
        match width {
            None if len < 2 => {
                return Err(mlua::Error::runtime(format!(
                    "wick.data.batch: row {r} has {len} token(s); a row needs at least 2 (inputs and the next token)"
                )))
            }
            None => width = Some(len),
            Some(w) if w != len => {
                return Err(mlua::Error::runtime(format!(
                    "wick.data.batch: row {r} has {len} tokens, row 1 has {w}; every row must have the same length"
                )))
            }
            _ => {}
        }
        for c in 1..=len {
            let v: Value = row.raw_get(c)?;
            let id = match v {
                Value::Integer(i) if i >= 0 && i <= u32::MAX as i64 => i as u32,
                Value::Number(f) if f.fract() == 0.0 && f >= 0.0 && f <= u32::MAX as f64 => f as u32,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "wick.data.batch: row {r}, column {c} is {}, not a token id (a non-negative integer)",
                        match &other {
                            Value::Number(f) => f.to_string(),
                            Value::Integer(i) => i.to_string(),
                            v => v.type_name().to_string(),
                        }
                    )))
                }
            };
            tokens.push(id);
        }
    }
    let width = width.unwrap_or(2);
    Ok(BatchHandle {
        windows: Arc::new(Windows {
            tokens,
            batch: n,
            width,
            share_of: None,
        }),
        source: None,
    })
}

/// A `filter`/`map` option: a module path (`"mymod.keep"`) or a function that captures nothing.
fn lua_code(func: &str, key: &str, v: Value) -> mlua::Result<Option<LuaCode>> {
    match v {
        Value::Nil => Ok(None),
        Value::String(s) => {
            let s = s.to_str()?.to_string();
            match s.rsplit_once('.') {
                Some((module, function)) if !module.is_empty() && !function.is_empty() => {
                    Ok(Some(LuaCode::Module {
                        module: module.to_string(),
                        function: function.to_string(),
                    }))
                }
                _ => Err(mlua::Error::runtime(format!(
                    "option '{key}' of {func}: \"{s}\" should name a module's function, as in \"filters.long_enough\""
                ))),
            }
        }
        Value::Function(f) => {
            let info = f.info();
            if info.what != "Lua" {
                return Err(mlua::Error::runtime(format!(
                    "option '{key}' of {func} must be a Lua function or \"module.function\""
                )));
            }
            let code = f.dump(false);
            // Upvalues other than _ENV (the globals) are captured locals, which the data
            // thread's own Lua state cannot see.
            let captured = captured_locals(&code, info.num_upvalues)?;
            if !captured.is_empty() {
                return Err(mlua::Error::runtime(format!(
                    "option '{key}' of {func}: the function (defined at {}:{}) captures local variables ({}), which cannot travel to the data thread; use globals only, or put it in a module and pass \"module.function\"",
                    info.short_src.unwrap_or_default(),
                    info.line_defined.unwrap_or(0),
                    captured.join(", ")
                )));
            }
            Ok(Some(LuaCode::Bytecode {
                name: info.source.unwrap_or_else(|| "=filter".into()),
                code,
            }))
        }
        _ => Err(mlua::Error::runtime(format!(
            "option '{key}' of {func} must be a function or \"module.function\""
        ))),
    }
}

/// Names of a dumped function's upvalues other than `_ENV`, read in a scratch state that has
/// the debug library (the recipe's does not).
fn captured_locals(code: &[u8], n: u8) -> mlua::Result<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a throwaway state; only debug.getupvalue is used, on our own function.
    let scratch = unsafe { Lua::unsafe_new_with(mlua::StdLib::DEBUG, mlua::LuaOptions::new()) };
    let f = scratch
        .load(code)
        .set_mode(mlua::chunk::ChunkMode::Binary)
        .into_function()?;
    let getupvalue: Function = scratch
        .globals()
        .get::<mlua::Table>("debug")?
        .get("getupvalue")?;
    let mut names = Vec::new();
    for i in 1..=n as i64 {
        let (name, _): (Option<String>, Value) = getupvalue.call((f.clone(), i))?;
        match name {
            Some(n) if n == "_ENV" => {}
            Some(n) => names.push(n),
            None => names.push(format!("upvalue {i}")),
        }
    }
    Ok(names)
}

/// The `filter` and `map` options of a source, if any.
pub fn transforms(
    lua: &Lua,
    func: &str,
    o: &Opts,
    seed: u64,
) -> mlua::Result<Option<Arc<Transforms>>> {
    let filter = lua_code(func, "filter", o.value("filter")?)?;
    let map = lua_code(func, "map", o.value("map")?)?;
    if filter.is_none() && map.is_none() {
        return Ok(None);
    }
    let recipe_dir = lock(&context(lua)?)
        .opts
        .recipe
        .as_ref()
        .and_then(|r| r.parent().map(|p| p.to_path_buf()))
        .unwrap_or_default();
    Ok(Some(Arc::new(Transforms {
        filter,
        map,
        module_dirs: vec![recipe_dir.clone(), recipe_dir.join("stdlib"), ".".into()],
        seed,
    })))
}

/// `wick.data.lua{ next = f, state = f, restore = f, name = "..." }`.
#[derive(Clone)]
pub struct LuaSourceHandle(pub LuaSource);

impl mlua::UserData for LuaSourceHandle {
    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(mlua::MetaMethod::ToString, |_, this, ()| {
            Ok(format!(
                "wick.data.source(lua {}{})",
                this.0.name,
                if this.0.resumable() {
                    ", resumable"
                } else {
                    ""
                }
            ))
        });
    }
}

const LUA_SOURCE_KEYS: &[&str] = &["next", "state", "restore", "name"];

pub fn lua_source(lua: &Lua, options: Value) -> mlua::Result<LuaSourceHandle> {
    check_stop()?;
    let func = "wick.data.lua";
    let o = Opts::new(
        func,
        super::opts::table_arg(func, options)?,
        LUA_SOURCE_KEYS,
        false,
    )?;
    let function = |key: &str| -> mlua::Result<Option<Function>> {
        match o.value(key)? {
            Value::Nil => Ok(None),
            Value::Function(f) => Ok(Some(f)),
            other => Err(mlua::Error::runtime(format!(
                "option '{key}' of {func} must be a function, got a {}",
                other.type_name()
            ))),
        }
    };
    let next = function("next")?.ok_or_else(|| {
        mlua::Error::runtime(
            "wick.data.lua needs next = function() ... end returning a document's text (or token ids), nil at the end of an epoch",
        )
    })?;
    let (state, restore) = (function("state")?, function("restore")?);
    if state.is_some() != restore.is_some() {
        return Err(mlua::Error::runtime(
            "wick.data.lua: give both state() and restore(s) (they make exact resume possible), or neither",
        ));
    }
    Ok(LuaSourceHandle(LuaSource {
        name: o.string("name")?.unwrap_or_else(|| "lua".into()),
        next,
        state,
        restore,
        lua: lua.weak(),
    }))
}
