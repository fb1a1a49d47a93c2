//! Watching a run: a metrics row for every step, the recipe's rows beside them, a file that
//! reads as one run across resumes, TensorBoard events, plots of one or several runs.
mod common;
use common::*;
use std::process::Command;

fn rows(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn recipe(d: &Dir) {
    d.corpus("data.jsonl", 200);
    let mut r = tiny_setup("data.jsonl", 1e-3);
    r.push_str(
        "local n = tonumber(wick.args[1]) or 20\nfor step in session:steps(n) do\n  local loss = session:step(train:next())\n  if step % 5 == 0 then wick.log{ val_loss = session:eval(train, 1) } end\n  if step == 10 and wick.args[2] == 'mid' then wick.save('mid.ckpt') end\nend\n",
    );
    d.write("r.lua", &r);
}

#[test]
fn every_step_has_a_row_and_the_recipes_rows_are_marked() {
    let d = Dir::new();
    recipe(&d);
    let o = d.run("r.lua", &["--", "20"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let all = rows(&d.join("ckpt/metrics.jsonl"));
    let steps: Vec<&serde_json::Value> = all.iter().filter(|r| r["kind"] == "step").collect();
    assert_eq!(
        steps
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    for r in &steps {
        for k in [
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tokens_seen",
            "elapsed_s",
        ] {
            assert!(r[k].is_number(), "{k} in {r}");
        }
    }
    let logs: Vec<&serde_json::Value> = all.iter().filter(|r| r["kind"] == "log").collect();
    assert_eq!(logs.len(), 4);
    assert!(logs.iter().all(|r| r["val_loss"].is_number()));
    // The closing summary draws the loss as a line of blocks.
    let err = stderr(&o);
    let spark = err
        .lines()
        .find(|l| l.starts_with("wick: loss "))
        .expect(&err);
    assert!(spark.chars().any(|c| ('▁'..='█').contains(&c)), "{spark}");
    assert!(spark.contains("(20 steps)"), "{spark}");

    let every5 = Dir::new();
    recipe(&every5);
    assert_eq!(
        code(&every5.run("r.lua", &["--metrics-every", "5", "--", "20"])),
        0
    );
    let steps: Vec<u64> = rows(&every5.join("ckpt/metrics.jsonl"))
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [5, 10, 15, 20]);
}

#[test]
fn after_a_resume_the_file_reads_as_one_run() {
    let d = Dir::new();
    recipe(&d);
    // A first run goes to step 20, with a checkpoint of step 10 beside.
    assert_eq!(code(&d.run("r.lua", &["--", "20", "mid"])), 0);
    // Continue from step 10: the rows the first run wrote past it are replaced.
    let o = d.run(
        "r.lua",
        &["--resume", d.join("mid.ckpt").to_str().unwrap(), "--", "20"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let all = rows(&d.join("ckpt/metrics.jsonl"));
    let steps: Vec<u64> = all
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "no step twice");
    let logged: Vec<u64> = all
        .iter()
        .filter(|r| r["kind"] == "log")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [5, 10, 15, 20]);
}

/// Minimal readers for the TFRecord framing and the Event fields wick writes.
fn masked_crc(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    (!crc).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*i];
        *i += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// (step, [(tag, value)]) of every event with a summary.
fn events(path: &std::path::Path) -> Vec<(i64, Vec<(String, f32)>)> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc(len_bytes), "length CRC");
        let body = &data[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(data[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked_crc(body), "data CRC");
        at += 16 + len;
        let (mut i, mut step, mut scalars) = (0, 0i64, Vec::new());
        while i < body.len() {
            let k = varint(body, &mut i);
            match (k >> 3, k & 7) {
                (1, 1) => i += 8,
                (2, 0) => step = varint(body, &mut i) as i64,
                (3, 2) => {
                    let n = varint(body, &mut i) as usize;
                    assert_eq!(&body[i..i + n], b"brain.Event:2");
                    i += n;
                }
                (5, 2) => {
                    let end = varint(body, &mut i) as usize + i;
                    while i < end {
                        assert_eq!(varint(body, &mut i), (1 << 3) | 2);
                        let vend = varint(body, &mut i) as usize + i;
                        let (mut tag, mut val) = (String::new(), f32::NAN);
                        while i < vend {
                            match varint(body, &mut i) {
                                k if k == (1 << 3) | 2 => {
                                    let n = varint(body, &mut i) as usize;
                                    tag = String::from_utf8(body[i..i + n].to_vec()).unwrap();
                                    i += n;
                                }
                                k if k == (2 << 3) | 5 => {
                                    val = f32::from_le_bytes(body[i..i + 4].try_into().unwrap());
                                    i += 4;
                                }
                                other => panic!("unexpected field {other}"),
                            }
                        }
                        scalars.push((tag, val));
                    }
                }
                other => panic!("unexpected event field {other:?}"),
            }
        }
        if !scalars.is_empty() {
            out.push((step, scalars));
        }
    }
    out
}

#[test]
fn tensorboard_events_hold_the_same_scalars() {
    let d = Dir::new();
    recipe(&d);
    assert_eq!(code(&d.run("r.lua", &["--", "12"])), 0);
    let files: Vec<_> = std::fs::read_dir(d.join("ckpt/tb"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let ev = events(&files[0].path());
    let metrics = rows(&d.join("ckpt/metrics.jsonl"));
    let losses: Vec<(i64, f32)> = ev
        .iter()
        .flat_map(|(s, v)| {
            v.iter()
                .filter(|(t, _)| t == "train/loss")
                .map(move |(_, x)| (*s, *x))
        })
        .collect();
    let want: Vec<(i64, f32)> = metrics
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            (
                r["step"].as_i64().unwrap(),
                r["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(losses, want);
    let val: Vec<i64> = ev
        .iter()
        .filter(|(_, v)| v.iter().any(|(t, _)| t == "log/val_loss"))
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(val, [5, 10]);
    // --tensorboard moves them; off turns them off.
    let off = Dir::new();
    recipe(&off);
    assert_eq!(
        code(&off.run("r.lua", &["--tensorboard", "off", "--", "3"])),
        0
    );
    assert!(!off.join("ckpt/tb").exists());
}

#[test]
fn plots_overlay_runs_as_png_and_svg() {
    let d = Dir::new();
    recipe(&d);
    for (dir, seed) in [("a", "1"), ("b", "2")] {
        let o = Command::new(wick_bin())
            .current_dir(d.path())
            .args([
                "run",
                "r.lua",
                "--seed",
                seed,
                "--ckpt-dir",
                &format!("runs/{dir}"),
                "--",
                "15",
            ])
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let plot = |out: &str| {
        Command::new(wick_bin())
            .current_dir(d.path())
            .args([
                "plot",
                "runs/a/metrics.jsonl",
                "runs/b/metrics.jsonl",
                "-o",
                out,
            ])
            .output()
            .unwrap()
    };
    let o = plot("cmp.png");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a: 15 train points, 3 validation; b: 15 train points"),
        "{}",
        stderr(&o)
    );
    let png = std::fs::read(d.join("cmp.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let o = plot("cmp.svg");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let svg = std::fs::read_to_string(d.join("cmp.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    for text in [
        "a train (EMA 0.9)",
        "b validation",
        "tokens/s",
        "learning rate",
    ] {
        assert!(svg.contains(text), "{text} missing from the SVG");
    }
    let bad = Command::new(wick_bin())
        .current_dir(d.path())
        .args(["plot", "runs/a/metrics.jsonl", "--smooth", "1.5"])
        .output()
        .unwrap();
    assert_eq!(code(&bad), 1);
    assert!(stderr(&bad).contains("--smooth"), "{}", stderr(&bad));
}
