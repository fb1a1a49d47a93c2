//! Data-parallel training over MPI (`--features mpi`; needs Open MPI's `mpirun` on PATH):
//! 2 ranks train what 1 rank trains, stops are agreed so every rank ends at one step, rank 0
//! writes the one checkpoint, a lost rank hangs nobody, and ranks that disagree are refused.
//!
//! Run with: cargo test --release --features mpi --test distributed
#![cfg(feature = "mpi")]

mod common;
use common::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One MPI job at a time: on a 2-core machine several jobs at once would make steps slow
/// enough to test the machine rather than wick.
static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_job() -> std::sync::MutexGuard<'static, ()> {
    ONE_JOB.lock().unwrap_or_else(|p| p.into_inner())
}

/// `mpirun -n N wick ARGS` (Open MPI; root allowed, more ranks than cores allowed), one
/// compute thread per rank.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .args(["--oversubscribe", "-x", "RAYON_NUM_THREADS", "-n"])
        .arg(n.to_string())
        .arg(wick_bin())
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null());
    c
}

/// `mpirun` for a run the test signals: stdout dropped, stderr to `log`.
fn spawn_mpirun(n: usize, args: &[&str], log: &std::path::Path) -> std::process::Child {
    let mut c = mpirun(n, args);
    c.stdout(Stdio::null());
    spawn_logged(c, log)
}

/// `wick run scripts/tiny.lua` into `ckpt`, for `steps` steps, with `extra` options.
fn tiny(ckpt: &std::path::Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into(), "scripts/tiny.lua".into(), "--ckpt-dir".into()];
    v.push(ckpt.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push("--".into());
    v.push("--steps".into());
    v.push(steps.to_string());
    v
}

/// Once training is under way (`needle` in the log), the process id of the last rank mpirun
/// started (rank 1 of 2).
fn last_rank_once_training(
    child: &mut std::process::Child,
    log: &std::path::Path,
    needle: &str,
) -> i32 {
    assert!(
        wait_for_line(child, log, needle, Duration::from_secs(120)),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let ranks = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let pids: Vec<i32> = String::from_utf8_lossy(&ranks.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "ranks of mpirun: {pids:?}");
    pids.into_iter().max().unwrap_or_default()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn step_losses(ckpt_dir: &std::path::Path) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(ckpt_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["kind"] == "step")
                .then(|| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        })
        .collect()
}

