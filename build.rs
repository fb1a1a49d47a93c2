//! Only the CUDA build needs this: scripts/build-cuda.sh points candle-kernels' `-lcudart`
//! at a linker-script shim for the static CUDA runtime, so the binary has no load-time
//! dependency on CUDA libraries and starts on machines without them.
fn main() {
    println!("cargo:rerun-if-env-changed=CUDART_SHIM_DIR");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Some(dir) = std::env::var_os("CUDART_SHIM_DIR") {
            println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
        }
    }
}
