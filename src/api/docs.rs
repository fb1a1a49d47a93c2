//! API documentation from `stdlib/wick.d.lua`, the same file that gives editors their LuaLS
//! completion: the REPL's `:help` and its completion of object methods read it here.

pub const ANNOTATIONS: &str = include_str!("../../stdlib/wick.d.lua");

pub struct Entry {
    /// `wick.model`, `Model:generate`, `wick.Session.lr`, `wick.Session`
    pub name: String,
    pub text: String,
}

/// Functions (with their preceding `---` comments) and classes (with their fields).
pub fn entries() -> Vec<Entry> {
    let mut out = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    let mut class: Option<(String, Vec<String>)> = None;
    let flush_class = |class: &mut Option<(String, Vec<String>)>, out: &mut Vec<Entry>| {
        if let Some((name, lines)) = class.take() {
            out.push(Entry {
                name,
                text: lines.join("\n"),
            });
        }
    };
    for line in ANNOTATIONS.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("---@class ") {
            flush_class(&mut class, &mut out);
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            let mut lines = doc.clone();
            lines.insert(0, format!("class {name}"));
            class = Some((name, lines));
            doc.clear();
        } else if let Some(rest) = t.strip_prefix("---@field ") {
            if let Some((cname, lines)) = class.as_mut() {
                lines.push(format!("  .{rest}"));
                let field = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches('?');
                out.push(Entry {
                    name: format!("{cname}.{field}"),
                    text: format!("{cname}.{rest}"),
                });
            }
        } else if let Some(rest) = t.strip_prefix("---@") {
            doc.push(format!("  @{rest}"));
        } else if let Some(rest) = t.strip_prefix("---") {
            doc.push(rest.trim().to_string());
        } else if let Some(sig) = t.strip_prefix("function ") {
            flush_class(&mut class, &mut out);
            let name = sig.split('(').next().unwrap_or("").to_string();
            let mut text = vec![sig.trim_end_matches(" end").to_string()];
            text.append(&mut doc);
            out.push(Entry {
                name,
                text: text.join("\n"),
            });
        } else {
            if !t.starts_with("--") {
                doc.clear();
            }
        }
    }
    flush_class(&mut class, &mut out);
    out
}

/// Help text for `name` (exact, or the entries that end with it: `generate` finds Model:generate).
pub fn help(name: &str) -> Option<String> {
    let all = entries();
    let exact: Vec<&Entry> = all.iter().filter(|e| e.name == name).collect();
    let found: Vec<&Entry> = if exact.is_empty() {
        all.iter()
            .filter(|e| {
                e.name.ends_with(&format!(".{name}")) || e.name.ends_with(&format!(":{name}"))
            })
            .collect()
    } else {
        exact
    };
    if found.is_empty() {
        return None;
    }
    Some(
        found
            .iter()
            .map(|e| e.text.clone())
            .collect::<Vec<_>>()
            .join("\n\n"),
    )
}

/// Topics for `:help` with no argument.
pub fn topics() -> Vec<String> {
    entries()
        .into_iter()
        .filter(|e| !e.name.contains('.') || e.name.starts_with("wick."))
        .map(|e| e.name)
        .collect()
}

/// Members (fields and methods) of a class such as `wick.Session`: (name, is_method).
pub fn members(class: &str) -> Vec<(String, bool)> {
    let short = class.rsplit('.').next().unwrap_or(class);
    let mut out = Vec::new();
    for e in entries() {
        if let Some(f) = e.name.strip_prefix(&format!("{class}.")) {
            out.push((f.to_string(), false));
        } else if let Some(m) = e.name.strip_prefix(&format!("{short}:")) {
            out.push((m.to_string(), true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_api_function_is_documented() {
        for name in [
            "wick.model",
            "wick.session",
            "wick.data.loader",
            "wick.data.batch",
            "wick.data.lua",
            "wick.log",
            "wick.save",
            "Model:generate",
            "Session:step",
            "Session:eval",
        ] {
            assert!(super::help(name).is_some(), "{name} has no help");
        }
        let m = super::members("wick.Session");
        assert!(m.contains(&("step".to_string(), true)));
        assert!(m.contains(&("lr".to_string(), false)));
        assert!(super::help("generate").unwrap().contains("max_tokens"));
    }
}
