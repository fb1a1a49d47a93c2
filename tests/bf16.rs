//! bf16 on the CPU: the main job trains as well as in f32, and the step reports which
//! products ran (AMX tiles, or f32 where the CPU has none or `WICK_NO_AMX` is set).
mod common;
use common::*;
use std::process::Command;

fn final_val_loss(dir: &std::path::Path) -> f64 {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    metrics
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .expect("a validation loss")
}

/// scripts/tiny.lua in bf16 ends within 2 % of the f32 validation loss (measured: 0.3 %).
#[test]
fn tiny_recipe_in_bf16_ends_within_two_percent_of_f32() {
    let d = Dir::new();
    let mut val = Vec::new();
    for dtype in ["f32", "bf16"] {
        let ckpt = d.join(dtype);
        let o = Command::new(wick_bin())
            .current_dir(repo_root())
            .args(["run", "scripts/tiny.lua", "--dtype", dtype, "--ckpt-dir"])
            .arg(&ckpt)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{dtype}: {}", stderr(&o));
        assert_eq!(ckpt_meta(&ckpt.join("full_model.ckpt"))["dtype"], dtype);
        val.push(final_val_loss(&ckpt));
    }
    let (f32_loss, bf16_loss) = (val[0], val[1]);
    assert!(f32_loss < 3.0, "f32 run did not train: {f32_loss}");
    assert!(
        (bf16_loss - f32_loss).abs() <= 0.02 * f32_loss,
        "bf16 val loss {bf16_loss} vs f32 {f32_loss}"
    );
}

fn bench_step_path(no_amx: bool) -> serde_json::Value {
    let mut cmd = Command::new(wick_bin());
    cmd.args([
        "bench",
        "train",
        "--configs",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "1",
        "--dtype",
        "bf16",
    ]);
    if no_amx {
        cmd.env("WICK_NO_AMX", "1");
    }
    let o = cmd.output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0, "{line}");
    line["step_path"].clone()
}

#[test]
fn bench_says_which_products_ran() {
    let cpu_has_amx = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains(" amx_bf16");
    let expected = if cpu_has_amx {
        "cpu-bf16-amx"
    } else {
        "cpu-bf16-f32"
    };
    assert_eq!(bench_step_path(false), expected);
    assert_eq!(bench_step_path(true), "cpu-bf16-f32");
}
