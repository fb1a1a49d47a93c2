//! Tab completion for the REPL: commands, globals, keywords, fields of tables and the
//! documented methods of wick objects.

use mlua::{Lua, ObjectLike, Value};
use rustyline::completion::{Completer, Pair};
use rustyline::{Context, Helper, Highlighter, Hinter, Validator};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::{COMMANDS, KEYWORDS};

#[derive(Helper, Highlighter, Hinter, Validator)]
pub struct LuaHelper {
    pub lua: Arc<Mutex<Lua>>,
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
        return crate::api::docs::members(class)
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
