//! Checked option tables: an unknown key is an error that suggests the closest valid one, and a
//! value of the wrong type says which option of which function expected what.

use mlua::{Table, Value};

pub struct Opts {
    func: &'static str,
    table: Table,
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Integer(_) | Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Boolean(_) => "a boolean".into(),
        Value::Table(_) => "a table".into(),
        Value::Nil => "nil".into(),
        Value::Function(_) => "a function".into(),
        Value::UserData(_) => "a wick object".into(),
        other => other.type_name().into(),
    }
}

/// A value as an error message shows it: short values themselves ("-8", "the string \"2\""),
/// others by their type ("a table").
pub fn describe(v: &Value) -> String {
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::String(s) if s.as_bytes().len() <= 40 => {
            format!("the string {:?}", s.to_string_lossy())
        }
        v => type_name(v),
    }
}

/// An argument that must be a whole number ≥ 0: `what` names it in the error.
pub fn whole_number(v: &Value, what: &str) -> mlua::Result<u64> {
    match v {
        Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        Value::Number(n) if *n >= 0.0 && n.fract() == 0.0 && *n < 9.0e18 => Ok(*n as u64),
        v => Err(mlua::Error::runtime(format!(
            "{what} must be a non-negative whole number, got {}",
            describe(v)
        ))),
    }
}

pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate, if it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| {
            *d <= (c.len().max(word.len()) / 2).max(2) || c.starts_with(word) || word.starts_with(c)
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    match closest(word, candidates) {
        Some(c) => format!("; did you mean '{c}'?"),
        None => format!("; valid options: {}", candidates.join(", ")),
    }
}

impl Opts {
    /// Check `table` against the keys `func` accepts. Positional (array) entries are allowed
    /// only when `positional` is true.
    pub fn new(
        func: &'static str,
        table: Table,
        keys: &[&str],
        positional: bool,
    ) -> mlua::Result<Opts> {
        for pair in table.pairs::<Value, Value>() {
            let (k, _) = pair?;
            match &k {
                Value::String(s) => {
                    let key = s.to_str()?.to_string();
                    if !keys.contains(&key.as_str()) {
                        return Err(mlua::Error::runtime(format!(
                            "unknown option '{key}' for {func}{}",
                            did_you_mean(&key, keys)
                        )));
                    }
                }
                Value::Integer(_) if positional => {}
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "{func} takes named options (key = value); got a key of type {}",
                        type_name(other)
                    )))
                }
            }
        }
        Ok(Opts { func, table })
    }

    fn get(&self, key: &str) -> mlua::Result<Value> {
        self.table.raw_get(key)
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> mlua::Error {
        mlua::Error::runtime(format!(
            "option '{key}' of {} must be {want}, got {}",
            self.func,
            describe(v)
        ))
    }

    pub fn f64(&self, key: &str) -> mlua::Result<Option<f64>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Integer(i) => Ok(Some(i as f64)),
            Value::Number(n) => Ok(Some(n)),
            v => Err(self.wrong(key, "a number", &v)),
        }
    }

    pub fn usize(&self, key: &str) -> mlua::Result<Option<usize>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Integer(i) if i >= 0 => Ok(Some(i as usize)),
            Value::Number(n) if n >= 0.0 && n.fract() == 0.0 => Ok(Some(n as usize)),
            v => Err(self.wrong(key, "a non-negative whole number", &v)),
        }
    }

    pub fn bool(&self, key: &str) -> mlua::Result<Option<bool>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Boolean(b) => Ok(Some(b)),
            v => Err(self.wrong(key, "true or false", &v)),
        }
    }

    pub fn string(&self, key: &str) -> mlua::Result<Option<String>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::String(s) => Ok(Some(s.to_str()?.to_string())),
            v => Err(self.wrong(key, "a string", &v)),
        }
    }

    /// A string or a list of strings.
    pub fn strings(&self, key: &str) -> mlua::Result<Option<Vec<String>>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::String(s) => Ok(Some(vec![s.to_str()?.to_string()])),
            Value::Table(t) => {
                let mut out = Vec::new();
                for v in t.sequence_values::<Value>() {
                    match v? {
                        Value::String(s) => out.push(s.to_str()?.to_string()),
                        other => return Err(self.wrong(key, "a list of strings", &other)),
                    }
                }
                Ok(Some(out))
            }
            v => Err(self.wrong(key, "a string or a list of strings", &v)),
        }
    }

    pub fn value(&self, key: &str) -> mlua::Result<Value> {
        self.get(key)
    }

    /// Positional string entries (`wick.data.jsonl{ "a", "b" }`).
    pub fn positional_strings(&self) -> mlua::Result<Vec<String>> {
        let mut out = Vec::new();
        for v in self.table.sequence_values::<Value>() {
            match v? {
                Value::String(s) => out.push(s.to_str()?.to_string()),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "{} expects paths as strings, got {}",
                        self.func,
                        type_name(&other)
                    )))
                }
            }
        }
        Ok(out)
    }

    pub fn func(&self) -> &'static str {
        self.func
    }
}

/// Require a table argument, with a message that shows the expected call shape.
pub fn table_arg(func: &str, v: Value) -> mlua::Result<Table> {
    match v {
        Value::Table(t) => Ok(t),
        Value::Nil => Err(mlua::Error::runtime(format!(
            "{func} expects an options table: {func}{{ ... }}"
        ))),
        other => Err(mlua::Error::runtime(format!(
            "{func} expects an options table: {func}{{ ... }}, got {}",
            type_name(&other)
        ))),
    }
}
