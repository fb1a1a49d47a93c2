//! Choosing where training runs: `--device cpu|cuda[:N]` and `--dtype f32|bf16`.
//!
//! A CUDA build loads the CUDA libraries only when a GPU is asked for (see
//! scripts/build-cuda.sh), and cudarc *panics* when one is missing. Opening the device here,
//! once, with that panic caught, turns every missing piece — no CUDA in this build, no driver,
//! no cuBLAS, no GPU — into an error that says what to install instead of a crash.

use candle_core::{DType, Device};

/// The compute device and dtype of a run, as the user named them.
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    /// Parameters, gradients and AdamW moments always stay f32; this is the dtype of the
    /// matrix products and activations (bf16 = mixed precision with f32 master weights).
    pub dtype: DType,
    /// "cpu", "cuda:0", ...: recorded in checkpoints and metrics.
    pub device_name: String,
}

impl Compute {
    /// "f32" / "bf16", as `--dtype` spells it.
    pub fn dtype_name(&self) -> &'static str {
        dtype_name(self.dtype)
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// Parse `--device` and `--dtype` and open the device.
pub fn open(device: &str, dtype: &str) -> Result<Compute, String> {
    let dtype = match dtype {
        "f32" | "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        other => {
            return Err(format!(
            "unknown --dtype '{other}'; use f32, or bf16 (mixed precision with f32 master weights)"
        ))
        }
    };
    let (dev, name) = match device {
        "cpu" => (Device::Cpu, "cpu".to_string()),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = match n.strip_prefix("cuda:") {
                // One rank per GPU: each rank of a data-parallel launch takes the GPU of its
                // local rank (0 alone).
                None => crate::dist::local_rank(),
                Some(k) => k.parse::<usize>().map_err(|_| {
                    format!("--device {n}: the GPU index must be a number, as in cuda:0")
                })?,
            };
            (open_cuda(ordinal)?, format!("cuda:{ordinal}"))
        }
        other => {
            return Err(format!(
                "unknown --device '{other}'; use cpu, cuda or cuda:N"
            ))
        }
    };
    Ok(Compute {
        device: dev,
        dtype,
        device_name: name,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    Err(format!(
        "--device cuda:{ordinal}: this wick was built without CUDA support; build one with scripts/build-cuda.sh (cargo build --release --features cuda)"
    ))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    // cudarc panics when it cannot dlopen a library; silence the default hook for the
    // duration so the user sees one clear error, not a panic message and a backtrace.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    if matches!(opened, Ok(Ok(_))) {
        // An optimisation only: a driver without the pool API must not stop the run.
        let _ = std::panic::catch_unwind(|| keep_freed_gpu_memory(ordinal));
    }
    std::panic::set_hook(previous);
    match opened {
        Ok(Ok(dev)) => Ok(dev),
        Ok(Err(e)) => Err(format!(
            "--device cuda:{ordinal}: cannot open the GPU: {}; check `nvidia-smi` and the GPU index",
            first_line(&e.to_string())
        )),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            // cudarc: `Unable to dynamically load the "cublas" shared library - searched ...`
            let what = match msg.split('"').nth(1) {
                Some(lib) if msg.starts_with("Unable to dynamically load") => {
                    let file = match lib {
                        "cuda" => "libcuda.so.1, from the NVIDIA driver".to_string(),
                        "curand" => "libcurand.so.10".to_string(),
                        other => format!("lib{other}.so.13"),
                    };
                    format!("the \"{lib}\" library ({file}) was not found")
                }
                _ => first_line(&msg).to_string(),
            };
            Err(format!(
                "--device cuda:{ordinal}: cannot load CUDA: {what}. wick needs the NVIDIA driver (libcuda.so.1) and CUDA 13 copies of libcublas, libcublasLt and libcurand on LD_LIBRARY_PATH"
            ))
        }
    }
}

/// candle allocates every intermediate with cuMemAllocAsync from the device's default pool,
/// whose release threshold of 0 hands all freed memory back to the driver at each
/// synchronisation (a training step has two: the loss and the gradient norm), so the next
/// step allocates its activations from scratch. Keeping it pooled is what PyTorch's caching
/// allocator does. Best effort: on failure the pool keeps its default. (Added after the H200
/// run recorded in the notes; not yet measured on a GPU.)
#[cfg(feature = "cuda")]
fn keep_freed_gpu_memory(ordinal: usize) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: plain driver calls on the device candle has just initialised; the pointers
    // are to locals that outlive the calls.
    unsafe {
        let mut dev: sys::CUdevice = 0;
        if sys::cuDeviceGet(&mut dev, ordinal as i32) != sys::CUresult::CUDA_SUCCESS {
            return;
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) != sys::CUresult::CUDA_SUCCESS {
            return;
        }
        let mut threshold: u64 = u64::MAX;
        let _ = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        );
    }
}

/// The first GPU, for the tests that compare CUDA kernels with their CPU versions; None, with
/// "gpu test skipped" on stderr (gpu-check.sh fails on it), where there is none.
#[cfg(all(test, feature = "cuda"))]
pub fn test_gpu() -> Option<Device> {
    match open("cuda:0", "f32") {
        Ok(c) => Some(c.device),
        Err(e) => {
            eprintln!("gpu test skipped: {e}");
            None
        }
    }
}

/// Whether wick's own CUDA kernels run (AdamW, the causal softmax): `WICK_GPU_KERNELS=1`.
/// Off by default until a GPU run has checked them against the tensor ops they replace
/// (`scripts/gpu-check.sh` runs both ways); CPU code paths do not ask.
pub fn gpu_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WICK_GPU_KERNELS").is_ok_and(|v| v == "1"))
}

/// The most GPU memory the run's tensors have held at once, in MiB: the high-water mark of
/// the device's default pool, which every candle allocation comes from (cuMemAllocAsync).
/// None on the CPU or when the driver does not say.
pub fn gpu_peak_memory_mb(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let dev = d.cuda_stream().context().cu_device();
        // SAFETY: plain driver calls on a device candle initialised; the pointers are to
        // locals that outlive the calls.
        unsafe {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            let mut high: u64 = 0;
            let got = sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut high as *mut u64 as *mut std::ffi::c_void,
            );
            return (got == sys::CUresult::CUDA_SUCCESS).then(|| high as f64 / (1 << 20) as f64);
        }
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(open("cpu", "f32").is_ok());
        assert_eq!(open("cpu", "bf16").unwrap().dtype_name(), "bf16");
        let e = open("tpu", "f32").unwrap_err();
        assert!(e.contains("unknown --device 'tpu'"), "{e}");
        let e = open("cpu", "f8").unwrap_err();
        assert!(e.contains("unknown --dtype 'f8'"), "{e}");
        let e = open("cuda:x", "f32").unwrap_err();
        assert!(e.contains("GPU index must be a number"), "{e}");
    }
}
