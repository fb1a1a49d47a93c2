//! `wick bench` prints one JSON line per measurement, with the fields the README documents.
mod common;
use common::*;
use std::process::Command;

fn json_lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert_eq!(code(o), 0, "bench failed: {}", stderr(o));
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn bench_train_reports_throughput_split_and_memory() {
    let o = Command::new(wick_bin())
        .args([
            "bench",
            "train",
            "--configs",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
        ])
        .output()
        .unwrap();
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    assert_eq!(r["config"], "tiny");
    assert_eq!(
        r["params"], 332_480,
        "tiny must match the PyTorch reference's shapes"
    );
    for key in [
        "tokens_per_s",
        "step_ms_median",
        "forward_ms",
        "backward_ms",
        "achieved_gflops_excl_emb",
        "peak_rss_mb",
    ] {
        let v = r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {r}"));
        assert!(v > 0.0, "{key} = {v}");
    }
    let parts = r["forward_ms"].as_f64().unwrap()
        + r["backward_ms"].as_f64().unwrap()
        + r["optimizer_ms"].as_f64().unwrap();
    assert!(parts <= r["step_ms_median"].as_f64().unwrap() * 1.5);
}

#[test]
fn bench_gemm_measures_every_layout_of_every_shape() {
    let o = Command::new(wick_bin())
        .args(["bench", "gemm", "--rows", "256", "--reps", "2"])
        .output()
        .unwrap();
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 30, "5 shapes × 3 layouts × (f32, bf16)");
    let dtypes: std::collections::BTreeSet<_> =
        lines.iter().map(|r| r["dtype"].to_string()).collect();
    assert_eq!(dtypes.len(), 2, "f32 and bf16");
    for r in &lines {
        assert_eq!(r["rows"], 256);
        assert!(r["kernel"].is_string(), "{r}");
        assert!(r["gflops_median"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ms_median"].as_f64().unwrap() > 0.0, "{r}");
    }
    let layouts: std::collections::BTreeSet<_> =
        lines.iter().map(|r| r["layout"].to_string()).collect();
    assert_eq!(layouts.len(), 3);
}

#[test]
fn zero_counts_are_refused_by_name() {
    for (args, option) in [
        (&["train", "--steps", "0"][..], "--steps"),
        (&["train", "--batch", "0"][..], "--batch"),
        (&["gemm", "--rows", "0"][..], "--rows"),
        (&["gemm", "--reps", "0"][..], "--reps"),
    ] {
        let o = Command::new(wick_bin())
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains(option) && err.contains("at least 1"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bench_gemm_refuses_an_unknown_precision_by_name() {
    let o = Command::new(wick_bin())
        .args(["bench", "gemm", "--dtype", "f32,f16"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert!(err.contains("--dtype") && err.contains("'f16'"), "{err}");
}

#[test]
fn bench_data_reports_the_pipeline_and_a_rare_subset_mixture_both_ways() {
    let o = Command::new(wick_bin())
        .current_dir(repo_root())
        .args(["bench", "data"])
        .output()
        .unwrap();
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    assert!(r["bytes_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    let mix = &r["rare_subset_mixture"];
    assert_eq!(mix["files"], 11, "{r}");
    for k in ["shared_parse_tokens_per_s", "parse_per_subset_tokens_per_s"] {
        assert!(mix[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    // Every row of the corpus is parsed once through the shared parse.
    assert_eq!(mix["shared_parse_rows_parsed"], 11 * 1500, "{r}");
}
