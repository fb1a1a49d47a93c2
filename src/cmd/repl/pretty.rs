//! How the REPL shows values: sorted keys, cycles marked, depth-limited; wick objects by their
//! `__tostring`.

use mlua::Value;

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
