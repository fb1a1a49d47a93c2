//! GPU gradients averaged by NCCL (feature `cuda`). With `--device cuda` in a group of more
//! than one rank, the flat gradient buffer stays on the GPU and is all-reduced in place
//! (`ncclAvg`) on candle's stream, in the gradients' own dtype (bf16 or f32, as the recipe's
//! `--dtype` made them), instead of travelling through host memory and MPI. Rank 0 makes the
//! communicator's id and hands it out through the MPI group (as llm.c does); MPI still carries
//! the loss and the step-boundary agreement.
//!
//! NCCL is loaded at run time, like the other CUDA libraries: a missing library is an error
//! that says what to install. `WICK_NCCL=0` keeps GPU gradients on the MPI path; `WICK_NCCL=1`
//! takes this path even alone (a group of one: the GPU check's self-test of it).
//!
//! A peer that dies mid-reduce would leave the stream waiting for ever: the reduce is polled
//! like the MPI collectives (`WICK_PEER_TIMEOUT`, `WICK_STOP_GRACE` after a stop signal) and
//! the communicator aborted when it does not finish, which releases the stream.

use super::{all_gather, group, mark_broken, GpuReduceError, Lost, Patience};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    // The communicator of this rank; made at the first reduce. NCCL's handle is a raw pointer
    // (not Send): the training step that uses it runs on one thread.
    static COMM: RefCell<Option<Comm>> = const { RefCell::new(None) };
}

/// Whether gradients on `device` are averaged through NCCL.
pub fn wanted(device: &Device) -> bool {
    if !device.is_cuda() {
        return false;
    }
    match std::env::var("WICK_NCCL").as_deref().map(str::trim) {
        Ok("0") => false,
        Ok("1") => true,
        _ => group().size > 1,
    }
}

/// Average `flat` (one contiguous GPU tensor, f32 or bf16) over the ranks, in place.
pub fn average(flat: &Tensor) -> Result<(), GpuReduceError> {
    let failed = GpuReduceError::Failed;
    let stream = flat
        .device()
        .as_cuda_device()
        .map_err(|e| failed(format!("NCCL averages GPU tensors only: {e}")))?
        .cuda_stream();
    COMM.with(|cell| {
        let mut comm = cell.borrow_mut();
        if comm.is_none() {
            *comm = Some(connect(stream.clone())?);
        }
        let Some(c) = comm.as_ref() else {
            return Err(failed("the NCCL communicator is missing".into()));
        };
        flat.inplace_op1(&AllReduceAvg(c))
            .map_err(|e| failed(format!("NCCL all-reduce of the gradients failed: {e}")))?;
        let done = stream
            .record_event(None)
            .map_err(|e| failed(format!("CUDA event after the NCCL all-reduce: {e:?}")))?;
        if let Err(lost) = wait(|| done.try_is_complete().unwrap_or(true)) {
            // Aborting the communicator releases the stream the reduce holds.
            drop(comm.take());
            return Err(GpuReduceError::Lost(lost));
        }
        Ok(())
    })
}

