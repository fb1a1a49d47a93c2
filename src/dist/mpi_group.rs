//! The group over MPI (rsmpi): world rank and size, and the few collectives a step needs —
//! all non-blocking and polled, so a rank waiting on a lost peer notices (timeout) and a
//! signal that arrives meanwhile is seen at once.

use super::{Group, Lost};
use mpi::collective::SystemOperation;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn init() -> Result<Group, String> {
    let universe = mpi::initialize().ok_or("MPI was already initialized in this process")?;
    let world = universe.world();
    let group = Group {
        rank: world.rank() as usize,
        size: world.size() as usize,
    };
    *locked(&UNIVERSE) = Some(universe);
    // Where every rank runs, so that a rank left waiting after a stop can tell a peer that
    // is gone (killed) from one that is only slow.
    let me = [machine_id(), std::process::id() as u64];
    let all = all_gather(&me).map_err(|l| format!("MPI start-up: {}", l.message))?;
    let _ = PEERS.set(all.chunks(2).map(|p| (p[0], p[1])).collect());
    Ok(group)
}

/// (machine, pid) of every rank, in rank order.
static PEERS: std::sync::OnceLock<Vec<(u64, u64)>> = std::sync::OnceLock::new();

/// A digest of this machine's host name.
fn machine_id() -> u64 {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most name.len() bytes into the buffer.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr() as *mut libc::c_char, name.len()) } == 0;
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    if ok {
        xxhash_rust::xxh3::xxh3_64(&name[..len])
    } else {
        0
    }
}

/// The first peer on this machine whose process no longer exists: (rank, pid). Peers on
/// other machines cannot be checked this way.
fn gone_local_peer() -> Option<(usize, u64)> {
    let peers = PEERS.get()?;
    let here = machine_id();
    let me = super::group().rank;
    peers
        .iter()
        .enumerate()
        .find_map(|(rank, &(machine, pid))| {
            let local = rank != me && machine == here && here != 0;
            // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
            let gone = local
                && unsafe { libc::kill(pid as libc::pid_t, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            gone.then_some((rank, pid))
        })
}

pub fn finish() {
    let universe = locked(&UNIVERSE).take();
    if super::broken() {
        // MPI_Finalize would wait for the peers this rank gave up on; the launcher ends them.
        std::mem::forget(universe);
    } else {
        // Dropping the universe calls MPI_Finalize (a launcher reports ranks that exit
        // without it).
        drop(universe);
    }
}

pub fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

// Buffers lent to a request. A request abandoned because a peer was lost may still be written
// by MPI later, so its buffers are never freed or reused: the process is about to end.
static F32_SEND: Mutex<Vec<f32>> = Mutex::new(Vec::new());
static F32_RECV: Mutex<Vec<f32>> = Mutex::new(Vec::new());
static F64_SEND: Mutex<Vec<f64>> = Mutex::new(Vec::new());
static F64_RECV: Mutex<Vec<f64>> = Mutex::new(Vec::new());
static U64_SEND: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static U64_RECV: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// The first `len` elements of a static buffer, for a request.
///
/// # Safety
/// The caller holds the buffer's lock until the request completed, or never releases it
/// (abandoned: see above), so nothing else reads or writes the slice meanwhile.
unsafe fn lend<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &'static mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    std::slice::from_raw_parts_mut(v.as_mut_ptr(), len)
}

/// Sum `grads` and `loss` over the ranks, then divide by the number of ranks.
pub fn average(grads: &mut [f32], loss: &mut f64) -> Result<(), Lost> {
    let world = SimpleCommunicator::world();
    let n = world.size() as f64;
    let (mut fs, mut fr) = (locked(&F32_SEND), locked(&F32_RECV));
    let (mut ds, mut dr) = (locked(&F64_SEND), locked(&F64_RECV));
    // SAFETY: the guards live until both requests completed, or the process ends (`wait`).
    let (send, recv, lsend, lrecv) = unsafe {
        (
            lend(&mut fs, grads.len()),
            lend(&mut fr, grads.len()),
            lend(&mut ds, 1),
            lend(&mut dr, 1),
        )
    };
    send.copy_from_slice(grads);
    lsend[0] = *loss;
    let recv_ptr = recv.as_ptr();
    let lrecv_ptr = lrecv.as_ptr();
    let req = world.immediate_all_reduce_into(StaticScope, &*send, recv, SystemOperation::sum());
    wait(req, "averaging the gradients")?;
    let req = world.immediate_all_reduce_into(StaticScope, &*lsend, lrecv, SystemOperation::sum());
    wait(req, "averaging the loss")?;
    // SAFETY: both requests completed; the buffers are ours again (still locked).
    let (summed, loss_sum) = unsafe {
        (
            std::slice::from_raw_parts(recv_ptr, grads.len()),
            *lrecv_ptr,
        )
    };
    let inv = (1.0 / n) as f32;
    for (g, s) in grads.iter_mut().zip(summed) {
        *g = s * inv;
    }
    *loss = loss_sum / n;
    Ok(())
}

/// Every rank's `values`, in rank order.
pub fn all_gather(values: &[u64]) -> Result<Vec<u64>, Lost> {
    let world = SimpleCommunicator::world();
    let total = values.len() * world.size() as usize;
    let (mut s, mut r) = (locked(&U64_SEND), locked(&U64_RECV));
    // SAFETY: as in `average`.
    let (send, recv) = unsafe { (lend(&mut s, values.len()), lend(&mut r, total)) };
    send.copy_from_slice(values);
    let recv_ptr = recv.as_ptr();
    let req = world.immediate_all_gather_into(StaticScope, &*send, recv);
    wait(req, "agreeing on the step")?;
    // SAFETY: the request completed.
    Ok(unsafe { std::slice::from_raw_parts(recv_ptr, total) }.to_vec())
}

/// Poll a request until it completes. It is abandoned (and the group marked broken) when
/// the peers do not answer within the peer timeout, or within the stop grace once a stop
/// signal arrived.
fn wait<D: ?Sized>(mut req: Request<'static, D, StaticScope>, what: &str) -> Result<(), Lost> {
    let mut patience = super::Patience::new();
    let mut polls = 0u32;
    loop {
        match req.test() {
            Ok(_) => return Ok(()),
            Err(r) => req = r,
        }
        if let Some(by_signal) = patience.spent() {
            std::mem::forget(req);
            super::mark_broken();
            if let Some((rank, pid)) = gone_local_peer() {
                // The stop came with (or because of) a dead peer: mpirun signals the others
                // when one rank dies.
                let message = format!("rank {rank} (pid {pid}, on this machine) is gone while {what}: it was killed or crashed");
                return Err(Lost {
                    message,
                    by_signal: false,
                });
            }
            let message = if by_signal {
                format!("stopped while {what}: the other ranks did not reach this step within {:.1} s of the stop", patience.grace.as_secs_f64())
            } else {
                format!(
                    "no answer from the other ranks for {:.0} s while {what}: a rank was lost (killed, crashed, or its machine is gone); WICK_PEER_TIMEOUT sets this wait",
                    patience.timeout.as_secs_f64()
                )
            };
            return Err(Lost { message, by_signal });
        }
        // Answers usually come within microseconds to a step's length: yield first, then
        // poll every 200 µs.
        polls = polls.saturating_add(1);
        if polls < 20_000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
