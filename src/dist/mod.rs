//! Data-parallel training: this process is one rank of a group started by an MPI launcher
//! (`mpirun -n N wick run …`, `srun`), or a group of one.
//!
//! Every rank holds the whole model and reads the whole global batch (so every rank's data
//! cursor is the one global cursor, and rank 0's checkpoint holds it); `session:step` trains
//! this rank's rows of it, and the gradients are averaged over the ranks as one flat buffer
//! before clipping and AdamW, so every rank applies the same update and the weights stay
//! identical. Rank 0 alone prints progress, writes metrics and checkpoints.
//!
//! Stopping is agreed, never taken alone: a signal only marks this rank; at each step boundary
//! the ranks exchange their marks (and digests of the model and the batch, so ranks training
//! different things are refused) and all stop at the same boundary. A rank that stops
//! answering is noticed by the others within `WICK_PEER_TIMEOUT` seconds (default 60): rank 0
//! saves the last completed step (reason `peer-lost`) and ends the job. A rank waiting on its
//! peers after a stop signal gives them `WICK_STOP_GRACE` (0.3 s) and then stops alone, so
//! rank 0 saves before a launcher that is ending the job kills it.
//!
//! Without the `mpi` cargo feature, or without a launcher, the group is this process alone and
//! every collective is the identity.

#[cfg(feature = "mpi")]
mod mpi_group;
#[cfg(feature = "cuda")]
mod nccl;

use std::sync::OnceLock;
use std::time::Duration;

/// This process's place in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub rank: usize,
    pub size: usize,
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// The group this process belongs to (a group of one until `init` found a launcher).
pub fn group() -> Group {
    GROUP.get().copied().unwrap_or(Group { rank: 0, size: 1 })
}

/// Whether this rank speaks for the group: prints, writes metrics and checkpoints.
pub fn is_leader() -> bool {
    group().rank == 0
}

/// A collective this rank gave up on: the peers did not answer within the peer timeout
/// (`by_signal` false), or within the stop grace after a stop signal (true).
#[derive(Debug, Clone)]
pub struct Lost {
    pub message: String,
    pub by_signal: bool,
}

/// The world size a launcher announced in the environment, and the variable that said so.
pub fn launched_size() -> Option<(usize, &'static str)> {
    let size = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    for var in [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MV2_COMM_WORLD_SIZE",
    ] {
        if let Some(n) = size(var) {
            return Some((n, var));
        }
    }
    match (size("SLURM_NTASKS"), size("SLURM_PROCID")) {
        (Some(n), Some(_)) if std::env::var_os("SLURM_STEP_ID").is_some() => {
            Some((n, "SLURM_NTASKS"))
        }
        _ => None,
    }
}

/// Ranks started on this machine, as the launcher says (for the compute thread count).
pub fn local_size() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
    .filter(|&n| n > 0)
    .unwrap_or(1)
}

/// This process's rank among the ranks a launcher started on this machine (0 alone): Open MPI,
/// MPICH/Hydra and SLURM say it in the environment.
pub fn local_rank() -> usize {
    local_rank_from(|v| std::env::var(v).ok())
}

fn local_rank_from(env: impl Fn(&str) -> Option<String>) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| env(v)?.trim().parse::<usize>().ok())
    .unwrap_or(0)
}

/// Join the launcher's group, if one started this process. Without MPI support a launch of
/// several copies is refused: they would be independent runs overwriting one checkpoint.
pub fn init() -> Result<Group, String> {
    if let Some(g) = GROUP.get() {
        return Ok(*g);
    }
    let group = match launched_size() {
        Some((n, var)) if n > 1 => join(n, var)?,
        _ => Group { rank: 0, size: 1 },
    };
    Ok(*GROUP.get_or_init(|| group))
}

#[cfg(feature = "mpi")]
fn join(_n: usize, _var: &str) -> Result<Group, String> {
    mpi_group::init()
}

#[cfg(not(feature = "mpi"))]
fn join(n: usize, var: &str) -> Result<Group, String> {
    Err(if var == "SLURM_NTASKS" {
        format!(
            "this process is one of {n} tasks of a SLURM step (SLURM_NTASKS={n}), but this wick was built without data-parallel training; build it with --features mpi (see the README), or run it with srun -n 1"
        )
    } else {
        format!(
            "this process is one of {n} started by an MPI launcher ({var}={n}), but this wick was built without data-parallel training (the copies would be independent runs overwriting one checkpoint); build it with --features mpi (see the README), or run one process"
        )
    })
}

