//! Only the CUDA build needs this: scripts/build-cuda.sh points candle-kernels' `-lcudart`
//! at a linker-script shim for the static CUDA runtime, so the binary has no load-time
//! dependency on CUDA libraries and starts on machines without them.
//!
//! It also compiles wick's own CUDA kernels (`src/**/*.cu`) to PTX with the pinned nvcc, for
//! the driver to compile when they are first loaded.
fn main() {
    println!("cargo:rerun-if-env-changed=CUDART_SHIM_DIR");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Some(dir) = std::env::var_os("CUDART_SHIM_DIR") {
            println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
        }
        for kernel in ["src/train/adamw.cu", "src/model/causal_softmax.cu"] {
            compile_ptx(kernel);
        }
    }
}

/// `nvcc --ptx` one kernel file into OUT_DIR/<stem>.ptx (virtual architecture compute_XX of
/// CUDA_COMPUTE_CAP, 90 by default: H100/H200).
fn compile_ptx(source: &str) {
    println!("cargo:rerun-if-changed={source}");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let stem = std::path::Path::new(source)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a kernel file name");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| std::path::Path::new(&root).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(format!("{out_dir}/{stem}.ptx"))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} for {source}: {e} (build with scripts/build-cuda.sh)",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {source}");
}
