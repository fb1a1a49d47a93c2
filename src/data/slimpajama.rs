//! SlimPajama's layout: `{root}/{split}/chunk{N}/example_{train|holdout}_{i}.jsonl.zst`, chunks
//! and files in numeric order, rows tagged with one of seven subsets.

use super::source::{natural_cmp, FileEntry};
use std::path::Path;

pub const SUBSETS: &[&str] = &[
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
    "unknown",
];

/// Accept a subset's full name or its short form (`Book` for `RedPajamaBook`).
pub fn canonical_subset(name: &str) -> Option<&'static str> {
    SUBSETS
        .iter()
        .find(|s| {
            s.eq_ignore_ascii_case(name)
                || s.strip_prefix("RedPajama")
                    .is_some_and(|short| short.eq_ignore_ascii_case(name))
        })
        .copied()
}

fn list_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| natural_cmp(a, b));
    v
}

/// The files of a split (optionally only some chunks), in SlimPajama's numeric order.
pub fn discover(
    root: &Path,
    split: &str,
    chunks: Option<&[u64]>,
) -> Result<Vec<FileEntry>, String> {
    if !root.is_dir() {
        return Err(format!(
            "SlimPajama root {} is not a directory",
            root.display()
        ));
    }
    let split_dir = root.join(split);
    if !split_dir.is_dir() {
        let found = list_dirs(root);
        return Err(format!(
            "no split '{split}' under {} (found: {})",
            root.display(),
            if found.is_empty() {
                "nothing".to_string()
            } else {
                found.join(", ")
            }
        ));
    }
    let existing: Vec<String> = list_dirs(&split_dir)
        .into_iter()
        .filter(|d| d.starts_with("chunk"))
        .collect();
    let wanted: Vec<String> = match chunks {
        Some(list) => {
            let mut out = Vec::new();
            for n in list {
                let name = format!("chunk{n}");
                if !existing.contains(&name) {
                    return Err(format!(
                        "{}: no directory {name} (found: {})",
                        split_dir.display(),
                        if existing.is_empty() {
                            "no chunk directories".to_string()
                        } else {
                            existing.join(", ")
                        }
                    ));
                }
                out.push(name);
            }
            out
        }
        None => existing,
    };
    let mut files = Vec::new();
    for chunk in &wanted {
        let dir = split_dir.join(chunk);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with("example_") && (n.ends_with(".jsonl.zst") || n.ends_with(".jsonl"))
            })
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        for n in names {
            let p = dir.join(&n);
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            files.push(FileEntry {
                path: p.to_string_lossy().into_owned(),
                size,
            });
        }
    }
    if files.is_empty() {
        return Err(format!(
            "split '{split}' under {} has no example_*.jsonl.zst files{}",
            root.display(),
            if wanted.is_empty() {
                " (no chunk directories)".to_string()
            } else {
                format!(" in {}", wanted.join(", "))
            }
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_in_numeric_order_and_missing_chunks_are_listed() {
        let d = tempfile::tempdir().unwrap();
        for c in [1, 2, 10] {
            let dir = d.path().join(format!("train/chunk{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in [0, 1, 2, 9, 10] {
                std::fs::write(dir.join(format!("example_train_{i}.jsonl.zst")), b"x").unwrap();
            }
        }
        let files = discover(d.path(), "train", None).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.path.rsplit("train/").next().unwrap().to_string())
            .collect();
        assert_eq!(names[0], "chunk1/example_train_0.jsonl.zst");
        assert_eq!(names[3], "chunk1/example_train_9.jsonl.zst");
        assert_eq!(names[4], "chunk1/example_train_10.jsonl.zst");
        assert_eq!(names[5], "chunk2/example_train_0.jsonl.zst");
        assert_eq!(names[10], "chunk10/example_train_0.jsonl.zst");
        let only = discover(d.path(), "train", Some(&[10])).unwrap();
        assert_eq!(only.len(), 5);
        let e = discover(d.path(), "train", Some(&[3])).unwrap_err();
        assert!(
            e.contains("no directory chunk3") && e.contains("chunk1, chunk2, chunk10"),
            "{e}"
        );
        let e = discover(d.path(), "validation", None).unwrap_err();
        assert!(
            e.contains("no split 'validation'") && e.contains("train"),
            "{e}"
        );
        std::fs::create_dir_all(d.path().join("test")).unwrap();
        let e = discover(d.path(), "test", None).unwrap_err();
        assert!(e.contains("no example_"), "{e}");
        assert_eq!(canonical_subset("book"), Some("RedPajamaBook"));
        assert_eq!(canonical_subset("RedPajamaC4"), Some("RedPajamaC4"));
        assert_eq!(canonical_subset("Books"), None);
    }
}