/// Join the group's NCCL communicator: rank 0's id, handed out through the MPI group.
fn connect(
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<Comm, GpuReduceError> {
    let failed = GpuReduceError::Failed;
    check_library().map_err(failed)?;
    let g = group();
    let mine = if g.rank == 0 {
        Id::new().map_err(|e| failed(format!("NCCL could not make a communicator id: {e:?}")))?
    } else {
        Id::uninit([0; 128])
    };
    let words: Vec<u64> = mine
        .internal()
        .chunks(8)
        .map(|b| u64::from_le_bytes(std::array::from_fn(|i| b[i] as u8)))
        .collect();
    let all = all_gather(&words).map_err(GpuReduceError::Lost)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (i, w) in all[..16].iter().enumerate() {
        for (j, b) in w.to_le_bytes().iter().enumerate() {
            internal[i * 8 + j] = *b as std::ffi::c_char;
        }
    }
    Comm::from_rank(stream, g.rank, g.size, Id::uninit(internal))
        .map_err(|e| failed(format!("NCCL could not join the {} ranks: {e:?}", g.size)))
}

/// cudarc loads NCCL by the names `libnccl.so` (and `libnccl.so.<CUDA major>`) and panics when
/// none loads: look first, and say what to do. NCCL's own packages often install only
/// `libnccl.so.2` (Debian's libnccl2, PyTorch's nvidia-nccl wheel).
pub fn check_library() -> Result<(), String> {
    let loads = |name: &str| {
        let Ok(c) = std::ffi::CString::new(name) else {
            return false;
        };
        // SAFETY: a NUL-terminated name; the handle is closed again (the library stays loaded
        // for cudarc only if it opens it itself).
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY);
            if h.is_null() {
                return false;
            }
            libc::dlclose(h);
            true
        }
    };
    if ["libnccl.so", "libnccl.so.13", "libnccl.so.12"]
        .iter()
        .any(|n| loads(n))
    {
        return Ok(());
    }
    Err(if loads("libnccl.so.2") {
        "NCCL is installed as libnccl.so.2 only, and it is loaded by the name libnccl.so: make a link named libnccl.so to it in a directory on LD_LIBRARY_PATH (or install the NCCL development package), or set WICK_NCCL=0 to average GPU gradients through MPI".to_string()
    } else {
        "NCCL (libnccl.so) was not found on LD_LIBRARY_PATH: install NCCL (libnccl2 + libnccl-dev, or the nvidia-nccl wheel), or set WICK_NCCL=0 to average GPU gradients through MPI".to_string()
    })
}

/// Poll `done` until it says the reduce finished; give up after the peer timeout, or the stop
/// grace once a stop signal arrived (the MPI collectives' rule).
fn wait(done: impl Fn() -> bool) -> Result<(), Lost> {
    let mut patience = Patience::new();
    while !done() {
        if let Some(by_signal) = patience.spent() {
            mark_broken();
            let message = if by_signal {
                format!("stopped while averaging the gradients (NCCL): the other ranks did not get there within {:.1} s of the stop", patience.grace.as_secs_f64())
            } else {
                format!("the NCCL all-reduce of the gradients did not finish in {:.0} s: a rank was lost (killed, crashed, or its machine is gone); WICK_PEER_TIMEOUT sets this wait", patience.timeout.as_secs_f64())
            };
            return Err(Lost { message, by_signal });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok(())
}

/// In-place `ncclAllReduce(.., ncclAvg)` over a whole contiguous storage.
struct AllReduceAvg<'a>(&'a Comm);

impl InplaceOp1 for AllReduceAvg<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-avg"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL averages GPU tensors only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let whole = |len: usize| l.contiguous_offsets() == Some((0, len));
        let err = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        match s.dtype() {
            DType::F32 => {
                let slice = s.as_cuda_slice_mut::<f32>()?;
                if !whole(slice.len()) {
                    candle_core::bail!("NCCL all-reduce: expected a whole contiguous buffer");
                }
                self.0
                    .all_reduce_in_place(slice, &ReduceOp::Avg)
                    .map_err(err)?;
            }
            DType::BF16 => {
                let slice = s.as_cuda_slice_mut::<half::bf16>()?;
                if !whole(slice.len()) {
                    candle_core::bail!("NCCL all-reduce: expected a whole contiguous buffer");
                }
                self.0
                    .all_reduce_in_place(slice, &ReduceOp::Avg)
                    .map_err(err)?;
            }
            other => candle_core::bail!("NCCL all-reduce: gradients in {other:?} are not averaged"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of one through NCCL: the average is the buffer itself, in f32 and in bf16 (the
    /// GPU check's self-test of this path; `wick-tests gpu_` runs it on the GPU machine).
    #[test]
    fn gpu_nccl_average_in_a_group_of_one_is_the_identity() {
        let Some(gpu) = crate::device::test_gpu() else {
            return;
        };
        let v: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = Tensor::from_vec(v.clone(), v.len(), &gpu).unwrap();
        average(&t).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), v);
        let b = t.to_dtype(DType::BF16).unwrap();
        let before = b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        average(&b).unwrap();
        assert_eq!(
            b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            before
        );
    }
}