/// Assert that the checkpoints in two run directories hold the same bytes in every tensor whose
/// name starts with one of `prefixes` ("" for all); returns how many tensors were compared.
fn assert_same_tensors(
    a: &std::path::Path,
    b: &std::path::Path,
    prefixes: &[&str],
    what: &str,
) -> usize {
    let (ta, tb) = (
        ckpt_tensors(&a.join("full_model.ckpt")),
        ckpt_tensors(&b.join("full_model.ckpt")),
    );
    let mut compared = 0;
    for (name, bytes) in ta
        .iter()
        .filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)))
    {
        let (x, y) = (floats(bytes), floats(&tb[name]));
        let differing = x.iter().zip(&y).filter(|(p, q)| p != q).count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} values differ {what}",
            x.len()
        );
        compared += 1;
    }
    compared
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// 2 ranks × half of each batch train what 1 rank trains on the whole batch: per-step losses
/// within 1e-5 relative over 50 steps of scripts/tiny.lua, and the final weights and AdamW
/// moments bit for bit the same (a run of one process sums each gradient over the batch as its
/// two halves; each rank sums one half and the all-reduce adds the two).
#[test]
fn two_ranks_train_what_one_rank_trains() {
    let _job = one_job();
    let d = Dir::new();
    let one = d.join("one");
    let o = Command::new(wick_bin())
        .current_dir(repo_root())
        .env("RAYON_NUM_THREADS", "1")
        .args(strs(&tiny(&one, 50, &[])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let two = d.join("two");
    let o = mpirun(2, &strs(&tiny(&two, 50, &[]))).output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // One progress line per step report, one saved checkpoint, one printed sample: rank 0 alone.
    assert_eq!(stdout(&o).matches("model: ").count(), 1, "{}", stdout(&o));
    assert_eq!(stderr(&o).matches("saved ").count(), 1, "{}", stderr(&o));
    let meta = ckpt_meta(&two.join("full_model.ckpt"));
    assert_eq!(meta["world_size"], 2);
    assert_eq!(meta["step"], 50);

    let (a, b) = (step_losses(&one), step_losses(&two));
    assert_eq!(a.len(), 50);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (step, la) in &a {
        let lb = b[step];
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs(),
            "step {step}: {la} vs {lb}"
        );
    }
    let compared = assert_same_tensors(&one, &two, &["model.", "optim."], "between 1 and 2 ranks");
    assert!(compared > 30, "{compared} tensors");
}

/// Ctrl+C on mpirun (which sends every rank SIGTERM): every rank stops at one step, rank 0
/// writes the one checkpoint, and resuming with 2 ranks ends bit-identical to a straight
/// 2-rank run.
#[test]
fn ctrl_c_on_mpirun_stops_all_ranks_and_resumes_exactly() {
    let _job = one_job();
    let d = Dir::new();
    let straight = d.join("straight");
    let o = mpirun(2, &strs(&tiny(&straight, 60, &[])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let ckpt = d.join("stopped");
    let log = d.join("mpirun.log");
    let mut child = spawn_mpirun(2, &strs(&tiny(&ckpt, 60, &[])), &log);
    assert!(
        wait_for_line(&mut child, &log, "step 1/60 loss", Duration::from_secs(120)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    send(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("mpirun did not end: {text}"));
    assert!(!status.success(), "{text}");
    // Rank 0 speaks for the group: one notice, one ending line.
    assert_eq!(text.matches("stopped by SIGTERM").count(), 1, "{text}");
    assert_eq!(text.matches("SIGTERM received").count(), 1, "{text}");
    let meta = ckpt_meta(&ckpt.join("full_model.ckpt"));
    assert_eq!(meta["reason"], "interrupted", "{text}");
    let stopped_at = meta["step"].as_u64().unwrap();
    assert!((1..60).contains(&stopped_at), "{stopped_at}");

    let o = mpirun(2, &strs(&tiny(&ckpt, 60, &["--resume"])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_same_tensors(&straight, &ckpt, &[""], "from the straight run");
}

/// SIGINT to one rank alone: the ranks agree at the next step boundary and all stop there
/// (exit 130); the checkpoint then resumes with one rank, which says the world size changed.
#[test]
fn a_signal_to_one_rank_stops_them_all_and_resumes_on_one_rank() {
    let _job = one_job();
    let d = Dir::new();
    let ckpt = d.join("ckpt");
    let log = d.join("mpirun.log");
    let mut child = spawn_mpirun(2, &strs(&tiny(&ckpt, 60, &[])), &log);
    let rank1 = last_rank_once_training(&mut child, &log, "step 1/60 loss");
    unsafe { libc::kill(rank1, libc::SIGINT) };
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("mpirun did not end: {text}"));
    assert_eq!(status.code(), Some(130), "{text}");
    // Rank 0 did not get the signal but stopped with it, and speaks for both.
    assert_eq!(text.matches("stopped by SIGINT").count(), 1, "{text}");
    let meta = ckpt_meta(&ckpt.join("full_model.ckpt"));
    assert_eq!(meta["reason"], "interrupted");
    assert_eq!(meta["world_size"], 2);
    assert!(stdout(&inspect(&ckpt.join("full_model.ckpt"))).contains("ranks        2"));

    let o = Command::new(wick_bin())
        .current_dir(repo_root())
        .args(strs(&tiny(&ckpt, 60, &["--resume"])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("written by 2 rank(s) and this run has 1"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ckpt_meta(&ckpt.join("full_model.ckpt"))["step"], 60);
    // 1 rank continues a 2-rank run bit for bit: the straight 2-rank run's weights.
    let straight = d.join("straight");
    let o = mpirun(2, &strs(&tiny(&straight, 60, &[])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_same_tensors(
        &straight,
        &ckpt,
        &["model."],
        "from the straight 2-rank run",
    );
}

/// A rank killed with SIGKILL: no rank hangs (the launcher ends the job), and rank 0 left a
/// checkpoint of a completed step, reason peer-lost, that resumes.
#[test]
fn a_killed_rank_hangs_nobody_and_leaves_a_checkpoint() {
    let _job = one_job();
    let d = Dir::new();
    let ckpt = d.join("ckpt");
    let log = d.join("mpirun.log");
    let mut child = spawn_mpirun(2, &strs(&tiny(&ckpt, 400, &[])), &log);
    let rank1 = last_rank_once_training(&mut child, &log, "step 1/400 loss");
    unsafe { libc::kill(rank1, libc::SIGKILL) };
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("no rank hangs");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let meta = ckpt_meta(&ckpt.join("full_model.ckpt"));
    assert!(meta["step"].as_u64().unwrap() >= 1, "{meta}");
    // mpirun sends the survivors SIGTERM as well; rank 0 still tells a dead peer from a stop.
    assert_eq!(meta["reason"], "peer-lost", "{text}");
    assert!(text.contains("rank 1 (pid"), "{text}");
    let o = inspect(&ckpt.join("full_model.ckpt"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A rank that stops answering without dying (SIGSTOP): rank 0 gives up after
/// WICK_PEER_TIMEOUT, writes the last completed step with reason peer-lost and ends the job.
#[test]
fn an_unresponsive_rank_is_declared_lost_after_the_timeout() {
    let _job = one_job();
    let d = Dir::new();
    let ckpt = d.join("ckpt");
    let log = d.join("mpirun.log");
    let mut cmd = mpirun(2, &strs(&tiny(&ckpt, 400, &[])));
    cmd.env("WICK_PEER_TIMEOUT", "2");
    // -x must come before the program: rebuild the argument list with it.
    let mut c = Command::new("mpirun");
    c.envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .args(["-x", "WICK_PEER_TIMEOUT"])
        .args(cmd.get_args())
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_logged(c, &log);
    let rank1 = last_rank_once_training(&mut child, &log, "step 1/400 loss");
    unsafe { libc::kill(rank1, libc::SIGSTOP) };
    // Rank 0 notices within the timeout, saves and ends the job (MPI_Abort). Open MPI cannot
    // end a stopped process until it runs again: the test resumes it once rank 0 has saved.
    let saved = wait_for_line(
        &mut child,
        &log,
        "reason peer-lost",
        Duration::from_secs(30),
    );
    unsafe { libc::kill(rank1, libc::SIGCONT) };
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(saved, "{text}");
    let status = status.unwrap_or_else(|| panic!("a rank hangs: {text}"));
    assert!(!status.success(), "{text}");
    assert!(text.contains("no answer from the other ranks"), "{text}");
    let meta = ckpt_meta(&ckpt.join("full_model.ckpt"));
    assert_eq!(meta["reason"], "peer-lost", "{text}");
}

/// Ranks that would train different things are refused (exit 2), naming the difference: other
/// recipe arguments at start, other data at the first step.
#[test]
fn ranks_that_disagree_are_refused_by_name() {
    let _job = one_job();
    let d = Dir::new();
    let ckpt = d.join("ckpt").display().to_string();
    let bin = wick_bin();
    let o = Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(repo_root())
        .args([
            "--oversubscribe",
            "-n",
            "1",
            bin,
            "run",
            "scripts/tiny.lua",
            "--ckpt-dir",
        ])
        .arg(&ckpt)
        .args([
            "--",
            "--steps",
            "5",
            ":",
            "-n",
            "1",
            bin,
            "run",
            "scripts/tiny.lua",
            "--ckpt-dir",
        ])
        .arg(&ckpt)
        .args(["--", "--steps", "6"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("disagree on the recipe arguments"),
        "{}",
        stderr(&o)
    );

    d.corpus("a.jsonl", 40);
    let other: String = (0..40)
        .map(|i| format!("{{\"text\": \"another corpus, line {i}: the quick brown fox\"}}\n"))
        .collect();
    d.write("b.jsonl", &other);
    d.write(
        "r.lua",
        r#"
local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }
local session = wick.session{ model = model }
local file = wick.rank == 0 and "a.jsonl" or "b.jsonl"
local train = wick.data.loader{ source = wick.data.jsonl{ file }, batch = 2, seq_len = 16 }
for _ in session:steps(3) do session:step(train:next()) end
"#,
    );
    let o = Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(d.path())
        .args([
            "--oversubscribe",
            "-n",
            "2",
            bin,
            "run",
            "r.lua",
            "--ckpt-dir",
            "ckpt",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("read different batches"),
        "{}",
        stderr(&o)
    );
}

/// A final save that fails on rank 0 (here: a directory where the checkpoint file must go) is
/// exit 74 on every rank, each rank's code recorded by a wrapper; the state went to the rescue
/// directory.
#[test]
fn a_failed_save_on_rank_0_is_exit_74_on_every_rank() {
    let _job = one_job();
    let d = Dir::new();
    let codes = d.join("codes");
    std::fs::create_dir_all(&codes).unwrap();
    std::fs::create_dir_all(d.join("ckpt/full_model.ckpt")).unwrap();
    let run = format!(
        "{} run scripts/tiny.lua --ckpt-dir {} --rescue-dir {} -- --steps 3; echo $? > {}/$OMPI_COMM_WORLD_RANK",
        wick_bin(),
        d.join("ckpt").display(),
        d.join("rescue").display(),
        codes.display()
    );
    let o = Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(repo_root())
        .args(["--oversubscribe", "-n", "2", "sh", "-c", &run])
        .output()
        .unwrap();
    for rank in ["0", "1"] {
        let code = std::fs::read_to_string(codes.join(rank)).unwrap_or_default();
        assert_eq!(code.trim(), "74", "rank {rank}: {}", stderr(&o));
    }
    assert!(stderr(&o).contains("is safe there"), "{}", stderr(&o));
}

/// `loader:next()` hands each rank its share of the global batch (its `size` is the share),
/// the shares together are the batch one rank reads alone, and the tokens counted are the
/// global batch's.
#[test]
fn each_rank_gets_its_share_of_the_global_batch() {
    let _job = one_job();
    let d = Dir::new();
    d.corpus("a.jsonl", 60);
    d.write(
        "r.lua",
        r#"
local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 16 }
local session = wick.session{ model = model }
local train = wick.data.loader{ source = wick.data.jsonl{ "a.jsonl" }, batch = 4, seq_len = 16 }
local out = assert(io.open(("rows-%d-of-%d.txt"):format(wick.rank, wick.world_size), "w"))
for _ in session:steps(3) do
  local b = train:next()
  for r = 1, b.size do out:write(b.size, ": ", table.concat(b:tokens(r), " "), "\n") end
  session:step(b)
end
out:close()
"#,
    );
    let bin = wick_bin();
    for (n, ckpt) in [(1, "one"), (2, "two")] {
        let o = Command::new("mpirun")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .current_dir(d.path())
            .args(["--oversubscribe", "-n", &n.to_string(), bin, "run", "r.lua"])
            .args(["--ckpt-dir", ckpt])
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let meta = ckpt_meta(&d.join(ckpt).join("full_model.ckpt"));
        assert_eq!(meta["tokens_seen"], 3 * 4 * 16, "{meta}");
    }
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(d.join(name))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let alone = lines("rows-0-of-1.txt");
    let (r0, r1) = (lines("rows-0-of-2.txt"), lines("rows-1-of-2.txt"));
    assert_eq!(alone.len(), 12);
    assert!(alone.iter().all(|l| l.starts_with("4: ")), "{alone:?}");
    assert!(
        r0.iter().chain(&r1).all(|l| l.starts_with("2: ")),
        "{r0:?} {r1:?}"
    );
    // Step by step: rank 0 has the first two rows of the batch, rank 1 the last two.
    for step in 0..3 {
        let rows = |v: &[String], a: usize, b: usize| -> Vec<String> {
            v[a..b].iter().map(|l| l[3..].to_string()).collect()
        };
        let mut together = rows(&r0, 2 * step, 2 * step + 2);
        together.extend(rows(&r1, 2 * step, 2 * step + 2));
        assert_eq!(
            together,
            rows(&alone, 4 * step, 4 * step + 4),
            "step {}",
            step + 1
        );
    }
}

/// Whether a SLURM cluster answers here (`sinfo` lists an idle or mixed node).
fn slurm_answers() -> bool {
    Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|s| s.starts_with("idle") || s.starts_with("mix"))
        })
        .unwrap_or(false)
}

/// `srun -n N -J NAME wick ARGS`, one compute thread per rank (srun passes the environment).
fn srun(n: usize, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new("srun");
    c.env("RAYON_NUM_THREADS", "1")
        .args(["-n", &n.to_string(), "-J", name, "--overcommit"])
        .arg(wick_bin())
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null());
    c
}

/// Under SLURM: `srun -n 2` trains exactly what `mpirun -n 2` trains; a job command with
/// `--resume` starts fresh when there is no checkpoint yet; `scancel` (what a time limit or a
/// preemption does: SIGTERM, then SIGKILL after KillWait) stops both ranks at one step with a
/// checkpoint, and the same command continues it to the straight run's bytes. Needs a SLURM
/// cluster that answers (`sinfo`); where there is none it says so and checks nothing.
#[test]
fn srun_trains_like_mpirun_and_a_cancelled_job_continues_exactly() {
    if !slurm_answers() {
        eprintln!("skipped: no SLURM cluster answers here (sinfo)");
        return;
    }
    let _job = one_job();
    let d = Dir::new();
    let straight = d.join("mpirun");
    let o = mpirun(2, &strs(&tiny(&straight, 60, &[])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let same_as_straight = |dir: &std::path::Path| {
        assert_same_tensors(&straight, dir, &[""], "from the mpirun run");
    };

    let fresh = d.join("srun");
    let name = format!("wick-test-{}", std::process::id());
    let o = srun(2, &name, &strs(&tiny(&fresh, 60, &["--resume"])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("no checkpoint at").count(),
        1,
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).matches("saved ").count(), 1, "{}", stderr(&o));
    same_as_straight(&fresh);

    let job = d.join("job");
    let log = d.join("srun.log");
    let name = format!("wick-test-cancel-{}", std::process::id());
    let mut cmd = srun(2, &name, &strs(&tiny(&job, 60, &["--resume"])));
    cmd.stdout(Stdio::null());
    let mut child = spawn_logged(cmd, &log);
    assert!(
        wait_for_line(&mut child, &log, "step 1/60 loss", Duration::from_secs(120)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let ids = Command::new("squeue")
        .args(["-h", "-n", &name, "-o", "%i"])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&ids.stdout).trim().to_string();
    assert!(!id.is_empty(), "no job named {name} in squeue");
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{text}");
    let meta = ckpt_meta(&job.join("full_model.ckpt"));
    assert_eq!(meta["reason"], "interrupted", "{text}");
    assert!((1..60).contains(&meta["step"].as_u64().unwrap()), "{text}");
    assert_eq!(text.matches("stopped by SIGTERM").count(), 1, "{text}");

    let o = srun(2, &name, &strs(&tiny(&job, 60, &["--resume"])))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    same_as_straight(&job);
}

/// The same exactness with tied embeddings (the head's gradient and the embedding rows share
/// one tensor) and an odd number of sequences per rank (batch 6 = 2 × 3), in bf16.
#[test]
fn two_ranks_train_what_one_rank_trains_tied_and_in_bf16() {
    let _job = one_job();
    let d = Dir::new();
    let recipe = d.write(
        "tied.lua",
        r#"local model = wick.model{ dim = 64, n_layers = 2, n_heads = 4, seq_len = 64, tie_embeddings = true }
local session = wick.session{ model = model, optim = wick.optim.adamw{ lr = 3e-3, weight_decay = 0.1, clip = 1.0 } }
local train = wick.data.loader{ source = wick.data.jsonl{ "data/sample/train", shuffle = true }, batch = 6, seq_len = 64 }
for step in session:steps(12) do session:step(train:next()) end
"#,
    );
    let args = |dir: &std::path::Path| -> Vec<String> {
        vec![
            "run".into(),
            recipe.display().to_string(),
            "--dtype".into(),
            "bf16".into(),
            "--ckpt-dir".into(),
            dir.display().to_string(),
        ]
    };
    let (one, two) = (d.join("one"), d.join("two"));
    let o = Command::new(wick_bin())
        .current_dir(repo_root())
        .args(args(&one))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = mpirun(2, &strs(&args(&two))).output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let a = ckpt_tensors(&one.join("full_model.ckpt"));
    assert!(
        a.contains_key("model.tok_embeddings.weight") && !a.contains_key("model.output.weight")
    );
    assert_same_tensors(
        &one,
        &two,
        &["model.", "optim."],
        "between 1 rank and 2 ranks",
    );
}
