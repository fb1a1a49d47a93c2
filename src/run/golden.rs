//! Golden files for `expect.golden`: a list of numbers in `golden/NAME.json` beside a test file,
//! compared with a relative and absolute tolerance, or (re)written under `wick test --bless`.

use std::path::Path;

#[derive(Clone, Copy)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

pub enum Verdict {
    Match,
    Mismatch(String),
    /// Written under --bless: "new", "changed" or "unchanged".
    Blessed(&'static str),
}

pub fn check(
    dir: &Path,
    name: &str,
    values: &[f64],
    tol: Tolerance,
    bless: bool,
) -> Result<Verdict, String> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(format!("expect.golden: '{name}' is not a plain file name"));
    }
    let path = dir.join(format!("{name}.json"));
    let old: Option<Vec<f64>> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| serde_json::from_value(v["values"].clone()).ok());
    if bless {
        let status = match &old {
            None => "new",
            Some(o) if o == values => "unchanged",
            Some(_) => "changed",
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let body =
            serde_json::to_string_pretty(&serde_json::json!({ "name": name, "values": values }))
                .map_err(|e| e.to_string())?;
        std::fs::write(&path, body + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        return Ok(Verdict::Blessed(status));
    }
    let Some(expected) = old else {
        return Ok(Verdict::Mismatch(format!(
            "golden file {} is missing or unreadable; run `wick test --bless` to create it",
            path.display()
        )));
    };
    if expected.len() != values.len() {
        return Ok(Verdict::Mismatch(format!(
            "golden {name}: expected {} values, got {}",
            expected.len(),
            values.len()
        )));
    }
    for (i, (e, a)) in expected.iter().zip(values).enumerate() {
        if (e - a).abs() > tol.atol + tol.rtol * e.abs() || a.is_nan() != e.is_nan() {
            return Ok(Verdict::Mismatch(format!(
                "golden {name} differs at index {} (step {}): expected {e}, got {a} (rtol {}, atol {}); `wick test --bless` accepts the new values",
                i + 1,
                i + 1,
                tol.rtol,
                tol.atol
            )));
        }
    }
    Ok(Verdict::Match)
}