/// Leave the group (MPI_Finalize) before the process exits.
pub fn finish() {
    #[cfg(feature = "mpi")]
    mpi_group::finish();
}

/// End every rank now with `code` (after rank 0 saved what it could).
pub fn abort(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    if group().size > 1 {
        mpi_group::abort(code);
    }
    std::process::exit(code)
}

/// Set once a collective was abandoned: the group can no longer be trusted to answer, so the
/// ending makes no more collectives.
static BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn broken() -> bool {
    BROKEN.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]
fn mark_broken() {
    BROKEN.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// How long a rank waiting on its peers lets them answer after a stop signal arrived. All
/// ranks usually get the signal (a launcher forwards it) and reach the step boundary within a
/// step; if not, this rank stops alone — the launcher then ends the others — because a
/// launcher that is ending the job (Ctrl+C on mpirun, a lost rank) kills every rank about a
/// second after its SIGTERM, and rank 0 must have saved by then.
pub fn stop_grace() -> Duration {
    let secs = std::env::var("WICK_STOP_GRACE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s >= 0.0)
        .unwrap_or(0.3);
    Duration::from_secs_f64(secs)
}

/// A wait on the peers: over after the peer timeout, or after the stop grace once a stop
/// signal arrived (the rule of every collective: MPI's and NCCL's).
#[cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]
struct Patience {
    start: std::time::Instant,
    signalled: Option<std::time::Instant>,
    timeout: Duration,
    grace: Duration,
}

#[cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]
impl Patience {
    fn new() -> Patience {
        Patience {
            start: std::time::Instant::now(),
            signalled: None,
            timeout: peer_timeout(),
            grace: stop_grace(),
        }
    }

    /// None while the wait goes on; once it is over, whether a stop signal ended it.
    fn spent(&mut self) -> Option<bool> {
        if self.signalled.is_none() && crate::host::signals::stop_requested() {
            self.signalled = Some(std::time::Instant::now());
        }
        let by_signal = self.signalled.is_some_and(|t| t.elapsed() > self.grace);
        (by_signal || self.start.elapsed() > self.timeout).then_some(by_signal)
    }
}

/// How long a rank waits on its peers before it calls them lost.
pub fn peer_timeout() -> Duration {
    let secs = std::env::var("WICK_PEER_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs)
}

/// What the ranks agreed at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    Go,
    /// Some rank was asked to stop (by this signal): every rank stops here.
    Stop(i32),
}

/// Why a step-boundary exchange failed.
#[derive(Debug, Clone)]
pub enum Disagreement {
    /// A peer did not answer.
    Lost(Lost),
    /// The ranks are not training the same model on the same data: the message says how.
    Differ(String),
}

/// The step-boundary exchange: each rank's stop mark (0, or the signal that asked it to stop),
/// a digest of its model's shape and of the batch it is about to train on. Ranks whose models
/// or batches differ are refused, naming the first difference.
pub fn agree(stop: i32, model_digest: u64, batch_digest: u64) -> Result<Agreement, Disagreement> {
    let marks = all_gather(&[stop as i64 as u64, model_digest, batch_digest])
        .map_err(Disagreement::Lost)?;
    let me = group().rank;
    for (r, m) in marks.chunks(3).enumerate() {
        if m[1] != model_digest {
            return Err(Disagreement::Differ(format!(
                "rank {r} and rank {me} built different models (model config or parameters differ): every rank must run the same recipe with the same arguments"
            )));
        }
        if m[2] != batch_digest {
            return Err(Disagreement::Differ(format!(
                "rank {r} and rank {me} read different batches for the same step: their data files differ (every rank must see the same files with the same contents)"
            )));
        }
    }
    Ok(
        match marks
            .chunks(3)
            .map(|m| m[0] as i64 as i32)
            .find(|&s| s != 0)
        {
            Some(sig) => Agreement::Stop(sig),
            None => Agreement::Go,
        },
    )
}

/// Refuse to start unless every rank has the same value for each named item (recipe, seed,
/// arguments, ...): the message names the first difference.
pub fn same_everywhere(items: &[(&str, u64)]) -> Result<(), String> {
    if group().size == 1 {
        return Ok(());
    }
    let mine: Vec<u64> = items.iter().map(|(_, d)| *d).collect();
    let all = all_gather(&mine).map_err(|l| l.message)?;
    for (r, theirs) in all.chunks(items.len()).enumerate() {
        for ((name, d), t) in items.iter().zip(theirs) {
            if d != t {
                return Err(format!(
                    "rank {r} and rank {} disagree on the {name}: every rank must run the same command on the same files",
                    group().rank
                ));
            }
        }
    }
    Ok(())
}

/// Average `grads` (one flat buffer) and `loss` over the ranks.
pub fn average(grads: &mut [f32], loss: &mut f64) -> Result<(), Lost> {
    #[cfg(feature = "mpi")]
    if group().size > 1 {
        return mpi_group::average(grads, loss);
    }
    let _ = (grads, loss);
    Ok(())
}

/// Whether gradients on `device` are averaged on the GPU through NCCL (several ranks on CUDA
/// devices, or `WICK_NCCL=1`) rather than through host memory and MPI.
pub fn reduces_on_gpu(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    return nccl::wanted(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// At start: whether the GPU path for gradients can run here (NCCL loads), so that a missing
/// library is a usage error before training rather than a failed step.
pub fn check_gpu_reduce(device: &candle_core::Device) -> Result<(), String> {
    if !reduces_on_gpu(device) {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    return nccl::check_library();
    #[cfg(not(feature = "cuda"))]
    Ok(())
}

/// Why averaging on the GPU failed: a peer did not answer, or NCCL itself failed.
#[derive(Debug)]
pub enum GpuReduceError {
    Lost(Lost),
    Failed(String),
}

/// Average `flat` (one GPU tensor holding every gradient) and `loss` over the ranks: the
/// gradients through NCCL on the GPU, the loss through MPI.
pub fn average_on_gpu(flat: &candle_core::Tensor, loss: &mut f64) -> Result<(), GpuReduceError> {
    #[cfg(feature = "cuda")]
    nccl::average(flat)?;
    #[cfg(not(feature = "cuda"))]
    let _ = flat;
    average(&mut [], loss).map_err(GpuReduceError::Lost)
}

/// Rank 0's value of `code`, on every rank (the exit code after rank 0's final save).
pub fn leader_code(code: i32) -> Result<i32, Lost> {
    let all = all_gather(&[code as i64 as u64])?;
    Ok(all.first().map(|&c| c as i64 as i32).unwrap_or(code))
}

/// Every rank's `values`, concatenated in rank order.
fn all_gather(values: &[u64]) -> Result<Vec<u64>, Lost> {
    #[cfg(feature = "mpi")]
    if group().size > 1 {
        return mpi_group::all_gather(values);
    }
    Ok(values.to_vec())
}

/// A digest of a batch's tokens (xxh3 of their bytes).
pub fn digest_tokens(tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// A digest of any text (recipe source, arguments).
pub fn digest(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// This rank's rows of a global batch of `batch` rows: `rank·b/size .. (rank+1)·b/size`.
pub fn my_rows(batch: usize) -> Result<std::ops::Range<usize>, String> {
    let Group { rank, size } = group();
    if !batch.is_multiple_of(size) {
        return Err(format!(
            "a batch of {batch} rows cannot be split evenly over {size} ranks: use a batch that is a multiple of the number of ranks"
        ));
    }
    let per = batch / size;
    Ok(rank * per..(rank + 1) * per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_comes_from_the_launcher() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])), 0);
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])),
            3
        );
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", "2")])), 2);
        assert_eq!(
            local_rank_from(env(&[("MPI_LOCALRANKID", "x"), ("SLURM_LOCALID", "1")])),
            1
        );
    }

    #[test]
    fn a_group_of_one_is_the_identity() {
        assert_eq!(group(), Group { rank: 0, size: 1 });
        assert_eq!(agree(0, 1, 7).unwrap(), Agreement::Go);
        assert_eq!(agree(2, 1, 7).unwrap(), Agreement::Stop(2));
        let mut g = vec![1.0f32, 2.0];
        let mut loss = 3.0;
        average(&mut g, &mut loss).unwrap();
        assert_eq!((g, loss), (vec![1.0, 2.0], 3.0));
        assert_eq!(my_rows(8).unwrap(), 0..8);
        assert!(same_everywhere(&[("recipe", 1)]).is_ok());
    }
}
