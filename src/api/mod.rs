//! Lua bindings: the `wick` table. Bindings only — each function checks its arguments and
//! calls into model / train / data / host, so recipes, the REPL and tests drive the same code.

mod data;
mod model;
pub mod opts;
mod session;

use crate::host::checkpointing;
use crate::host::context::{RunContext, SharedContext};
use crate::host::signals::{self, Interrupted};
use mlua::{Lua, LuaSerdeExt, Table, Value};
use std::sync::MutexGuard;

/// The run context of this Lua state.
pub fn context(lua: &Lua) -> mlua::Result<SharedContext> {
    lua.app_data_ref::<SharedContext>()
        .map(|c| c.clone())
        .ok_or_else(|| mlua::Error::runtime("wick host context missing"))
}

pub fn lock(ctx: &SharedContext) -> MutexGuard<'_, RunContext> {
    ctx.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every host call starts here: a pending stop ends the script at this boundary.
pub fn check_stop() -> mlua::Result<()> {
    if signals::stop_requested() {
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
        lua.create_function(|_, ()| Ok(signals::stop_requested()))?,
    )?;
    wick.set(
        "stopping",
        lua.create_function(|_, ()| Ok(signals::stop_requested()))?,
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
fn log(lua: &Lua, fields: Value) -> mlua::Result<()> {
    check_stop()?;
    let table = opts::table_arg("wick.log", fields)?;
    let ctx = context(lua)?;
    let mut row = serde_json::Map::new();
    let mut c = lock(&ctx);
    if let Some(s) = &c.session {
        let s = s
            .lock()
            .map_err(|_| mlua::Error::runtime("session is unusable after a crash"))?;
        row.insert("step".into(), s.step.into());
        row.insert("lr".into(), s.lr.into());
        row.insert("tokens".into(), s.tokens_seen.into());
        if let Some(l) = s.last_loss {
            row.insert("loss".into(), l.into());
        }
    }
    let mut shown = Vec::new();
    for pair in table.pairs::<String, Value>() {
        let (k, v) = pair?;
        let j: serde_json::Value = lua.from_value(v).map_err(|e| {
            mlua::Error::runtime(format!("wick.log: value of '{k}' is not plain data: {e}"))
        })?;
        shown.push(match &j {
            serde_json::Value::Number(n) => format!("{k} {:.4}", n.as_f64().unwrap_or(0.0)),
            other => format!("{k} {other}"),
        });
        row.insert(k, j);
    }
    let bad: u64 = c
        .loaders
        .iter()
        .filter_map(|(_, l)| l.lock().ok().map(|l| l.stats_snapshot().bad_rows))
        .sum();
    if bad > 0 {
        row.insert("bad_rows".into(), bad.into());
    }
    row.insert(
        "data_wait_pct".into(),
        ((c.data_wait().0 * 100.0).round() / 100.0).into(),
    );
    row.insert("time".into(), crate::ckpt::meta::now_unix().into());
    c.write_metrics(&serde_json::Value::Object(row.clone()))
        .map_err(mlua::Error::runtime)?;
    if !c.opts.quiet {
        shown.sort();
        let step = row
            .get("step")
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        crate::progress::warn(&format!("step {step}: {}", shown.join(", ")));
    }
    Ok(())
}

/// `wick.save([path])`: save now (reason `manual`).
fn save(lua: &Lua, path: Option<String>) -> mlua::Result<Value> {
    check_stop()?;
    let ctx = context(lua)?;
    let state = crate::host::guard::read_state(lua);
    let mut c = lock(&ctx);
    let result = checkpointing::save(&mut c, state, "manual", path.map(Into::into), true)
        .map_err(|e| mlua::Error::runtime(e.to_string()))?;
    crate::progress::warn(&checkpointing::describe(&result, "manual"));
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
    let tol = crate::golden::Tolerance { rtol, atol };
    match crate::golden::check(&dir, &name, &values, tol, c.opts.bless)
        .map_err(mlua::Error::runtime)?
    {
        crate::golden::Verdict::Blessed(status) => {
            c.blessed.push((name, status.to_string()));
            Ok((true, String::new()))
        }
        crate::golden::Verdict::Match => Ok((true, String::new())),
        crate::golden::Verdict::Mismatch(msg) => Ok((false, msg)),
    }
}
