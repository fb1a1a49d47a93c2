//! Lua bindings: the `wick` table. Bindings only — each function checks its arguments and
//! calls into model / train / data / host, so recipes, the REPL and tests drive the same code.

mod data;
pub mod docs;
mod lua_data;
mod model;
pub mod opts;
mod session;

use crate::host::signals::{self, Interrupted};
use crate::run::checkpointing;
pub use crate::run::context::lock;
use crate::run::context::SharedContext;
use mlua::{Lua, LuaSerdeExt, Table, Value};

/// The run context of this Lua state.
pub fn context(lua: &Lua) -> mlua::Result<SharedContext> {
    lua.app_data_ref::<SharedContext>()
        .map(|c| c.clone())
        .ok_or_else(|| mlua::Error::runtime("wick host context missing"))
}

/// Every host call starts here: a pending stop ends the script at this boundary.
pub fn check_stop() -> mlua::Result<()> {
    if signals::should_unwind() {
        return Err(mlua::Error::external(Interrupted));
    }
    Ok(())
}

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let ctx = context(lua)?;
    let (args, seed, resumed, state, (device, dtype), recipe, ckpt_dir) = {
        let c = lock(&ctx);
        (
            c.opts.args.clone(),
            c.opts.seed,
            c.resume.is_some(),
            c.resume.as_ref().map(|r| r.meta.state.clone()),
            (
                c.opts.compute.device_name.clone(),
                c.opts.compute.dtype_name(),
            ),
            c.opts.recipe.clone(),
            c.ckpt_dir(),
        )
    };
    let wick = lua.create_table()?;
    wick.set("args", args.clone())?;
    // Data-parallel: this process's rank and the number of ranks (0 and 1 alone).
    wick.set("rank", crate::dist::group().rank)?;
    wick.set("world_size", crate::dist::group().size)?;
    if !crate::dist::is_leader() {
        // Every rank runs the same recipe: its prints would repeat rank 0's, once per rank.
        lua.globals().set(
            "print",
            lua.create_function(|_, _: mlua::MultiValue| Ok(()))?,
        )?;
    }
    wick.set("seed", seed)?;
    wick.set("resumed", resumed)?;
    wick.set("device", device)?;
    wick.set("dtype", dtype)?;
    wick.set("version", env!("CARGO_PKG_VERSION"))?;
    wick.set("ckpt_dir", ckpt_dir.display().to_string())?;
    let state = match state {
        Some(s) if !s.is_null() => lua.to_value(&s)?,
        _ => Value::Table(lua.create_table()?),
    };
    wick.set("state", state)?;

    // Lua's own `arg`: arg[0] is the recipe, arg[1..] its arguments.
    let arg = lua.create_table()?;
    if let Some(r) = &recipe {
        arg.raw_set(0, r.display().to_string())?;
    }
    for (i, a) in args.iter().enumerate() {
        arg.raw_set(i + 1, a.clone())?;
    }
    lua.globals().set("arg", arg)?;

    wick.set(
        "__stopping",
        lua.create_function(|_, ()| Ok(signals::should_unwind()))?,
    )?;
    wick.set(
        "stopping",
        lua.create_function(|_, ()| Ok(signals::should_unwind()))?,
    )?;
    wick.set("log", lua.create_function(log)?)?;
    wick.set("save", lua.create_function(save)?)?;
    wick.set("__golden", lua.create_function(golden)?)?;
    wick.set("model", lua.create_function(model::create)?)?;
    wick.set("load", lua.create_function(model::load)?)?;
    wick.set("session", lua.create_function(session::create)?)?;
    let optim = lua.create_table()?;
    optim.set("adamw", lua.create_function(session::adamw)?)?;
    wick.set("optim", optim)?;
    wick.set("data", data::table(lua)?)?;
    wick.set("tokenizer", data::tokenizer_table(lua)?)?;
    if std::env::var_os("WICK_TEST_HOOKS").is_some() {
        // Only for the test suite: a host call that panics, to prove the guard.
        let debug = lua.create_table()?;
        debug.set(
            "panic",
            lua.create_function(|lua, ()| -> mlua::Result<()> {
                let ctx = context(lua)?;
                let session = lock(&ctx).session.clone();
                match session {
                    Some(s) if std::env::var_os("WICK_TEST_PANIC_IN_STEP").is_some() => {
                        let _held = s.lock();
                        panic!("test panic while the session is locked")
                    }
                    _ => panic!("test panic in a host call"),
                }
            })?,
        )?;
        wick.set("debug", debug)?;
    }
    lua.globals().set("wick", wick)?;
    Ok(())
}

/// `wick.log{ key = value, ... }`: one JSON object in metrics.jsonl and a line on stderr.
/// The row is written even when a stop is pending (it describes a completed step the
/// checkpoint will hold); the stop is honoured right after.
fn log(lua: &Lua, fields: Value) -> mlua::Result<()> {
    let table = opts::table_arg("wick.log", fields)?;
    let mut values = Vec::new();
    for pair in table.pairs::<String, Value>() {
        let (k, v) = pair?;
        let j: serde_json::Value = lua.from_value(v).map_err(|e| {
            mlua::Error::runtime(format!("wick.log: value of '{k}' is not plain data: {e}"))
        })?;
        values.push((k, j));
    }
    let ctx = context(lua)?;
    let mut c = lock(&ctx);
    let (_, line) = crate::run::metrics::log(&mut c, values)?;
    if !c.opts.quiet {
        crate::host::progress::warn(&line);
    }
    drop(c);
    check_stop()
}

/// `wick.save([path])`: save now (reason `manual`).
fn save(lua: &Lua, path: Option<String>) -> mlua::Result<Value> {
    check_stop()?;
    let ctx = context(lua)?;
    let state = crate::run::guard::read_state(lua);
    let mut c = lock(&ctx);
    let result = checkpointing::save(&mut c, state, "manual", path.map(Into::into), true)
        .map_err(crate::Error::from)?;
    crate::host::progress::warn(&checkpointing::describe(&result, "manual"));
    match result {
        checkpointing::SaveResult::Saved { path, .. } => Ok(Value::String(
            lua.create_string(path.display().to_string())?,
        )),
        _ => Ok(Value::Nil),
    }
}

/// Convert a loaded table of plain data into a Lua table (used by bindings that return configs).
pub fn to_lua_table(lua: &Lua, v: &impl serde::Serialize) -> mlua::Result<Table> {
    match lua.to_value(v)? {
        Value::Table(t) => Ok(t),
        _ => lua.create_table(),
    }
}

/// `expect.golden` on the host: compare with (or under `--bless`, write) golden/NAME.json.
/// Returns (ok, message) so the Lua side raises at the caller's line.
fn golden(
    lua: &Lua,
    (name, values, rtol, atol): (String, Vec<f64>, f64, f64),
) -> mlua::Result<(bool, String)> {
    let ctx = context(lua)?;
    let mut c = lock(&ctx);
    let dir = c
        .opts
        .golden_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("golden"));
    let tol = crate::run::golden::Tolerance { rtol, atol };
    match crate::run::golden::check(&dir, &name, &values, tol, c.opts.bless)
        .map_err(mlua::Error::runtime)?
    {
        crate::run::golden::Verdict::Blessed(status) => {
            c.blessed.push((name, status.to_string()));
            Ok((true, String::new()))
        }
        crate::run::golden::Verdict::Match => Ok((true, String::new())),
        crate::run::golden::Verdict::Mismatch(msg) => Ok((false, msg)),
    }
}
