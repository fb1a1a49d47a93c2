//! The README's main job (scripts/tiny.lua on the shipped sample), shortened: the validation
//! loss falls, a sample is generated, and the checkpoint is written.
mod common;
use common::*;

#[test]
fn tiny_recipe_trains_on_the_shipped_sample() {
    let d = Dir::new();
    let o = std::process::Command::new(wick_bin())
        .current_dir(repo_root())
        .args(["run", "scripts/tiny.lua", "--ckpt-dir"])
        .arg(d.join("ckpt"))
        .args(["--", "--steps", "60"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let metrics = std::fs::read_to_string(d.join("ckpt/metrics.jsonl")).unwrap();
    let val: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .collect();
    let steps = metrics
        .lines()
        .filter(|l| l.contains(r#""kind":"step""#))
        .count();
    assert_eq!(steps, 60, "a metrics row per step");
    assert!(val[0] > 5.0, "starts near ln 257: {val:?}");
    assert!(*val.last().unwrap() < 3.2, "falls within 60 steps: {val:?}");
    assert!(
        stdout(&o).lines().count() >= 2,
        "prints a generated sample: {}",
        stdout(&o)
    );
    let m = ckpt_meta(&d.join("ckpt/full_model.ckpt"));
    assert_eq!(m["step"], 60);
    assert_eq!(m["reason"], "completed");
}
